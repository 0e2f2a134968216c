"""The oracle: for greedy decoding every topology returns exactly the tokens of one in-process vLLM engine."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import CASES, PEER, chat, data_url, metric, png, start_frontend, stream_text, tokens

TOPOLOGIES = ["agg", "e-pd", "e-p-d"]


ORACLE_CASES = ["one-image", "other-image", "two-images", "text-only", "one-video", "image-and-video"]


@pytest.mark.parametrize("case", ORACLE_CASES)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_topology_returns_the_single_engine_tokens(endpoints, reference, topology, case):
    assert tokens(endpoints[topology], case) == reference[case]


def test_the_oracle_is_sensitive_to_the_image(reference):
    """Guards the guard: requests that differ only in their image's pixels (same size, same text) get different
    tokens, and so do other images and no image, so equality above means something."""
    assert reference["one-image"] != reference["other-image"]
    assert len({tuple(reference[c]) for c in ("one-image", "other-image", "two-images", "text-only")}) == 4
    assert len({tuple(reference[c]) for c in ("one-video", "image-and-video", "text-only")}) == 3
    assert len({tuple(reference[f"concurrent-{i}"]) for i in range(16)}) > 8


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_streaming_and_non_streaming_agree(endpoints, topology):
    plain = chat(endpoints[topology], **CASES["one-image"]).json()["choices"][0]
    text, chunks = stream_text(endpoints[topology], **CASES["one-image"])
    assert text == plain["message"]["content"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"] == "length"


def test_sixteen_concurrent_requests_each_get_their_own_answer(endpoints, reference):
    """16 different requests, twice over (32 in flight through 16 client threads), spread over the topologies."""
    jobs = [(f"concurrent-{i % 16}", TOPOLOGIES[i % 3]) for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda job: tokens(endpoints[job[1]], job[0]), jobs))
    assert got == [reference[case] for case, _ in jobs]


def test_the_encoders_tower_takes_a_requests_images_in_one_pass(graph):
    """8 images no test sent before (so none is cached) in one request: one pass of the real tower with all 8, as
    the running encoder's `mmgraph_encoder_batch_items` shows. (Requests arriving during a pass share the next
    one: test_encoder_batching proves that with a tower slow enough to overlap; the tiny tower's passes take a few
    milliseconds, too short for arrivals to overlap them reliably.)"""
    from mmgraph_workers.protocol import EncodeRequest, EncodeResponse, image_items

    encoder = f"http://127.0.0.1:{graph.stages['encoder'].port}"
    seed = time.monotonic_ns() % 1_000_000

    def passes() -> tuple[float, float]:
        return metric(encoder, "mmgraph_encoder_batch_items_sum"), metric(encoder, "mmgraph_encoder_batch_items_count")

    images, count = passes()
    urls = [data_url(png(64 + 16 * (i % 2), 64, seed + i)) for i in range(8)]  # two sizes in one pass
    body = EncodeRequest(request_id=f"batch-{seed}", media=image_items(urls)).model_dump_json()
    r = httpx.post(f"{encoder}/encode", content=body, headers=PEER, timeout=60)
    assert r.status_code == 200, r.text
    items = EncodeResponse.model_validate_json(r.content).items
    for item in items:  # nobody will read these embeddings: free them now, not at their time-to-live
        httpx.post(f"{encoder}/release/{item.embeddings.handle}", headers=PEER, timeout=10)
    assert len(items) == 8 and not any(item.cached for item in items)
    assert [now - then for now, then in zip(passes(), (images, count), strict=True)] == [8, 1]


def test_decode_gets_kv_over_nixl_not_recomputed(graph, endpoints, reference):
    """With a prompt only this test sends, so no engine's prefix cache holds any of it, whatever ran before."""
    decode = f"http://127.0.0.1:{graph.stages['decode'].port}"
    before = metric(decode, "vllm:nixl_bytes_transferred_sum")
    assert tokens(endpoints["e-p-d"], "nixl-probe") == reference["nixl-probe"]
    moved = metric(decode, "vllm:nixl_bytes_transferred_sum") - before
    assert moved > 0, "decode's NixlConnector pulled no KV bytes"


def test_embeddings_travel_from_the_encoder(graph, endpoints, reference, tiny_model, tmp_path_factory):
    """Control: an encoder whose vision weights differ changes the tokens, while pd and decode are unchanged."""
    from mmgraph_contract.graph import parse
    from mmgraph_contract.vocabulary import StageName
    from mmgraph_workers.ports import free_port
    from mmgraph_workers.tiny_model import build
    from mmgraph_workers.up import LocalGraph

    from .conftest import graph_spec

    other = build(tmp_path_factory.mktemp("models") / "tiny-other-vision", vision_seed=7)
    logs = tmp_path_factory.mktemp("control")
    side = LocalGraph(parse(graph_spec(other, "e-pd")), logdir=logs)
    side.spawn(StageName.ENCODER, free_port(), {})
    try:
        side.wait_healthy(timeout=120, progress=lambda line: None)
        other_encoder = side.stages[StageName.ENCODER].port
        frontend = start_frontend(graph, tiny_model, "e-pd", logs / "frontend", encoder_port=other_encoder)
        try:
            frontend.wait_healthy(timeout=120, progress=lambda line: None)
            assert tokens(frontend.endpoint, "one-image") != reference["one-image"]
            assert tokens(frontend.endpoint, "one-video") != reference["one-video"]
            assert tokens(frontend.endpoint, "text-only") == reference["text-only"]  # no image: no difference
        finally:
            frontend.stop()
    finally:
        side.stop()


def test_models_and_health(endpoints):
    for endpoint in endpoints.values():
        assert httpx.get(f"{endpoint}/health", timeout=10).status_code == 200
        models = httpx.get(f"{endpoint}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny-qwen2-vl"]


def test_usage_counts_expanded_prompt_and_completion(endpoints):
    body = chat(endpoints["e-p-d"], **CASES["one-image"]).json()
    usage = body["usage"]
    assert usage["completion_tokens"] == 12
    text_only = chat(endpoints["e-p-d"], **CASES["text-only"]).json()["usage"]
    assert usage["prompt_tokens"] > text_only["prompt_tokens"]  # the image expanded to several tokens


def test_metrics_count_requests_and_stage_latency(endpoints):
    """One request moves each of its own counters by exactly one: per stage, on deltas this test caused."""
    frontend = endpoints["e-p-d"]
    names = [f'mmgraph_stage_seconds_count{{stage="{s}"}}' for s in ("encoder", "pd", "decode")]
    names += ['mmgraph_requests_total{status="200"}', "mmgraph_time_to_first_token_seconds_count"]
    before = {name: metric(frontend, name) for name in names}
    assert chat(frontend, **CASES["one-image"]).status_code == 200
    assert {name: metric(frontend, name) - before[name] for name in names} == dict.fromkeys(names, 1.0)


def test_kv_travels_from_pd_to_decode(tiny_model, reference, tmp_path_factory):
    """Control: a pd whose language weights differ from decode's changes the tokens. If decode recomputed the
    prompt instead of using the KV it pulled, it would return the reference tokens. (NixlConnector's handshake
    compares a hash that includes the model path; the control turns that check off on both engines.)"""
    from mmgraph_contract.graph import parse
    from mmgraph_contract.vocabulary import StageName
    from mmgraph_workers.ports import free_port
    from mmgraph_workers.tiny_model import build
    from mmgraph_workers.up import LocalGraph

    from .conftest import graph_spec

    other = build(tmp_path_factory.mktemp("models") / "tiny-other-text", text_seed=11)
    body = graph_spec(tiny_model, "e-p-d")
    lax = {"kv-transfer-config": {"kv_connector_extra_config": {"enforce_handshake_compat": False}}}
    for stage in ("pd", "decode"):
        body["spec"]["stages"][stage]["engineArgs"].update(lax)
    local = LocalGraph(parse(body), logdir=tmp_path_factory.mktemp("kv-control"))
    ports = {s: free_port() for s in (StageName.ENCODER, StageName.PD, StageName.DECODE, StageName.FRONTEND)}
    peers = {s: f"http://127.0.0.1:{p}" for s, p in ports.items() if s != StageName.FRONTEND}
    local.spawn(StageName.ENCODER, ports[StageName.ENCODER], peers)
    local.spawn(StageName.PD, ports[StageName.PD], peers, model=str(other))
    local.spawn(StageName.DECODE, ports[StageName.DECODE], peers)
    local.spawn(StageName.FRONTEND, ports[StageName.FRONTEND], peers)
    try:
        local.wait_healthy(timeout=300, progress=lambda line: None)
        for case in ("one-image", "text-only"):
            assert tokens(local.endpoint, case) != reference[case], case
    finally:
        local.stop()
