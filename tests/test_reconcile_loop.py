"""The loop around a reconcile pass, with the pass replaced by a recorder (the pass itself is exercised against
the real API server in test_operator_integration.py): bursts coalesce, passes are bounded, failures back off."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

import pytest

from mmgraph_operator import reconcile
from mmgraph_operator.drift import GraphKey
from mmgraph_operator.reconcile import Reconciler

pytestmark = pytest.mark.cluster  # the Reconciler discovers the API server's kinds when it is made


class Recorder(Reconciler):
    """Records each pass (start time, graphs in flight) and fails the first `failures` passes."""

    def __init__(self, api, concurrency: int, failures: int = 0, seconds: float = 0.2):
        super().__init__(api, "1.20", concurrency)
        self.primed.set()
        self.lead()
        self.passes: list[tuple[GraphKey, float]] = []
        self.active = self.peak = 0
        self.failures, self.seconds = failures, seconds

    async def reconcile(self, key: GraphKey) -> None:
        self.passes.append((key, time.monotonic()))
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.seconds)
            if self.failures:
                self.failures -= 1
                raise RuntimeError("the API server refused")
        finally:
            self.active -= 1

    async def settle(self) -> None:
        while tasks := [s.task for s in self.state.values() if s.task and not s.task.done()]:
            await asyncio.gather(*tasks)


def graph(name: str) -> dict:
    return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": "1"}}


def test_a_burst_of_events_is_one_pass_and_passes_are_bounded(api):
    async def run() -> Recorder:
        loop = Recorder(api, concurrency=2)
        for _ in range(20):  # 20 events for each of 6 graphs, faster than the debounce
            for i in range(6):
                loop.graph_event(None, graph(f"g{i}"))
        await loop.settle()
        return loop

    loop = asyncio.run(run())
    assert Counter(key for key, _ in loop.passes) == {("ns", f"g{i}"): 1 for i in range(6)}
    assert loop.peak == 2  # at most `concurrency` graphs at once, and that many were used


def test_an_event_during_a_pass_causes_exactly_one_more(api):
    async def run() -> Recorder:
        loop = Recorder(api, concurrency=8, seconds=0.5)
        loop.graph_event(None, graph("g"))
        await asyncio.sleep(reconcile.DEBOUNCE + 0.2)  # the first pass is running
        for _ in range(10):
            loop.graph_event(None, graph("g"))
        await loop.settle()
        return loop

    assert len(asyncio.run(run()).passes) == 2


def test_a_failed_pass_is_retried_with_doubling_backoff(api):
    async def run() -> Recorder:
        loop = Recorder(api, concurrency=8, failures=2, seconds=0.0)
        loop.graph_event(None, graph("g"))
        await loop.settle()
        return loop

    starts = [t for _, t in asyncio.run(run()).passes]
    assert len(starts) == 3  # two failures, then success: the graph is never dropped
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert 1.0 <= gaps[0] < 2.0 and 2.0 <= gaps[1] < 4.0, gaps  # 1 s, then twice that


def test_a_deleted_graph_leaves_nothing_behind_in_the_loop(api):
    """The loop's memory of a graph (its children, what was applied, its task) goes with it."""
    from mmgraph_operator.drift import ChildKey

    async def run() -> Recorder:
        loop = Recorder(api, concurrency=8)
        loop.graph_event(None, graph("g"))
        child = ChildKey("apps/v1", "Deployment", "ns", "g-pd")
        loop.children[("ns", "g")][child] = {"metadata": {"name": "g-pd"}}
        loop.applied[child] = ("digest", "1")
        await loop.settle()
        loop.graph_event("DELETED", graph("g"))
        return loop

    loop = asyncio.run(run())
    assert (loop.graphs, dict(loop.children), loop.applied, loop.state) == ({}, {}, {}, {})


def test_a_standby_reconciles_nothing_until_it_leads_and_stops_when_it_loses_the_lease(api):
    """Only the leader reconciles: a standby's pokes wait; leading runs them; losing the lease cancels the passes
    in flight (another replica may be writing) and they run again once this replica leads again."""

    async def run() -> None:
        loop = Recorder(api, concurrency=4, seconds=1.0)
        loop.follow()
        for i in range(3):
            loop.graph_event(None, graph(f"g{i}"))
        await asyncio.sleep(0.3)
        assert loop.passes == []  # a standby: nothing
        loop.lead()
        await asyncio.sleep(0.3)
        assert len(loop.passes) == 3 and loop.active == 3
        loop.follow()  # lost the lease mid-pass
        await asyncio.sleep(0.1)
        assert loop.active == 0  # cancelled, not finished
        await asyncio.sleep(0.5)
        assert len(loop.passes) == 3  # and none started meanwhile
        loop.lead()
        await loop.settle()
        assert Counter(key for key, _ in loop.passes) == {("ns", f"g{i}"): 2 for i in range(3)}

    asyncio.run(run())


def test_a_write_is_given_up_before_another_replica_could_take_the_lease(api):
    """A write that passed the leadership check could take the client's whole 30 s timeout, past a 15 s
    takeover: its timeout is cut to what is left of the lease (less a margin), and with nothing left it is not
    sent at all."""
    from mmgraph_operator.apply import WRITE_MARGIN, NotLeading

    reconciler = Reconciler(api, "1.20")
    reconciler.lead()
    sent: list[float] = []
    write = reconciler._writing(lambda **kwargs: sent.append(kwargs["_request_timeout"]))
    reconciler.lease_ends = lambda: time.monotonic() + 4.0
    write(_request_timeout=30.0)
    assert 0 < sent[-1] <= 4.0 - WRITE_MARGIN
    reconciler.lease_ends = lambda: time.monotonic() + WRITE_MARGIN / 2
    with pytest.raises(NotLeading):
        write(_request_timeout=30.0)
    assert len(sent) == 1


def test_a_prune_deletes_only_the_object_it_read(api, namespace):
    """An object the graph's uid does not own is never pruned, whatever its labels; and between the prune's read
    and its delete, the child may be deleted and made again by someone else (same name, another uid): the delete
    carries the uid it read as a precondition, so the new object stays."""
    from kubernetes import client

    from mmgraph_operator.drift import ChildKey

    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "child"}, "data": {"a": "1"}})
    reconciler = Reconciler(api, "1.20")
    reconciler.lead()
    ck = ChildKey("v1", "ConfigMap", namespace, "child")

    graph_uid = "9b9b9b9b-0000-0000-0000-000000000000"
    assert asyncio.run(reconciler._prune((namespace, "g"), graph_uid, ck)) is False  # not the graph's: no delete
    assert core.read_namespaced_config_map("child", namespace).data == {"a": "1"}, "an object not owned was deleted"

    async def read_then_lose_the_race(_: ChildKey) -> dict:
        owner = {"kind": "MultimodalGraph", "name": "g", "uid": graph_uid}
        return {
            "metadata": {"name": "child", "uid": "0a0a0a0a-0000-0000-0000-000000000000", "ownerReferences": [owner]}
        }

    reconciler._get = read_then_lose_the_race
    assert asyncio.run(reconciler._prune((namespace, "g"), graph_uid, ck)) is False
    assert core.read_namespaced_config_map("child", namespace).data == {"a": "1"}, "another's object was deleted"
