"""The encoder stage: fetch and decode media, run only the vision tower, publish the embeddings for pd to pull.

Core (`Encoder`) and HTTP (`app`) are separate: the core knows the model, the media policy and the transfer; the
HTTP layer only parses and answers. Identical media (by content hash) are encoded once while they stay in the
embedding cache. The images of every request that arrives while a pass of the vision tower runs go through the
next pass together (`Batcher`). A published buffer stays registered until pd's read completes (NIXL notifies us)
or its time-to-live passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from mmgraph_operator.api import EmbeddingCacheSpec, EncoderSpec, default
from prometheus_client import Counter, Gauge, Histogram

from mmgraph_workers.content_key import encoder_identity, item_key, media_digest
from mmgraph_workers.media import MediaError, policy
from mmgraph_workers.media.audio import Audio
from mmgraph_workers.media.fetch import fetch_all, media_client
from mmgraph_workers.media.load import load
from mmgraph_workers.media.video import DECODE_SECONDS, Video
from mmgraph_workers.models import Encoded, adapter_for
from mmgraph_workers.protocol import EncodedItem, EncodeRequest, EncodeResponse, WorkerInfo
from mmgraph_workers.server import (
    add_common_arguments,
    add_transfer_arguments,
    make_app,
    peer_token,
    read_message,
    readers_wait_seconds,
    serve,
    unless_disconnected,
)
from mmgraph_workers.transfer import Pool, PoolFull, Transfer, framed, make_transfer

log = logging.getLogger("mmgraph.encoder")
POOL_REQUESTS = 2  # the automatic transfer pool holds this many largest requests' embeddings at once
MIN_POOL_BYTES = 64 << 20
PREPARING_BATCHES = 2  # media items fetched, decoded and encoded at once: this many of the tower's passes
DECODED_AS = 65536  # bytes' hashes the cache remembers the content of (~10 MiB of keys)
ENCODED = Counter("mmgraph_encoder_items_total", "Media items encoded", ["cached"])
CACHE_EVICTIONS = Counter("mmgraph_encoder_cache_evictions_total", "Embeddings dropped from the cache to make room")
CACHE_BYTES = Gauge("mmgraph_encoder_cache_bytes", "Bytes of embeddings the cache holds")
ENCODE_SECONDS = Histogram("mmgraph_encoder_seconds", "Time to fetch, decode and encode one request's media")
PUBLISHED = Gauge("mmgraph_encoder_published_buffers", "Embedding buffers waiting for pd to pull them")
MEDIA_ERRORS = Counter("mmgraph_encoder_media_errors_total", "Requests refused for their media", ["status"])
AUDIO_SECONDS_DECODED = Counter("mmgraph_encoder_audio_seconds_decoded_total", "Seconds of audio decoded")
VIDEO_FRAMES_DECODED = Counter(
    "mmgraph_encoder_video_frames_decoded_total", "Video frames decoded to sample the frames requests asked for"
)
WAITING = Gauge(
    "mmgraph_encoder_items_waiting",
    "Media items queued for the tower behind the pass now running (what the encoder's autoscaler steers on)",
)
BATCH_ITEMS = Histogram(
    "mmgraph_encoder_batch_items", "Media items per pass of the tower", buckets=(1, 2, 4, 8, 16, 32, 64)
)


class Busy(RuntimeError):
    """The encoder's queue is full: a 503 with Retry-After."""


class Batcher:
    """Runs `forward` once over the items of every request that arrived while the previous pass ran: no waiting
    window (a lone request starts at once), and under load one pass per wave of requests instead of one each (a
    GPU's tower is far from busy with one item). A failed pass is retried request by request, so a request
    that breaks the tower fails alone."""

    def __init__(self, forward: Callable[[list[Any]], list[Any]], max_items: int, max_waiting: int | None = None):
        self.forward, self.max_items = forward, max_items
        self.max_waiting = max_waiting if max_waiting is not None else 4 * max_items
        self.queue: list[tuple[list[Any], asyncio.Future]] = []
        self.worker: asyncio.Task | None = None
        WAITING.set_function(self.waiting)  # one Batcher per encoder process

    async def run(self, items: list[Any]) -> list[Any]:
        """`forward`'s results for `items`, in order; Busy when `max_waiting` items already wait (the queue is
        bounded: a replica that cannot keep up says so at once, and the client retries, maybe elsewhere)."""
        self.check(len(items))
        future = asyncio.get_running_loop().create_future()
        self.queue.append((items, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())
        return await future

    def waiting(self) -> int:
        """Items queued behind the pass now running (a request whose client left no longer counts)."""
        return sum(len(request) for request, future in self.queue if not future.done())

    def check(self, items: int) -> None:
        """Busy if `items` more would not fit in the queue (also asked before fetching, to fail fast)."""
        waiting = self.waiting()
        if waiting and waiting + items > self.max_waiting:
            raise Busy(f"the encoder has {waiting} items waiting for its tower; retry shortly")

    async def _drain(self) -> None:
        while self.queue:
            batch = [self.queue.pop(0)]
            count = len(batch[0][0])
            while self.queue and count + len(self.queue[0][0]) <= self.max_items:
                batch.append(self.queue.pop(0))
                count += len(batch[-1][0])
            await self._pass(batch)

    async def _pass(self, batch: list[tuple[list[Any], asyncio.Future]]) -> None:
        batch = [item for item in batch if not item[1].done()]  # a client that left needs no embeddings
        if not batch:
            return
        items = [item for request, _ in batch for item in request]
        BATCH_ITEMS.observe(len(items))
        try:
            results = await asyncio.to_thread(self.forward, items)
        except Exception as err:
            if len(batch) == 1:
                if not batch[0][1].done():  # the client may have gone during the pass
                    batch[0][1].set_exception(err)
                return
            for item in batch:
                await self._pass([item])
            return
        start = 0
        for request, future in batch:
            if not future.done():  # the client may have gone
                future.set_result(results[start : start + len(request)])
            start += len(request)


K = TypeVar("K")
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """One computation per key at a time: a request needing a key another request is computing waits for its
    result instead of computing it again. Correct by construction:
    - a request never waits while it holds keys (it waits first, then claims every key still missing in one step
      with no await in between), so two requests never wait on each other;
    - the futures waited on are taken in that same step, so a key finished (and forgotten) meanwhile is no error;
    - a key is forgotten only by its holder (`finish`), and `finish` resolves its future whatever happened: a
      waiter sees the value, or None when the holder failed or was cancelled, and then tries for the key itself.
    """

    def __init__(self) -> None:
        self.running: dict[K, asyncio.Future[V | None]] = {}

    async def claim(self, keys: list[K], lookup: Callable[[K], V | None]) -> tuple[dict[K, V], list[K]]:
        """(the keys' values that are known, from `lookup` or from the request that computed them; the keys this
        caller now holds and must compute, then `finish`)."""
        found: dict[K, V] = {}
        while True:
            for key in keys:
                if key not in found and (value := lookup(key)) is not None:
                    found[key] = value
            waits = {key: self.running[key] for key in dict.fromkeys(keys) if key not in found and key in self.running}
            if not waits:
                mine = [key for key in dict.fromkeys(keys) if key not in found]
                for key in mine:
                    self.running[key] = asyncio.get_running_loop().create_future()
                return found, mine
            for key, future in waits.items():
                if (value := await asyncio.shield(future)) is not None:
                    found[key] = value

    def finish(self, key: K, value: V | None) -> None:
        """The holder's result for `key` (None: it failed), to every request that waited for it."""
        future = self.running.pop(key)
        if not future.done():
            future.set_result(value)


@dataclass(frozen=True)
class Embedding:
    """One item's encoder output: what pd consumes, the family's metadata, and its content key."""

    tensor: torch.Tensor
    metadata: dict[str, Any]
    key: str


class EmbeddingCache:
    """LRU of embeddings by decoded content (modality + digest of the decoded media), bounded in bytes: the same
    pixels in other bytes (another PNG compression, a re-encoded upload) are one entry. Bytes seen lately map to
    the content they decoded to, so bytes seen before skip decoding too. Within one encoder process decoded
    content determines the content key, which the entry keeps."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.used = 0
        self.items: OrderedDict[str, Embedding] = OrderedDict()
        self.decoded_as: OrderedDict[str, str] = OrderedDict()  # bytes' hash -> content, at most DECODED_AS entries

    def by_bytes(self, blob_hash: str) -> Embedding | None:
        content = self.decoded_as.get(blob_hash)
        if content is None:
            return None
        self.decoded_as.move_to_end(blob_hash)  # a hot blob's mapping stays
        return self.get(content)

    def get(self, content: str) -> Embedding | None:
        if content in self.items:
            self.items.move_to_end(content)
            return self.items[content]
        return None

    def put(self, blob_hash: str, content: str, item: Embedding | None) -> None:
        """Remember what `blob_hash` decoded to, and `item` as that content's (None: it is cached already)."""
        self.decoded_as[blob_hash] = content
        self.decoded_as.move_to_end(blob_hash)
        if len(self.decoded_as) > DECODED_AS:
            self.decoded_as.popitem(last=False)
        size = 0 if item is None else item.tensor.numel() * item.tensor.element_size()
        if item is None or size > self.capacity or content in self.items:
            return
        self.items[content] = item
        self.used += size
        while self.used > self.capacity:
            _, old = self.items.popitem(last=False)
            self.used -= old.tensor.numel() * old.tensor.element_size()
            CACHE_EVICTIONS.inc()
        CACHE_BYTES.set(self.used)


class Encoder:
    def __init__(self, args: argparse.Namespace, make_pool: Callable[[int], Transfer]):
        self.args = args
        host = f"[{args.advertise_host}]" if ":" in args.advertise_host else args.advertise_host
        self.url = f"http://{host}:{args.port}"  # where pd asks for our agent's metadata, and releases
        self.policy = policy.from_args(args)
        self.adapter = adapter_for(args.model, args.revision, args.trust_remote_code)
        self.processor = self.adapter.load_processor()
        started = time.perf_counter()
        self.module = self.adapter.load_encoder(args.device)
        log.info("%s encoder loaded on %s (%.2f s)", self.adapter.family, args.device, time.perf_counter() - started)
        started = time.perf_counter()
        settings = {**self.adapter.processor_settings(self.processor), "encoder": self.adapter.encoder_settings()}
        self.identity = encoder_identity(self.module, settings)
        log.info("encoder identity %s… (%.2f s)", self.identity[:16], time.perf_counter() - started)
        self.audio_format = self.adapter.audio_format(self.processor)
        self.transfer = make_pool(self.pool_bytes())
        self.cache = EmbeddingCache(args.cache_bytes)
        self.in_flight: SingleFlight[str, Embedding] = SingleFlight()  # bytes' hash -> its encoding in progress
        self.client = media_client()
        self.batcher = Batcher(self._forward, args.max_batch_size)  # one pass at a time: the tower uses every core
        self.preparing = 0  # media items of the requests being fetched, decoded or encoded now
        self.max_preparing = PREPARING_BATCHES * max(args.max_batch_size, self.policy.max_items)

    def pool_bytes(self) -> int:
        """--transfer-pool-bytes, or room for POOL_REQUESTS requests of maxItems items, each as large as the caps
        allow an item of the graph's modalities to be (an image of maxPixels, a video of videoFrames frames, the
        longest clip), in rows of the language model's width and the tower's dtype."""
        if self.args.transfer_pool_bytes:
            return self.args.transfer_pool_bytes
        rows = self.adapter.max_tokens(self.processor, self.policy)
        width = self.adapter.config.get_text_config().hidden_size
        element = next(self.module.parameters()).element_size()
        item = Pool.footprint(framed(rows * width * element))
        size = max(MIN_POOL_BYTES, POOL_REQUESTS * max(1, self.policy.max_items) * item)
        log.info(
            "transfer pool %d MiB (%d requests of %d items of up to %d rows)",
            size >> 20,
            POOL_REQUESTS,
            self.policy.max_items,
            rows,
        )
        return size

    async def encode(self, request: EncodeRequest) -> EncodeResponse:
        media = request.media
        if len(media) > self.policy.max_items:
            raise MediaError(f"{len(media)} media items, more than the {self.policy.max_items} allowed")
        if refused := {m.modality for m in media} - set(self.policy.modalities):
            raise MediaError(f"this graph does not accept {', '.join(sorted(refused))} (spec.media.modalities)")
        self.batcher.check(len(media))  # before any fetch: a full queue answers at once
        started = time.perf_counter()
        with self._preparing(len(media)):
            hashes, found, was_cached = await self._embeddings(request)
        items: list[EncodedItem] = []
        ttl = self.args.transfer_timeout_seconds * 3 + 30
        for m, h in zip(media, hashes, strict=True):
            item = found[h]
            assert item is not None
            try:
                ref = self.transfer.publish(item.tensor, ttl_seconds=ttl, owner=self.url)
            except PoolFull as err:  # all or nothing: what this request published so far is released
                for done in items:
                    self.transfer.release(done.embeddings.handle, handed_out=False)
                raise Busy(f"{err}; retry shortly") from None
            cached = was_cached[h]
            items.append(
                EncodedItem(
                    modality=m.modality,
                    key=item.key,
                    embeddings=ref,
                    num_tokens=item.tensor.shape[0],
                    metadata=item.metadata,
                    cached=cached,
                )
            )
            ENCODED.labels(cached=str(cached).lower()).inc()
        PUBLISHED.set(self.transfer.published())
        ENCODE_SECONDS.observe(time.perf_counter() - started)
        return EncodeResponse(items=items)

    @contextlib.contextmanager
    def _preparing(self, items: int) -> Iterator[None]:
        """Admit `items` to fetching, decoding and the tower, or Busy: the media of every request in flight is held
        in memory (bytes fetched, pixels decoded) before the batcher's queue could refuse it, so their number is
        bounded here (`max_preparing`; a request alone always passes)."""
        if self.preparing and self.preparing + items > self.max_preparing:
            raise Busy(f"the encoder is preparing {self.preparing} media items already; retry shortly")
        self.preparing += items
        try:
            yield
        finally:
            self.preparing -= items

    async def _embeddings(
        self, request: EncodeRequest
    ) -> tuple[list[str], dict[str, Embedding | None], dict[str, bool]]:
        """Each item's bytes' hash, its embedding (from the cache, from the request that encodes it now, or
        encoded here) and whether it was cached."""
        media = request.media
        blobs = await fetch_all([m.url for m in media], self.policy, self.client)
        # the same bytes as an image and as a video are two items; hashed off the loop
        hashes = await asyncio.to_thread(
            lambda: [f"{m.modality}:{hashlib.sha256(b).hexdigest()}" for m, b in zip(media, blobs, strict=True)]
        )
        known, mine = await self.in_flight.claim(hashes, self.cache.by_bytes)  # others' encodings waited for
        found: dict[str, Embedding | None] = {h: known.get(h) for h in hashes}
        was_cached = {h: item is not None for h, item in found.items()}
        missing = list({h: i for i, h in enumerate(hashes) if h in mine}.values())
        try:
            if missing:
                await self._encode_missing(request, blobs, hashes, missing, found, was_cached)
        finally:  # what this request encoded, for the requests that waited for it (None if it failed)
            for h in mine:
                self.in_flight.finish(h, found[h])
        return hashes, found, was_cached

    async def _encode_missing(
        self,
        request: EncodeRequest,
        blobs: list[bytes],
        hashes: list[str],
        missing: list[int],
        found: dict[str, Embedding | None],
        was_cached: dict[str, bool],
    ) -> None:
        """Decode the `missing` items; those whose decoded content is cached are hits, the rest go through the
        tower and into the cache. Fills `found` (and `was_cached` for content hits)."""
        media = request.media
        deadline = time.monotonic() + DECODE_SECONDS  # one for all of the request's videos
        decoded = await asyncio.to_thread(
            lambda: [self._decode(blobs[i], request.position(i), media[i].modality, deadline) for i in missing]
        )
        contents = [f"{media[i].modality}:{digest.hex()}" for i, (_, digest) in zip(missing, decoded, strict=True)]
        for i, content in zip(missing, contents, strict=True):  # other bytes of content encoded before
            if (item := self.cache.get(content)) is not None:
                found[hashes[i]], was_cached[hashes[i]] = item, True
                self.cache.put(hashes[i], content, None)
        todo = [k for k, i in enumerate(missing) if found[hashes[i]] is None]
        encoded: list[Encoded] = await self.batcher.run([decoded[k][0] for k in todo]) if todo else []
        for k, out in zip(todo, encoded, strict=True):
            i, digest = missing[k], decoded[k][1]
            key = item_key(self.identity, media[i].modality, digest, out.metadata, out.embeddings.shape[0])
            found[hashes[i]] = Embedding(out.embeddings, out.metadata, key)
            self.cache.put(hashes[i], contents[k], found[hashes[i]])

    def _decode(self, blob: bytes, position: int, modality: str, deadline: float) -> tuple[Any, bytes]:
        """The item as the tower takes it and the digest of what it decoded to (for the content key), in one trip
        off the loop; media the model's processor refuses is the client's mistake, found before any pass."""
        media = load(modality, blob, self.policy, deadline, self.audio_format)
        if isinstance(media, Video):
            VIDEO_FRAMES_DECODED.inc(media.decoded)
        elif isinstance(media, Audio):
            AUDIO_SECONDS_DECODED.inc(media.seconds)
        try:
            prepared = self.adapter.prepare_item(self.processor, modality, media)
        except ValueError as err:
            raise MediaError(f"{modality} {position + 1} cannot be used with this model: {err}") from None
        return prepared, media_digest(media)

    def _forward(self, prepared: list) -> list[Encoded]:
        out: list[Encoded] = []
        for start in range(0, len(prepared), self.args.max_batch_size):
            out += self.adapter.forward(self.module, prepared[start : start + self.args.max_batch_size])
        return out

    async def report_published(self) -> None:
        while True:
            PUBLISHED.set(self.transfer.published())
            await asyncio.sleep(1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add_transfer_arguments(parser)
    policy.add_arguments(parser)
    parser.add_argument("--device", default="cpu", help="where the tower runs: cuda when the stage has GPUs")
    parser.add_argument("--max-batch-size", type=int, default=default(EncoderSpec, "max_batch_size"))
    parser.add_argument("--cache-bytes", type=int, default=default(EmbeddingCacheSpec, "capacity_bytes"))
    parser.add_argument(
        "--transfer-pool-bytes",
        type=int,
        default=0,
        help="registered memory for embeddings; 0: room for a few requests of maxItems images at maxPixels",
    )


def main(args: argparse.Namespace) -> None:
    encoder: Encoder | None = None
    app = make_app("encoder", lambda: encoder is not None, args.max_request_bytes, peer_token(args))

    @app.on_event("startup")
    async def load() -> None:
        nonlocal encoder
        name = f"encoder-{args.advertise_host}-{args.port}-{uuid.uuid4().hex[:8]}"  # a restart is a new agent
        hold = args.transfer_timeout_seconds + 1  # a read begun before a free ends by its deadline
        encoder = await asyncio.to_thread(
            Encoder, args, lambda size: make_transfer(args.transfer_backend, name, size, hold_seconds=hold)
        )
        app.state.metrics = asyncio.create_task(encoder.report_published())
        log.info("encoder ready: %s", args.model)

    @app.on_event("shutdown")
    async def drain() -> None:
        """Stay until pd has pulled what we published (or the pulls' deadline passes): a replica being scaled
        down has answered requests whose embeddings are still to be read from this process's memory."""
        if encoder is None:
            return
        wait = readers_wait_seconds(args.transfer_timeout_seconds, args.drain_seconds)  # a pull's deadline
        deadline, waiting = time.monotonic() + wait, encoder.transfer.published()
        while encoder.transfer.published() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if left := encoder.transfer.published():
            log.warning("stopping with %d of %d published embeddings unread", left, waiting)
        else:
            log.info("stopping: every published embedding was read (%d waited for)", waiting)
        encoder.transfer.close()

    @app.get("/v1/info")
    async def info() -> WorkerInfo:
        return WorkerInfo(stage="encoder", model=args.model, served_model_name=args.served_model_name)

    @app.post("/encode")
    async def encode(request: Request) -> JSONResponse:
        body = await read_message(request, EncodeRequest)
        if isinstance(body, JSONResponse):
            return body
        try:
            encoded = await unless_disconnected(request, encoder.encode(body))  # type: ignore[union-attr]
            return JSONResponse(encoded.model_dump())
        except MediaError as err:
            MEDIA_ERRORS.labels(status=str(err.status)).inc()
            return JSONResponse({"error": str(err), "status": err.status}, status_code=err.status)
        except Busy as err:
            return JSONResponse({"error": str(err), "status": 503}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/v1/transfer/agent")
    async def agent() -> JSONResponse:
        """What pd connects to this encoder's NIXL agent with: asked of the encoder itself, at an address pd
        resolved from the graph's encoder Service, never taken from a message."""
        transfer = encoder.transfer  # type: ignore[union-attr]
        return JSONResponse({"agent": transfer.name, "metadata": transfer.metadata})

    @app.post("/release/{handle}")
    async def release(handle: str) -> JSONResponse:
        encoder.transfer.release(handle)  # type: ignore[union-attr]
        return JSONResponse({"released": handle})

    serve(app, args)
