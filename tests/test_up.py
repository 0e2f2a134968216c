"""`mmgraph up`: what it starts for a graph's replicas and what it refuses, with process creation faked (no stage,
no engine runs here)."""

from __future__ import annotations

import signal
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmgraph_contract.graph import parse
from mmgraph_workers.up import LocalGraph, up

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-e-p-d.yaml"


class Started:
    """Stands in for subprocess.Popen: records each stage's command line, runs nothing, and is alive."""

    all: list[Started] = []
    returncode = None

    def __init__(self, argv: list[str], **kwargs: Any):
        self.argv = argv
        Started.all.append(self)

    def flag(self, name: str) -> str:
        return next(a.split("=", 1)[1] for a in self.argv if a.startswith(f"--{name}="))

    def poll(self) -> None:
        return None


@pytest.fixture
def started(monkeypatch) -> list[Started]:
    """Processes `up` starts, faked; stopping them is a no-op (there is no process group to signal)."""
    Started.all = []
    monkeypatch.setattr(subprocess, "Popen", Started)
    monkeypatch.setattr(LocalGraph, "_stop", staticmethod(lambda stages: None))
    return Started.all


def graph_file(tmp_path: Path, stages: dict[str, dict[str, Any]]) -> Path:
    """The tiny example with these stage settings, its model a directory that exists (nothing is built)."""
    body = yaml.safe_load(EXAMPLE.read_text())
    for stage, settings in stages.items():
        body["spec"]["stages"][stage].update(settings)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    body["spec"]["model"]["path"] = str(tmp_path / "model")
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_every_replica_of_a_stage_is_started_on_a_loopback_address_of_its_own(tmp_path, started, monkeypatch):
    """A stage's `replicas` (an autoscaled one's minReplicas) are that many processes, as pods of a Deployment
    are: the same port, each on its own address; once healthy, the worker replicas are listed under their
    stage's name, where the frontend and the other stages find them."""
    replicas = {"frontend": 2, "encoder": 2, "decode": 3}
    stages = {name: {"replicas": n} for name, n in replicas.items()} | {
        "pd": {"autoscaling": {"minReplicas": 2, "maxReplicas": 4}}
    }
    local = LocalGraph(parse(yaml.safe_load(graph_file(tmp_path, stages).read_text())), logdir=tmp_path / "logs")
    local.start()
    by_stage: dict[str, list[Started]] = defaultdict(list)
    for process in started:
        by_stage[process.argv[process.argv.index("worker") + 1]].append(process)
    assert {stage: len(ps) for stage, ps in by_stage.items()} == replicas | {"pd": 2}
    for processes in by_stage.values():
        assert len({p.flag("port") for p in processes}) == 1, "one port per stage, as a Service's"
        assert processes[0].flag("host") == "127.0.0.1"
    extra = [p.flag("host") for p in started if p.flag("host") != "127.0.0.1"]
    assert len(extra) == len(set(extra)) == len(started) - len(by_stage), "all but each stage's first, apart"
    assert all(host.startswith("127.0.0.") for host in extra)

    monkeypatch.setattr(LocalGraph, "healthy", lambda self, stage: True)
    seen: list[str] = []
    local.wait_healthy(timeout=30, progress=seen.append)
    listed = defaultdict(list)
    for line in local.hosts_file.read_text().splitlines():
        address, name = line.split()
        listed[name.split(".")[0]].append(address)
    assert {stage: len(addresses) for stage, addresses in listed.items()} == {"encoder": 2, "pd": 2, "decode": 3}
    assert listed["decode"] == [p.flag("host") for p in by_stage["decode"]]
    assert "decode x3" in seen[-1]


@pytest.mark.parametrize(
    ("stages", "host", "message"),
    [
        ({"decode": {"replicas": 0}}, "127.0.0.1", "spec.stages.decode.replicas is 0"),
        ({"encoder": {"replicas": 2}}, "0.0.0.0", "spec.stages.encoder.replicas is 2"),
    ],
    ids=["no-process", "replicas-behind-a-wildcard-host"],
)
def test_what_local_processes_cannot_run_is_refused_naming_the_field(
    tmp_path, started, monkeypatch, capsys, stages, host, message
):
    """No stage processes for a stage serve nothing, and extra replicas' loopback addresses at their stage's port
    are taken where the first one listens on every address: refused before anything starts."""
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(LocalGraph, "wait_healthy", lambda *args, **kwargs: pytest.fail("it started"))
    assert up(str(graph_file(tmp_path, stages)), host=host) == 2
    assert message in capsys.readouterr().err
    assert started == []
