"""`mmgraph up FILE`: the stages of a MultimodalGraph as local processes on this machine.

The same `mmgraph worker <stage>` command lines a Deployment runs (commands.py), with peers on 127.0.0.1, and as
many of each as the stage's `replicas` (extra ones on 127.0.0.2 and up, found by name as pods are). Shows
progress until every stage answers /health, prints the endpoint, and stops every process it started on Ctrl-C
or as soon as one stage dies (saying which, and the end of its log). With --demo it sends one chat request with
an image, prints the reply and its timings, and stops. A `path` model that does not exist yet is built as a tiny
model first (Qwen2-VL, or the family the graph's `mmgraph.io/tiny-model-family` annotation names), so the demo
needs no download.
"""

from __future__ import annotations

import ipaddress
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmgraph_contract.graph import MultimodalGraph, MultimodalGraphSpec, parse
from mmgraph_contract.rules import problems
from mmgraph_contract.settings import api_stage, process_stages, worker_command
from mmgraph_contract.vocabulary import StageName
from mmgraph_contract.wire import PEER_TOKEN_ENV
from mmgraph_workers import cpu
from mmgraph_workers.demo import send_demo_request
from mmgraph_workers.peers import REFRESH_SECONDS
from mmgraph_workers.ports import free_port

# Which tiny model `up` builds where the graph's model path is empty (the demo examples set it; default Qwen2-VL).
TINY_FAMILY_ANNOTATION = "mmgraph.io/tiny-model-family"
START_TIMEOUT = 600.0  # seconds for every stage to become healthy (engines take ~30 s each on 2 CPU cores)
ENTRY = ("-m", "mmgraph_workers.cli")  # how a stage starts: this release's `mmgraph worker`


def replica_counts(spec: MultimodalGraphSpec) -> dict[StageName, int]:
    """How many processes `up` starts per stage: as many as its pods (`replicas`; an autoscaled stage's
    minReplicas, as no autoscaler runs here). agg's frontend runs inside pd, whose replicas are the API's."""
    counts: dict[StageName, int] = {}
    for stage in process_stages(spec):
        cfg = spec.stages.get(stage)
        counts[stage] = cfg.autoscaling.min_replicas if cfg and cfg.autoscaling else (cfg.replicas if cfg else 1)
    return counts


def local_problems(spec: MultimodalGraphSpec, host: str) -> list[str]:
    """What a valid graph asks that local processes cannot give: a stage without processes serves nothing, and
    extra replicas listen on other loopback addresses at their stage's port, which a wildcard --host holds."""
    out = []
    for stage, count in replica_counts(spec).items():
        field = f"spec.stages.{stage.value}.replicas"
        if count == 0:
            out.append(f"{field} is 0: `mmgraph up` runs at least one process of every stage")
        elif count > 1 and _is_wildcard(host):
            out.append(f"{field} is {count}: extra replicas listen on 127.0.0.x, which --host={host} holds too")
    return out


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a name
        return False


def cpu_share(spec: MultimodalGraphSpec, stage: StageName) -> dict[str, str]:
    """OpenMP threads for a CPU engine of this graph: the machine's cores but one split between its engines, every
    replica counted (cpu.py)."""
    counts = replica_counts(spec)
    engines = sum(counts.get(s, 0) for s in (StageName.PD, StageName.DECODE))
    cfg = spec.stages.get(stage)
    if stage not in (StageName.PD, StageName.DECODE) or stage not in counts or cfg is None:
        return {}
    return cpu.omp_threads(engines, cfg.gpus)


@dataclass
class Stage:
    name: StageName
    port: int
    proc: subprocess.Popen
    log: Path
    host: str = "127.0.0.1"
    listed: bool = False  # in the hosts file: healthy once, as a Service lists a pod once it is ready

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class LocalGraph:
    """Starts, watches and stops the stage processes of one graph."""

    def __init__(self, graph: MultimodalGraph, host: str = "127.0.0.1", logdir: Path | None = None):
        self.graph, self.host = graph, host
        self.logdir = logdir or Path(tempfile.mkdtemp(prefix=f"mmgraph-{graph.name}-"))
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.stages: dict[StageName, Stage] = {}  # the first replica of each stage
        self.replicas: list[Stage] = []  # the others (the graph's replicas, add_replica)
        self.hosts_file = self.logdir / "peers.hosts"  # the frontend's stand-in for a headless Service's DNS
        self.peers: dict[StageName, str] = {}  # each worker stage's URL (start)
        self.hosts_written = -math.inf
        # the graph's peer credential, as the operator's Secret gives it to pods (or the caller's, to reach stages)
        self.peer_token = os.environ.get(PEER_TOKEN_ENV) or secrets.token_urlsafe(32)

    @property
    def endpoint(self) -> str:
        # a frontend process where there is one (tests route one of another topology to a graph's workers)
        serving = StageName.FRONTEND if StageName.FRONTEND in self.stages else api_stage(self.graph.spec)
        return f"http://{self.host}:{self.stages[serving].port}"

    def peer_name(self, stage: StageName) -> str:
        return f"{stage.value}.{self.graph.name}.mmgraph.local"

    def start(self) -> None:
        """Every stage's replicas: the first on `host`, the others each on a loopback address of its own at the
        same port, as add_replica starts them (peers find them in the hosts file once they are healthy)."""
        counts = replica_counts(self.graph.spec)  # agg: no frontend process, pd serves the API
        ports = {s: free_port() for s in counts}
        self.peers = {s: f"http://{self.peer_name(s)}:{ports[s]}" for s in counts if s != StageName.FRONTEND}
        for stage in (s for s in counts if s != StageName.FRONTEND):  # workers first, the frontend last
            self.spawn_replicas(stage, counts[stage], ports[stage])
        self.write_hosts()
        if StageName.FRONTEND in counts:
            self.spawn_replicas(StageName.FRONTEND, counts[StageName.FRONTEND], ports[StageName.FRONTEND])

    def spawn_replicas(self, stage: StageName, count: int, port: int) -> None:
        """`count` processes of a stage, none waited for (engines start in parallel)."""
        args = self.hosts_args(stage)
        self.spawn(stage, port, self.peers, args=args)
        for _ in range(count - 1):
            self.replicas.append(self.spawn(stage, port, self.peers, host=self.free_host(), args=args))

    def hosts_args(self, stage: StageName) -> list[str]:
        """The stages that resolve others' names (the frontend its peers, pd its encoders, decode its pds) read
        the hosts file first."""
        return [] if stage == StageName.ENCODER else [f"--peer-hosts-file={self.hosts_file}"]

    def write_hosts(self, leaving: Stage | None = None) -> None:
        """List every worker replica that has been healthy under its stage's name (but `leaving`), as a Service
        lists ready pods; the stages re-read the file."""
        lines = [
            f"{s.host} {self.peer_name(s.name)}"
            for s in [*self.stages.values(), *self.replicas]
            if s.name != StageName.FRONTEND and s is not leaving and s.proc.poll() is None and s.listed
        ]
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        tmp.replace(self.hosts_file)  # atomic: a reader never sees half a file
        self.hosts_written = time.monotonic()

    def add_replica(self, stage: StageName, timeout: float = START_TIMEOUT) -> Stage:
        """Start one more replica of a worker stage on the next loopback address (same port, as pods of a
        Deployment), and list it for the frontend once it is healthy (as a Service lists a ready pod)."""
        first = self.stages[stage]
        replica = self.spawn(stage, first.port, self.peers, host=self.free_host(), args=self.hosts_args(stage))
        self.replicas.append(replica)
        deadline = time.monotonic() + timeout
        while not self.healthy(replica):
            if replica.proc.poll() is not None or time.monotonic() > deadline:
                raise StageDied(replica)
            time.sleep(0.2)
        replica.listed = True
        self.write_hosts()
        return replica

    def free_host(self) -> str:
        """The next loopback address no process of the graph listens on."""
        taken = {s.host for s in [*self.stages.values(), *self.replicas]}
        return next(f"127.0.0.{i}" for i in range(2, 255) if f"127.0.0.{i}" not in taken)

    def remove_replica(self, replica: Stage, drain_seconds: float = 3.0) -> None:
        """Unlist a replica, give the frontend time to notice (it re-resolves every 2 s), then stop it: it
        finishes what it is doing (uvicorn drains; the encoder waits for pd to pull what it published)."""
        self.write_hosts(leaving=replica)
        time.sleep(drain_seconds)
        self._stop([replica])
        self.replicas.remove(replica)

    def spawn(
        self,
        stage: StageName,
        port: int,
        peers: dict[StageName, str],
        env: dict[str, str] | None = None,
        model: str | None = None,
        host: str | None = None,
        args: list[str] | None = None,
        entry: tuple[str, ...] = ENTRY,
    ) -> Stage:
        """Start one stage on `port`, its peers at `peers` (a frontend may be routed to another graph's workers);
        `model` overrides the graph's weights for this one stage (the tests' controls use it); `host` is the
        address it listens and advertises on (another replica's); `entry` runs it (another release's CLI)."""
        host = host or self.host
        spec = self.graph.spec
        model = model or spec.model.path or (spec.model.hugging_face.id if spec.model.hugging_face else "")
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "NIXL_LOG_LEVEL": "WARN",
            **cpu_share(spec, stage),
            PEER_TOKEN_ENV: self.peer_token,
            **(env or {}),
        }
        argv = worker_command(
            spec,
            stage,
            model=model,
            host=host,
            advertise_host=host,
            peers=peers,
            ports={stage: port},
            transfer_port=free_port(span=2),  # embeddings' side channel, then the KV one
        )
        log = self.logdir / (f"{stage.value}.log" if host == self.host else f"{stage.value}-{host}.log")
        proc = subprocess.Popen(
            [sys.executable, *entry, *argv, *(args or [])],
            stdout=open(log, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches us, and we stop the stages in order
        )
        replica = Stage(stage, port, proc, log, host)
        if host == self.host:
            self.stages[stage] = replica
        return replica

    def dead(self) -> Stage | None:
        return next((s for s in [*self.stages.values(), *self.replicas] if s.proc.poll() is not None), None)

    def healthy(self, stage: Stage) -> bool:
        try:
            with urllib.request.urlopen(f"http://{stage.host}:{stage.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = START_TIMEOUT, progress=print) -> None:
        deadline, started, shown = time.monotonic() + timeout, time.monotonic(), None
        while time.monotonic() < deadline:
            dead = self.dead()
            if dead:
                raise StageDied(dead)
            everyone = [*self.stages.values(), *self.replicas]
            healthy = [s for s in everyone if self.healthy(s)]
            if any(not s.listed for s in healthy):
                for s in healthy:
                    s.listed = True
                self.write_hosts()
            line = f"  {time.monotonic() - started:5.0f}s  ready: {counted(s.name for s in healthy) or '-'}"
            if line.split("ready")[1] != (shown or "").split("ready")[-1]:
                progress(line)
                shown = line
            if len(healthy) == len(everyone):  # and every reader has re-read the last listing, as DNS would
                time.sleep(max(0.0, self.hosts_written + REFRESH_SECONDS + 0.5 - time.monotonic()))
                return
            time.sleep(0.5)
        raise TimeoutError(f"stages not healthy within {timeout:.0f} s; logs in {self.logdir}")

    def stop(self) -> None:
        self._stop([*self.replicas, *self.stages.values()])

    @staticmethod
    def _stop(stages: list[Stage]) -> None:
        for stage in stages:  # SIGTERM to each process group, then wait, then SIGKILL
            if stage.proc.poll() is None:
                os.killpg(stage.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for stage in stages:
            try:
                stage.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(stage.proc.pid, signal.SIGKILL)
                stage.proc.wait(5)


def counted(stages: Iterable[StageName]) -> str:
    """Stage names in order, a repeated one once with its count: "encoder x2, pd"."""
    return ", ".join(name.value + (f" x{n}" if n > 1 else "") for name, n in Counter(stages).items())


class StageDied(RuntimeError):
    def __init__(self, stage: Stage):
        super().__init__(f"stage {stage.name.value} exited with code {stage.proc.returncode}")
        self.stage = stage


def up(file: str, host: str = "127.0.0.1", demo: bool = False) -> int:
    docs = [d for d in yaml.safe_load_all(Path(file).read_text()) if d]
    graph = parse(docs[0])
    checks = {"the graph is invalid": problems(graph), "cannot run the graph here": local_problems(graph.spec, host)}
    for what, found in checks.items():
        if found:
            print(f"mmgraph up: {what}:\n  " + "\n  ".join(found), file=sys.stderr)
            return 2
    if graph.spec.model.path and not Path(graph.spec.model.path, "config.json").exists():
        from mmgraph_workers.tiny_model import ensure

        family = graph.metadata.get("annotations", {}).get(TINY_FAMILY_ANNOTATION, "qwen2-vl")
        print(f"building the tiny {family} model at {graph.spec.model.path} (no download) ...", flush=True)
        ensure(graph.spec.model.path, family)
    local = LocalGraph(graph, host)
    stages = counted(s for s, n in replica_counts(graph.spec).items() for _ in range(n))
    print(f"starting {graph.name} ({graph.spec.topology.value}: {stages}); logs in {local.logdir}", flush=True)
    interrupted = False

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        local.start()
        local.wait_healthy(progress=lambda line: print(line, flush=True))
        print(f"\nready: {local.endpoint}/v1/chat/completions  (model {graph.spec.model.name!r})", flush=True)
        if demo:
            send_demo_request(local.endpoint, graph.spec.model.name, graph.spec.media.modalities)
            return 0
        print("Ctrl-C stops every stage.", flush=True)
        while True:
            dead = local.dead()
            if dead:
                raise StageDied(dead)
            time.sleep(0.5)
    except StageDied as err:
        print(f"\nmmgraph up: {err}; its last lines ({err.stage.log}):\n{err.stage.tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        return 130
    finally:
        print("stopping ..." if not interrupted else "\ninterrupted: stopping ...", flush=True)
        local.stop()
        print("stopped.", flush=True)
