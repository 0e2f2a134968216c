"""Operator at scale: N MultimodalGraphs applied in a burst to a real API server.

For each N: time from each graph's create to all of its children existing (p50/p99, from watch events), the
operator's requests per graph (from the API server's audit log, by the operator's ServiceAccount), and after
the burst, the operator's writes during a quiet window (target: zero). The baseline is the floor any operator
has to beat: a client that server-side-applies the same rendered children itself, in the same burst, with no
watch, cache or status at all. Writes JSON and a PNG plot to bench/out/, prints the figures and the ratios.

    .venv/bin/python bench/operator_scale.py [--sizes 10 100 200] [--quiet-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, dynamic

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from kubecluster import (  # noqa: E402
    OPERATOR_USER,
    OperatorProcess,
    install_chart,
    operator_kubeconfig_of,
    start_cluster,
)

from mmgraph_contract.graph import parse  # noqa: E402
from mmgraph_operator.render import render  # noqa: E402

OUT = REPO / "bench" / "out"
KINDS = [
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("policy/v1beta1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
]


class ChildWatcher:
    """Records when each child first appears (ADDED), cluster-wide, from one watch per kind."""

    def __init__(self, api: client.ApiClient):
        self.dyn = dynamic.DynamicClient(api)
        self.seen: dict[tuple[str, str, str], float] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._watch, args=k, daemon=True) for k in KINDS]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _watch(self, api_version: str, kind: str) -> None:
        resource = self.dyn.resources.get(api_version=api_version, kind=kind)
        while not self.stop.is_set():
            for event in resource.watch(timeout=5, label_selector="mmgraph.io/graph"):
                meta = event["object"].metadata
                self.seen.setdefault((kind, meta.namespace, meta.name), time.monotonic())
                if self.stop.is_set():
                    return


def graph_body(name: str, namespace: str) -> dict[str, Any]:
    body = yaml.safe_load((REPO / "examples" / "qwen2.5-vl-e-p-d.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    return body


def expected_children(body: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(m["kind"], m["metadata"]["namespace"], m["metadata"]["name"]) for m in render(parse(body), "1.20")}


def burst(api: client.ApiClient, watcher: ChildWatcher, namespace: str, n: int, create: Any) -> dict[str, Any]:
    """Create n graphs (or their children) at once; returns per-graph latency to all-children-exist."""
    client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
    bodies = [graph_body(f"g{i}", namespace) for i in range(n)]
    started: dict[str, float] = {}

    def one(body: dict[str, Any]) -> None:
        started[body["metadata"]["name"]] = time.monotonic()
        create(body)

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, bodies))
    want = {b["metadata"]["name"]: expected_children(b) for b in bodies}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(c <= watcher.seen.keys() for c in want.values()):
        time.sleep(0.05)
    latencies = []
    for name, children in want.items():
        if children <= watcher.seen.keys():
            latencies.append(max(watcher.seen[c] for c in children) - started[name])
    done = max((max(watcher.seen[c] for c in ch) for ch in want.values() if ch <= watcher.seen.keys()), default=t0)
    latencies.sort()
    return {
        "n": n,
        "complete": len(latencies),
        "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "all_children_s": done - t0,
    }


def audit_count(cluster: Any, since: int, writes_only: bool = False) -> tuple[int, int]:
    events = cluster.audit_events()
    mine = [e for e in events[since:] if e.get("user", {}).get("username") == OPERATOR_USER]
    if writes_only:
        mine = [e for e in mine if e.get("verb") not in ("get", "list", "watch")]
    return len(mine), len(events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 200])
    parser.add_argument("--quiet-seconds", type=float, default=60.0)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    cluster = start_cluster()
    operator = None
    try:
        api = config.new_client_from_config(str(cluster.kubeconfig))
        install_chart(cluster, api)
        operator = OperatorProcess(operator_kubeconfig_of(cluster, api), cluster.workdir, cluster.workdir)
        operator.webhook_port = 0  # no webhook in this benchmark: it measures reconciliation alone
        operator.start()
        watcher = ChildWatcher(api)
        watcher.start()
        time.sleep(1)
        dyn = dynamic.DynamicClient(api)
        custom = client.CustomObjectsApi(api)

        def via_operator(body: dict[str, Any]) -> None:
            custom.create_namespaced_custom_object(
                "mmgraph.io", "v1alpha1", body["metadata"]["namespace"], "multimodalgraphs", body
            )

        def direct_apply(body: dict[str, Any]) -> None:
            for m in render(parse(body), "1.20"):
                resource = dyn.resources.get(api_version=m["apiVersion"], kind=m["kind"])
                resource.server_side_apply(
                    body=m, name=m["metadata"]["name"], namespace=m["metadata"]["namespace"], field_manager="bench"
                )

        results = []
        for n in args.sizes:
            _, mark = audit_count(cluster, 0)
            op = burst(api, watcher, f"op-{n}", n, via_operator)
            time.sleep(3)  # let status updates triggered by the controller-manager settle into the count
            requests, _ = audit_count(cluster, mark)
            writes, _ = audit_count(cluster, mark, writes_only=True)
            base = burst(api, watcher, f"direct-{n}", n, direct_apply)
            row = {
                "n": n,
                "operator": op,
                "direct_apply": base,
                "operator_requests_per_graph": requests / n,
                "operator_writes_per_graph": writes / n,
                "p50_ratio_operator_over_direct": op["p50_s"] / base["p50_s"]
                if op["p50_s"] and base["p50_s"]
                else None,
            }
            results.append(row)
            print(
                f"N={n:4d}  operator p50 {op['p50_s'] * 1000:7.0f} ms  p99 {op['p99_s'] * 1000:7.0f} ms  "
                f"all children {op['all_children_s']:6.2f} s  | direct apply p50 {base['p50_s'] * 1000:7.0f} ms  "
                f"all {base['all_children_s']:6.2f} s  | ratio p50 {row['p50_ratio_operator_over_direct']:.2f}x  "
                f"| {row['operator_requests_per_graph']:.1f} requests/graph "
                f"({row['operator_writes_per_graph']:.1f} writes)",
                flush=True,
            )
        # Steady state begins once the burst's aftermath (Deployment status churn from the controller-manager,
        # and the status patches it causes) is over: no operator write for 10 s (at most 5 minutes of waiting).
        settle_start = time.monotonic()
        while time.monotonic() - settle_start < 300:
            before, _ = audit_count(cluster, 0, writes_only=True)
            time.sleep(10)
            after, _ = audit_count(cluster, 0, writes_only=True)
            if after == before:
                break
        settle_s = time.monotonic() - settle_start
        print(f"settled {settle_s:.0f} s after the last burst", flush=True)
        _, mark = audit_count(cluster, 0)
        print(f"quiet window: {args.quiet_seconds:.0f} s with {sum(args.sizes)} graphs in place ...", flush=True)
        time.sleep(args.quiet_seconds)
        quiet_writes, _ = audit_count(cluster, mark, writes_only=True)
        kinds: dict[str, int] = {}
        for e in cluster.audit_events()[mark:]:
            if e.get("user", {}).get("username") == OPERATOR_USER and e.get("verb") not in ("get", "list", "watch"):
                ref = e.get("objectRef", {})
                what = f"{e['verb']} {ref.get('resource')}/{ref.get('subresource', '')}"
                kinds[what] = kinds.get(what, 0) + 1
        if kinds:
            print("steady-state writes by kind:", kinds)
        quiet_requests, _ = audit_count(cluster, mark)
        print(
            f"steady state: {quiet_writes} writes, {quiet_requests} requests in {args.quiet_seconds:.0f} s "
            "(target: 0 writes)"
        )
        watcher.stop.set()
        for thread in watcher.threads:
            thread.join(10)
        report = {
            "benchmark": "operator_scale",
            "kubernetes": "1.20.2 (kube-apiserver + etcd 3.4 + kube-controller-manager, 127.0.0.1)",
            "results": results,
            "steady_state": {
                "settled_after_s": settle_s,
                "seconds": args.quiet_seconds,
                "writes": quiet_writes,
                "requests": quiet_requests,
            },
        }
        (OUT / "operator_scale.json").write_text(json.dumps(report, indent=2))
        plot(results)
        print(f"wrote {OUT / 'operator_scale.json'} and {OUT / 'operator_scale.png'}")
    finally:
        if operator is not None:
            operator.stop()
        cluster.stop()


def plot(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for who, style in (("operator", "o-"), ("direct_apply", "s--")):
        left.plot(ns, [r[who]["p50_s"] for r in results], style, label=f"{who} p50")
        left.plot(ns, [r[who]["p99_s"] for r in results], style, alpha=0.5, label=f"{who} p99")
        right.plot(ns, [r[who]["all_children_s"] for r in results], style, label=who)
    left.set(xlabel="graphs in the burst", ylabel="create → all children exist (s)", title="per-graph latency")
    right.set(xlabel="graphs in the burst", ylabel="seconds", title="until every child of the burst exists")
    right.axhline(30, color="red", lw=0.8, ls=":", label="target (200 graphs)")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "operator_scale.png", dpi=110)


if __name__ == "__main__":
    main()
