"""Session fixtures for the data plane: the tiny model, the oracle's tokens, and one real graph of processes.

The graph is an e-p-d graph run by `LocalGraph` (the same `mmgraph worker` command lines `mmgraph up` and a
Deployment run): encoder, pd (vLLM + NixlConnector producer), decode (vLLM + NixlConnector consumer) and its
frontend. Two more frontends, one with topology agg and one with e-pd, route to the same pd and encoder: vLLM
engines start in ~25 s each on these CPUs, so the session shares them (an agg request to pd is the same engine
code path as in an agg-only graph: the engine loads the images itself; an agg graph runs its frontend inside pd's
process, which test_agg.py starts). Every process is stopped at the end.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from bombs import gzip_bomb as gzip_bomb  # re-exported: tests import it from here
from bombs import send_gzip_bomb
from PIL import Image

from mmgraph_contract.graph import parse
from mmgraph_contract.vocabulary import StageName
from mmgraph_contract.wire import PEER_TOKEN_ENV
from mmgraph_workers.baseline import vllm_serve
from mmgraph_workers.media.samples import clip
from mmgraph_workers.ports import free_port
from mmgraph_workers.server import peer_headers
from mmgraph_workers.up import LocalGraph

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny-qwen2-vl"
QWEN_EXAMPLE, LLAVA_EXAMPLE, AUDIO_EXAMPLE = "tiny-e-p-d.yaml", "tiny-llava-e-p-d.yaml", "tiny-qwen2-audio-e-p-d.yaml"
MODALITIES = {QWEN_EXAMPLE: ["image", "video"], LLAVA_EXAMPLE: ["image"], AUDIO_EXAMPLE: ["audio"]}
# One peer credential for every graph these tests start (LocalGraph takes it from the environment), so a test can
# call a stage directly, as another stage would, with PEER's headers.
os.environ.setdefault(PEER_TOKEN_ENV, f"test-peer-credential-{os.getpid()}")
PEER = peer_headers(os.environ[PEER_TOKEN_ENV])


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.RandomState(seed)
    image = Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(*parts: Any) -> list[dict[str, Any]]:
    content = [
        {"type": "image_url", "image_url": {"url": p}}
        if p.startswith("data:") or "://" in p
        else {"type": "text", "text": p}
        for p in parts
    ]
    return [{"role": "user", "content": content}]


def input_audio(data: bytes, format: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": format}}


def ask(*parts: dict[str, Any], text: str = "what is said") -> dict[str, Any]:
    """An audio case: the clips, then the question."""
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}], "max_tokens": 12}


IMG_A, IMG_B, IMG_C = data_url(png(96, 64, 1)), data_url(png(64, 96, 2)), data_url(png(112, 112, 3))
CASES: dict[str, dict[str, Any]] = {
    "one-image": {"messages": user(IMG_A, "describe this image"), "max_tokens": 12},
    "two-images": {"messages": user(IMG_A, IMG_B, "what differs between these two"), "max_tokens": 12},
    "text-only": {"messages": user("hello world, what color is the sky"), "max_tokens": 12},
    # one-image's text with another image of the same size: only the pixels differ
    "other-image": {"messages": user(data_url(png(96, 64, 5)), "describe this image"), "max_tokens": 12},
}
# 16 different requests for the concurrency test: each must get its own answer.
for i in range(16):
    image = data_url(png(56 + 8 * (i % 4), 56 + 8 * (i // 4), 100 + i))
    CASES[f"concurrent-{i}"] = {"messages": user(image, f"question number {i}"), "max_tokens": 8}
# Prefix caching: images of ONE size with ONE multi-block text (158 prompt tokens, block size 32), so two requests
# differ only in their images' content; alone ("long-i") and as the second of two ("pair-i", same first image).
LONG_TEXT = " ".join(["describe this image in detail please"] * 12)
SAME_SIZE = [data_url(png(96, 64, 200 + i)) for i in range(4)]
FIRST = data_url(png(96, 64, 300))
for i, image in enumerate(SAME_SIZE):
    CASES[f"long-{i}"] = {"messages": user(image, LONG_TEXT), "max_tokens": 12}
    CASES[f"pair-{i}"] = {"messages": user(FIRST, image, LONG_TEXT), "max_tokens": 12}
# Reuse: one image only these cases send; "reuse-longer" shares the first blocks of "reuse" and then differs.
REUSE = data_url(png(96, 64, 400))
CASES["reuse"] = {"messages": user(REUSE, LONG_TEXT), "max_tokens": 12}
CASES["reuse-longer"] = {"messages": user(REUSE, LONG_TEXT + " and then tell me the colors"), "max_tokens": 12}
# Proof that decode's KV came over NIXL: a prompt no other test sends, so no engine has it cached.
CASES["nixl-probe"] = {"messages": user(data_url(png(64, 64, 500)), IMG_B, "compare these two"), "max_tokens": 12}
# Videos (the oracle is given the frames mmgraph's loader samples: this checks the pipeline, not the loader).
VIDEO = data_url(clip(seconds=2, size=(96, 64)), "video/mp4")
VIDEO_PART = {"type": "video_url", "video_url": {"url": VIDEO}}
TEXT_PART = {"type": "text", "text": "what happens"}
CASES["one-video"] = {"messages": [{"role": "user", "content": [VIDEO_PART, TEXT_PART]}]}
IMAGE_PART = user(IMG_A)[0]["content"][0]
CASES["image-and-video"] = {"messages": [{"role": "user", "content": [IMAGE_PART, VIDEO_PART, TEXT_PART]}]}
for case in ("one-video", "image-and-video"):
    CASES[case]["max_tokens"] = 12


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmgraph_workers.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny")


# The node's tests (test_on_a_node.py, test_day_two.py): their graphs' namespace and the README's files
NAMESPACE = "serving"
CLUSTER = REPO / "examples" / "cluster"


@pytest.fixture(scope="session")
def node_models(chart_on_node: Any, tiny_model: Path) -> Iterator[Path]:
    """The tiny models on a hostPath PersistentVolume, bound to the claim `tiny-models` (readable by UID 1000)."""
    from kubenode import tool

    from mmgraph_workers.tiny_model import build

    node = chart_on_node
    shared = Path(tempfile.mkdtemp(prefix="mmgraph-node-models-"))  # outside pytest's 0700 directories
    try:
        shutil.copytree(tiny_model, shared / "tiny-qwen2-vl")
        build(shared / "tiny-qwen2-audio", family="qwen2-audio")
        for path in [shared, *shared.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IRGRP | stat.S_IROTH | (0o055 if path.is_dir() else 0))
        # the README's file, on this test's folder
        volumes = (CLUSTER / "tiny-models.yaml").read_text().replace("/var/lib/mmgraph/models", str(shared))
        tool(node, "kubectl", "create", "namespace", NAMESPACE)
        tool(node, "kubectl", "apply", "-f", "-", stdin=volumes)
        yield shared
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture(scope="session")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    """Greedy tokens of one in-process vLLM engine for every case (computed before any worker starts)."""
    return reference_tokens(tiny_model, CASES, tmp_path_factory.mktemp("reference"))


def reference_tokens(model: Path, cases: dict[str, dict[str, Any]], work: Path) -> dict[str, list[int]]:
    """The oracle (reference_engine.py, in a subprocess so its engine and memory are gone afterwards)."""
    (work / "requests.json").write_text(json.dumps(list(cases.values())))
    script = str(Path(__file__).with_name("reference_engine.py"))
    done = subprocess.run(
        [sys.executable, script, str(model), str(work / "requests.json"), str(work / "out.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"the reference engine failed:\n{done.stderr[-3000:]}"
    return dict(zip(cases, json.loads((work / "out.json").read_text()), strict=True))


def graph_spec(model: Path, topology: str = "e-p-d", example: str = QWEN_EXAMPLE, **media: Any) -> dict[str, Any]:
    """The tiny example graph (`example`, under examples/) on `model`, cut down to `topology`."""
    body = yaml.safe_load((REPO / "examples" / example).read_text())
    body["spec"]["model"]["path"] = str(model)
    body["spec"]["topology"] = topology
    body["spec"]["media"] = {
        "modalities": MODALITIES[example],
        "allowedSchemes": ["https", "http", "data"],
        "allowPrivateNetworks": True,
        **media,
    }
    if topology != "e-p-d":
        del body["spec"]["stages"]["decode"]
    if topology == "agg":
        del body["spec"]["stages"]["encoder"]
    return body


@pytest.fixture(scope="session")
def graph(tiny_model: Path, reference: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGraph]:
    with running(graph_spec(tiny_model), tmp_path_factory.mktemp("graph-logs")) as local:
        yield local


@contextlib.contextmanager
def running(body: dict[str, Any], logdir: Path) -> Iterator[LocalGraph]:
    """The graph `body` as local processes, healthy, stopped on the way out."""
    local = LocalGraph(parse(body), logdir=logdir)
    local.start()
    try:
        local.wait_healthy(timeout=300, progress=lambda line: None)
        yield local
    finally:
        local.stop()


def start_frontend(
    graph: LocalGraph,
    model: Path,
    topology: str,
    logdir: Path,
    encoder_port: int | None = None,
    example: str = QWEN_EXAMPLE,
    pd_port: int | None = None,
    **media: Any,
) -> LocalGraph:
    """Another frontend process for `topology`, routed to `graph`'s workers (or to another encoder or pd)."""
    spec = parse(graph_spec(model, topology, example, **media))
    extra = LocalGraph(spec, logdir=logdir)
    peers = {s: f"http://127.0.0.1:{graph.stages[s].port}" for s in spec.spec.used_stages() if s != StageName.FRONTEND}
    if encoder_port is not None:
        peers[StageName.ENCODER] = f"http://127.0.0.1:{encoder_port}"
    if pd_port is not None:
        peers[StageName.PD] = f"http://127.0.0.1:{pd_port}"
    extra.spawn(StageName.FRONTEND, free_port(), peers)
    return extra


@pytest.fixture(scope="session")
def endpoints(
    graph: LocalGraph, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    with frontends(graph, tiny_model, tmp_path_factory.mktemp("frontend-logs")) as endpoints:
        yield endpoints


@contextlib.contextmanager
def frontends(graph: LocalGraph, model: Path, logs: Path, example: str = QWEN_EXAMPLE) -> Iterator[dict[str, str]]:
    """Topology -> endpoint: `graph`'s own (e-p-d) and an agg and an e-pd frontend routed to its workers."""
    extras = {t: start_frontend(graph, model, t, logs / t, example=example) for t in ("agg", "e-pd")}
    try:
        for extra in extras.values():
            extra.wait_healthy(timeout=120, progress=lambda line: None)
        yield {"e-p-d": graph.endpoint, **{t: e.endpoint for t, e in extras.items()}}
    finally:
        for extra in extras.values():
            extra.stop()


@dataclasses.dataclass
class FamilyGraph:
    """A tiny model of one family, served by an e-p-d graph with an agg and an e-pd frontend beside it, its
    oracle's tokens and vLLM's own server on the same weights."""

    model: Path
    graph: LocalGraph
    reference: dict[str, list[int]]
    endpoints: dict[str, str]
    vllm_server: str


@contextlib.contextmanager
def family_graph(
    tmp: pytest.TempPathFactory, family: str, example: str, name: str, cases: dict[str, dict[str, Any]], **media: Any
) -> Iterator[FamilyGraph]:
    """What a model family's test module needs, started once for the module and stopped after it."""
    from mmgraph_workers.tiny_model import build

    model = build(tmp.mktemp("models") / f"tiny-{family}", family=family)
    reference = reference_tokens(model, cases, tmp.mktemp(f"{family}-reference")) if cases else {}
    graph = LocalGraph(parse(graph_spec(model, example=example, **media)), logdir=tmp.mktemp(family))
    graph.start()
    try:
        graph.wait_healthy(timeout=300, progress=lambda line: None)
        with (
            frontends(graph, model, tmp.mktemp(f"{family}-frontends"), example) as endpoints,
            vllm_openai_server(model, name, example, tmp.mktemp(f"{family}-vllm")) as server,
        ):
            yield FamilyGraph(model, graph, reference, endpoints, server)
    finally:
        graph.stop()


def chat(
    endpoint: str, messages: list, max_tokens: int = 12, stream: bool = False, model: str = MODEL_NAME, **extra: Any
) -> httpx.Response:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
    if not stream:
        body["return_token_ids"] = True
    return httpx.post(f"{endpoint}/v1/chat/completions", json={**body, "stream": stream}, timeout=180)


def metric(endpoint: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples on a worker's /metrics: every label set, or those with `labels`."""
    text = httpx.get(f"{endpoint}/metrics", timeout=10).text
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if re.match(rf"^{re.escape(name)}(\{{| )", line) and all(w in line for w in wanted)
    )


def error_of(response: httpx.Response, status: int) -> str:
    """The message of an OpenAI error answer with `status`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["type"] == "invalid_request_error"
    return error["message"]


def tokens(endpoint: str, case: str, model: str = MODEL_NAME, cases: dict[str, dict] = CASES) -> list[int]:
    response = chat(endpoint, **cases[case], model=model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def assert_same_as_vllm_server(
    endpoint: str, server: str, case: str, model: str = MODEL_NAME, cases: dict[str, dict] = CASES
) -> None:
    """The same HTTP request to mmgraph and to vLLM's own server gives the same text and token counts."""
    ours, theirs = chat(endpoint, **cases[case], model=model), chat(server, **cases[case], model=model)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    ours_body, theirs_body = ours.json(), theirs.json()
    assert ours_body["choices"][0]["message"]["content"] == theirs_body["choices"][0]["message"]["content"], case
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: ours_body["usage"][k] for k in counts} == {k: theirs_body["usage"][k] for k in counts}, case


def stream_text(endpoint: str, messages: list, max_tokens: int = 12) -> tuple[str, list[dict]]:
    with httpx.stream(
        "POST",
        f"{endpoint}/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True},
        timeout=180,
    ) as response:
        assert response.status_code == 200
        chunks, done = [], False
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    assert done, "the stream must end with [DONE]"
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
    return text, chunks


@pytest.fixture(scope="module")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own OpenAI server for the tiny Qwen2-VL. Per module: it is one more engine on two cores, stopped as
    soon as the tests that compare with it are done."""
    with vllm_openai_server(tiny_model, MODEL_NAME, QWEN_EXAMPLE, tmp_path_factory.mktemp("vllm-server")) as url:
        yield url


@contextlib.contextmanager
def vllm_openai_server(model: Path, name: str, example: str, logdir: Path) -> Iterator[str]:
    """`python -m vllm.entrypoints.openai.api_server` on the same weights and with the same engine arguments as
    the example graph's pd: what a user would run instead of mmgraph. Videos: the graph's frame count, with
    vLLM's loader that takes it (for Qwen2-VL vLLM's default loader samples at 2 fps and ignores num_frames)."""
    from mmgraph_contract.settings import vllm_flags

    spec = parse(graph_spec(model, example=example)).spec
    engine_args = vllm_flags(spec.stages.pd.engine_args or {})
    video = {"video": {"num_frames": spec.media.video_frames, "video_backend": "opencv"}}
    engine_args += ["--media-io-kwargs", json.dumps(video)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    env.setdefault("OMP_NUM_THREADS", "1")  # as `mmgraph up` gives each of the graph's two engines on 2 cores
    with vllm_serve(model, name, engine_args, env, logdir / "server.log") as url:
        yield url


class MediaServer:
    """A local HTTP server for media URLs (127.0.0.1 only); paths: /a.png, /big.png, /redirect?to=URL, /bomb.png
    (2 KB gzipped twice, 256 MiB inflated), /slow-ok.png (/a.png's bytes over 7 s) and /slow.png, whose body
    trickles for up to 60 s (`slow_started` is set once a client is reading either)."""

    def __init__(self) -> None:
        files = {"/a.png": png(96, 64, 1), "/big.png": png(400, 400, 9), "/notimage.png": b"hello, not an image"}
        self.slow_started = slow_started = threading.Event()
        self.slow_sent = slow_sent = threading.Event()  # /slow-ok.png went out whole: nobody hung up

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/bomb.png":
                    send_gzip_bomb(self)
                    return
                if self.path == "/slow-ok.png":  # a good image, sent in 14 pieces over 7 s
                    data = files["/a.png"]
                    step = -(-len(data) // 14)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    slow_started.set()
                    with contextlib.suppress(OSError):
                        for start in range(0, len(data), step):
                            self.wfile.write(data[start : start + step])
                            self.wfile.flush()
                            time.sleep(0.5)
                        slow_sent.set()
                    return
                if self.path == "/slow.png":
                    self.send_response(200)
                    self.end_headers()
                    slow_started.set()
                    with contextlib.suppress(OSError):  # the client went away
                        for _ in range(600):
                            self.wfile.write(b"\x00" * 10)
                            self.wfile.flush()
                            time.sleep(0.1)
                    return
                if self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.end_headers()
                    return
                body = files.get(self.path)
                self.send_response(200 if body else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def media_server() -> Iterator[MediaServer]:
    server = MediaServer()
    yield server
    server.stop()


def wait(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.fixture(scope="session", autouse=True)
def no_worker_outlives_the_session() -> Iterator[None]:
    """Every fixture stops what it started; this is the safety net: any `mmgraph worker` child of this test
    process still alive at the end is stopped, and reported."""
    yield
    import psutil

    entries = ("mmgraph_workers.cli", "mmgraph_operator.cli")  # this release's stages, the previous release's
    leaked = [p for p in psutil.Process().children(recursive=False) if any(e in " ".join(p.cmdline()) for e in entries)]
    for proc in leaked:
        proc.kill()
    psutil.wait_procs(leaked, timeout=10)
    if leaked:
        print(f"\nstopped {len(leaked)} leaked worker process(es): {[p.pid for p in leaked]}", file=sys.stderr)


# ---- requests with media parts, and their answers as a client reads them (video tests) ----


def video(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def media_request(*parts: dict[str, Any], text: str = "what happens here", stream: bool = False) -> dict[str, Any]:
    content = [*parts, {"type": "text", "text": text}]
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 12}
    body |= {"temperature": 0, "stream": stream}
    return body | ({"stream_options": {"include_usage": True}} if stream else {})


def answer_of(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{endpoint}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    if not body["stream"]:
        choice = r.json()["choices"][0]
        return {"text": choice["message"]["content"], "finish": choice["finish_reason"], "usage": r.json()["usage"]}
    text, finish, usage = "", None, None
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            for c in chunk.get("choices") or []:
                text += c["delta"].get("content") or ""
                finish = c.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    return {"text": text, "finish": finish, "usage": usage}


def counts(a: dict[str, Any]) -> dict[str, Any]:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {"text": a["text"], "finish": a["finish"], "usage": {k: a["usage"][k] for k in keys}}
