"""A text flood against a running graph: 20 MB prompts (chat, completion, /tokenize) cannot fit the tiny model's
1024-token context, so the frontend refuses each from its size before tokenizing it, while small requests sent
meanwhile are answered in time and the frontend's memory barely moves (before the bound, one such prompt took the
frontend from 0.6 to 4.9 GB and held a 2-token request for 27 s).

MMGRAPH_FLOOD_MB sets the prompts' size (to see the unbounded behaviour under a lower cap)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mmgraph_contract.vocabulary import StageName
from mmgraph_workers.up import LocalGraph

from .conftest import MODEL_NAME, error_of, graph_spec, running, user

FLOOD_BYTES = int(os.environ.get("MMGRAPH_FLOOD_MB", "20")) << 20
MB = 1 << 20


@pytest.fixture(scope="module")
def flooded(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGraph]:
    """An e-pd graph of its own (the frontend's memory is measured: no other test's requests)."""
    with running(graph_spec(tiny_model, "e-pd"), tmp_path_factory.mktemp("flood")) as local:
        yield local


GUARD = 1 << 30  # growth at which the frontend is killed: a regression fails the test, not the shared machine


class PeakRss(threading.Thread):
    """A process's peak resident memory while the block runs: its VmHWM, reset on entry (clear_refs), and VmRSS
    sampled every 5 ms in case the reset is not allowed. Past `GUARD` of growth the process is killed (it is this
    module's own graph): an unbounded frontend would take gigabytes of a shared machine per prompt."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop, self.killed = pid, threading.Event(), False
        self.reset = self._reset()
        self.before = self.peak = self._status("VmRSS")

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            line = next(line for line in status if line.startswith(field + ":"))
        return int(line.split()[1]) << 10

    def _reset(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
                refs.write("5")
            return True
        except OSError:
            return False

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self._status("VmRSS"))
            if self.peak - self.before > GUARD:
                os.kill(self.pid, signal.SIGKILL)
                self.killed = True
                return

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()
        if self.reset:
            self.peak = max(self.peak, self._status("VmHWM"))

    @property
    def growth(self) -> int:
        return self.peak - self.before


def test_a_flood_of_huge_text_prompts_is_refused_cheaply_while_small_requests_flow(flooded: LocalGraph):
    endpoint, frontend = flooded.endpoint, flooded.stages[StageName.FRONTEND].proc.pid
    small = {"model": MODEL_NAME, "messages": user("hi"), "max_tokens": 2, "temperature": 0}
    with httpx.Client(base_url=endpoint, timeout=120) as http:
        assert http.post("/v1/chat/completions", json=small).status_code == 200  # warm
    text = "word " * (FLOOD_BYTES // 5)
    floods = [
        ("/v1/chat/completions", {**small, "messages": user(text)}),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": text, "max_tokens": 2}),
        ("/tokenize", {"model": MODEL_NAME, "prompt": text}),
    ]
    answers: list[httpx.Response] = []
    flooding = threading.Event()

    def flood() -> None:
        with httpx.Client(base_url=endpoint, timeout=300) as http:
            for _ in range(2):
                for path, body in floods:
                    flooding.set()
                    answers.append(http.post(path, json=body))

    waits: list[float] = []
    with PeakRss(frontend) as peak:
        flooder = threading.Thread(target=flood)
        flooder.start()
        flooding.wait(10)
        with httpx.Client(base_url=endpoint, timeout=120) as http:
            while flooder.is_alive() or len(waits) < 3:  # every small request is sent while the flood runs
                assert not peak.killed, f"the frontend grew past {GUARD / MB:.0f} MiB during the flood (killed)"
                started = time.monotonic()
                r = http.post("/v1/chat/completions", json=small)
                waits.append(time.monotonic() - started)
                assert r.status_code == 200, r.text
        flooder.join()
    print(f"\nsmall requests during the flood: {len(waits)}, slowest {max(waits):.2f} s; ", end="")
    print(f"frontend peak RSS growth {peak.growth / MB:.0f} MiB (of {peak.before / MB:.0f} MiB)")
    assert max(waits) < 2, waits
    assert peak.growth < 200 * MB, f"the frontend grew by {peak.growth / MB:.0f} MiB"
    for r in answers:
        assert error_of(r, 400).startswith("This model's maximum context length is 1024 tokens."), r.text[:300]
