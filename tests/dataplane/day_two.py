"""What test_day_two's cases share: a steady load whose every answer is checked against the oracle's tokens, a
timeline of the graphs' pods, and the node-side acts (apply an image, lose a pod, find the leader, scale)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import yaml
from kubecluster import wait_for
from kubenode import kubectl_json, tool

from .conftest import CASES, CLUSTER, MODEL_NAME, NAMESPACE

GRAPHS = {"tiny": "tiny-e-p-d.yaml", "tiny-agg": "tiny-agg.yaml"}
LOAD_CASES = ["one-image", "two-images", "text-only", "one-video"]
OPERATOR_NAMESPACE = "mmgraph-system"


@dataclass
class Outcome:
    sent: float  # seconds since the load started
    done: float
    outcome: str  # ok, wrong, failed or resent
    detail: str = ""


@dataclass
class Load:
    """Requests at a fixed rate to a frontend (one client, its connections kept alive as an SDK keeps them),
    cycling through `cases`; every answer is compared with the oracle's tokens."""

    endpoint: str
    reference: dict[str, list[int]]
    rate: float = 2.0
    cases: list[str] = field(default_factory=lambda: list(LOAD_CASES))
    outcomes: Counter = field(default_factory=Counter)
    records: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stopping, self.lock = threading.Event(), threading.Lock()
        self.pool = ThreadPoolExecutor(16)
        self.client = httpx.Client(timeout=180, limits=httpx.Limits(max_connections=16))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        self.pool.shutdown(wait=True)
        self.client.close()

    def now(self) -> float:
        return time.monotonic() - self.started

    def _run(self) -> None:
        n = 0
        while not self.stopping.wait(max(0.0, self.started + n / self.rate - time.monotonic())):
            self.pool.submit(self._one, self.cases[n % len(self.cases)])
            n += 1

    def _one(self, case: str) -> None:
        sent = self.now()
        try:
            self._ask(case, sent)
        except Exception as err:  # an answer of the wrong shape, say: a failure, never a request counted nowhere
            self._count(sent, "failed", f"{case}: {type(err).__name__}: {err}")

    def _ask(self, case: str, sent: float) -> None:
        """One request; sent again (up to twice) only where the connection failed before any answer came, as the
        OpenAI SDK does (`max_retries`): a server closing an idle connection just as it is reused. Counted."""
        body = {**CASES[case], "model": MODEL_NAME, "temperature": 0, "return_token_ids": True}
        for attempt in range(3):
            try:
                r = self.client.post(f"{self.endpoint}/v1/chat/completions", json=body)
                break
            except httpx.TransportError as err:
                if attempt == 2 or isinstance(err, httpx.TimeoutException):
                    self._count(sent, "failed", f"{case}: {type(err).__name__}: {err}")
                    return
                self._count(sent, "resent", f"{case}: {type(err).__name__}: {err}")
        if r.status_code != 200:
            self._count(sent, "failed", f"{case}: {r.status_code} {r.text[:300]}")
        elif r.json()["choices"][0]["token_ids"] != self.reference[case]:
            self._count(sent, "wrong", f"{case}: {r.json()['choices'][0]}")
        else:
            self._count(sent, "ok")

    def _count(self, sent: float, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            self.records.append(Outcome(sent, self.now(), outcome, detail))

    @property
    def failures(self) -> list[str]:
        """Every request not answered rightly at once, as `<seconds> s <outcome>: <detail>`."""
        return [f"{r.done:6.1f} s {r.outcome}: {r.detail}" for r in self.records if r.outcome != "ok"]

    @property
    def failed(self) -> list[str]:
        return [f for f in self.failures if " resent: " not in f]

    def between(self, start: float, end: float) -> list[Outcome]:
        """The requests sent from `start` to `end` (seconds since the load started)."""
        return [r for r in self.records if start <= r.sent < end]

    def report(self, what: str) -> str:
        total = sum(n for outcome, n in self.outcomes.items() if outcome != "resent")
        return (
            f"{what}: {total} requests in {self.now():.0f} s, "
            f"{self.outcomes['failed']} failed, {self.outcomes['wrong']} wrong, "
            f"{self.outcomes['resent']} sent again by the client (no answer on a kept-alive connection)"
        )


class Timeline(threading.Thread):
    """The graphs' pods as they change (created, ready, going, gone, restarted), second by second: what a
    failed request is read against."""

    def __init__(self, node: Any, started: float):
        super().__init__(daemon=True)
        self.node, self.started, self.stopping, self.lines = node, started, threading.Event(), []

    def run(self) -> None:
        seen: dict[str, tuple] = {}
        while not self.stopping.wait(1):
            with contextlib.suppress(Exception):
                now = {}
                for pod in kubectl_json(self.node, "get", "pods", "-n", NAMESPACE)["items"]:
                    restarts = sum(c.get("restartCount", 0) for c in pod["status"].get("containerStatuses") or [])
                    image = pod["spec"]["containers"][0]["image"].rsplit(":", 1)[-1]
                    going = "going" if pod["metadata"].get("deletionTimestamp") else ""
                    now[pod["metadata"]["name"]] = (image, "ready" if ready(pod) else "not ready", going, restarts)
                for name in sorted(now.keys() | seen.keys()):
                    if now.get(name) != seen.get(name):
                        self.lines.append(f"{time.monotonic() - self.started:6.1f} s {name} {now.get(name, 'gone')}")
                seen = now

    def __enter__(self) -> Timeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join()


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


# ---- the graphs ------------------------------------------------------------------------------------------------


def apply(node: Any, name: str, image: str) -> None:
    graph = yaml.safe_load((CLUSTER / GRAPHS[name]).read_text())
    graph["spec"]["image"] = image
    tool(node, "kubectl", "apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(graph))


def patch(node: Any, name: str, spec: dict[str, Any]) -> None:
    tool(node, "kubectl", "patch", "multimodalgraph", name, "-n", NAMESPACE, "--type=merge", "-p", json.dumps(spec))


def frontend(node: Any, name: str, timeout: float = 900) -> str:
    """The graph's frontend Service address, once the graph is Ready."""
    wait_for(lambda: phase(node, name) == "Ready", timeout=timeout, interval=2, what=f"{name} Ready: {pods(node)}")
    service = kubectl_json(node, "get", "service", f"{name}-frontend", "-n", NAMESPACE)
    return f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"


def rolled_to(node: Any, image: str) -> None:
    """Every Deployment rolled (`kubectl rollout status`) and no pod of another image left."""
    for deployment in kubectl_json(node, "get", "deployments", "-n", NAMESPACE)["items"]:
        name = deployment["metadata"]["name"]
        tool(node, "kubectl", "rollout", "status", f"deployment/{name}", "-n", NAMESPACE, "--timeout=900s")
    wait_for(
        lambda: all(pod_image == image for _, _, pod_image in pods(node)),
        timeout=300,
        interval=1,
        what=f"the old pods gone: {pods(node)}",
    )


def phase(node: Any, name: str) -> str | None:
    return (kubectl_json(node, "get", "multimodalgraph", name, "-n", NAMESPACE).get("status") or {}).get("phase")


def pods(node: Any) -> list[tuple[str, str, str]]:
    """Each pod's name, phase and image."""
    return [
        (p["metadata"]["name"], p["status"]["phase"], p["spec"]["containers"][0]["image"])
        for p in kubectl_json(node, "get", "pods", "-n", NAMESPACE)["items"]
    ]


def stage_pods(node: Any, graph: str, stage: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    selector = f"mmgraph.io/graph={graph},mmgraph.io/stage={stage}"
    return kubectl_json(node, "get", "pods", "-n", namespace, "-l", selector)["items"]


def settled(node: Any, graph: str, stage: str, replicas: int) -> bool:
    """`replicas` pods of the stage, every one Ready and none going."""
    now = stage_pods(node, graph, stage)
    return len(now) == replicas and all(ready(p) and not p["metadata"].get("deletionTimestamp") for p in now)


# ---- losing a pod ----------------------------------------------------------------------------------------------


def lose(node: Any, pod: dict[str, Any], how: str) -> None:
    """`deleted`: `kubectl delete pod` (the graceful path: preStop, SIGTERM, the grace period); `killed`: SIGKILL
    to the container's process from the node, as the kernel's OOM killer or a crash ends it (the kubelet restarts
    the container in the same pod)."""
    name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
    if how == "deleted":
        tool(node, "kubectl", "delete", "pod", name, "-n", namespace, "--wait=false")
    else:
        container = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
        node.ctr("tasks", "kill", "--signal", "SIGKILL", container)


def replaced(pod: dict[str, Any], how: str, now: list[dict[str, Any]]) -> bool:
    """Whole again after `lose(pod, how)`, from the pods `now` of its kind: a new pod in its place, or its
    container restarted, and every one Ready."""
    if not now or not all(ready(p) and not p["metadata"].get("deletionTimestamp") for p in now):
        return False
    if how == "deleted":
        return pod["metadata"]["name"] not in {p["metadata"]["name"] for p in now}
    (same,) = [p for p in now if p["metadata"]["name"] == pod["metadata"]["name"]]
    return restarts(same) > restarts(pod)


def restarts(pod: dict[str, Any]) -> int:
    return sum(c.get("restartCount", 0) for c in pod["status"].get("containerStatuses") or [])


# ---- the operator ----------------------------------------------------------------------------------------------


def operator_pods(node: Any) -> list[dict[str, Any]]:
    selector = "app.kubernetes.io/name=mmgraph-operator,app.kubernetes.io/instance=mmgraph"
    return kubectl_json(node, "get", "pods", "-n", OPERATOR_NAMESPACE, "-l", selector)["items"]


def leader(node: Any) -> str:
    """The identity holding the operator's Lease: `<pod>_<random>`, new with each process."""
    lease = kubectl_json(node, "get", "lease", "mmgraph-operator", "-n", OPERATOR_NAMESPACE)
    return lease["spec"].get("holderIdentity") or ""


def webhook_refuses(node: Any) -> tuple[bool, str]:
    """Whether the webhook answered a create (server-side dry run) that it must refuse; and what kubectl said."""
    bad = yaml.safe_load((CLUSTER / GRAPHS["tiny"]).read_text())
    bad["metadata"]["name"], bad["spec"]["topology"] = "refused", "e-pd"  # decode is still set
    done = tool(
        node, "kubectl", "create", "--dry-run=server", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(bad), check=False
    )
    return "denied the request" in done.stderr and "topology e-pd does not use it" in done.stderr, done.stderr


# ---- the encoders' embedding cache -----------------------------------------------------------------------------


class EncoderCounters(threading.Thread):
    """Each encoder pod's items served from its embedding cache and items asked for, read from its /metrics every
    second while it lives:
    the last reading of a pod that went is kept (pods come and go as the stage scales)."""

    def __init__(self, node: Any, graph: str):
        super().__init__(daemon=True)
        self.node, self.graph, self.stopping = node, graph, threading.Event()
        self.last: dict[str, tuple[float, float]] = {}  # pod -> (hits, items)
        self.lock = threading.Lock()

    def run(self) -> None:
        with httpx.Client(timeout=2) as http:
            while not self.stopping.wait(1):
                with contextlib.suppress(Exception):
                    for pod in stage_pods(self.node, self.graph, "encoder"):
                        if not pod["status"].get("podIP"):
                            continue
                        port = pod["metadata"]["annotations"]["prometheus.io/port"]
                        text = http.get(f"http://{pod['status']['podIP']}:{port}/metrics").text
                        with self.lock:
                            self.last[pod["metadata"]["name"]] = (
                                sample(text, 'mmgraph_encoder_items_total{cached="true"}'),
                                sample(text, "mmgraph_encoder_items_total"),
                            )

    def totals(self) -> tuple[float, float]:
        """Hits and items over every encoder pod seen so far."""
        with self.lock:
            return sum(h for h, _ in self.last.values()), sum(i for _, i in self.last.values())

    def __enter__(self) -> EncoderCounters:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join()


def sample(text: str, series: str) -> float:
    """The sum of the samples of `series` (a name, or a name with labels) in a /metrics page."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(series) and line[len(series) : len(series) + 1] in ("{", " ")
    )
