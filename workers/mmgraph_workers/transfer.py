"""Moving tensors between stage processes without copying them through HTTP.

The map (the same three primitives whatever the implementation):

    owner (encoder)                         reader (pd)
    ---------------                         -----------
    ref = publish(tensor)  ---- ref ---->   tensor = fetch(ref, deadline)
      (keeps the buffer registered)           (pulls the bytes; a notice tells the owner)
    release happens when the reader's        release(ref) is sent by the reader only when it
      completion notice arrives, or when       could not pull (the owner must never free early:
      the buffer's time-to-live passes          a read of a released buffer returns wrong bytes)

A buffer may still be read after its owner gave up on it (the reader was late: its time-to-live passed and the
slot now holds another publish's bytes; NIXL reads a reused buffer without an error). So every published region is
framed by its generation, a header before the bytes and a trailer after them; the owner zeroes both when it frees
the region, and the reader checks both against the descriptor's generation after reading the whole frame: a read
of a freed or reused region, or one torn by a reuse in the middle of it, is refused (`StaleRead`), never returned.

Implementations sit side by side and are chosen by name (`make_transfer`), never by `if backend ==` in callers.
NIXL (UCX underneath) is the one we ship. Agents, peer connections and memory registrations are made once and
reused: the owner registers one pool up front (its regions must be in the metadata peers connected with) and
copies tensors into it; a reader lands small reads in its own registered pool and registers the destination of
large ones. Copies run on the calling thread, not torch's OpenMP pool (see `copy_bytes`). Over a network the owner
must make progress for a read to complete, so a poller thread spins while anything is published and sleeps when
nothing is; the reader drives its own reads. Every wait has a deadline.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from abc import ABC, abstractmethod

import torch

from mmgraph_workers.protocol import TensorRef

log = logging.getLogger("mmgraph.transfer")


class TransferError(RuntimeError):
    """A transfer failed or missed its deadline; the message names the peer."""


class ReadFailed(TransferError):
    """NIXL reported the read failed (not a missed deadline): its owner is gone or broken."""


class StaleRead(TransferError):
    """The bytes read were no longer the descriptor's: the owner freed (and maybe reused) the buffer first."""


class PoolFull(TransferError):
    """Nothing was published: the owner's pool has no room until readers pull (retry shortly)."""


class Transfer(ABC):
    name: str  # this agent's, unique per process
    metadata: str  # what a reader needs to connect to this agent (base64), served by the owner itself

    @abstractmethod
    def publish(self, tensor: torch.Tensor, ttl_seconds: float, owner: str) -> TensorRef:
        """Copy `tensor` into registered memory and describe where it is (`owner`: this stage's address, where
        readers ask for `metadata`); it stays until released."""

    @abstractmethod
    def connected(self, agent: str) -> bool:
        """Whether this reader holds a connection to `agent` (else `fetch` needs the agent's metadata)."""

    @abstractmethod
    def fetch(self, ref: TensorRef, deadline: float, metadata: str | None = None) -> torch.Tensor:
        """Pull the tensor `ref` describes by `deadline` (`time.monotonic()`'s clock: the caller's deadline, time
        spent waiting for a thread included); its completion tells the owner it may release it. StaleRead if the
        owner had freed the buffer. `metadata`: the owning agent's, as its owner served it (never a message's),
        needed unless `connected(ref.agent)`."""

    @abstractmethod
    def poll(self) -> None:
        """Owner side: process completion notices and expiries (the poller thread calls it)."""

    @abstractmethod
    def release(self, handle: str, handed_out: bool = True) -> None:
        """Free a published buffer before its reader's notice. `handed_out`: its descriptor left this process, so
        a read may be under way (the owner's own undo of a publish nobody saw is not)."""

    @abstractmethod
    def published(self) -> int:
        """How many buffers are still registered (for metrics and tests)."""

    def close(self) -> None:  # noqa: B027 (optional: implementations without background work need nothing)
        """Stop any background work (a poller thread); called at worker shutdown."""


FRAME = 8  # bytes of the generation before and after a published tensor's bytes


def framed(nbytes: int) -> int:
    """The size of a published tensor of `nbytes` in its owner's pool: its bytes in their frame."""
    return nbytes + 2 * FRAME


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Byte copy between host tensors on the calling thread. torch's `copy_` of more than 32 Ki elements runs on
    its OpenMP pool, whose threads then busy-wait: on a small machine they take the core that the peer's progress
    (or our own poll loop) needs, and a 64 KiB transfer went from ~0.15 ms to one scheduler tick (~3.5 ms)."""
    if dst.is_cuda or src.is_cuda:
        dst.copy_(src)
    else:
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())


def _mem(tensor: torch.Tensor) -> str:
    return "VRAM" if tensor.is_cuda else "DRAM"


class Pool:
    """First-fit allocator over one registered buffer: NIXL publishes a region's address in the agent's metadata
    when it is registered, so registering once up front keeps the metadata (and every peer's connection) valid."""

    ALIGN = 256

    def __init__(self, size: int):
        self.size = size
        self.free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted, coalesced

    @classmethod
    def footprint(cls, nbytes: int) -> int:
        """What an allocation of `nbytes` takes of the pool."""
        return -(-max(nbytes, 1) // cls.ALIGN) * cls.ALIGN

    def alloc(self, nbytes: int) -> int | None:
        need = self.footprint(nbytes)
        for i, (offset, length) in enumerate(self.free):
            if length >= need:
                self.free[i : i + 1] = [(offset + need, length - need)] if length > need else []
                return offset
        return None

    def release(self, offset: int, nbytes: int) -> None:
        size = self.footprint(nbytes)
        self.free.append((offset, size))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for off, length in self.free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((off, length))
        self.free = merged

    def used(self) -> int:
        return self.size - sum(length for _, length in self.free)


# backend name -> "module:class", imported when chosen (NIXL's only then)
TRANSFERS: dict[str, str] = {"nixl": "mmgraph_workers.nixl_transfer:NixlTransfer"}


def make_transfer(
    backend: str, name: str | None = None, pool_bytes: int = 0, recv_pool_bytes: int = 0, hold_seconds: float = 0.0
) -> Transfer:
    """`pool_bytes`: what an owner can have published at once; `recv_pool_bytes`: a reader's landing area;
    `hold_seconds`: how long an owner keeps a frame freed without its reader's notice out of the pool (at least
    the readers' transfer deadline)."""
    if backend not in TRANSFERS:
        raise ValueError(f"unknown transfer backend {backend!r}; known: {', '.join(TRANSFERS)}")
    module, cls = TRANSFERS[backend].split(":")
    return getattr(importlib.import_module(module), cls)(name, pool_bytes, recv_pool_bytes, hold_seconds)
