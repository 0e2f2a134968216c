"""Bad input: each an OpenAI-format 4xx with a message a person can act on, and the workers still serving.

URL safety is tested where the connection is made (the encoder) with a guard loaded into that process that
refuses, and records, any socket connect outside 127.0.0.0/8: refusals must happen before any connection.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import time
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

from mmgraph_contract.graph import parse
from mmgraph_contract.vocabulary import StageName
from mmgraph_workers.frontend.router import KV_ATTEMPTS
from mmgraph_workers.ports import free_port
from mmgraph_workers.protocol import PREVIOUS_VERSION, PROTOCOL_VERSION, GenerateEvent, GenerateRequest, sampling
from mmgraph_workers.up import LocalGraph

from .conftest import CASES, MODEL_NAME, PEER, chat, data_url, error_of, graph_spec, metric, png, tokens, user, wait

GUARD = Path(__file__).with_name("guard")
STRICT = {
    "modalities": ["image"],
    "allowedSchemes": ["https", "data"],
    "allowPrivateNetworks": False,
    "maxBytes": 200_000,
    "maxPixels": 300 * 300,
    "maxItems": 2,
}


@pytest.fixture(scope="module")
def strict(graph, tiny_model, tmp_path_factory):
    """An e-pd frontend and its own encoder with default URL safety and small caps, routed to the session's pd;
    the encoder runs with the loopback-only socket guard."""
    logs = tmp_path_factory.mktemp("strict")
    guard_log = logs / "guard.log"
    local = LocalGraph(parse(graph_spec(tiny_model, "e-pd", **STRICT)), logdir=logs)
    encoder_port = free_port()
    guard_env = {
        "PYTHONPATH": f"{GUARD}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "MMGRAPH_GUARD_LOG": str(guard_log),
    }
    local.spawn(StageName.ENCODER, encoder_port, {}, env=guard_env)
    peers = {
        StageName.ENCODER: f"http://127.0.0.1:{encoder_port}",
        StageName.PD: f"http://127.0.0.1:{graph.stages[StageName.PD].port}",
    }
    local.spawn(StageName.FRONTEND, free_port(), peers)
    try:
        local.wait_healthy(timeout=120, progress=lambda line: None)
        local.guard_log = guard_log
        yield local
    finally:
        local.stop()


def ask_image(endpoint: str, url: str) -> httpx.Response:
    return chat(endpoint, user(url, "describe"), max_tokens=4)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG header claiming a huge 1-bit image over a tiny body: what a decompression bomb looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_malformed_json(endpoints):
    r = httpx.post(f"{endpoints['e-p-d']}/v1/chat/completions", content=b'{"model": "x", "messages": [', timeout=30)
    assert "not valid JSON" in error_of(r, 400)


def test_missing_messages_names_the_field(endpoints):
    r = httpx.post(f"{endpoints['e-p-d']}/v1/chat/completions", json={"model": MODEL_NAME}, timeout=30)
    assert "messages" in error_of(r, 400)


def test_unknown_content_part(endpoints):
    messages = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]
    message = error_of(chat(endpoints["e-p-d"], messages), 400)
    assert "'input_image'" in message and "'image_url'" in message and "'input_audio'" in message


def test_wrong_model_name(endpoints):
    r = httpx.post(
        f"{endpoints['e-p-d']}/v1/chat/completions", json={"model": "gpt-9", "messages": user("hi")}, timeout=30
    )
    assert "not served here" in error_of(r, 404)


def test_max_tokens_beyond_the_model_length(endpoints):
    message = error_of(chat(endpoints["e-p-d"], user("hello"), max_tokens=5000), 400)
    assert "1024 token context" in message and "lower max_tokens" in message


def test_undecodable_image(strict):
    message = error_of(ask_image(strict.endpoint, data_url(b"this is not an image at all")), 400)
    assert "cannot decode the image" in message


def test_truncated_png(strict):
    message = error_of(ask_image(strict.endpoint, data_url(png(96, 64, 5)[:300])), 400)
    assert "cannot decode the image" in message


def test_decompression_bomb(strict):
    message = error_of(ask_image(strict.endpoint, data_url(bomb_png())), 413)
    assert "pixel" in message or "decompression bomb" in message


def test_too_many_pixels(strict):
    buf = io.BytesIO()
    Image.new("RGB", (400, 400), "green").save(buf, format="PNG")  # small file, 160000 pixels > 90000
    message = error_of(ask_image(strict.endpoint, data_url(buf.getvalue())), 413)
    assert "400x400" in message and "pixel limit" in message


def test_too_many_bytes(strict):
    message = error_of(ask_image(strict.endpoint, data_url(os.urandom(300_000))), 413)
    assert "200000 byte limit" in message


def test_too_many_images(strict):
    image = data_url(png(56, 56, 1))
    message = error_of(chat(strict.endpoint, user(image, image, image, "three")), 400)
    assert "3 media items" in message and "2 allowed" in message


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "http://example.com/a.png"])
def test_disallowed_schemes(strict, url):
    message = error_of(ask_image(strict.endpoint, url), 400)
    assert "is not allowed for media" in message and "allowed: data, https" in message


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://127.0.0.1/a.png", "private or loopback"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://10.1.2.3/a.png", "private or loopback"),
        ("https://localhost/a.png", "private or loopback"),  # a host name that resolves to a private address
    ],
)
def test_private_addresses_refused_before_connecting(strict, url, why):
    message = error_of(ask_image(strict.endpoint, url), 403)
    assert why in message and "refused" in message
    assert not strict.guard_log.exists(), strict.guard_log.read_text()


def test_redirect_to_link_local_refused_even_where_private_is_allowed(endpoints, media_server):
    """The session graph allows http and private networks (to reach the local media server); its redirect to the
    metadata address must still be refused, checked again at the redirect."""
    ok = ask_image(endpoints["e-pd"], f"{media_server.url}/a.png")
    assert ok.status_code == 200, ok.text
    r = ask_image(endpoints["e-pd"], f"{media_server.url}/redirect?to=http://169.254.169.254/latest/meta-data/")
    assert "169.254.169.254" in error_of(r, 403)
    r = ask_image(endpoints["e-pd"], f"{media_server.url}/redirect?to=file:///etc/passwd")
    assert "'file' is not allowed" in error_of(r, 400)


def test_a_body_over_the_graphs_limit_is_a_413(strict):
    """Every stage caps the bodies it reads (from spec.media: every item at its cap, as base64, plus text): over
    it, declared or streamed, is a 413 that says what sets the limit, at the frontend and between stages."""
    from mmgraph_contract.settings import max_request_bytes

    media = parse(graph_spec(Path("/unused"), "e-pd", **STRICT)).spec.media
    for stage, url in (
        (StageName.FRONTEND, f"{strict.endpoint}/v1/chat/completions"),
        (StageName.ENCODER, f"http://127.0.0.1:{strict.stages[StageName.ENCODER].port}/encode"),
    ):
        limit = max_request_bytes(media, stage)
        body = b'{"model": "m", "messages": [], "padding": "' + b"x" * limit + b'"}'
        declared = httpx.post(url, content=body, headers=PEER, timeout=30)
        chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
        streamed = httpx.post(url, content=chunks, headers=PEER, timeout=30)
        for response in (declared, streamed):
            assert f"larger than this graph's {limit} byte limit" in error_of(response, 413), stage
    assert ask_image(strict.endpoint, data_url(png(96, 64, 1))).status_code == 200  # and it still serves


@pytest.mark.parametrize("topology", ["agg", "e-pd", "e-p-d"])
def test_an_image_the_model_cannot_use_is_refused_before_any_pass(graph, endpoints, topology):
    """4000x16: within every cap, but an aspect ratio of 250, which Qwen2-VL's processor cannot tile (vLLM's own
    server answers 400) and which every family refuses. A 400 saying so, whichever stage processes images, and the
    encoder's tower never runs for it."""
    encoder = f"http://127.0.0.1:{graph.stages[StageName.ENCODER].port}"
    passes = metric(encoder, "mmgraph_encoder_batch_items_count")
    message = error_of(ask_image(endpoints[topology], data_url(png(4000, 16, 7))), 400)
    assert "aspect ratio" in message, message
    assert metric(encoder, "mmgraph_encoder_batch_items_count") == passes


def test_a_full_transfer_pool_is_a_retryable_503_that_pins_nothing(graph, tiny_model, tmp_path_factory):
    """An encoder whose pool holds two images' embeddings gets a request of three: it answers 503 with
    Retry-After, releasing the two it had published (all or nothing), so a request of two succeeds right after
    instead of waiting for their time-to-live."""
    from mmgraph_workers.protocol import EncodeRequest, EncodeResponse, image_items
    from mmgraph_workers.transfer import Pool, framed

    def encode(port: int, urls: list[str]) -> httpx.Response:
        body = EncodeRequest(request_id=f"pool-{time.monotonic_ns()}", media=image_items(urls)).model_dump_json()
        return httpx.post(f"http://127.0.0.1:{port}/encode", content=body, headers=PEER, timeout=60)

    seed = time.monotonic_ns() % 1_000_000
    images = [data_url(png(96, 64, seed + i)) for i in range(3)]
    probe = EncodeResponse.model_validate_json(encode(graph.stages[StageName.ENCODER].port, images[:1]).content)
    one = Pool.footprint(framed(probe.items[0].embeddings.nbytes))  # what one image takes of the pool
    local = LocalGraph(parse(graph_spec(tiny_model)), logdir=tmp_path_factory.mktemp("small-pool"))
    port = free_port()
    local.spawn(StageName.ENCODER, port, {}, args=[f"--transfer-pool-bytes={2 * one}"])
    try:
        local.wait_healthy(timeout=120, progress=lambda line: None)
        full = encode(port, images)
        assert full.status_code == 503 and full.headers.get("retry-after") == "1", full.text
        assert "transfer pool" in full.json()["error"]
        fits = encode(port, images[:2])
        assert fits.status_code == 200, fits.text
    finally:
        local.stop()


def test_a_seed_vllm_cannot_take_is_a_400(endpoints):
    message = error_of(chat(endpoints["e-p-d"], user("hello"), max_tokens=2, seed=2**70), 400)
    assert "seed" in message


@pytest.mark.parametrize("topology", ["e-pd", "e-p-d"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_client_that_hangs_up_stops_the_engine_generating(graph, endpoints, topology, stream):
    """The stage generating the tokens (pd in e-pd, decode in e-p-d) aborts the request once its client hangs
    up, streaming or not: the worker counts it cancelled, vLLM runs nothing, and no token is made for nobody
    (980 tokens would take seconds more)."""
    stage = StageName.PD if topology == "e-pd" else StageName.DECODE
    base = f"http://127.0.0.1:{graph.stages[stage].port}"

    def cancelled() -> float:
        return metric(base, "mmgraph_engine_requests_total", stage=stage.value, outcome="cancelled")

    before = cancelled()
    url = f"{endpoints[topology]}/v1/chat/completions"
    body = {"model": MODEL_NAME, "messages": user("go on"), "max_tokens": 980, "temperature": 0, "stream": stream}
    if stream:
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if '"content": "' in line and '"content": ""' not in line)
    else:  # hang up while the engine generates: not after a fixed time, which a fast machine outlasts
        host, port = endpoints[topology].removeprefix("http://").split(":")
        payload = json.dumps(body).encode()
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        with socket.create_connection((host, int(port)), timeout=10) as client:
            client.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            wait(lambda: metric(base, "vllm:num_requests_running") >= 1, timeout=10)
    wait(lambda: cancelled() == before + 1, timeout=10)
    wait(lambda: metric(base, "vllm:num_requests_running") == 0, timeout=5)
    made = metric(base, "vllm:generation_tokens_total")
    time.sleep(1)
    assert metric(base, "vllm:generation_tokens_total") == made


def test_a_client_that_hangs_up_stops_the_work_it_started(endpoints, media_server):
    """Not streaming, the client gives up while its image is still arriving (7 s): the frontend cancels its
    encoder call and the encoder its fetch, so the media server's upload is cut off, not finished for nobody."""
    media_server.slow_started.clear()
    media_server.slow_sent.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{endpoints['e-pd']}/v1/chat/completions",
            json={
                "model": MODEL_NAME,
                "messages": user(f"{media_server.url}/slow-ok.png", "describe"),
                "max_tokens": 4,
            },
            timeout=2,
        )
    assert media_server.slow_started.is_set()
    assert not media_server.slow_sent.wait(10), "the image was fetched in full for a client that had gone"


def test_embeddings_of_a_client_that_left_are_released_not_kept_for_their_time_to_live(graph, endpoints):
    """The client leaves after the encoder published its image's embeddings and before pd pulled them (pd is held
    still with SIGSTOP meanwhile): the frontend releases them at the encoder at once, instead of the buffer being
    held for its time-to-live (a minute) for nobody."""
    encoder = f"http://127.0.0.1:{graph.stages[StageName.ENCODER].port}"
    pd = graph.stages[StageName.PD].proc

    def published() -> float:
        return metric(encoder, "mmgraph_encoder_published_buffers")

    before = published()
    os.kill(pd.pid, signal.SIGSTOP)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{endpoints['e-pd']}/v1/chat/completions",
                json={"model": MODEL_NAME, "messages": user(data_url(png(90, 60, 4242)), "what"), "max_tokens": 2},
                timeout=3,
            )
        wait(lambda: published() <= before, timeout=5)  # the gauge is refreshed every second
    finally:
        os.kill(pd.pid, signal.SIGCONT)


def test_a_compressed_body_never_inflates_in_the_encoder(graph, endpoints, media_server):
    """The encoder's own memory, sampled while it refuses a body of 2 KB that would inflate to 256 MiB: it asks
    for identity, refuses what comes compressed anyway, and inflates nothing (the status alone would not show
    a stage that inflated the body and then refused it for its size)."""
    import threading

    import psutil

    encoder = psutil.Process(graph.stages[StageName.ENCODER].proc.pid)
    baseline, peak, done = encoder.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], encoder.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        r = ask_image(endpoints["e-pd"], f"{media_server.url}/bomb.png")
    finally:
        done.set()
        sampler.join()
    assert "Content-Encoding 'gzip, gzip'" in error_of(r, 422)
    assert peak[0] - baseline < 64 << 20, f"the encoder grew by {(peak[0] - baseline) >> 20} MiB"


@pytest.mark.parametrize("stage", ["encoder", "pd", "decode"])
def test_a_message_of_another_protocol_version_is_refused_by_name(graph, stage):
    """A stage of another release (a rollout half done) is refused with a message, never misread."""
    path = "/encode" if stage == "encoder" else "/generate"
    body = (
        {"version": 1, "request_id": "old", "urls": ["data:,"]}
        if stage == "encoder"
        else {
            **GenerateRequest(request_id="old", prompt_token_ids=[1], sampling=sampling()).model_dump(),
            "version": 1,
        }
    )
    response = httpx.post(f"http://127.0.0.1:{graph.stages[stage].port}{path}", json=body, headers=PEER, timeout=30)
    assert response.status_code == 400
    spoken = f"({PREVIOUS_VERSION} or {PROTOCOL_VERSION})"
    assert f"protocol version 1 is not spoken here {spoken}" in response.json()["error"]
    assert response.json()["speaks"] == [PREVIOUS_VERSION, PROTOCOL_VERSION]  # what a sender of another release reads


def test_workers_still_serve_after_all_of_it(endpoints, reference):
    for topology, endpoint in endpoints.items():
        assert tokens(endpoint, "one-image") == reference["one-image"], topology


def test_api_key_required_when_configured(graph, tiny_model, tmp_path_factory):
    spec = graph_spec(tiny_model, "agg")
    spec["spec"]["stages"]["frontend"]["apiKeySecret"] = {"name": "api", "key": "key"}
    local = LocalGraph(parse(spec), logdir=tmp_path_factory.mktemp("apikey"))
    local.spawn(
        StageName.FRONTEND,
        free_port(),
        {StageName.PD: f"http://127.0.0.1:{graph.stages[StageName.PD].port}"},
        env={"MMGRAPH_API_KEY": "s3cret"},
    )
    try:
        local.wait_healthy(timeout=120, progress=lambda line: None)
        body = {"model": MODEL_NAME, "messages": user("hi"), "max_tokens": 2}
        url = f"{local.endpoint}/v1/chat/completions"
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=60).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60).status_code == 200
        assert httpx.get(f"{local.endpoint}/health", timeout=10).status_code == 200  # probes need no key
        # vLLM's server leaves these open; here they share the tokenizer's thread with the answers, so not
        for path, tokenizer_call in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
            assert httpx.post(f"{local.endpoint}{path}", json=tokenizer_call, timeout=30).status_code == 401
    finally:
        local.stop()


def lease_frontend(graph, tiny_model, logdir, **transfer) -> LocalGraph:
    """An e-p-d frontend with its own `spec.transfer` settings, routed to the session graph's workers."""
    spec = graph_spec(tiny_model, "e-p-d")
    spec["spec"]["transfer"] = transfer
    local = LocalGraph(parse(spec), logdir=logdir)
    peers = {s: f"http://127.0.0.1:{graph.stages[s].port}" for s in (StageName.ENCODER, StageName.PD, StageName.DECODE)}
    local.spawn(StageName.FRONTEND, free_port(), peers)
    local.wait_healthy(timeout=120, progress=lambda line: None)
    return local


REQUESTS, MISSED = "mmgraph_engine_requests_total", "mmgraph_engine_kv_deadline_missed_total"


def test_kv_lease_that_would_expire_is_never_used(graph, tiny_model, tmp_path_factory):
    """A frontend whose KV lease leaves no time to start decode prefills again (KV_ATTEMPTS in all), then fails
    with 503, and decode never receives a request whose KV may have been reused."""
    local = lease_frontend(graph, tiny_model, tmp_path_factory.mktemp("lease"), kvLeaseSeconds=1, timeoutSeconds=0.999)
    decode = f"http://127.0.0.1:{graph.stages[StageName.DECODE].port}"
    try:
        before = metric(decode, REQUESTS)
        r = chat(local.endpoint, **CASES["one-image"])
        assert r.status_code == 503, r.text
        assert "lease would expire before decode could start" in r.json()["error"]["message"]
        assert metric(decode, REQUESTS) == before
        assert metric(local.endpoint, "mmgraph_kv_lease_reprefills_total") == KV_ATTEMPTS
    finally:
        local.stop()


def test_decode_late_for_the_lease_makes_the_frontend_prefill_again(graph, tiny_model, tmp_path_factory):
    """A 1 s lease minus the frontend's 1 s margin leaves decode no time: each attempt, decode answers with a
    retryable 503 before any token, and the frontend prefills again, KV_ATTEMPTS times in all, then tells the
    client why. (Without the margin decode would have about a second, and answer.)"""
    local = lease_frontend(graph, tiny_model, tmp_path_factory.mktemp("late"), kvLeaseSeconds=1, timeoutSeconds=0.01)
    pd, decode = (f"http://127.0.0.1:{graph.stages[s].port}" for s in (StageName.PD, StageName.DECODE))
    try:
        prefills, decodes, missed = metric(pd, REQUESTS), metric(decode, REQUESTS), metric(decode, MISSED)
        r = chat(local.endpoint, **CASES["one-image"])
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "not pulled within 0.0 s" in message and f"{KV_ATTEMPTS} times" in message, message
        assert metric(local.endpoint, "mmgraph_kv_lease_reprefills_total") == KV_ATTEMPTS
        assert metric(pd, REQUESTS) - prefills == KV_ATTEMPTS
        assert metric(decode, REQUESTS) - decodes == metric(decode, MISSED) - missed == KV_ATTEMPTS
    finally:
        local.stop()


def test_decode_that_cannot_pull_the_kv_within_the_lease_stops_before_any_token(graph, endpoints, reference):
    """The frontend gives decode the time left on pd's lease; decode must produce its first token (so have pulled
    the KV) within it, or stop the request before any token and say so (retry: nothing was sent). Without the
    guard a decode stuck past the lease would pull blocks pd may have given to another request and answer with
    wrong tokens, silently. Three cases: no time at all; a pull in flight when the time runs out (pd stopped
    after its prefill, so the read cannot complete); time to spare."""
    pd_stage = graph.stages[StageName.PD]
    pd, decode = (f"http://127.0.0.1:{graph.stages[s].port}" for s in (StageName.PD, StageName.DECODE))
    params = sampling(max_tokens=4, temperature=0)

    def events(base: str, request: GenerateRequest) -> list[GenerateEvent]:
        r = httpx.post(f"{base}/generate", content=request.model_dump_json(), headers=PEER, timeout=60)
        assert r.status_code == 200, r.text
        return [GenerateEvent.model_validate_json(line) for line in r.text.splitlines() if line.strip()]

    before = metric(decode, MISSED)
    for deadline, stop_pd in ((0.0, False), (2.0, True), (30.0, False)):
        rid = f"lease-{deadline}-{time.monotonic_ns()}"
        ids = [40 + (time.monotonic_ns() // 1000 + 7 * k) % 400 for k in range(40)]  # one no engine has cached
        prefill = events(pd, GenerateRequest(request_id=rid, prompt_token_ids=ids, sampling=params, prefill_only=True))
        kv = prefill[-1].kv_transfer_params
        assert kv and kv.get("remote_block_ids"), prefill[-1]
        request = GenerateRequest(
            request_id=rid,
            prompt_token_ids=ids,
            sampling=params,
            kv_transfer_params=kv,
            kv_deadline_seconds=deadline,
        )
        if stop_pd:
            os.killpg(pd_stage.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            out = events(decode, request)
            took = time.monotonic() - started
        finally:
            if stop_pd:
                os.killpg(pd_stage.proc.pid, signal.SIGCONT)
        if deadline < 30:
            assert len(out) == 1 and out[0].status == 503 and out[0].retry, out
            assert f"not pulled within {deadline:.1f} s" in (out[0].error or "")
            assert deadline <= took < deadline + 5
        else:  # the same path with time to spare: tokens, so the guard is not what always answers
            assert out[-1].finish_reason and sum(len(e.token_ids) for e in out) == 4, out
    assert metric(decode, MISSED) == before + 2
    assert tokens(endpoints["e-p-d"], "one-image") == reference["one-image"]  # decode and pd still serve


def test_pd_frees_a_prefill_nobody_pulls_when_its_lease_ends(graph):
    """pd keeps a prefilled request's KV blocks for decode for `kvLeaseSeconds` (the session graph's 30 s) and
    no longer: a prefill whose decode never comes (its client went away, decode died) does not leak blocks."""
    pd = f"http://127.0.0.1:{graph.stages[StageName.PD].port}"
    lease = parse(graph_spec(Path("/unused"))).spec.transfer.kv_lease_seconds

    def used() -> float:
        return metric(pd, "vllm:kv_cache_usage_perc")

    wait(lambda: used() == 0.0, timeout=lease + 30)  # other tests' prefills that nobody pulled end with their leases
    idle = 0.0
    ids = [40 + (time.monotonic_ns() // 1000 + 11 * k) % 400 for k in range(200)]  # 7 blocks no one has cached
    request = GenerateRequest(
        request_id=f"orphan-{time.monotonic_ns()}",
        prompt_token_ids=ids,
        sampling=sampling(max_tokens=4, temperature=0),
        prefill_only=True,
    )
    r = httpx.post(f"{pd}/generate", content=request.model_dump_json(), headers=PEER, timeout=60)
    assert r.status_code == 200 and "kv_transfer_params" in r.text, r.text
    prefilled = time.monotonic()
    held = used()
    assert held > idle, (idle, held)
    wait(lambda: used() <= idle, timeout=lease + 30)
    assert time.monotonic() - prefilled >= lease - 2, "freed before the lease ended: decode could have lost it"


@pytest.fixture
def own_encoder(graph, tiny_model, tmp_path_factory):
    """An e-pd frontend with its own encoder (http and private URLs allowed), routed to the session's pd, for the
    tests that kill or stop that encoder; the frontend gives up on a stage call after 3 s."""
    local = LocalGraph(parse(graph_spec(tiny_model, "e-pd")), logdir=tmp_path_factory.mktemp("own-encoder"))
    encoder_port = free_port()
    local.spawn(StageName.ENCODER, encoder_port, {})
    peers = {
        StageName.ENCODER: f"http://127.0.0.1:{encoder_port}",
        StageName.PD: f"http://127.0.0.1:{graph.stages[StageName.PD].port}",
    }
    local.spawn(StageName.FRONTEND, free_port(), peers, args=["--request-timeout-seconds=3"])
    try:
        local.wait_healthy(timeout=120, progress=lambda line: None)
        yield local
    finally:
        local.stop()


def test_stage_killed_mid_request_fails_fast_naming_it(own_encoder, media_server, endpoints, reference):
    """The encoder dies while it is reading a slow URL for a request: the client gets a 5xx naming the encoder
    at once (not at the deadline), `mmgraph up`'s watcher names the dead stage, and the other graphs keep
    serving."""
    import threading

    from mmgraph_workers.up import StageDied

    encoder = own_encoder.stages[StageName.ENCODER]
    media_server.slow_started.clear()
    results = {}
    thread = threading.Thread(
        target=lambda: results.setdefault("r", ask_image(own_encoder.endpoint, f"{media_server.url}/slow.png"))
    )
    thread.start()
    assert media_server.slow_started.wait(30), "the encoder never began reading the URL"
    killed = time.monotonic()
    os.killpg(encoder.proc.pid, signal.SIGKILL)
    thread.join(60)
    response = results["r"]
    assert response.status_code == 502, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("encoder: ") and "127.0.0.1" not in message  # the stage, never a pod's address
    assert time.monotonic() - killed < 2.5  # a dead peer is noticed, not timed out (the frontend waits 3 s)
    encoder.proc.wait(10)  # the kernel may still be tearing the killed process down
    dead = own_encoder.dead()
    assert dead is not None and dead.name == StageName.ENCODER
    assert "stage encoder exited" in str(StageDied(dead))
    assert tokens(endpoints["e-p-d"], "one-image") == reference["one-image"]


def test_a_hung_stage_hits_the_frontends_deadline(own_encoder, media_server):
    """The encoder stops answering (SIGSTOP: alive, connections accepted by the kernel, nothing read): the
    client gets a 504 naming the encoder when the frontend's deadline passes, and the stage serves again
    once it resumes."""
    encoder = own_encoder.stages[StageName.ENCODER]
    os.killpg(encoder.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = ask_image(own_encoder.endpoint, f"{media_server.url}/a.png")
        took = time.monotonic() - started
    finally:
        os.killpg(encoder.proc.pid, signal.SIGCONT)
    assert response.status_code == 504, response.text
    assert "encoder" in response.json()["error"]["message"] and "Timeout" in response.json()["error"]["message"]
    assert 3 <= took < 10
    assert ask_image(own_encoder.endpoint, f"{media_server.url}/a.png").status_code == 200
