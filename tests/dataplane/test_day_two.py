"""Day two on the node (issue 30): what an inference graph's users fear most, under a steady load of requests
through the frontend Service whose every answer is checked against the oracle's tokens.

- A rolling upgrade of the worker image from the previous release (tests/dataplane/previous_release/, a thin
  layer over this tree's image) to this tree's, by `kubectl apply` of a changed `spec.image`, for e-p-d and agg at
  once: none is answered wrongly, and none fails but by the previous release's own keep-alive race; then from
  this tree's release to the next (another tag): not one request fails. What makes it so is rendered by the
  operator: a preStop hook (the pod tells callers to go elsewhere and keeps serving while endpoints, DNS and the
  frontends' peer lists let it go), then the drain on SIGTERM, maxSurge 1 / maxUnavailable 0; and the workers:
  the frontend sends a call that got no answer to another replica, and stages keep idle connections longer than
  their callers do.

Each case prints its counts (requests, failed, wrong, seconds)."""

from __future__ import annotations

import contextlib
import json
import re
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
        """One request; sent again (up to twice) only where the connection failed before any answer came, as the
        OpenAI SDK does (`max_retries`): a server closing an idle connection just as it is reused. Counted."""
        body = {**CASES[case], "model": MODEL_NAME, "temperature": 0, "return_token_ids": True}
        for attempt in range(3):
            try:
                r = self.client.post(f"{self.endpoint}/v1/chat/completions", json=body)
                break
            except httpx.TransportError as err:
                if attempt == 2 or isinstance(err, httpx.TimeoutException):
                    self._count("failed", f"{case}: {type(err).__name__}: {err}")
                    return
                self._count("resent", f"{case}: {type(err).__name__}: {err}")
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

    @property
    def failed(self) -> list[str]:
        return [f for f in self.failures if " resent: " not in f]

    def report(self, what: str) -> str:
        total = sum(n for outcome, n in self.outcomes.items() if outcome != "resent")
        return (
            f"{what}: {total} requests in {time.monotonic() - self.started:.0f} s, "
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
                    ready = any(
                        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or []
                    )
                    restarts = sum(c.get("restartCount", 0) for c in pod["status"].get("containerStatuses") or [])
                    image = pod["spec"]["containers"][0]["image"].rsplit(":", 1)[-1]
                    going = "going" if pod["metadata"].get("deletionTimestamp") else ""
                    now[pod["metadata"]["name"]] = (image, "ready" if ready else "not ready", going, restarts)
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


# How the previous release's frontend reports a call its peer closed before answering (a kept-alive connection the
# peer was closing): it sent none of those to another replica, and its stages closed idle connections after 5 s,
# the very age at which httpx stops reusing one. This tree's frontend never answers so: it sends such a call to
# another replica, and its stages keep idle connections 20 s.
PREVIOUS_RELEASES_RACE = re.compile(r'"message":"(encoder|pd|decode): (ReadError|RemoteProtocolError|WriteError)')


def rollout(node: Any, loads: dict[str, Load], image: str) -> tuple[float, list[str]]:
    """Apply the graphs with `image` under their loads (10 s of load before and after), wait until every
    Deployment has rolled and no pod of another image is left; the seconds it took and the pods' timeline."""
    with Timeline(node, time.monotonic()) as timeline, contextlib.ExitStack() as running:
        for load in loads.values():
            running.enter_context(load)
        time.sleep(10)
        started = time.monotonic()
        for name in GRAPHS:
            apply(node, name, image)
        rolled_to(node, image)
        rolled = time.monotonic() - started
        time.sleep(10)
    print("\n".join(["", f"rolled to {image} in {rolled:.0f} s; the pods (image, readiness, going, restarts):"]))
    print("\n".join(timeline.lines))
    for name, load in loads.items():
        print(load.report(f"{name} through the rollout"))
        print("\n".join(load.failures[:20]))
    return rolled, timeline.lines


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


def test_a_rolling_upgrade_from_the_previous_release_answers_every_request_rightly(
    chart_on_node, on_previous_release, worker_image, reference
):
    """From the previous release (e-p-d and agg at once): no answer is wrong, and no request fails but those the
    previous release's own frontend fails by its keep-alive race, while it still serves (counted apart; its
    servers' side of that race, a client's idle connection closed under it, the client sends again)."""
    loads = {name: Load(endpoint, reference) for name, endpoint in on_previous_release.items()}
    rollout(chart_on_node, loads, worker_image)
    for name, load in loads.items():
        theirs = [f for f in load.failed if PREVIOUS_RELEASES_RACE.search(f)]
        print(f"{name}: {len(theirs)} failed in the previous release's frontend (its keep-alive race)")
        assert load.outcomes["ok"] > 0 and load.outcomes["wrong"] == 0, load.failures[:20]
        assert [f for f in load.failed if f not in theirs] == [], load.failures[:20]


def test_a_rolling_upgrade_between_releases_of_this_tree_loses_no_request(
    chart_on_node, on_previous_release, worker_image, next_worker_image, reference
):
    """The next upgrade, from a release with this tree's drain (its worker image under another tag, so every pod
    is replaced): not one request fails, none is answered wrongly, and none even needs the client to send it
    again."""
    node = chart_on_node
    for name in GRAPHS:  # this tree's release first (a no-op after the test above)
        apply(node, name, worker_image)
    rolled_to(node, worker_image)
    loads = {name: Load(frontend(node, name), reference) for name in GRAPHS}
    rollout(node, loads, next_worker_image)
    for load in loads.values():
        assert load.outcomes["ok"] > 0 and not load.failures, load.failures[:20]


@pytest.fixture(scope="module")
def next_worker_image(node: Any, worker_image: str) -> str:
    """This tree's worker image under another tag: a release that changes nothing but the image's name."""
    image = worker_image.rsplit(":", 1)[0] + ":next"
    node.ctr("images", "tag", "--force", worker_image, image)
    return image


def phase(node: Any, name: str) -> str | None:
    return (kubectl_json(node, "get", "multimodalgraph", name, "-n", NAMESPACE).get("status") or {}).get("phase")


def pods(node: Any) -> list[tuple[str, str, str]]:
    """Each pod's name, phase and image."""
    return [
        (p["metadata"]["name"], p["status"]["phase"], p["spec"]["containers"][0]["image"])
        for p in kubectl_json(node, "get", "pods", "-n", NAMESPACE)["items"]
    ]
