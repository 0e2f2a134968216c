"""How the encoder stage shares work: the images of every request that arrives while a pass of the vision tower
runs go through the next pass together (`Batcher`), and one encoding in progress serves every request for the same
media (`SingleFlight`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from prometheus_client import Gauge, Histogram

from mmgraph_contract.wire import ENCODER_WAITING

log = logging.getLogger("mmgraph.encoder")
WAITING = Gauge(
    ENCODER_WAITING,
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
