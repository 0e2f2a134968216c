"""Day two on the node (issue 30): what an inference graph's users fear most, under a steady load of requests
through the frontend Service whose every answer is checked against the oracle's tokens.

1. A rolling upgrade of the worker image from the previous release (tests/dataplane/previous_release/, a thin
   layer over this tree's image) to this tree's, by `kubectl apply` of a changed `spec.image`, for e-p-d and agg at
   once: none is answered wrongly, and none fails but by the previous release's own keep-alive race; then from
   this tree's release to the next (another tag): not one request fails. What makes it so is rendered by the
   operator: a preStop hook (the pod tells callers to go elsewhere and keeps serving while endpoints, DNS and the
   frontends' peer lists let it go), then the drain on SIGTERM, maxSurge 1 / maxUnavailable 0; and the workers:
   the frontend sends a call that got no answer to another replica, and stages keep idle connections longer than
   their callers do.
2. A pod lost in each stage of the e-p-d graph in turn, deleted and SIGKILLed: the requests it held fail with a
   5xx naming a stage (or, for the frontend killed, the connection), none is answered wrongly, every request sent
   once the stage is whole again succeeds, and the agg graph beside it never notices.
3. The operator's leader lost (deleted: it gives the Lease up; SIGKILLed: the Lease expires): the standby leads
   within the Lease's duration plus a retry, reconciles a graph changed meanwhile, and the webhook answers all the
   while; serving never notices.
4. The encoder stage scaled 1 -> 3 -> 1 under a load of repeated images: content routing keeps the embedding
   cache's hit rate within 10 points of one encoder's, and no request fails.
5. The API server restarted: serving never notices, and the operator reconciles a change after it.
6. A real Prometheus finds the pods through the API server and scrapes them; every query of the chart's Grafana
   dashboard returns data for the graphs of the cases above.

Each case prints its counts (requests, failed, wrong, seconds)."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubecluster import wait_for
from kubenode import kubectl_json, tool
from prometheus import Prometheus

from .conftest import NAMESPACE
from .day_two import (
    GRAPHS,
    EncoderCounters,
    Load,
    Timeline,
    apply,
    frontend,
    leader,
    lose,
    operator_pods,
    patch,
    pods,
    replaced,
    rolled_to,
    settled,
    stage_pods,
    webhook_refuses,
)

pytestmark = [pytest.mark.node, pytest.mark.timeout(2400)]

DASHBOARD = Path(__file__).parents[2] / "charts" / "mmgraph" / "dashboards" / "mmgraph.json"


@pytest.fixture(scope="module")
def watched(chart_on_node: Any, node_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus watching the graphs' namespace for the whole module; at its end, the graphs deleted."""
    node = chart_on_node
    prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), node.cluster.kubeconfig, [NAMESPACE]).start()
    try:
        yield prometheus
    finally:
        prometheus.stop()
        tool(node, "kubectl", "delete", "multimodalgraphs", "--all", "-n", NAMESPACE, "--cascade=foreground", "--wait")
        wait_for(lambda: not pods(node), timeout=120, interval=1, what="the graphs' pods gone")


@pytest.fixture(scope="module")
def on_previous_release(chart_on_node: Any, watched: Prometheus, previous_worker_image: str) -> dict[str, str]:
    """The README's e-p-d and agg graphs on the previous release's image, Ready; their frontend addresses."""
    for name in GRAPHS:
        apply(chart_on_node, name, previous_worker_image)
    return {name: frontend(chart_on_node, name) for name in GRAPHS}


STAGES = {"tiny": ("frontend", "encoder", "pd", "decode"), "tiny-agg": ("pd",)}


@pytest.fixture
def serving(chart_on_node: Any, watched: Prometheus, worker_image: str) -> dict[str, str]:
    """The graphs on this tree's release (as the rollouts left them, or applied now), Ready, one pod per stage
    (as the cases leave their specs) and none going; their frontend addresses."""
    node = chart_on_node
    present = {g["metadata"]["name"] for g in kubectl_json(node, "get", "multimodalgraphs", "-n", NAMESPACE)["items"]}
    for name in set(GRAPHS) - present:
        apply(node, name, worker_image)
    endpoints = {name: frontend(node, name, 900 if name not in present else 300) for name in GRAPHS}
    one_each = lambda: all(settled(node, g, stage, 1) for g, stages in STAGES.items() for stage in stages)  # noqa: E731
    wait_for(one_each, timeout=300, interval=1, what=f"one pod per stage: {pods(node)}")
    return endpoints


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


# ---- 2. a pod lost ---------------------------------------------------------------------------------------------

LOST_STAGES = ["frontend", "encoder", "pd", "decode"]
# Once the stage is whole again: the frontends' peer lists (every 2 s), the DNS feed and the Endpoints catch up.
SETTLE_SECONDS = 10
# What a request the lost pod held may get: a 5xx from the frontend naming the stage that failed it.
NAMED_FAILURE = re.compile(r'^[\w-]+: (502|503|504) \{"error":\{"message":"(frontend|encoder|pd|decode)[: ]')


def test_a_pod_lost_in_each_stage_fails_only_what_it_held_and_the_stage_recovers(chart_on_node, serving, reference):
    """Each stage of the e-p-d graph loses its pod in turn, by `kubectl delete pod` and by SIGKILL: its requests
    fail with a 5xx naming a stage (a client's connection broken only where the frontend itself went), none is
    answered wrongly, every request sent once the stage is whole again succeeds, and the agg graph never notices."""
    node = chart_on_node
    loads = {name: Load(endpoint, reference) for name, endpoint in serving.items()}
    load, losses = loads["tiny"], list[tuple[str, str, float, float]]()
    with Timeline(node, time.monotonic()) as timeline, loads["tiny"], loads["tiny-agg"]:
        time.sleep(5)
        for stage in LOST_STAGES:
            for how in ("deleted", "killed"):
                (pod,) = stage_pods(node, "tiny", stage)
                lost = load.now()
                lose(node, pod, how)
                wait_for(
                    lambda: replaced(pod, how, stage_pods(node, "tiny", stage)),  # noqa: B023 - called at once
                    timeout=600,
                    interval=1,
                    what=f"the {stage} stage whole again after its pod was {how}",
                )
                losses.append((stage, how, lost, load.now()))
                time.sleep(SETTLE_SECONDS + 5)
    print("\n".join(["", "the pods (image, readiness, going, restarts):", *timeline.lines]))
    ends = [lost for _, _, lost, _ in losses[1:]] + [load.now()]
    unexplained, after = [], []
    for (stage, how, lost, whole), end in zip(losses, ends, strict=True):
        failed = [r for r in load.records if lost <= r.done < end and r.outcome == "failed"]
        recovered = max((r.done for r in failed), default=lost) - lost
        print(f"{stage} {how}: {len(failed)} failed, served again in {recovered:.0f} s, whole in {whole - lost:.0f} s")
        unexplained += [r.detail for r in failed if not NAMED_FAILURE.match(r.detail) and stage != "frontend"]
        after += [r.detail for r in load.between(whole + SETTLE_SECONDS, end) if r.done < end and r.outcome != "ok"]
    print(load.report("e-p-d, its pods lost in turn"), loads["tiny-agg"].report("agg beside it"), sep="\n")
    print("\n".join(load.failures[:40]))
    assert load.outcomes["wrong"] == 0 and loads["tiny-agg"].outcomes["wrong"] == 0, load.failures
    assert unexplained == [], unexplained
    assert after == [], after
    assert loads["tiny-agg"].failures == [], loads["tiny-agg"].failures


# ---- 3. the leader lost ----------------------------------------------------------------------------------------

LEASE_SECONDS, RETRY_SECONDS = 15, 2  # operator/mmgraph_operator/leader.py's Timing


def test_the_leader_lost_the_standby_leads_and_the_webhook_answers_throughout(chart_on_node, serving, reference):
    """The operator's leader deleted (it gives the Lease up) and SIGKILLed (the Lease must expire): another
    process leads and reconciles a graph changed just after, within the Lease's duration and a retry; serving
    never notices. Both replicas serve the webhook, so it refuses a bad graph whenever asked, but for the moment
    a killed pod is still in its Service's endpoints: a change sent then skips the check (updates fail open, so
    that a finalizer never waits on the operator), and the operator does not apply it but says so, Degraded
    NotAdmitted with an Event naming the recheck, after which it is applied."""
    node = chart_on_node
    loads = {name: Load(endpoint, reference) for name, endpoint in serving.items()}
    unanswered, rows = [], []
    with contextlib.ExitStack() as running:
        for load in loads.values():
            running.enter_context(load)
        for how, frontends in (("deleted", 2), ("killed", 1)):
            was = leader(node)
            (pod,) = [p for p in operator_pods(node) if p["metadata"]["name"] == was.split("_")[0]]
            lost = time.monotonic()
            lose(node, pod, how)
            patch(node, "tiny", {"spec": {"stages": {"frontend": {"replicas": frontends}}}})
            took, rechecked = None, False
            while took is None or time.monotonic() - lost < 20:  # the webhook asked for 20 s at least
                if took is None and frontend_replicas(node, "tiny") == frontends:
                    took = time.monotonic() - lost
                elif took is None and not rechecked and not_admitted(node, "tiny"):
                    recheck(node, "tiny")  # as the condition's message says
                    rechecked = True
                answered, said = webhook_refuses(node)
                if not answered:
                    unanswered.append((how, time.monotonic() - lost, said.strip()))
                assert time.monotonic() - lost < 120, f"never reconciled after the leader was {how}"
                time.sleep(0.5)
            now = leader(node)
            assert now not in ("", was), f"the Lease is still {was!r}"  # another process leads
            rows.append((how, took, now, rechecked))
            whole = lambda: replaced(pod, how, operator_pods(node))  # noqa: B023, E731 - called at once
            wait_for(whole, timeout=300, interval=1, what="both operator replicas Ready")
    for how, took, now, rechecked in rows:
        again = " (sent as the pod went, not checked, told NotAdmitted, rechecked)" if rechecked else ""
        print(f"leader {how}: the change reconciled {took:.1f} s after{again}, by {now}")
    for name, load in loads.items():
        print(load.report(f"{name} through it"))
    print("\n".join(f"webhook not answering, leader {how}, {at:.1f} s after: {said}" for how, at, said in unanswered))
    assert all(took <= LEASE_SECONDS + RETRY_SECONDS + 5 for _, took, _, _ in rows), rows
    assert all(how == "killed" and at < KILLED_ENDPOINT_SECONDS for how, at, _ in unanswered), unanswered
    for load in loads.values():
        assert load.outcomes["wrong"] == 0 and load.failed == [], load.failures


# How long a SIGKILLed pod may stay in its Service's endpoints: the kubelet notices the container gone (its
# relist, 1 s), reports it, and the endpoints and kube-proxy's rules follow.
KILLED_ENDPOINT_SECONDS = 5


def not_admitted(node: Any, graph: str) -> bool:
    """The graph reports its spec not admitted (Degraded NotAdmitted), and a Warning Event says so."""
    body = kubectl_json(node, "get", "multimodalgraph", graph, "-n", NAMESPACE)
    degraded = [c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == "Degraded"]
    if not degraded or degraded[0]["status"] != "True" or degraded[0]["reason"] != "NotAdmitted":
        return False
    events = kubectl_json(node, "get", "events", "-n", NAMESPACE, f"--field-selector=involvedObject.name={graph}")
    return any(e["reason"] == "NotAdmitted" and e["type"] == "Warning" for e in events["items"])


def recheck(node: Any, graph: str) -> None:
    """What a NotAdmitted graph's message tells its author to run: the webhook checks the spec as them."""
    annotation = f"mmgraph.io/recheck={time.time():.0f}"
    tool(node, "kubectl", "annotate", "multimodalgraph", graph, "-n", NAMESPACE, annotation, "--overwrite")


def frontend_replicas(node: Any, graph: str) -> int:
    return kubectl_json(node, "get", "deployment", f"{graph}-frontend", "-n", NAMESPACE)["spec"]["replicas"]


# ---- 4. scaling ------------------------------------------------------------------------------------------------

GALLERY = [f"concurrent-{i}" for i in range(16)]  # 16 images, each with its own answer


def test_encoders_scaled_1_3_1_keep_their_cache_and_every_request(chart_on_node, serving, reference):
    """The encoder stage scaled 1 -> 3 -> 1 through the graph's spec under a load that repeats 16 images: only
    the keys of the replicas that came or went move (their first request misses), so the hit rate stays within
    10 points of one encoder's; no request fails."""
    node = chart_on_node
    load = Load(serving["tiny"], reference, cases=GALLERY)
    with EncoderCounters(node, "tiny") as counters, load:
        time.sleep(len(GALLERY) / load.rate + 10)  # each image encoded once: the cache is warm
        hits0, items0 = counters.totals()
        time.sleep(30)
        hits1, items1 = counters.totals()
        for replicas in (3, 1):
            started = time.monotonic()
            patch(node, "tiny", {"spec": {"stages": {"encoder": {"replicas": replicas}}}})
            wait_for(lambda: settled(node, "tiny", "encoder", replicas), timeout=600, interval=1, what="encoders")  # noqa: B023
            print(f"{replicas} encoders Ready in {time.monotonic() - started:.0f} s")
            time.sleep(15)
        hits2, items2 = counters.totals()
    one, scaled = (hits1 - hits0) / (items1 - items0), (hits2 - hits1) / (items2 - items1)
    print(f"hit rate: {one:.1%} of {items1 - items0:.0f} items with one encoder, {scaled:.1%} of {items2 - items1:.0f}")
    print(load.report("e-p-d, scaled"), "\n".join(load.failures[:20]), sep="\n")
    assert one > 0.9 and scaled >= one - 0.10  # warm, one encoder hits nearly every repeated image
    assert load.outcomes["wrong"] == 0 and load.failed == [], load.failures


# ---- 5. the API server restarted -------------------------------------------------------------------------------


def test_the_api_server_restarted_serving_never_notices_and_the_operator_reconciles(chart_on_node, serving, reference):
    """The API server stopped and started again while the graphs serve: no request fails; the operator's watches
    come back and it reconciles a change made after."""
    node = chart_on_node
    loads = {name: Load(endpoint, reference) for name, endpoint in serving.items()}
    with contextlib.ExitStack() as running:
        for load in loads.values():
            running.enter_context(load)
        time.sleep(5)
        down = node.cluster.restart_api_server()
        for frontends in (2, 1):
            changed = time.monotonic()
            patch(node, "tiny", {"spec": {"stages": {"frontend": {"replicas": frontends}}}})
            wait_for(lambda: frontend_replicas(node, "tiny") == frontends, timeout=120, interval=0.5)  # noqa: B023
            took = time.monotonic() - changed
            print(f"the API server was down {down:.1f} s; {frontends} frontends reconciled {took:.1f} s after")
        time.sleep(10)
    for name, load in loads.items():
        print(load.report(f"{name} through it"), "\n".join(load.failures[:20]), sep="\n")
        assert load.outcomes["wrong"] == 0 and load.failed == [], load.failures


# ---- 6. watching it --------------------------------------------------------------------------------------------


def dashboard_queries(namespace: str) -> list[str]:
    """Every PromQL expression of the chart's dashboard, its `$namespace` variable set to `namespace`."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for item in dashboard["panels"] for p in (item, *(item.get("panels") or []))]
    return [t["expr"].replace("$namespace", namespace) for p in panels for t in p.get("targets") or []]


def scrapes(prometheus: Prometheus) -> list[tuple[str, str, str]]:
    """Each target's pod, health and last error."""
    return [(t["labels"].get("pod", ""), t["health"], t["lastError"]) for t in prometheus.targets()]


def test_prometheus_finds_the_pods_and_every_dashboard_query_returns_data(chart_on_node, serving, watched, reference):
    """Debian's Prometheus, discovering pods through the API server by the annotations the operator renders,
    scrapes every stage of both graphs; each query of the chart's dashboard returns data over the module's
    cases (a few requests now, so that it also does when this test runs alone)."""
    with Load(serving["tiny"], reference):
        time.sleep(10)
    node = chart_on_node
    pods = {p["metadata"]["name"] for g, stages in STAGES.items() for s in stages for p in stage_pods(node, g, s)}
    deadline = time.monotonic() + 30  # a pod listed since the last round is scraped within two intervals
    while not pods <= {pod for pod, health, _ in scrapes(watched) if health == "up"}:
        assert time.monotonic() < deadline, f"{sorted(pods)} not all scraped: {scrapes(watched)}"
        time.sleep(1)
    empty = [expr for expr in dashboard_queries(NAMESPACE) if not watched.query_range(expr, watched.began)]
    assert empty == [], empty
