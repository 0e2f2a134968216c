"""A pd whose vLLM engine core dies must not look healthy: /health fails at once, the worker stops (so its pod
leaves the Service and is restarted), `mmgraph up`'s watcher names it, and the API it served (agg: pd serves it
itself) goes with it, so a Service sends clients elsewhere. An engine that could not work (its KV side channel's
port taken) stops before it loads, saying why."""

from __future__ import annotations

import socket
import time

import httpx
import psutil
import pytest

from mmgraph_contract.graph import parse
from mmgraph_contract.vocabulary import StageName
from mmgraph_workers.ports import free_port
from mmgraph_workers.up import LocalGraph, StageDied

from .conftest import CASES, chat, graph_spec, wait


def test_a_dead_engine_fails_health_and_stops_its_worker(tiny_model, tmp_path_factory):
    local = LocalGraph(parse(graph_spec(tiny_model, "agg")), logdir=tmp_path_factory.mktemp("engine-dies"))
    local.start()
    try:
        local.wait_healthy(timeout=300, progress=lambda line: None)
        assert chat(local.endpoint, **CASES["text-only"]).status_code == 200
        pd = local.stages[StageName.PD]
        cores = [
            p for p in psutil.Process(pd.proc.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline())
        ]
        assert len(cores) == 1, [p.cmdline() for p in psutil.Process(pd.proc.pid).children(recursive=True)]
        cores[0].kill()
        killed = time.monotonic()

        def unhealthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{pd.port}/health", timeout=2).status_code == 503
            except httpx.HTTPError:
                return True  # already gone

        wait(unhealthy, timeout=10)
        dead = wait(local.dead, timeout=30)
        assert dead.name == StageName.PD and time.monotonic() - killed < 30
        assert "stage pd exited" in str(StageDied(dead))
        assert "the vLLM engine died" in pd.log.read_text()
        with pytest.raises(httpx.ConnectError):  # nothing answers for the dead engine
            chat(local.endpoint, **CASES["text-only"])
    finally:
        local.stop()
    assert all(s.proc.poll() is not None for s in local.stages.values())


def test_a_taken_kv_side_channel_port_stops_the_worker(tiny_model, tmp_path_factory):
    """vLLM's NIXL listener thread dies on a port in use, and the engine then waits for it forever (never healthy,
    never dead): the worker checks the port first."""
    local = LocalGraph(parse(graph_spec(tiny_model, "e-p-d")), logdir=tmp_path_factory.mktemp("kv-port-taken"))
    transfer = free_port(span=2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", transfer + 1))
        taken.listen()
        decode = local.spawn(StageName.DECODE, free_port(), {}, args=[f"--transfer-port={transfer}"])
        try:
            assert wait(local.dead, timeout=120) is decode
        finally:
            local.stop()
    said = f"the KV side channel's port 127.0.0.1:{transfer + 1} (--transfer-port + 1) is in use"
    assert said in decode.log.read_text()
