"""The encoder's batcher (mmgraph_workers.batching: passes, a bounded queue) and its embedding cache
(mmgraph_workers.embedding_cache: bytes, recency, content keys), with no tower."""

from __future__ import annotations

import asyncio
import threading

import pytest


def metric_value(name: str) -> float:
    """A series of this process's default Prometheus registry (0 when it was never set)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0


def test_encoder_passes_together_what_arrived_during_a_pass_and_a_bad_request_fails_alone():
    """The first request starts a pass at once; those that arrive while it runs share the next pass (less one
    whose client left); that pass fails on one request's image, so each is retried alone and only that one fails."""
    from mmgraph_workers.batching import Batcher

    started, release, calls = threading.Event(), threading.Event(), []

    def forward(images):  # stands in for the processor and vision tower; the real ones run in tests/dataplane
        calls.append(list(images))
        started.set()
        release.wait(10)
        if "broken" in images:
            raise ValueError("the tower failed on this image")
        return [f"emb-{image}" for image in images]

    async def scenario():
        batcher = Batcher(forward, max_items=16)
        first = asyncio.create_task(batcher.run(["a"]))
        await asyncio.to_thread(started.wait, 10)
        later = [asyncio.create_task(batcher.run(images)) for images in (["b", "cc"], ["broken"], ["d"], ["gone"])]
        await asyncio.sleep(0.05)
        later[-1].cancel()  # its client left while it waited: no pass includes it
        release.set()
        return await first, await asyncio.gather(*later, return_exceptions=True)

    first, (two, broken, last, gone) = asyncio.run(scenario())
    assert isinstance(gone, asyncio.CancelledError)
    assert calls == [["a"], ["b", "cc", "broken", "d"], ["b", "cc"], ["broken"], ["d"]]
    assert first == ["emb-a"]
    assert two == ["emb-b", "emb-cc"]
    assert isinstance(broken, ValueError)
    assert last == ["emb-d"]


def test_the_encoders_queue_is_bounded():
    """While a pass runs, requests wait up to `max_waiting` images; past that the encoder says it is busy at once
    (a 503 with Retry-After) instead of queueing without end; a lone request is never refused."""
    from mmgraph_workers.batching import Batcher, Busy

    started, release = threading.Event(), threading.Event()

    def forward(images):
        started.set()
        release.wait(10)
        return images

    async def scenario():
        batcher = Batcher(forward, max_items=4, max_waiting=5)
        first = asyncio.create_task(batcher.run(list(range(9))))  # more than max_waiting, alone: accepted
        await asyncio.to_thread(started.wait, 10)
        waiting = [asyncio.create_task(batcher.run([i, i])) for i in range(2)]  # 4 images wait
        await asyncio.sleep(0)
        assert metric_value("mmgraph_encoder_items_waiting") == 4  # the series an encoder's HPA steers on
        with pytest.raises(Busy, match="4 items waiting"):
            await batcher.run([7, 7])  # 6 > 5
        release.set()
        return await first, await asyncio.gather(*waiting)

    first, waiting = asyncio.run(scenario())
    assert first == list(range(9)) and waiting == [[0, 0], [1, 1]]


def test_the_embedding_cache_keeps_the_most_recently_used_within_its_bytes():
    import torch

    from mmgraph_workers.embedding_cache import Embedding, EmbeddingCache

    def item(n: int) -> Embedding:
        return Embedding(torch.zeros(n, 4), {}, f"k{n}")  # n * 16 bytes

    cache = EmbeddingCache(capacity_bytes=100)
    evicted = metric_value("mmgraph_encoder_cache_evictions_total")
    cache.put("bytes-a", "a", item(2))
    cache.put("bytes-b", "b", item(2))
    cache.put("bytes-c", "c", item(2))  # 96 bytes: all fit
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("bytes-d", "d", item(2))  # 128 bytes: the least recently used (b) goes
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    assert cache.used == 96 and metric_value("mmgraph_encoder_cache_evictions_total") == evicted + 1
    assert metric_value("mmgraph_encoder_cache_bytes") == 96
    cache.put("bytes-huge", "huge", item(10))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and cache.used == 96


def test_the_embedding_cache_is_keyed_by_decoded_content():
    """Other bytes of the same content (another PNG compression) find the entry once decoded; bytes seen before
    find it without decoding; bytes whose content was evicted miss."""
    import torch

    from mmgraph_workers.embedding_cache import Embedding, EmbeddingCache

    cache = EmbeddingCache(capacity_bytes=64)
    entry = Embedding(torch.zeros(2, 4), {}, "key")
    cache.put("png-fast", "image:pixels", entry)
    assert cache.by_bytes("png-fast") is entry and cache.by_bytes("png-small") is None  # not decoded yet
    assert cache.get("image:pixels") is entry  # what the encoder finds after decoding png-small
    cache.put("png-small", "image:pixels", None)
    assert cache.by_bytes("png-small") is entry and len(cache.items) == 1 and cache.used == 32
    cache.put("other", "image:other", Embedding(torch.zeros(4, 4), {}, "other"))  # 64 bytes: evicts the first
    assert cache.by_bytes("png-fast") is None and cache.by_bytes("png-small") is None


def test_the_embedding_cache_counts_each_entry_once_under_repeated_inserts():
    """One content inserted again (other bytes of it, or two misses of one image in one request) is counted
    once, so hits do not fade as the count drifts. (The encoder uses its cache on its event loop only.)"""
    import torch

    from mmgraph_workers.embedding_cache import Embedding, EmbeddingCache

    cache = EmbeddingCache(capacity_bytes=1000)
    for i in range(400):
        cache.put(f"b{i}", f"k{i % 5}", Embedding(torch.zeros(2, 4), {}, f"k{i % 5}"))
    assert cache.used == 5 * 32 == sum(e.tensor.numel() * e.tensor.element_size() for e in cache.items.values())
    assert all(cache.get(f"k{i}") is not None for i in range(5))
