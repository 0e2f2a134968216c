"""agg as the operator runs it: pd serves the OpenAI API itself (the frontend in its process, the engine one
call away instead of an HTTP hop), against the oracle; the API key and the peer credential each guard their own
paths on the one port, and a client's body is cut off at the client's limit; the same answers as vLLM's own
server; and a second pd replica, to which the first routes requests over HTTP.

(The session's agg endpoint elsewhere is a frontend process routed to the e-p-d graph's pd, which shares one
engine among the topologies; this module starts an engine of its own.)"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mmgraph_contract.vocabulary import StageName
from mmgraph_workers.up import LocalGraph

from .conftest import CASES, MODEL_NAME, PEER, error_of, graph_spec, metric, running, wait

KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def agg(tiny_model, reference, tmp_path_factory) -> Iterator[LocalGraph]:
    spec = graph_spec(tiny_model, "agg", maxBytes=1 << 20)  # a client's body limit of ~12 MB: see the 413 test
    spec["spec"]["stages"]["frontend"]["apiKeySecret"] = {"name": "api", "key": "key"}
    spec["spec"]["stages"]["pd"]["engineArgs"]["max-num-seqs"] = 2  # saturated at 3 in flight: see the last test
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MMGRAPH_API_KEY", "s3cret")  # what the Secret gives the pod
        with running(spec, tmp_path_factory.mktemp("agg-logs")) as local:
            yield local


def answer(endpoint: str, case: str, headers: dict[str, str] = KEY) -> httpx.Response:
    body = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 12, "return_token_ids": True, **CASES[case]}
    return httpx.post(f"{endpoint}/v1/chat/completions", json=body, headers=headers, timeout=180)


def tokens(endpoint: str, case: str) -> list[int]:
    response = answer(endpoint, case)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def test_pd_serves_the_api_with_no_frontend_process(agg):
    """One process, one port: the API key guards the OpenAI routes, the graph's peer credential its stage calls,
    and neither opens the other's."""
    assert set(agg.stages) == {StageName.PD}
    pd = agg.endpoint
    assert pd == f"http://127.0.0.1:{agg.stages[StageName.PD].port}"
    assert answer(pd, "text-only", headers={}).status_code == 401
    assert answer(pd, "text-only", headers=PEER).status_code == 401  # the peer credential is not the API key
    assert answer(pd, "text-only").status_code == 200
    assert httpx.get(f"{pd}/v1/info", headers=KEY, timeout=10).status_code == 401  # nor the other way round
    assert httpx.get(f"{pd}/v1/info", headers=PEER, timeout=10).status_code == 200
    assert httpx.post(f"{pd}/generate", content=b"{}", headers=KEY, timeout=10).status_code == 401
    assert httpx.get(f"{pd}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("case", ["one-image", "two-images", "text-only", "image-and-video"])
def test_agg_returns_the_single_engine_tokens(agg, reference, case):
    assert tokens(agg.endpoint, case) == reference[case]


@pytest.mark.parametrize("case", ["one-image", "two-images", "text-only"])
def test_agg_answers_as_vllms_server_does(agg, vllm_server, case):
    """The same HTTP request to the in-process API and to vLLM's own server (same weights, same engine
    arguments) gives the same text and the same token counts."""
    ours, theirs = answer(agg.endpoint, case), answer(vllm_server, case, headers={})
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    ours_body, theirs_body = ours.json(), theirs.json()
    assert ours_body["choices"][0]["message"]["content"] == theirs_body["choices"][0]["message"]["content"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: ours_body["usage"][k] for k in counts} == {k: theirs_body["usage"][k] for k in counts}


def test_a_client_body_over_the_limit_is_cut_off_where_the_limit_is(agg):
    """pd also takes its peers' messages, with twice a client's limit; the API's paths keep a client's. A body
    streamed past it (no length declared) is a 413 naming that limit, and pd stops reading there: its memory,
    sampled meanwhile, grows by far less than the 96 MB sent (the status alone would not show it)."""
    import threading
    import time

    import psutil

    from mmgraph_contract.settings import max_request_bytes
    from mmgraph_contract.vocabulary import StageName

    limit = max_request_bytes(agg.graph.spec.media, StageName.FRONTEND)
    assert limit < 16 << 20 and max_request_bytes(agg.graph.spec.media, StageName.PD) == 2 * limit
    pd = psutil.Process(agg.stages[StageName.PD].proc.pid)
    baseline, peak, done = pd.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], pd.memory_info().rss)
            time.sleep(0.002)

    chunk = b"x" * (1 << 20)
    body = (b'{"model": "m", "padding": "', *([chunk] * 96), b'"}')
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        r = httpx.post(f"{agg.endpoint}/v1/chat/completions", content=iter(body), headers=KEY, timeout=60)
    finally:
        done.set()
        sampler.join()
    assert f"larger than this graph's {limit} byte limit" in error_of(r, 413)
    assert peak[0] - baseline < 3 * limit, f"pd grew by {(peak[0] - baseline) >> 20} MiB"


def test_one_request_at_a_time_stays_in_process(agg, reference):
    """Requests the engine has room for never leave the process, and each counts as served (none as cancelled,
    though the API stops reading at the last event)."""
    served = lambda outcome: metric(agg.endpoint, "mmgraph_engine_requests_total", outcome=outcome)  # noqa: E731
    before = served("ok"), served("cancelled")
    for case in ("one-image", "text-only"):
        assert tokens(agg.endpoint, case) == reference[case]
    assert (served("ok") - before[0], served("cancelled") - before[1]) == (2, 0)


def test_a_saturated_engine_sends_requests_to_another_replica(agg, reference):
    """The API a replica serves takes every request into its own engine until that engine is saturated (here
    max-num-seqs 2), then sends it to the least busy other pd replica over HTTP: with 8 requests in flight,
    both engines serve some, and every answer is still the oracle's."""
    replica = agg.add_replica(StageName.PD)
    try:
        second = f"http://{replica.host}:{replica.port}"
        served = lambda endpoint: metric(endpoint, "mmgraph_engine_requests_total", outcome="ok")  # noqa: E731
        load = [f"concurrent-{i}" for i in range(16)]

        def round_trip() -> bool:
            before = served(agg.endpoint), served(second)
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda case: tokens(agg.endpoint, case), load))
            assert got == [reference[case] for case in load]
            return served(agg.endpoint) > before[0] and served(second) > before[1]

        wait(round_trip, timeout=60)  # the first replica re-reads its peers every 2 s
    finally:
        agg.remove_replica(replica)
