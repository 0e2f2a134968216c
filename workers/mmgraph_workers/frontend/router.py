"""The router: each request through the graph's stages, every call with a deadline, every failure naming its stage.

Retries are explicit loops, each for one reason:
- a refused connection (the replica left before DNS caught up; nothing was sent) goes to the next replica;
- pd could not pull a request's embeddings (it did no work yet): encode again, send pd the request once more;
- e-p-d: decode could not start, or pull the KV, within pd's lease: prefill again, KV_ATTEMPTS times in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import Counter, Histogram

from mmgraph_contract.vocabulary import Topology
from mmgraph_contract.wire import ENCODE_PATH, GENERATE_PATH
from mmgraph_workers.frontend.openai_api import RequestError
from mmgraph_workers.frontend.stage_client import (
    RETRIES,
    UNANSWERED,
    Local,
    StageClient,
    StageFailure,
    _call_failed,
    _checked,
    _error_text,
    _within,
)
from mmgraph_workers.handoff import release
from mmgraph_workers.peers import NoReplica
from mmgraph_workers.protocol import (
    CannotDowngrade,
    EncodedItem,
    EncodeRequest,
    EncodeResponse,
    GenerateEvent,
    GenerateRequest,
    MediaItem,
    PlaceholderItem,
)

log = logging.getLogger("mmgraph.frontend")
STAGE_SECONDS = Histogram("mmgraph_stage_seconds", "Time spent in each stage call", ["stage"])
CACHE_HITS = Counter("mmgraph_embedding_cache_hits_total", "Media items the encoder served from its cache")
SPILLS = Counter(
    "mmgraph_encoder_route_spills_total",
    "Media items sent to another encoder than their key's owner, which was busier than the bound allows",
)
KV_REPREFILLS = Counter(
    "mmgraph_kv_lease_reprefills_total", "Prefills redone because decode could not start or pull within the KV lease"
)
# decode's first token must come this long before pd's lease ends: covers the frontend-to-decode hop (the deadline
# travels as seconds left, so clocks need not agree) with room to spare.
KV_DEADLINE_MARGIN_SECONDS = 1.0
# Prefills per request when decode cannot start, or pull the KV, within the lease: a late decode is usually a
# passing overload.
KV_ATTEMPTS = 3


@dataclass
class Media:
    """A request's media items, the encoder's answer for each and the replica that gave it (replaced when they
    are encoded again)."""

    items: list[MediaItem]
    encoded: list[EncodedItem] = field(default_factory=list)
    encoders: list[str] = field(default_factory=list)  # each item's replica's address
    asked: float = 0.0  # when the encoders were asked (time.monotonic()): their time-to-live began after that

    def aged(self) -> list[EncodedItem]:
        """The encoded items as pd is sent them: each descriptor's seconds to live less the time since the encoders
        were asked (pods share no clock: each hop takes off the time it held them)."""
        held, out = time.monotonic() - self.asked, []
        for item in self.encoded:
            if (left := item.embeddings.expires_in_seconds) is not None:  # None: an encoder of the previous release
                ref = item.embeddings.model_copy(update={"expires_in_seconds": max(1e-3, left - held)})
                item = item.model_copy(update={"embeddings": ref})
            out.append(item)
        return out


class Router(StageClient):
    def _acquire(self, stage: str, tried: set[str], unwanted: Collection[str] = ()) -> tuple[str, str]:
        try:
            return self.peers[stage].acquire(tried, unwanted)
        except NoReplica as err:
            raise StageFailure(stage, str(err).removeprefix(f"{stage}: "), 503) from None

    async def encode(self, request_id: str, media: Media, elsewhere: bool = False) -> None:
        """Encode `media`'s items, each on the encoder replica that owns its routing key (with
        --encoder-routing=least-busy: the least busy), one call per replica, the calls at once. `elsewhere`: pd
        could not pull the last embeddings, so each item goes to its key's next owner where there is one."""
        started, done = time.perf_counter(), list[tuple[str, list[int], list[EncodedItem]]]()
        media.asked = time.monotonic()
        last = media.encoders if elsewhere and media.encoders else [""] * len(media.items)
        try:
            await self._encode_each(request_id, media.items, range(len(media.items)), last, frozenset(), done)
        except BaseException:  # what the other replicas published for this request is nobody's now
            if done:
                self._release_later(done)
            raise
        STAGE_SECONDS.labels("encoder").observe(time.perf_counter() - started)
        placed = {
            i: (item, address) for address, indices, items in done for i, item in zip(indices, items, strict=True)
        }
        media.encoded = [placed[i][0] for i in range(len(media.items))]
        media.encoders = [placed[i][1] for i in range(len(media.items))]
        CACHE_HITS.inc(sum(item.cached for item in media.encoded))

    async def _encode_each(
        self,
        request_id: str,
        items: list[MediaItem],
        indices: Iterable[int],
        last: list[str],
        tried: frozenset[str],
        done: list[tuple[str, list[int], list[EncodedItem]]],
    ) -> None:
        """Each item of `indices` placed on a replica, one call per replica, all at once; every call has ended
        when this returns or raises the first failure, and `done` holds what succeeded."""
        groups = self._place(items, indices, last, tried)
        calls = [self._encode_call(request_id, items, address, group, last, tried, done) for address, group in groups]
        if errors := [e for e in await asyncio.gather(*calls, return_exceptions=True) if isinstance(e, BaseException)]:
            raise errors[0]

    def _place(
        self, items: list[MediaItem], indices: Iterable[int], last: list[str], tried: frozenset[str]
    ) -> list[tuple[str, list[int]]]:
        """(replica, its items) for one call each, counted busy until released. Never a replica that refused a
        connection, nor an item's `last` (its embeddings could not be pulled) while another is left. By content:
        each distinct key to its owner, as loaded before this request (a request's own items do not spill each
        other), spilling only from an owner with more calls in flight than one pass of its tower takes (a spilled
        hot item costs a pass on the next owner; on its owner it would have joined the pass, or hit); least busy:
        the whole request to one replica."""
        peer = self.peers["encoder"]

        def avoiding(previous: set[str]) -> frozenset[str]:
            return tried | previous if set(peer.addresses) - tried - previous else tried

        try:
            if self.routes.encoder_routing == "least-busy":
                indices = list(indices)
                address, _ = peer.acquire(avoiding({last[i] for i in indices} - {""}))
                return [(address, indices)]
            keys: dict[tuple[str, str], list[int]] = {}
            for i in indices:
                keys.setdefault((items[i].route, last[i]), []).append(i)
            groups: dict[str, list[int]] = {}
            for (route, previous), same in keys.items():
                address, spilled = peer.owner(route, avoiding({previous} - {""}), self.routes.encoder_batch_size)
                SPILLS.inc(spilled)
                groups.setdefault(address, []).extend(same)
        except NoReplica as err:
            raise StageFailure("encoder", str(err).removeprefix("encoder: "), 503) from None
        for address in groups:
            peer.take(address)
        return [(address, sorted(group)) for address, group in groups.items()]

    async def _encode_call(
        self,
        request_id: str,
        items: list[MediaItem],
        address: str,
        group: list[int],
        last: list[str],
        tried: frozenset[str],
        done: list[tuple[str, list[int], list[EncodedItem]]],
    ) -> None:
        peer = self.peers["encoder"]
        base, refused = peer.url_of(address), False
        message = EncodeRequest(request_id=request_id, media=[items[i] for i in group], positions=group)
        try:
            r = await self._post(base, ENCODE_PATH, message)
        except CannotDowngrade as err:
            raise StageFailure("encoder", f"{err} (mid-rollout: retry shortly)", 503, retry=True) from None
        except UNANSWERED as err:
            refused = True  # no answer (an encoding is idempotent): place these items again, on the others
            self._unanswered("encoder", err, tried | {address})
        except httpx.HTTPError as err:
            raise _call_failed("encoder", base, err) from None
        finally:
            peer.release(address)
        if refused:
            return await self._encode_each(request_id, items, group, last, tried | {address}, done)
        if r.status_code != 200:
            message = _error_text(r)
            if 400 <= r.status_code < 500:
                raise RequestError(message, "messages", r.status_code)
            raise StageFailure("encoder", message, 503 if r.status_code == 503 else 502)  # 503: busy, retry
        encoded = EncodeResponse.model_validate_json(r.content).items
        if len(encoded) != len(group):
            raise StageFailure("encoder", f"{len(encoded)} items answered for {len(group)} sent", 502)
        done.append((address, group, encoded))

    def _release_later(self, done: list[tuple[str, list[int], list[EncodedItem]]]) -> None:
        """`_release` in a task of its own: a cancelled request (the client left) cancels every await of its own."""
        self.releasing.start(self._release(done))

    async def _release(self, done: list[tuple[str, list[int], list[EncodedItem]]]) -> None:
        """Free what encoders published for a request that failed elsewhere (else it waits out its TTL)."""
        for address, _, items in done:
            for item in items:
                await release(self.http, self.peers["encoder"].url_of(address), item.embeddings.handle)

    async def stream_stage(
        self, stage: str, request: GenerateRequest, unwanted: Collection[str] = ()
    ) -> AsyncIterator[GenerateEvent]:
        """The stage's events until the request finishes, from a replica not `unwanted` while another is left. A
        call that got no answer goes to the next replica, but only before any event came: a request is never sent
        twice once a stage has begun answering it."""
        started, tried, sent = time.perf_counter(), set[str](), False
        while True:
            local = self._local(stage, tried)
            address, base = (local.address, "") if local else self._acquire(stage, tried | self._own(stage), unwanted)
            try:
                if local:  # no HTTP, so no read timeout: the same deadline between events, kept here
                    events = _within(stage, local.events(request), self.routes.request_timeout_seconds)
                else:
                    events = self._stream(stage, base, request)
                async with contextlib.aclosing(events):
                    async for event in events:
                        sent = True
                        yield _checked(stage, event)
                        if event.final:
                            STAGE_SECONDS.labels(stage).observe(time.perf_counter() - started)
                            return
                raise StageFailure(stage, "the stream ended before the request finished (the stage died?)", 502)
            except UNANSWERED as err:
                if sent:
                    raise StageFailure(stage, "the connection broke after the stream had begun", 502) from None
                tried.add(address)
                self._unanswered(stage, err, tried | self._own(stage))
            except httpx.HTTPError as err:
                raise _call_failed(stage, base, err) from None
            finally:
                if not local:
                    self.peers[stage].release(address)

    def _local(self, stage: str, tried: set[str]) -> Local | None:
        """The replica in this process, for a pd call: unless its engine is saturated and another replica is
        there to take the request."""
        local = self.local
        if local is None or stage != "pd" or local.address in tried:
            return None
        others = set(self.peers["pd"].addresses) - tried - {local.address}
        return local if not (local.saturated() and others) else None

    async def _stream(self, stage: str, base: str, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        for _ in range(2):  # the second time in the version a peer of the previous release named
            try:
                sent, body = self._body(base, request)
            except CannotDowngrade as err:
                raise StageFailure(stage, f"{err} (mid-rollout: retry shortly)", 503, retry=True) from None
            async with self.http.stream("POST", base + GENERATE_PATH, content=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    if self._learn(base, r, sent):
                        continue
                    raise StageFailure(stage, _error_text(r), 502)
                async for line in r.aiter_lines():
                    if line.strip():
                        yield GenerateEvent.model_validate_json(line)
                return

    # ---- the topologies ---------------------------------------------------------------------------------------

    async def run(
        self,
        request_id: str,
        token_ids: list[int],
        media: list[MediaItem],
        sampling: dict[str, Any],
        prompt: bool = False,
    ):
        """The tokens of one request, as GenerateEvents from the last engine (`prompt`: the first carries the
        prompt's token ids as that engine saw them)."""
        topology = self.routes.topology
        base: dict[str, Any] = {
            "request_id": request_id,
            "prompt_token_ids": token_ids,
            "sampling": sampling,
            "return_prompt_token_ids": prompt,
        }
        encoded = Media(media)
        try:
            if topology == Topology.AGG or (topology == Topology.E_PD and not media):
                stream = self.stream_stage("pd", GenerateRequest(**base, media=media))
            elif topology == Topology.E_PD:
                await self.encode(request_id, encoded)
                stream = self.prefill(base, encoded)
            else:
                stream = self.prefill_then_decode(base, encoded)
            async for event in stream:
                yield event
        except asyncio.CancelledError:  # the client left: what encoders published for it is nobody's now
            if encoded.encoded:  # (pd releases what it had not pulled; releasing twice frees nothing twice)
                self._release_later([(a, [], [i]) for a, i in zip(encoded.encoders, encoded.encoded, strict=True)])
            raise

    async def prefill(
        self, base: dict[str, Any], media: Media, prefill_only: bool = False, unwanted: Collection[str] = ()
    ) -> AsyncIterator[GenerateEvent]:
        """pd's stream for the encoder's embeddings. If pd could not pull them (it did no work yet), encode again,
        on each item's next owner, and send pd the request once more."""
        for attempt in (1, 2):
            request = GenerateRequest(**base, encoded=media.aged(), prefill_only=prefill_only)
            try:
                async for event in self.stream_stage("pd", request, unwanted):
                    yield event
                return
            except StageFailure as err:
                if attempt == 2 or not (err.retry and media.encoded):
                    raise
                RETRIES.labels("pd").inc()
                log.warning("request %s: %s; encoding again", base["request_id"], err)
            await self.encode(base["request_id"], media, elsewhere=True)

    async def prefill_then_decode(self, base: dict[str, Any], media: Media) -> AsyncIterator[GenerateEvent]:
        """e-p-d: pd prefills, decode pulls the KV and streams. decode must start, and pull the KV, within pd's
        lease (a late pull reads blocks that may hold another request's KV); either check failing, before any
        token, prefills again (re-encoding: pd released the embeddings it pulled)."""
        request_id = base["request_id"]
        for attempt in range(1, KV_ATTEMPTS + 1):
            if media.items:
                await self.encode(request_id, media)
            prefill, started = None, time.monotonic()
            pds = self.peers["pd"].other_versions(self.peers["decode"].known_versions())  # no decode reads their KV
            async for event in self.prefill(base, media, prefill_only=True, unwanted=pds):
                prefill = event
            assert prefill is not None and prefill.kv_transfer_params is not None, "pd returned no KV parameters"
            # pd's lease began when its prefill ended, after `started`: counting from `started` is conservative.
            lease_ends = started + self.routes.kv_lease_seconds
            if time.monotonic() >= lease_ends - self.routes.transfer_timeout_seconds:
                reason = "the KV cache lease would expire before decode could start"
            else:
                decode = GenerateRequest(
                    **base,
                    placeholders=[
                        PlaceholderItem(
                            modality=i.modality,
                            key=i.key,
                            num_tokens=i.num_tokens,
                            metadata=i.metadata,
                            hidden_size=prefill.hidden_size or 0,
                        )
                        for i in media.encoded
                    ],
                    kv_transfer_params=prefill.kv_transfer_params,
                    kv_deadline_seconds=max(0.0, lease_ends - KV_DEADLINE_MARGIN_SECONDS - time.monotonic()),
                )
                sent, pd = False, self.peers["pd"].versions.get(str(prefill.kv_transfer_params.get("remote_host")))
                try:
                    decodes = self.peers["decode"].other_versions({pd} if pd else None)  # not of pd's vLLM
                    async for event in self.stream_stage("decode", decode, decodes):
                        sent = True
                        yield event
                    return
                except StageFailure as err:
                    if sent or not err.retry:
                        raise
                    reason = err.detail
            KV_REPREFILLS.inc()
            log.warning("request %s: %s (attempt %d of %d)", request_id, reason, attempt, KV_ATTEMPTS)
        raise StageFailure("decode", f"{reason}, {KV_ATTEMPTS} times; the graph is overloaded", 503)
