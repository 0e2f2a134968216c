"""vLLM's own OpenAI server, started as a user would start it: the baseline the oracles and benchmarks compare
mmgraph with (same weights, same engine arguments). Not used by the graph itself."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from mmgraph_workers.ports import free_port


@contextlib.contextmanager
def vllm_serve(
    model: Path, name: str, engine_args: list[str], env: dict[str, str], log: Path, timeout: float = 300
) -> Iterator[str]:
    """`python -m vllm.entrypoints.openai.api_server` on a free loopback port, until healthy; its base URL."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    argv += ["--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *engine_args]
    with process(argv, env, log, f"http://127.0.0.1:{port}", timeout) as url:
        yield url


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str] | None, log: Path, url: str, timeout: float) -> Iterator[str]:
    """A server process, its output in `log`, until `url`/health answers 200 (its log's tail in the error
    otherwise); `url`. Stopped on exit, killed if it will not stop."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[1:3]} exited:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[1:3]} not healthy in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
