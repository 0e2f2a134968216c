"""Upgrades without an outage. Stages roll one Deployment at a time, so mid-rollout one release's stages call
another's. The previous release (its worker and operator packages, from tests/dataplane/previous_release/) is
mixed with this tree in an e-p-d graph, under load: an old frontend in front of the new stages (the frontend
rolls last), and a new frontend in front of an old encoder (the encoder rolls last). Every request must get
exactly the oracle's tokens; none may fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from mmgraph_contract.graph import parse
from mmgraph_contract.vocabulary import StageName
from mmgraph_workers.ports import free_port
from mmgraph_workers.protocol import PREVIOUS_VERSION, PROTOCOL_VERSION
from mmgraph_workers.up import LocalGraph

from .conftest import CASES, chat, graph_spec, start_frontend, tokens

REPO = Path(__file__).resolve().parents[2]
CONCURRENCY = 8
LOAD = ["one-image", "two-images", "text-only", *(f"concurrent-{i}" for i in range(16))]


PREVIOUS_RELEASE = Path(__file__).with_name("previous_release")
PREVIOUS_ENTRY = ("-m", (PREVIOUS_RELEASE / "entry").read_text().strip())  # its own `mmgraph` command


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment that runs the previous release's code: its packages (previous_release/packages.tar.gz, no
    git history needed) first on the import path."""
    tree = tmp_path_factory.mktemp("previous-release")
    with tarfile.open(PREVIOUS_RELEASE / "packages.tar.gz") as tar:
        tar.extractall(tree, filter="data")
    env = {"PYTHONPATH": os.pathsep.join(str(tree / package) for package in ("contract", "workers", "operator"))}
    where = subprocess.run(
        [sys.executable, "-c", "import mmgraph_workers, mmgraph_operator; print(mmgraph_workers.__file__)"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(tree)), where  # the old packages win over this tree's installed ones
    return env


def under_load(endpoint: str) -> dict[str, list[int]]:
    """Every LOAD case, CONCURRENCY at a time."""
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return dict(zip(LOAD, pool.map(lambda case: tokens(endpoint, case), LOAD), strict=True))


def test_an_old_frontend_in_front_of_new_stages(graph, tiny_model, reference, previous_release, tmp_path):
    old = LocalGraph(parse(graph_spec(tiny_model)), logdir=tmp_path)
    peers = {s: f"http://127.0.0.1:{graph.stages[s].port}" for s in (StageName.ENCODER, StageName.PD, StageName.DECODE)}
    old.spawn(StageName.FRONTEND, free_port(), peers, env=previous_release, entry=PREVIOUS_ENTRY)
    try:
        old.wait_healthy(timeout=120, progress=lambda line: None)
        assert under_load(old.endpoint) == {case: reference[case] for case in LOAD}
    finally:
        old.stop()


def test_a_new_frontend_in_front_of_an_old_encoder(graph, tiny_model, reference, previous_release, tmp_path):
    side = LocalGraph(parse(graph_spec(tiny_model)), logdir=tmp_path)
    side.spawn(StageName.ENCODER, free_port(), {}, env=previous_release, entry=PREVIOUS_ENTRY)
    try:
        side.wait_healthy(timeout=120, progress=lambda line: None)
        port = side.stages[StageName.ENCODER].port
        exported = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "mmgraph_encoder_items_waiting" not in exported  # it runs the previous release's code (no such gauge)
        frontend = start_frontend(graph, tiny_model, "e-p-d", tmp_path / "frontend", encoder_port=port)
        try:
            frontend.wait_healthy(timeout=120, progress=lambda line: None)
            assert under_load(frontend.endpoint) == {case: reference[case] for case in LOAD}
        finally:
            frontend.stop()
    finally:
        side.stop()


class PreviousVersionStage:
    """What a stage of a release that speaks only PREVIOUS_VERSION does with a message: it refuses any other
    version with that release's words (before any work), and serves one of its own version. Serving is left to
    a real stage of this tree (reading the previous version, as the next release's stages do), behind this
    front; everything else (info, health, releases) passes through."""

    def __init__(self, target: str):
        self.target, self.seen = target, Counter()
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._relay("GET", None)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path in ("/encode", "/generate"):
                    version = json.loads(body).get("version")
                    front.seen[(self.path, version)] += 1
                    if version != PREVIOUS_VERSION:  # the previous release's refusal, word for word
                        error = (
                            f"protocol version {version} is not spoken here ({PREVIOUS_VERSION}); "
                            "upgrade the graph's stages together"
                        )
                        refusal = json.dumps({"error": error, "status": 400}).encode()
                        return self._answer(400, refusal, "application/json")
                self._relay("POST", body)

            def _relay(self, method: str, body: bytes | None) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = httpx.request(method, front.target + self.path, content=body, headers=headers, timeout=120)
                self._answer(r.status_code, r.content, r.headers.get("content-type", "application/json"))

            def _answer(self, status: int, content: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_new_frontend_speaks_the_previous_version_to_stages_that_read_only_it(graph, tiny_model, reference, tmp_path):
    """The next protocol version's rollout, now: the encoder and pd answer only the previous version. The new
    frontend learns that from their refusal, sends each the previous version (the refused call did no work), and
    this tree's stages read it: every answer is the oracle's. What the previous version cannot say (a video) is a
    503 to retry, naming the rollout."""
    encoder = PreviousVersionStage(f"http://127.0.0.1:{graph.stages[StageName.ENCODER].port}")
    pd = PreviousVersionStage(f"http://127.0.0.1:{graph.stages[StageName.PD].port}")
    frontend = start_frontend(graph, tiny_model, "e-p-d", tmp_path, encoder_port=encoder.port, pd_port=pd.port)
    try:
        frontend.wait_healthy(timeout=120, progress=lambda line: None)
        assert under_load(frontend.endpoint) == {case: reference[case] for case in LOAD}
        # refused only until the first refusal was read (by the calls in flight then: at most CONCURRENCY), each
        # refused call sent again; every request's call came in the previous version
        assert 1 <= encoder.seen[("/encode", PROTOCOL_VERSION)] <= CONCURRENCY
        assert encoder.seen[("/encode", PREVIOUS_VERSION)] == len(LOAD) - 1  # every request with media
        assert 1 <= pd.seen[("/generate", PROTOCOL_VERSION)] <= CONCURRENCY
        assert pd.seen[("/generate", PREVIOUS_VERSION)] == len(LOAD)
        video = chat(frontend.endpoint, **CASES["one-video"])
        assert video.status_code == 503, video.text  # the stage's to retry, not the client's fault
        assert "cannot take video (mid-rollout: retry shortly)" in video.json()["error"]["message"]
    finally:
        frontend.stop()
        encoder.close()
        pd.close()
