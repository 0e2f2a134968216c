"""Inter-stage trust (docs/architecture.md, "Threat model"): an internal stage answers only callers holding the
graph's peer credential, and a message cannot send pd or decode to an address outside the graph's own replicas.
A trap listener on a loopback address the graph does not use proves that no connection was even tried."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from mmgraph_contract.vocabulary import StageName
from mmgraph_workers.protocol import EncodedItem, GenerateEvent, GenerateRequest, TensorRef, sampling

from .conftest import PEER

TRAP_HOST = "127.0.0.77"  # no stage of any test graph listens here (replicas take 127.0.0.2 and up, in order)


@contextlib.contextmanager
def trap() -> Iterator[tuple[int, socket.socket]]:
    """A listener that should never be connected to: (its port, the socket)."""
    with socket.socket() as s:
        s.bind((TRAP_HOST, 0))
        s.listen()
        s.setblocking(False)
        yield s.getsockname()[1], s


def never_connected(listener: socket.socket) -> bool:
    time.sleep(0.5)  # what a connection attempt would take on loopback, many times over
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    return False


def events(url: str, request: GenerateRequest) -> list[GenerateEvent]:
    r = httpx.post(url, content=request.model_dump_json(), headers=PEER, timeout=60)
    assert r.status_code == 200, r.text
    return [GenerateEvent.model_validate_json(line) for line in r.text.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("stage", "path"),
    [
        ("encoder", "/encode"),
        ("encoder", "/release/0123456789abcdef"),
        ("encoder", "/v1/transfer/agent"),
        ("pd", "/generate"),
        ("pd", "/v1/info"),
        ("decode", "/generate"),
    ],
)
def test_an_internal_stage_answers_only_the_graphs_credential(graph, stage, path):
    """No credential, a wrong one, or the right one with a byte more: 401, before the body is read. /health and
    /metrics stay open for the kubelet's probes and Prometheus. The right credential reaches the handler."""
    base = f"http://127.0.0.1:{graph.stages[StageName(stage)].port}"
    method = "GET" if path.startswith("/v1/") else "POST"
    wrong = ({}, {"authorization": "Bearer nope"}, {"authorization": PEER["authorization"] + "x"})
    for headers in wrong:
        r = httpx.request(method, f"{base}{path}", content=b"{}", headers=headers, timeout=30)
        assert r.status_code == 401 and "peer credential" in r.json()["error"], (headers, r.text)
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    assert httpx.get(f"{base}/metrics", timeout=30).status_code == 200
    r = httpx.request(method, f"{base}{path}", content=b"{}", headers=PEER, timeout=30)
    assert r.status_code != 401, r.text


def test_pd_pulls_embeddings_only_from_the_graphs_encoders(graph):
    """A descriptor naming an owner outside the encoder Service's addresses is refused: pd neither asks it for
    agent metadata nor releases to it (which would be a blind request to any address a peer names)."""
    pd = f"http://127.0.0.1:{graph.stages[StageName.PD].port}"
    with trap() as (port, listener):
        ref = TensorRef(
            handle="f" * 32,
            agent="encoder-elsewhere",
            owner=f"http://{TRAP_HOST}:{port}",
            address=0,
            nbytes=64,
            dtype="float32",
            shape=[4, 4],
        )
        item = EncodedItem(key="k" * 64, embeddings=ref, num_tokens=4, metadata={"grid_thw": [1, 4, 4]})
        request = GenerateRequest(
            request_id=f"forged-owner-{time.monotonic_ns()}",
            prompt_token_ids=[1, 2, 3],
            sampling=sampling(),
            encoded=[item],
        )
        (event,) = events(f"{pd}/generate", request)
        assert event.status == 403 and "not one of this graph's encoders" in (event.error or ""), event
        assert never_connected(listener)


def test_decode_pulls_the_kv_cache_only_from_the_graphs_pds(graph):
    """kv_transfer_params naming a host outside the pd Service's addresses are refused before vLLM's connector
    sees them (it would connect its side channel there)."""
    decode = f"http://127.0.0.1:{graph.stages[StageName.DECODE].port}"
    with trap() as (port, listener):
        params = {
            "do_remote_prefill": True,
            "remote_engine_id": "elsewhere",
            "remote_block_ids": [1],
            "remote_host": TRAP_HOST,
            "remote_port": port,
            "tp_size": 1,
        }
        request = GenerateRequest(
            request_id=f"forged-kv-{time.monotonic_ns()}",
            prompt_token_ids=[1, 2, 3],
            sampling=sampling(max_tokens=2),
            kv_transfer_params=params,
        )
        (event,) = events(f"{decode}/generate", request)
        assert event.status == 403 and "not one of this graph's pd replicas" in (event.error or ""), event
        assert never_connected(listener)
