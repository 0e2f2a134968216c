"""The frontend's calls to its stages: the replicas of each (peers.py), one HTTP client with the graph's
credential, the protocol version each replica reads (a rollout mixes releases), and what a failed call means
(`StageFailure`). The router (router.py) decides which stage gets what; this says how a call is made."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass

import httpx
from prometheus_client import Counter
from pydantic import ValidationError

from mmgraph_contract.settings import Routes
from mmgraph_contract.wire import INFO_PATH, PEER_KEEPALIVE_SECONDS
from mmgraph_workers.frontend.openai_api import RequestError
from mmgraph_workers.peers import REFRESH_SECONDS, NoReplica, Peer, read_hosts
from mmgraph_workers.protocol import (
    PREVIOUS_VERSION,
    PROTOCOL_VERSION,
    GenerateEvent,
    GenerateRequest,
    Message,
    StageErrorBody,
    WorkerInfo,
)
from mmgraph_workers.server import Detached, peer_headers

log = logging.getLogger("mmgraph.frontend")
SPEAKS_TTL = 60.0  # seconds a peer's older protocol version is remembered (its address may serve a new release next)
RETRIES = Counter(
    "mmgraph_stage_retries_total", "Calls sent again after a stage failed before doing any work", ["stage"]
)
REFUSED = Counter(
    "mmgraph_stage_connect_refused_total",
    "Calls a replica refused at connect or dropped before answering (it left before the address list caught up, "
    "or died), sent to another",
    ["stage"],
)
# A call that got no answer at all: the replica refused the connection, or closed it (a kept-alive one it was
# closing as it stopped, or by dying) before a byte of the answer. Sent again to another replica: nothing of it
# reached the client.
UNANSWERED = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class StageFailure(RuntimeError):
    """A stage failed or missed its deadline: answered 5xx naming the stage."""

    def __init__(self, stage: str, message: str, status: int = 502, retry: bool = False):
        super().__init__(f"{stage}: {message}")
        self.stage, self.detail, self.status, self.retry = stage, message, status, retry


@dataclass
class Local:
    """The pd replica in this very process (agg: pd serves the OpenAI API itself). It takes every request until
    its engine is saturated (another request would queue there), then the least busy of the other replicas does,
    over HTTP: the Service already spreads clients over the replicas, and the hop costs what vLLM's server does
    not pay. Its calls skip HTTP and JSON."""

    address: str  # the address the pd Service resolves this replica to (never called over HTTP)
    events: Callable[[GenerateRequest], AsyncIterator[GenerateEvent]]  # what its /generate would stream
    info: Callable[[], WorkerInfo | None]  # what its /v1/info answers; None while the engine loads
    saturated: Callable[[], bool]


class StageClient:
    """The stages' replicas and the one HTTP client the frontend reaches them with."""

    def __init__(self, routes: Routes, token: str | None, local: Local | None = None):
        self.routes, self.local = routes, local
        self.peers = {
            stage: Peer(stage, url)
            for stage, url in (("encoder", routes.encoder_url), ("pd", routes.pd_url), ("decode", routes.decode_url))
            if url
        }
        for stage in self.peers:  # each stage's series at 0 from the start (a dashboard's rate is 0, not absent)
            RETRIES.labels(stage), REFUSED.labels(stage)
        timeout = httpx.Timeout(routes.request_timeout_seconds, connect=30.0)
        limits = httpx.Limits(max_connections=256, keepalive_expiry=PEER_KEEPALIVE_SECONDS)
        headers = peer_headers(token)
        self.http = httpx.AsyncClient(timeout=timeout, trust_env=False, limits=limits, headers=headers)
        # peer base URL -> the protocol version it reads, where not ours, and when it said so (a replica mid-rollout)
        self.speaks: dict[str, tuple[int, float]] = {}
        self.pd_info: WorkerInfo | None = None
        self.releasing = Detached()  # releases of failed requests' embeddings

    async def watch_peers(self) -> None:
        """Re-resolve every stage's replicas (quickly until pd has answered once, then every 2 s)."""
        while True:
            try:
                await self._refresh_peers()
            except Exception:  # one bad round (a pd answering garbage, a resolver error) must not end the watch
                log.exception("refreshing the stages' addresses failed; trying again")
            await asyncio.sleep(REFRESH_SECONDS if self.pd_info else 0.5)

    async def _refresh_peers(self) -> None:
        if self.pd_info is None and self.local is not None:  # before the Service lists this replica (it is not
            self.pd_info = self.local.info()  # ready until the API is), so from the engine itself
        hosts = read_hosts(self.routes.peer_hosts_file) if self.routes.peer_hosts_file else None
        await asyncio.gather(*(p.refresh(hosts) for p in self.peers.values()))
        if self.pd_info is None and self.peers["pd"].addresses:
            with contextlib.suppress(httpx.HTTPError, NoReplica, ValidationError):
                address, base = self.peers["pd"].acquire()
                try:
                    r = await self.http.get(base + INFO_PATH, timeout=2)
                finally:
                    self.peers["pd"].release(address)
                if r.status_code == 200:
                    self.pd_info = WorkerInfo.model_validate(r.json())
        if "decode" in self.peers:
            await asyncio.gather(self._learn_versions("pd"), self._learn_versions("decode"))

    async def _learn_versions(self, stage: str) -> None:
        """Each newly listed replica's vLLM version, from its /v1/info, once: e-p-d pairs pd and decode by it."""
        peer = self.peers[stage]

        async def learn(address: str) -> None:
            with contextlib.suppress(httpx.HTTPError, ValueError):  # pydantic's errors are ValueErrors too
                r = await self.http.get(peer.url_of(address) + INFO_PATH, timeout=2)
                if r.status_code == 200:
                    peer.versions[address] = WorkerInfo.model_validate_json(r.content).vllm_version or ""

        await asyncio.gather(*(learn(a) for a in peer.addresses if a not in peer.versions))

    # ---- one call to one stage ------------------------------------------------------------------------------

    def _body(self, base: str, message: Message) -> tuple[int, str]:
        """The version `base` reads (ours, unless it said otherwise lately) and the message's body in it."""
        version, learned = self.speaks.get(base, (PROTOCOL_VERSION, 0.0))
        if version != PROTOCOL_VERSION and time.monotonic() - learned > SPEAKS_TTL:  # rolled since? ask again
            del self.speaks[base]
            version = PROTOCOL_VERSION
        return version, message.dump_for(version)

    def _learn(self, base: str, r: httpx.Response, sent: int) -> bool:
        """A peer refused the version we sent (it is of the previous release, mid-rollout) and said which it
        speaks: remember it, and True to send again in that one (the refusal came before any work)."""
        if r.status_code != 400:
            return False
        shared = sorted(_versions_spoken(r) & {PROTOCOL_VERSION, PREVIOUS_VERSION})
        if not shared or shared[-1] == sent:
            return False
        if self.speaks.get(base, (PROTOCOL_VERSION,))[0] != shared[-1]:
            log.info("%s speaks protocol version %d: sending it that", base, shared[-1])
        self.speaks[base] = (shared[-1], time.monotonic())
        return True

    async def _post(self, base: str, path: str, message: Message) -> httpx.Response:
        for _ in range(2):  # the second time in the version a peer of another release named
            sent, body = self._body(base, message)
            r = await self.http.post(f"{base}{path}", content=body)
            if not self._learn(base, r, sent):
                break
        return r

    def _unanswered(self, stage: str, err: httpx.HTTPError, tried: Collection[str]) -> None:
        """Count a call that got no answer, to be sent to another replica. Where none is left and this one took
        the request and then dropped it (it died mid-request), say so: 502, not the 503 of replicas that all
        refused the connection."""
        REFUSED.labels(stage).inc()
        if not isinstance(err, httpx.ConnectError) and not set(self.peers[stage].addresses) - set(tried):
            raise StageFailure(stage, "the replica closed the connection before answering (it died?)", 502) from None

    def _own(self, stage: str) -> set[str]:
        """This process's own replica of `stage`: reached in process, never over HTTP."""
        return {self.local.address} if self.local is not None and stage == "pd" else set()


async def _within(stage: str, events: AsyncIterator[GenerateEvent], seconds: float) -> AsyncIterator[GenerateEvent]:
    """`events`, each within `seconds` of the last (in this task: the engine's own deadlines stay its task's); a
    stall is the 504 an HTTP read timeout would give, and the request is aborted (its generator is cancelled)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(seconds) as deadline, contextlib.aclosing(events):
            async for event in events:
                deadline.reschedule(None)  # the caller's time with the event is not the engine's
                yield event
                deadline.reschedule(loop.time() + seconds)
    except TimeoutError:
        raise StageFailure(stage, f"no answer within {seconds:g} s", 504) from None


def _checked(stage: str, event: GenerateEvent) -> GenerateEvent:
    """`event`, unless it says the stage failed: the client's 4xx, or the stage's failure (busy stays retryable)."""
    if event.error:
        if event.status and 400 <= event.status < 500:
            raise RequestError(event.error, None, event.status)
        status = event.status if event.status in (503, 504) else 502
        raise StageFailure(stage, event.error, status, retry=event.retry)
    return event


def _call_failed(stage: str, base: str, err: httpx.HTTPError) -> StageFailure:
    """The client learns which stage failed and how; the log also says which replica (a pod's address)."""
    log.warning("%s call to %s failed: %s: %s", stage, base, type(err).__name__, err)
    status = 504 if isinstance(err, httpx.TimeoutException) else 502
    return StageFailure(stage, f"{type(err).__name__}: {str(err)[:200] or 'no detail'}", status)


def _versions_spoken(response: httpx.Response) -> set[int]:
    """The protocol versions a refusal names: `speaks` (this release on), or the previous release's wording."""
    try:
        body = response.json()
    except ValueError:
        return set()
    if not isinstance(body, dict):
        return set()
    if isinstance(body.get("speaks"), list):
        return {v for v in body["speaks"] if isinstance(v, int)}
    found = re.match(r"protocol version \d+ is not spoken here \((\d+)\)", str(body.get("error", "")))
    return {int(found.group(1))} if found else set()


def _error_text(response: httpx.Response) -> str:
    try:
        return StageErrorBody.model_validate_json(response.content).error
    except ValueError:
        pass
    try:  # a body limit's refusal, in OpenAI's shape (every stage's server answers its clients so)
        body = response.json()
        return str(body.get("error") or body)
    except (json.JSONDecodeError, ValueError, AttributeError):  # not a stage's answer (a proxy's page?)
        return f"HTTP {response.status_code} from a stage"
