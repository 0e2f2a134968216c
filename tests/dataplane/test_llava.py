"""The second model family through the same stages: a tiny LLaVA (CLIP tower + projector + Llama-style language
model) in every topology returns exactly the single engine's tokens and vLLM's own server's text and usage.

Its graph (encoder, pd, decode and three frontends) and vLLM's server live for this module only."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import (
    CASES,
    LLAVA_EXAMPLE,
    FamilyGraph,
    assert_same_as_vllm_server,
    family_graph,
    tokens,
)

NAME = "tiny-llava"
LLAVA_CASES = {c: CASES[c] for c in ("one-image", "two-images", "text-only", "long-0", "long-1", "pair-1", "pair-2")}
TOPOLOGIES = ["agg", "e-pd", "e-p-d"]


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FamilyGraph]:
    with family_graph(tmp_path_factory, "llava", LLAVA_EXAMPLE, NAME, LLAVA_CASES) as served:
        yield served


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
