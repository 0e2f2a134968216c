"""The second model family through the same stages: a tiny LLaVA (CLIP tower + projector + Llama-style language
model) in every topology returns exactly the single engine's tokens and vLLM's own server's text and usage.

Its graph (encoder, pd, decode and three frontends) and vLLM's server live for this module only."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from mmgraph_operator.api import parse
from mmgraph_workers.up import LocalGraph

from .conftest import (
    CASES,
    LLAVA_EXAMPLE,
    assert_same_as_vllm_server,
    frontends,
    graph_spec,
    reference_tokens,
    tokens,
    vllm_openai_server,
)

NAME = "tiny-llava"
LLAVA_CASES = {c: CASES[c] for c in ("one-image", "two-images", "text-only", "long-0", "long-1", "pair-1", "pair-2")}
TOPOLOGIES = ["agg", "e-pd", "e-p-d"]


@dataclass
class Llava:
    reference: dict[str, list[int]]
    endpoints: dict[str, str]
    vllm_server: str


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llava]:
    from mmgraph_workers.tiny_model import build

    model = build(tmp_path_factory.mktemp("models") / "tiny-llava", family="llava")
    reference = reference_tokens(model, LLAVA_CASES, tmp_path_factory.mktemp("llava-reference"))
    graph = LocalGraph(parse(graph_spec(model, example=LLAVA_EXAMPLE)), logdir=tmp_path_factory.mktemp("llava"))
    graph.start()
    try:
        graph.wait_healthy(timeout=300, progress=lambda line: None)
        logs: Path = tmp_path_factory.mktemp("llava-frontends")
        with (
            frontends(graph, model, logs, LLAVA_EXAMPLE) as endpoints,
            vllm_openai_server(model, NAME, LLAVA_EXAMPLE, tmp_path_factory.mktemp("llava-vllm")) as server,
        ):
            yield Llava(reference, endpoints, server)
    finally:
        graph.stop()


def test_the_llava_oracle_tells_images_apart(llava):
    assert len({tuple(llava.reference[c]) for c in LLAVA_CASES}) >= len(LLAVA_CASES) - 1


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_llava_every_topology_returns_the_single_engine_tokens(llava, topology):
    for case in LLAVA_CASES:
        assert tokens(llava.endpoints[topology], case, model=NAME) == llava.reference[case], case


def test_llava_concurrent_requests_each_get_their_own_answer(llava):
    jobs = [(case, topology) for case in LLAVA_CASES for topology in TOPOLOGIES]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda job: tokens(llava.endpoints[job[1]], job[0], model=NAME), jobs))
    assert got == [llava.reference[case] for case, _ in jobs]


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_llava_vllm_server_gives_the_same_text_and_usage(llava, topology):
    for case in LLAVA_CASES:
        assert_same_as_vllm_server(llava.endpoints[topology], llava.vllm_server, case, model=NAME)
