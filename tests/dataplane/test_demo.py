"""`mmgraph up FILE --demo`, the README's first command, as a user runs it: builds the tiny model where the graph
points, starts every stage, sends one image request (audio for the audio example), prints the answer, and stops
everything it started."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest
import yaml

from .conftest import REPO


@pytest.mark.parametrize(
    ("example", "family", "sent"),
    [
        ("tiny-e-p-d.yaml", "qwen2-vl", "one 96x64 PNG"),
        ("tiny-qwen2-audio-e-p-d.yaml", "qwen2-audio", "a 2 s 16 kHz WAV"),
    ],
)
def test_mmgraph_up_demo_answers_and_leaves_nothing_running(tmp_path, example, family, sent):
    graph = yaml.safe_load((REPO / "examples" / example).read_text())
    model = tmp_path / "tiny-model"  # not built yet: `up` builds it
    graph["spec"]["model"]["path"] = str(model)
    (tmp_path / "graph.yaml").write_text(yaml.safe_dump(graph))
    done = subprocess.run(
        [sys.executable, "-m", "mmgraph_contract.cli", "up", str(tmp_path / "graph.yaml"), "--demo"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert (model / "config.json").exists() and f"building the tiny {family} model" in out
    assert f"({sent} + 'describe this" in out
    assert "ready: http://127.0.0.1:" in out
    answer = next(line for line in out.splitlines() if line.startswith("< "))
    assert len(answer) > 4, answer  # some text came back
    assert "time to first token" in out and out.rstrip().endswith("stopped.")
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(model) in " ".join(p.info["cmdline"] or [])]
    assert left == [], f"processes of the demo still running: {left}"
