"""The encoder's embedding cache: identical media (by content hash) are encoded once while they stay in it."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import Counter, Gauge

log = logging.getLogger("mmgraph.encoder")
DECODED_AS = 65536  # bytes' hashes the cache remembers the content of (~10 MiB of keys)
CACHE_EVICTIONS = Counter("mmgraph_encoder_cache_evictions_total", "Embeddings dropped from the cache to make room")
CACHE_BYTES = Gauge("mmgraph_encoder_cache_bytes", "Bytes of embeddings the cache holds")


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
