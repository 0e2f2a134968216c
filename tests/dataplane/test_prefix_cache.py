"""Prefix caching keys every image by its content key, in every engine: never one image's KV for another's.

decode gets placeholder embeddings (zeros of the right shape); keyed by those, two images of one size looked the
same to its prefix cache, and with a multi-block prompt decode served the first image's KV for every later one.
These cases share one size and one multi-block text, so only the images' content tells them apart.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mmgraph_workers.protocol import PROTOCOL_VERSION

from .conftest import PEER, assert_same_as_vllm_server, metric, tokens

TOPOLOGIES = ["agg", "e-pd", "e-p-d"]
LONG = [f"long-{i}" for i in range(4)]
PAIRS = [f"pair-{i}" for i in range(4)]


def test_the_same_size_cases_tell_images_apart(reference):
    """Guards the guard: the single engine answers the cases differently, so a mix-up would show."""
    assert len({tuple(reference[c]) for c in LONG}) >= 3
    assert len({tuple(reference[c]) for c in PAIRS}) >= 3
    assert reference["reuse"] != reference["reuse-longer"]


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_same_size_images_with_one_long_prompt_each_get_their_own_answer(endpoints, reference, topology):
    for case in LONG + PAIRS:
        assert tokens(endpoints[topology], case) == reference[case], case


def test_the_same_concurrently_in_every_topology(endpoints, reference):
    jobs = [(case, topology) for _ in range(2) for case in LONG + PAIRS for topology in TOPOLOGIES]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: tokens(endpoints[job[1]], job[0]), jobs))
    assert got == [reference[case] for case, _ in jobs]


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_vllm_server_gives_the_same_text_and_usage(vllm_server, endpoints, topology):
    """The same HTTP request to vLLM's own OpenAI server (same weights and engine arguments)."""
    for case in LONG + PAIRS:
        assert_same_as_vllm_server(endpoints[topology], vllm_server, case)


def test_a_repeated_image_and_prompt_reuse_cached_blocks_on_pd_and_decode(graph, endpoints, reference):
    engines = {s: f"http://127.0.0.1:{graph.stages[s].port}" for s in ("pd", "decode")}
    first = tokens(endpoints["e-p-d"], "reuse")
    before = {s: metric(url, "vllm:prefix_cache_hits_total") for s, url in engines.items()}
    second = tokens(endpoints["e-p-d"], "reuse")
    hits = {s: metric(url, "vllm:prefix_cache_hits_total") - before[s] for s, url in engines.items()}
    assert first == second == reference["reuse"]
    full_blocks = 4 * 32  # 158 prompt tokens, block size 32: the image sits in the first block
    assert hits["pd"] >= full_blocks and hits["decode"] >= full_blocks, hits


def test_decode_reusing_part_of_a_prompt_pulls_the_rest_over_nixl(graph, endpoints, reference):
    """decode finds the first blocks in its own cache (same image, same start) and pulls the rest from pd."""
    decode = f"http://127.0.0.1:{graph.stages['decode'].port}"
    assert tokens(endpoints["e-p-d"], "reuse") == reference["reuse"]
    hits = metric(decode, "vllm:prefix_cache_hits_total")
    moved = metric(decode, "vllm:nixl_bytes_transferred_sum")
    assert tokens(endpoints["e-p-d"], "reuse-longer") == reference["reuse-longer"]
    assert metric(decode, "vllm:prefix_cache_hits_total") - hits >= 32, "decode reused none of its own blocks"
    assert metric(decode, "vllm:nixl_bytes_transferred_sum") - moved > 0, "decode pulled nothing over NIXL"


def test_an_item_without_a_content_key_is_refused_by_decode(graph):
    """The key is part of the protocol: decode never falls back to keying placeholders by their values."""
    decode = f"http://127.0.0.1:{graph.stages['decode'].port}"
    body = {
        "version": PROTOCOL_VERSION,
        "request_id": "no-key",
        "prompt_token_ids": [1, 2, 3],
        "sampling": {"max_tokens": 1},
        "placeholders": [{"grid_thw": [1, 4, 6], "num_tokens": 6, "hidden_size": 128}],
    }
    response = httpx.post(f"{decode}/generate", json=body, headers=PEER, timeout=30)
    assert response.status_code == 400 and "key" in response.text
