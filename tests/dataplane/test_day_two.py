"""Day two on the node (issue 30): what an inference graph's users fear most, under a steady load of requests
through the frontend Service whose every answer is checked against the oracle's tokens.

- A rolling upgrade of the worker image from the previous release (tests/dataplane/previous_release/, a thin
  layer over this tree's image) to this tree's, by `kubectl apply` of a changed `spec.image`, for e-p-d and agg at
  once: no request fails, none is answered wrongly. What makes it so is rendered by the operator: a preStop hook
  (the pod tells callers to go elsewhere and keeps serving while endpoints, DNS and the frontends' peer lists let
  it go), then the drain on SIGTERM, maxSurge 1 / maxUnavailable 0, and the frontend sending a call that got no
  answer to another replica.

Each case prints its counts (requests, failed, wrong, seconds)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubecluster import wait_for
from kubenode import kubectl_json, tool

from .conftest import CASES, CLUSTER, MODEL_NAME, NAMESPACE

pytestmark = [pytest.mark.node, pytest.mark.timeout(2400)]

GRAPHS = {"tiny": "tiny-e-p-d.yaml", "tiny-agg": "tiny-agg.yaml"}
LOAD_CASES = ["one-image", "two-images", "text-only", "one-video"]


@dataclass
class Load:
    """Requests at a fixed rate to a frontend (a client per request thread, kept alive, as an SDK keeps its
    connections), cycling through LOAD_CASES; every answer is compared with the oracle's tokens."""

    endpoint: str
    reference: dict[str, list[int]]
    rate: float = 2.0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(16)
        self.client = httpx.Client(timeout=180, limits=httpx.Limits(max_connections=16))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        self.pool.shutdown(wait=True)
        self.client.close()

    def _run(self) -> None:
        n = 0
        while not self.stopping.wait(max(0.0, self.started + n / self.rate - time.monotonic())):
            self.pool.submit(self._one, LOAD_CASES[n % len(LOAD_CASES)])
            n += 1

    def _one(self, case: str) -> None:
        body = {**CASES[case], "model": MODEL_NAME, "temperature": 0, "return_token_ids": True}
        try:
            r = self.client.post(f"{self.endpoint}/v1/chat/completions", json=body)
        except httpx.HTTPError as err:
            self._count("failed", f"{case}: {type(err).__name__}: {err}")
            return
        if r.status_code != 200:
            self._count("failed", f"{case}: {r.status_code} {r.text[:300]}")
        elif r.json()["choices"][0]["token_ids"] != self.reference[case]:
            self._count("wrong", f"{case}: {r.json()['choices'][0]}")
        else:
            self._count("ok")

    def _count(self, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if detail:
            self.failures.append(f"{time.monotonic() - self.started:6.1f} s {outcome}: {detail}")

    def report(self, what: str) -> str:
        total = sum(self.outcomes.values())
        return (
            f"{what}: {total} requests in {time.monotonic() - self.started:.0f} s, "
            f"{self.outcomes['failed']} failed, {self.outcomes['wrong']} wrong"
        )


@pytest.fixture(scope="module")
def on_previous_release(chart_on_node: Any, previous_worker_image: str, node_models: Path) -> Iterator[dict[str, str]]:
    """The README's e-p-d and agg graphs on the previous release's image, Ready; their frontend addresses."""
    node = chart_on_node
    for name in GRAPHS:
        apply(node, name, previous_worker_image)
    endpoints = {name: frontend(node, name) for name in GRAPHS}
    yield endpoints
    tool(node, "kubectl", "delete", "multimodalgraphs", "--all", "-n", NAMESPACE, "--cascade=foreground", "--wait")
    wait_for(lambda: not pods(node), timeout=120, interval=1, what="the graphs' pods gone")


def apply(node: Any, name: str, image: str) -> None:
    graph = yaml.safe_load((CLUSTER / GRAPHS[name]).read_text())
    graph["spec"]["image"] = image
    tool(node, "kubectl", "apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(graph))


def frontend(node: Any, name: str) -> str:
    wait_for(lambda: phase(node, name) == "Ready", timeout=900, interval=2, what=f"{name} Ready: {pods(node)}")
    service = kubectl_json(node, "get", "service", f"{name}-frontend", "-n", NAMESPACE)
    return f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"


def test_a_rolling_upgrade_from_the_previous_release_loses_no_request(
    chart_on_node, on_previous_release, worker_image, previous_worker_image, reference
):
    node = chart_on_node
    loads = {name: Load(endpoint, reference) for name, endpoint in on_previous_release.items()}
    for load in loads.values():
        load.__enter__()
    try:
        time.sleep(10)  # the load before the rollout
        started = time.monotonic()
        for name in GRAPHS:
            apply(node, name, worker_image)
        listed = kubectl_json(node, "get", "deployments", "-n", NAMESPACE)["items"]
        deployments = [d["metadata"]["name"] for d in listed]
        for deployment in deployments:
            tool(node, "kubectl", "rollout", "status", f"deployment/{deployment}", "-n", NAMESPACE, "--timeout=900s")
        wait_for(
            lambda: all(image == worker_image for _, _, image in pods(node)),
            timeout=300,
            interval=1,
            what=f"the old pods gone: {pods(node)}",
        )
        rolled = time.monotonic() - started
        time.sleep(10)  # and after it
    finally:
        for load in loads.values():
            load.__exit__(None, None, None)
    print(f"\nrolled {len(deployments)} Deployments from {previous_worker_image} to {worker_image} in {rolled:.0f} s")
    for name, load in loads.items():
        print(load.report(f"{name} through the rollout"))
        print("\n".join(load.failures[:20]))
    for load in loads.values():
        assert load.outcomes["ok"] > 0 and not load.failures, load.failures[:20]


def phase(node: Any, name: str) -> str | None:
    return (kubectl_json(node, "get", "multimodalgraph", name, "-n", NAMESPACE).get("status") or {}).get("phase")


def pods(node: Any) -> list[tuple[str, str, str]]:
    """Each pod's name, phase and image."""
    return [
        (p["metadata"]["name"], p["status"]["phase"], p["spec"]["containers"][0]["image"])
        for p in kubectl_json(node, "get", "pods", "-n", NAMESPACE)["items"]
    ]
