"""Replicas coming and going under load, and a decode dying mid-stream.

The session graph's frontend finds its peers by name, re-resolved every 2 s from the peer hosts file that
`mmgraph up` keeps (its stand-in for a headless Service's DNS). A replica is another `mmgraph worker` process
on the next loopback address and the same port, as pods of one Deployment are.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from PIL import Image

from mmgraph_contract.graph import parse
from mmgraph_contract.vocabulary import StageName
from mmgraph_workers.ports import free_port
from mmgraph_workers.protocol import EncodedItem, EncodeRequest, EncodeResponse, image_items
from mmgraph_workers.up import LocalGraph

from .conftest import CASES, IMG_C, MODEL_NAME, PEER, chat, data_url, graph_spec, metric, png, user, wait

LOAD = [f"concurrent-{i}" for i in range(16)]


class Load:
    """Clients sending LOAD's requests back to back until stopped; every answer is kept."""

    def __init__(self, endpoint: str, clients: int = 2):
        self.endpoint, self.results, self.stopping = endpoint, [], threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self, k: int) -> None:
        i = k
        while not self.stopping.is_set():
            case = LOAD[i % len(LOAD)]
            response = chat(self.endpoint, **CASES[case])
            body = response.json()
            got = body["choices"][0]["token_ids"] if response.status_code == 200 else body
            self.results.append((case, response.status_code, got))
            i += len(self.threads)

    def wait_for(self, more: int, timeout: float = 120) -> None:
        target = len(self.results) + more
        wait(lambda: len(self.results) >= target, timeout)

    def stop(self) -> list[tuple[str, int, object]]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(200)
        return self.results


def encoded_by(replica) -> float:
    text = httpx.get(f"http://{replica.host}:{replica.port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("mmgraph_encoder_items_total"))


def items_encoded(stage, cached: bool) -> float:
    """mmgraph_encoder_items_total of one encoder replica: served from its cache, or through the tower."""
    text = httpx.get(f"http://{stage.host}:{stage.port}/metrics", timeout=5).text
    series = f'mmgraph_encoder_items_total{{cached="{str(cached).lower()}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series))


def test_routing_by_content_encodes_each_image_once_across_encoder_replicas(graph, tmp_path_factory):
    """Two encoder replicas; four new images, each sent three times in turn. Routed by content, an image always
    meets the one replica that owns it: one tower pass per image, every repeat a cache hit. A frontend routing to
    the least busy replica, as before, alternates between idle replicas and encodes images twice."""
    encoders = [graph.stages[StageName.ENCODER], graph.add_replica(StageName.ENCODER)]
    spec = graph.graph.model_copy(deep=True)
    spec.spec.embedding_cache.routing = "leastBusy"
    least = LocalGraph(spec, logdir=tmp_path_factory.mktemp("least-busy"))
    least.spawn(StageName.FRONTEND, free_port(), graph.peers, args=graph.hosts_args(StageName.FRONTEND))

    def passes(endpoint: str, seed: int) -> tuple[float, float]:
        """(tower passes, cache hits) for one round of four new images through `endpoint`."""
        before = [sum(items_encoded(e, cached) for e in encoders) for cached in (False, True)]
        for image in [data_url(png(80, 64, seed + i)) for i in range(4)]:
            answers = [chat(endpoint, user(image, "describe"), max_tokens=4).json()["choices"][0] for _ in range(3)]
            assert [a["token_ids"] for a in answers] == [answers[0]["token_ids"]] * 3
        after = [sum(items_encoded(e, cached) for e in encoders) for cached in (False, True)]
        return after[0] - before[0], after[1] - before[1]

    def routes_to_both(endpoint: str) -> bool:  # the frontend has re-read its peers: the new replica gets work
        seed = 7000 + time.monotonic_ns() % 10**6
        before = items_encoded(encoders[1], False)
        for i in range(8):
            assert chat(endpoint, user(data_url(png(48, 48, seed + i)), "hi"), max_tokens=1).status_code == 200
        return items_encoded(encoders[1], False) > before

    try:
        least.wait_healthy(timeout=120, progress=lambda line: None)
        for endpoint in (graph.endpoint, least.endpoint):
            wait(lambda endpoint=endpoint: routes_to_both(endpoint), timeout=60)
        by_content, least_busy = passes(graph.endpoint, 6000), passes(least.endpoint, 6100)
    finally:
        least.stop()
        graph.remove_replica(encoders[1])
    assert by_content == (4, 8)  # one pass per image, its repeats hits
    assert least_busy[0] > 4, least_busy  # the images met both replicas


def encode_directly(graph: LocalGraph, image: bytes) -> EncodedItem:
    """One image through the graph's encoder as pd's caller would send it; released at once (no pd pulls it)."""
    encoder = graph.stages[StageName.ENCODER]
    body = EncodeRequest(request_id=f"direct-{time.monotonic_ns()}", media=image_items([data_url(image)]))
    base = f"http://{encoder.host}:{encoder.port}"
    r = httpx.post(f"{base}/encode", content=body.model_dump_json(), headers=PEER, timeout=60)
    assert r.status_code == 200, r.text
    item = EncodeResponse.model_validate_json(r.content).items[0]
    httpx.post(f"{base}/release/{item.embeddings.handle}", headers=PEER, timeout=10)
    return item


def test_the_encoder_cache_finds_the_same_pixels_in_other_bytes(graph):
    """The encoder's cache is keyed by decoded content: an image re-compressed (other PNG bytes, the same
    pixels) skips the tower and carries the same content key."""
    image = png(80, 64, 6200)
    buf = io.BytesIO()
    Image.open(io.BytesIO(image)).save(buf, format="PNG", compress_level=1)
    assert buf.getvalue() != image
    first, again = encode_directly(graph, image), encode_directly(graph, buf.getvalue())
    assert not first.cached and again.cached and again.key == first.key


def test_concurrent_requests_for_one_new_image_share_one_tower_pass(graph):
    """A hot new image arrives in several requests at once: the first encodes it, the others wait for that
    pass instead of repeating it."""
    encoder = graph.stages[StageName.ENCODER]
    image = png(224, 224, 6300)
    before = items_encoded(encoder, cached=False), items_encoded(encoder, cached=True)
    with ThreadPoolExecutor(6) as pool:
        items = list(pool.map(lambda _: encode_directly(graph, image), range(6)))
    assert len({item.key for item in items}) == 1
    assert items_encoded(encoder, cached=False) - before[0] == 1
    assert items_encoded(encoder, cached=True) - before[1] == 5


def test_encoder_replicas_added_and_removed_under_load(graph, reference):
    """Scale the encoder 1 -> 2 -> 1 while two clients keep sending: the new replica gets work without a
    restart of anything, the one scaled down finishes what it had (pd pulls its embeddings first), and no
    request fails or gets other tokens than the single-engine oracle."""
    load = Load(graph.endpoint)
    try:
        load.wait_for(3)
        replica = graph.add_replica(StageName.ENCODER)
        wait(lambda: encoded_by(replica) > 0, timeout=60)  # picked up by re-resolution alone
        load.wait_for(6)
        graph.remove_replica(replica)
        assert replica.proc.returncode is not None
        load.wait_for(6)
    finally:
        results = load.stop()
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:3]
    wrong = [case for case, _, got in results if got != reference[case]]
    assert not wrong, wrong


def test_crashed_replica_still_listed_is_skipped(graph, reference):
    """A replica dies while still listed (as a pod that crashed before its endpoint is removed): requests the
    router sends its way are refused at connect and go to the other replica, so none fails."""
    replica = graph.add_replica(StageName.ENCODER)
    os.killpg(replica.proc.pid, signal.SIGKILL)
    replica.proc.wait(10)
    assert replica.host in Path(graph.hosts_file).read_text()  # still listed: the frontend must cope
    refused = 'mmgraph_stage_connect_refused_total{stage="encoder"}'
    before = metric(graph.endpoint, refused)
    load = Load(graph.endpoint)
    try:  # until the frontend has re-read its peers (every 2 s) and tried the dead address
        wait(lambda: metric(graph.endpoint, refused) > before, timeout=60)
        load.wait_for(3)
    finally:
        results = load.stop()
        graph.replicas.remove(replica)
        graph.write_hosts()
    assert all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200][:3]
    assert all(got == reference[case] for case, _, got in results)


def test_an_encoder_told_to_stop_stays_until_its_embeddings_are_read(graph, tiny_model, tmp_path_factory):
    """SIGTERM with embeddings published and not yet read (a replica scaled down after answering a request whose
    embeddings pd has still to pull): the encoder stays, the read gets the right bytes, then it exits cleanly."""
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    from mmgraph_workers.transfer import make_transfer

    def encode(port: int) -> EncodeResponse:
        body = EncodeRequest(request_id=f"drain-{time.monotonic_ns()}", media=image_items([IMG_C])).model_dump_json()
        r = httpx.post(f"http://127.0.0.1:{port}/encode", content=body, headers=PEER, timeout=60)
        assert r.status_code == 200, r.text
        return EncodeResponse.model_validate_json(r.content)

    def metadata(port: int) -> str:  # as pd asks the encoder for its agent
        return httpx.get(f"http://127.0.0.1:{port}/v1/transfer/agent", headers=PEER, timeout=10).json()["metadata"]

    local = LocalGraph(parse(graph_spec(tiny_model)), logdir=tmp_path_factory.mktemp("drain"))
    port = free_port()
    local.spawn(StageName.ENCODER, port, {})
    reader = make_transfer("nixl", f"drain-reader-{os.getpid()}", recv_pool_bytes=8 << 20)
    try:
        local.wait_healthy(timeout=300, progress=lambda line: None)
        leaving = local.stages[StageName.ENCODER]
        item, agent = encode(port).items[0], metadata(port)  # pd asks before: a stopping encoder takes no calls
        leaving.proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert leaving.proc.poll() is None, "the encoder left with embeddings still to be read"
        got = reader.fetch(item.embeddings, time.monotonic() + 10, agent)
        assert leaving.proc.wait(15) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
        assert "every published embedding was read (1 waited for)" in leaving.log.read_text()
        live = graph.stages[StageName.ENCODER].port
        expected = reader.fetch(encode(live).items[0].embeddings, time.monotonic() + 10, metadata(live))
        assert torch.equal(got, expected)
    finally:
        local.stop()
        reader.close()


def test_decode_killed_mid_stream(graph, tiny_model, reference, tmp_path_factory):
    """A decode engine dies while it streams: the client's stream ends with an error naming decode (after the
    tokens it had), quickly; the session graph keeps serving."""
    spec = parse(graph_spec(tiny_model))
    local = LocalGraph(spec, logdir=tmp_path_factory.mktemp("decode-dies"))
    decode_port = free_port()
    peers = {s: f"http://127.0.0.1:{graph.stages[s].port}" for s in (StageName.ENCODER, StageName.PD)}
    try:
        local.spawn(StageName.DECODE, decode_port, peers)  # pulls from the session graph's pd
        peers[StageName.DECODE] = f"http://127.0.0.1:{decode_port}"
        local.spawn(StageName.FRONTEND, free_port(), peers)
        local.wait_healthy(timeout=300, progress=lambda line: None)
        decode = local.stages[StageName.DECODE]
        body = {**CASES["one-image"], "model": MODEL_NAME, "max_tokens": 400, "temperature": 0, "stream": True}
        lines, killed_at = [], None
        with httpx.stream("POST", f"{local.endpoint}/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in filter(None, response.iter_lines()):  # SSE events are separated by blank lines
                lines.append(line)
                if killed_at is None and '"content": "' in line and '"content": ""' not in line:
                    os.killpg(decode.proc.pid, signal.SIGKILL)  # the first token is out: decode is streaming
                    killed_at = time.monotonic()
        assert killed_at is not None, "no token arrived"
        assert time.monotonic() - killed_at < 30
        assert lines[-1] == "data: [DONE]"
        error = json.loads(next(line for line in reversed(lines) if '"error"' in line)[6:])["error"]
        assert "decode" in error["message"] and error["code"] >= 500, error
    finally:
        local.stop()
    assert chat(graph.endpoint, **CASES["one-image"]).json()["choices"][0]["token_ids"] == reference["one-image"]


def test_a_frontend_told_to_stop_finishes_what_it_is_serving(graph, tiny_model, media_server, tmp_path_factory):
    """SIGTERM while a request is in flight whose image takes 7 s to arrive (longer than uvicorn's default 5 s
    drain): the frontend takes no new work but answers that request in full, then exits."""
    from .conftest import start_frontend, user

    local = start_frontend(graph, tiny_model, "e-pd", tmp_path_factory.mktemp("frontend-drain"))
    try:
        local.wait_healthy(timeout=120, progress=lambda line: None)
        frontend = local.stages[StageName.FRONTEND]
        media_server.slow_started.clear()
        results = {}
        url = f"{media_server.url}/slow-ok.png"
        thread = threading.Thread(target=lambda: results.setdefault("r", chat(local.endpoint, user(url, "describe"))))
        started = time.monotonic()
        thread.start()
        assert media_server.slow_started.wait(30)
        frontend.proc.send_signal(signal.SIGTERM)
        thread.join(60)
        assert results["r"].status_code == 200, results["r"].text
        assert time.monotonic() - started > 6
        frontend.proc.wait(30)
    finally:
        local.stop()
