"""Bounds on what a stage holds at once and on what a request can cost before it is refused, with no engine: the
frontend's text bound and preparation lanes (the tiny model's tokenizer, in process), a stage's body budget, body
deadline and connection limit (make_app and serve in a subprocess, under lowered caps), and 500s that carry a
request id, never an exception's text."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from mmgraph_contract.flags import from_argv
from mmgraph_contract.settings import FrontendSettings
from mmgraph_workers.frontend import app as frontend
from mmgraph_workers.frontend.openai_api import RequestError
from mmgraph_workers.frontend.processor import longest_token_bytes
from mmgraph_workers.ports import free_port
from mmgraph_workers.protocol import WorkerInfo
from mmgraph_workers.server import make_app

MODEL, MAX_LEN, MIB = "tiny-qwen2-vl", 1024, 1 << 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmgraph_workers.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny")


class Watched:
    """A tokenizer that records what it is asked to tokenize (the frontend's only two ways in)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.calls = tokenizer, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.tokenizer.apply_chat_template(*args, **kwargs)


@pytest.fixture(scope="module")
def api(tiny: Path) -> Iterator[tuple[TestClient, list[Watched]]]:
    """The frontend's app in process, its pd (never called) said to have a 1024-token context; its lanes'
    tokenizers watched."""
    dead = f"http://127.0.0.1:{free_port()}"
    args = from_argv(
        FrontendSettings,
        [f"--model={tiny}", f"--served-model-name={MODEL}", "--port=0", "--topology=agg", f"--pd-url={dead}"],
    )
    app = frontend.build_app(args)
    with TestClient(app) as client:
        app.state.router.pd_info = WorkerInfo(
            stage="pd", model=str(tiny), served_model_name=MODEL, max_model_len=MAX_LEN
        )
        watched = []
        for lane in (app.state.lanes.small, app.state.lanes.large):
            lane.processor.tokenizer = Watched(lane.processor.tokenizer)
            watched.append(lane.processor.tokenizer)
        yield client, watched


def test_the_longest_token_bounds_the_bytes_each_token_stands_for(api):
    _, (watched, _) = api
    longest = longest_token_bytes(watched.tokenizer)
    assert longest >= len("<|vision_start|>")  # special tokens count
    for text in ["hello world " * 50, "日本語のテキスト" * 40, "🙂🙃 " * 60, "\t\n  x" * 30, "describeimage" * 20]:
        ids = watched.tokenizer(text, add_special_tokens=False).input_ids
        assert len(text.encode()) <= len(ids) * longest, text[:20]


def flood(size: int) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of requests whose text alone is `size` bytes, in every shape the frontend tokenizes."""
    text = "x" * size
    return [
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2}),
        ("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 2}),
        ("/tokenize", {"model": MODEL, "prompt": text}),
        ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}),
    ]


def test_text_that_cannot_fit_is_refused_before_it_is_tokenized(api):
    """Past max_model_len x the longest token's bytes no tokenization can fit the context: a 400 worded as vLLM's,
    from the size alone (the tokenizer never sees it, so 8 MB costs a JSON parse, not seconds and gigabytes)."""
    client, watched = api
    bound = MAX_LEN * longest_token_bytes(watched[0].tokenizer)
    for size in (bound + 1, 8 * MIB):
        for path, body in flood(size):
            before = [w.calls for w in watched]
            started = time.monotonic()
            r = client.post(path, json=body)
            assert r.status_code == 400, (path, r.text[:300])
            message = r.json()["error"]["message"]
            assert message.startswith(f"This model's maximum context length is {MAX_LEN} tokens."), message
            assert f"{size} bytes of text" in message and "Please reduce the length of the" in message
            assert [w.calls for w in watched] == before, f"{path}: tokenized before it was refused"
            assert time.monotonic() - started < 5
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [1] * (MAX_LEN + 1), "max_tokens": 2})
    assert r.status_code == 400 and f"{MAX_LEN + 1} prompt tokens" in r.json()["error"]["message"], r.text
    # at the bound it is tokenized (and counted): a context-length refusal in tokens, or the count
    r = client.post("/tokenize", json={"model": MODEL, "prompt": "x" * bound})
    assert r.status_code == 200 and r.json()["count"] > 0, r.text


def test_media_bytes_are_not_text(api):
    """A data: URL is media, counted by the media limits, not by the text bound."""
    client, _ = api
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (MAX_LEN * 64)}}
    body = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}], "tools": None}
    processor = client.app.state.lanes.small.processor
    processor.check_fits(body, MAX_LEN)
    with pytest.raises(RequestError, match="maximum context length"):
        processor.check_fits({"messages": [{"role": "user", "content": "y" * (MAX_LEN * 64)}]}, MAX_LEN)


def test_a_full_lane_answers_503_and_the_work_of_a_caller_that_left_never_starts():
    ran: list[str] = []
    release = threading.Event()

    def work(processor: Any, name: str) -> str:
        if name == "first":
            release.wait(10)
        ran.append(name)
        return name

    async def scenario() -> None:
        lane = frontend.Lane("test", processor=None, capacity=2)
        first = asyncio.ensure_future(lane.run(work, "first"))
        await asyncio.sleep(0.1)  # running, and holding the thread
        queued = asyncio.ensure_future(lane.run(work, "left"))
        await asyncio.sleep(0.05)
        with pytest.raises(RequestError) as full:
            await lane.run(work, "third")
        assert full.value.status == 503
        queued.cancel()  # its client left while it waited
        with contextlib.suppress(asyncio.CancelledError):
            await queued  # the cancel reached its work before the thread is free to start it
        release.set()
        assert await first == "first"
        assert await lane.run(work, "after") == "after"  # the cancelled one's slot came back
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    assert ran == ["first", "after"]


def test_a_lane_full_is_a_503_with_retry_after(api, monkeypatch):
    client, _ = api
    monkeypatch.setattr(client.app.state.lanes.small, "slots", threading.Semaphore(0))
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["type"] == "server_error"


# ---- 500s: a request id, never the exception's text ----

SECRET = "token=hunter2 at /var/run/secrets/x"


def test_a_stages_crash_answers_a_request_id_and_logs_the_exception(caplog):
    app = make_app("encoder", lambda: True)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(SECRET)

    with caplog.at_level(logging.ERROR, "mmgraph.worker"):
        r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500 and SECRET not in r.text and "RuntimeError" not in r.text
    request_id = r.json()["request_id"]
    assert r.json()["error"] == f"internal error in encoder; request id {request_id}"
    (record,) = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert SECRET in str(record.exc_info[1])


def test_the_frontends_failure_answers_a_request_id_and_logs_the_exception(caplog):
    with caplog.at_level(logging.ERROR, "mmgraph.frontend"):
        status, body = frontend.failure(KeyError(SECRET), "chatcmpl-abc")
    assert status == 500 and SECRET not in str(body) and "KeyError" not in str(body)
    assert body["error"]["message"] == "internal error in frontend; request id chatcmpl-abc"
    (record,) = [rec for rec in caplog.records if "chatcmpl-abc" in rec.getMessage()]
    assert SECRET in str(record.exc_info[1])


# ---- a stage's bounds on what it holds at once: make_app and serve, as every stage runs them ----

STAGE = """
import sys
from fastapi import Request
from mmgraph_contract.flags import from_argv
from mmgraph_contract.settings import Server
from mmgraph_workers.server import make_app, serve

args = from_argv(Server, sys.argv[1:])
app = make_app("probe", lambda: True, args.max_request_bytes)


@app.post("/echo")
async def echo(request: Request) -> dict:
    return {"bytes": len(await request.body())}


serve(app, args)
"""


@contextlib.contextmanager
def stage(*flags: str) -> Iterator[tuple[int, int]]:
    """(port, pid) of a stage app with a 1 MiB body limit (so a 4 MiB budget by default) and `flags`."""
    port = free_port()
    argv = [f"--port={port}", f"--max-request-bytes={MIB}", *flags]
    proc = subprocess.Popen([sys.executable, "-c", STAGE, *argv])
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "the stage did not start"
            time.sleep(0.2)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


async def slow_upload(port: int, chunked: bool) -> tuple[int | None, dict[str, str]]:
    """A 1 MiB body (declared, or chunked with no length), 15/16 of it over 1.5 s, then silence: the status and
    headers the stage answers with, or (None, {}) if it never does (within 20 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {MIB}"
    writer.write(f"POST /echo HTTP/1.1\r\nhost: stage\r\n{framing}\r\n\r\n".encode())
    answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    piece = b"x" * (MIB // 16)
    try:
        for _ in range(15):
            await asyncio.sleep(0.1)
            if answer.done():
                break
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await asyncio.wait_for(writer.drain(), 5)
        head = (await asyncio.wait_for(answer, 20)).decode()
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        return None, {}
    finally:
        answer.cancel()
        writer.close()
    status, *lines = head.strip().split("\r\n")
    return int(status.split()[1]), dict(line.lower().split(": ", 1) for line in lines)


class Peak(threading.Thread):
    """A process's resident memory, sampled every 10 ms: the most it reached over what it had at the start."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.stop = psutil.Process(pid), threading.Event()
        self.start_rss = self.peak = self.proc.memory_info().rss

    def run(self) -> None:
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start_rss


def test_fifty_slow_uploads_are_bounded_and_small_requests_still_answered():
    """50 slow 1 MiB uploads (40 declared, 10 chunked) at a stage with a 1 MiB limit: the budget (4 x 1 MiB) holds
    the bytes of at most four of them, the others get 503 with Retry-After as their bytes would pass it, the ones
    held 408 at the 3 s body deadline, which closes their connections; meanwhile probes and small requests are
    answered at once and the process holds a few MiB more, not 50."""
    with stage("--body-timeout-seconds=3") as (port, pid):
        url = f"http://127.0.0.1:{port}"
        httpx.post(f"{url}/echo", content=b"warm" * 1000)
        peak = Peak(pid)
        peak.start()

        async def scenario() -> tuple[list, list[float]]:
            uploads = [asyncio.ensure_future(slow_upload(port, chunked=i % 5 == 0)) for i in range(50)]
            waits: list[float] = []
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                for _ in range(8):
                    await asyncio.sleep(0.25)
                    started = time.monotonic()
                    assert (await http.get("/health")).status_code == 200
                    r = await http.post("/echo", content=b"small" * 100)
                    assert r.status_code == 200 and r.json() == {"bytes": 500}
                    waits.append(time.monotonic() - started)
            return await asyncio.gather(*uploads), waits

        answers, waits = asyncio.run(scenario())
        peak.stop.set()
        peak.join()
    statuses = [status for status, _ in answers]
    print(f"\n{statuses.count(408)} x 408, {statuses.count(503)} x 503, {statuses.count(None)} unanswered; ", end="")
    print(f"small requests within {max(waits):.2f} s; the stage grew by {peak.growth / MIB:.1f} MiB")
    assert peak.growth < 24 * MIB, f"the stage grew by {peak.growth / MIB:.0f} MiB"
    assert None not in statuses, f"{statuses.count(None)} uploads got no answer"
    assert set(statuses) <= {408, 503} and 1 <= statuses.count(408) <= 4, statuses
    assert all(headers.get("retry-after") == "1" for status, headers in answers if status == 503)
    assert all(headers.get("connection") == "close" for status, headers in answers if status == 408)
    assert max(waits) < 1, waits


def test_connections_past_the_limit_get_503():
    with stage("--max-connections=4") as (port, _):
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            time.sleep(0.3)
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            assert r.status_code == 503, r.text
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200


# ---- the pod going: the preStop hook's SIGWINCH, then the kubelet's SIGTERM ----


def test_a_stage_keeps_idle_connections_and_told_its_pod_is_going_serves_on_but_closes_them():
    """What render's preStop does (kill -WINCH 1): the stage still answers, on the same kept-alive connection,
    but says `Connection: close` (the caller reconnects, through endpoints that no longer hold this pod), and its
    readiness fails; a stage of a release without the handler ignores the signal (its default action)."""
    with stage() as (port, pid), httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        before = client.post("/echo", content=b"x")
        assert before.status_code == 200 and before.headers.get("connection") != "close"
        # first: an idle connection outlives the 5 s after which httpx (the OpenAI SDK's client) stops reusing
        # one, so a caller never sends on a connection the stage is closing (uvicorn's default was 5 s too)
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=5)) as kept:
            for idle in (6, 0):
                kept.request("GET", "/health")
                response = kept.getresponse()
                assert response.status == 200 and not response.will_close
                response.read()
                time.sleep(idle)
                kept.sock.setblocking(False)  # a connection the stage closed reads b"" at once; an open one blocks
                with pytest.raises(BlockingIOError):
                    assert kept.sock.recv(1, socket.MSG_PEEK) != b"", f"the stage closed an idle connection in {idle} s"
                kept.sock.setblocking(True)
        os.kill(pid, signal.SIGWINCH)
        deadline = time.monotonic() + 10
        while (health := client.get("/health")).status_code == 200:
            assert time.monotonic() < deadline, "readiness still passes"
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["draining"] is True
        after = client.post("/echo", content=b"xyz")
        assert after.status_code == 200 and after.json() == {"bytes": 3}
        assert after.headers["connection"] == "close"
    unaware = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        unaware.send_signal(signal.SIGWINCH)
        time.sleep(0.5)
        assert unaware.poll() is None, "a process with no handler died of SIGWINCH"
    finally:
        unaware.kill()
        unaware.wait(5)
