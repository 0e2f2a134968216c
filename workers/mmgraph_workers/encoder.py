"""The encoder stage: fetch and decode media, run only the vision tower, publish the embeddings for pd to pull.

Core (`Encoder`) and HTTP (`app`) are separate: the core knows the model, the media policy and the transfer; the
HTTP layer only parses and answers. Identical media (by content hash) are encoded once while they stay in the
embedding cache. The images of every request that arrives while a pass of the vision tower runs go through the
next pass together (`Batcher`). A published buffer stays registered until pd's read completes (NIXL notifies us)
or its time-to-live passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from mmgraph_contract.settings import EncoderSettings
from mmgraph_workers.batching import Batcher, Busy, SingleFlight
from mmgraph_workers.content_key import encoder_identity, item_key, media_digest
from mmgraph_workers.embedding_cache import Embedding, EmbeddingCache
from mmgraph_workers.handoff import EmbeddingsSender
from mmgraph_workers.media import MediaError
from mmgraph_workers.media.audio import Audio
from mmgraph_workers.media.fetch import fetch_all, media_client
from mmgraph_workers.media.load import load
from mmgraph_workers.media.video import DECODE_SECONDS, Video
from mmgraph_workers.models import Encoded, adapter_for
from mmgraph_workers.protocol import EncodedItem, EncodeRequest, EncodeResponse
from mmgraph_workers.transfer import Pool, PoolFull, Transfer, framed

log = logging.getLogger("mmgraph.encoder")
POOL_REQUESTS = 2  # the automatic transfer pool holds this many largest requests' embeddings at once
MIN_POOL_BYTES = 64 << 20
PREPARING_BATCHES = 2  # media items fetched, decoded and encoded at once: this many of the tower's passes
ENCODED = Counter("mmgraph_encoder_items_total", "Media items encoded", ["cached"])
ENCODE_SECONDS = Histogram("mmgraph_encoder_seconds", "Time to fetch, decode and encode one request's media")
PUBLISHED = Gauge("mmgraph_encoder_published_buffers", "Embedding buffers waiting for pd to pull them")
AUDIO_SECONDS_DECODED = Counter("mmgraph_encoder_audio_seconds_decoded_total", "Seconds of audio decoded")
VIDEO_FRAMES_DECODED = Counter(
    "mmgraph_encoder_video_frames_decoded_total", "Video frames decoded to sample the frames requests asked for"
)


class Encoder:
    def __init__(self, settings: EncoderSettings, make_pool: Callable[[int], Transfer]):
        self.settings = settings
        advertised = settings.transfer.advertise_host
        host = f"[{advertised}]" if ":" in advertised else advertised
        self.url = f"http://{host}:{settings.server.port}"  # where pd asks for our agent's metadata, and releases
        self.policy = settings.media
        weights = settings.weights
        self.adapter = adapter_for(weights.model, weights.revision, weights.trust_remote_code)
        self.processor = self.adapter.load_processor()
        started = time.perf_counter()
        self.module = self.adapter.load_encoder(settings.device)
        log.info(
            "%s encoder loaded on %s (%.2f s)", self.adapter.family, settings.device, time.perf_counter() - started
        )
        started = time.perf_counter()
        identity = {**self.adapter.processor_settings(self.processor), "encoder": self.adapter.encoder_settings()}
        self.identity = encoder_identity(self.module, identity)
        log.info("encoder identity %s… (%.2f s)", self.identity[:16], time.perf_counter() - started)
        self.audio_format = self.adapter.audio_format(self.processor)
        self.transfer = make_pool(self.pool_bytes())
        # a pull's deadline is the transfer timeout; a descriptor outlives a few of them
        self.sender = EmbeddingsSender(self.transfer, self.url, settings.transfer.transfer_timeout_seconds * 3 + 30)
        self.cache = EmbeddingCache(settings.cache_bytes)
        self.in_flight: SingleFlight[str, Embedding] = SingleFlight()  # bytes' hash -> its encoding in progress
        self.client = media_client()
        self.batcher = Batcher(self._forward, settings.max_batch_size)  # one pass at a time: the tower uses every core
        self.preparing = 0  # media items of the requests being fetched, decoded or encoded now
        self.max_preparing = PREPARING_BATCHES * max(settings.max_batch_size, self.policy.max_items)

    def pool_bytes(self) -> int:
        """--transfer-pool-bytes, or room for POOL_REQUESTS requests of maxItems items, each as large as the caps
        allow an item of the graph's modalities to be (an image of maxPixels, a video of videoFrames frames, the
        longest clip), in rows of the language model's width and the tower's dtype."""
        if self.settings.transfer_pool_bytes:
            return self.settings.transfer_pool_bytes
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
        try:
            refs = self.sender.publish([found[h].tensor for h in hashes])  # type: ignore[union-attr]
        except PoolFull as err:
            raise Busy(f"{err}; retry shortly") from None
        items: list[EncodedItem] = []
        for m, h, ref in zip(media, hashes, refs, strict=True):
            item, cached = found[h], was_cached[h]
            assert item is not None
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
        for start in range(0, len(prepared), self.settings.max_batch_size):
            out += self.adapter.forward(self.module, prepared[start : start + self.settings.max_batch_size])
        return out

    async def report_published(self) -> None:
        while True:
            PUBLISHED.set(self.transfer.published())
            await asyncio.sleep(1.0)
