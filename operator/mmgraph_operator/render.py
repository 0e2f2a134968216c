"""`render(graph, kube_version)`: the pure compiler from a MultimodalGraph to the Kubernetes objects that run it.

No I/O and no clock: the same graph and version always give the same manifests, so the operator's reconcile loop
is "render, then make the cluster match", `mmgraph render` shows a GitOps reviewer exactly what will be applied,
and golden tests pin the output. Anything that needs the cluster (the server's version, the graph's uid) is an
argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmgraph_contract.graph import MultimodalGraph, peer_credential_name
from mmgraph_contract.rules import problems
from mmgraph_contract.settings import api_stage, process_stages, serves_api
from mmgraph_contract.spec import Autoscaling, StageSpec
from mmgraph_contract.vocabulary import StageName
from mmgraph_contract.wire import AUTOSCALING_METRICS, PEER_TOKEN_KEY
from mmgraph_operator.names import SERVES_API, _labels, _metadata, _selector, child_name
from mmgraph_operator.pod import _pod_spec, _ports

DEFAULT_KUBE_VERSION = "1.29"


class InvalidGraph(ValueError):
    """The graph breaks a rule the schema cannot express; `problems` says what to change."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class KubeVersion:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> KubeVersion:
        """Accepts 1.20, v1.20.2, 1.29+ (as GKE/EKS report minor versions)."""
        parts = text.strip().lstrip("v").split(".")
        return cls(int(parts[0]), int("".join(c for c in parts[1] if c.isdigit())))

    def __ge__(self, other: tuple[int, int]) -> bool:  # type: ignore[override]
        return (self.major, self.minor) >= other


POD_MONITOR = ("monitoring.coreos.com/v1", "PodMonitor")
OPTIONAL_KINDS = {POD_MONITOR}  # another operator's CRDs: a cluster may not serve them (served.py copes)


def pdb_api_version(version: KubeVersion) -> str:
    """PodDisruptionBudget is policy/v1 from Kubernetes 1.21 (policy/v1beta1 before, gone in 1.25)."""
    return "policy/v1" if version >= (1, 21) else "policy/v1beta1"


def endpoint(graph: MultimodalGraph) -> str:
    """The OpenAI API's in-cluster URL (the frontend Service's), as reported in status.endpoint."""
    port = graph.spec.stages.frontend.port
    return f"http://{child_name(graph.name, StageName.FRONTEND)}.{graph.namespace}.svc:{port}"


def render(
    graph: MultimodalGraph, kube_version: str = DEFAULT_KUBE_VERSION, api_pods: StageName | None = None
) -> list[dict[str, Any]]:
    """Every object the graph needs, in apply order; raises InvalidGraph with what to change. `api_pods`: whose
    pods the frontend Service selects, when the loop keeps it on the pods that served the API while it moves
    between a frontend Deployment and agg's pd (default: the stage that serves it)."""
    found = problems(graph)
    if found:
        raise InvalidGraph(found)
    version = KubeVersion.parse(kube_version)
    out: list[dict[str, Any]] = []
    running = process_stages(graph.spec)  # agg: the frontend runs in pd's pods, which its Service selects
    for stage in graph.spec.used_stages():
        cfg = graph.spec.stages.get(stage)
        assert cfg is not None
        if graph.spec.network_policy.enabled and stage in running:
            out.append(_network_policy(graph, stage))
        out.append(_service(graph, stage, api_pods or api_stage(graph.spec)))
        if stage in running:
            out.append(_deployment(graph, stage, cfg))
            if cfg.autoscaling:
                out.append(_hpa(graph, stage, cfg.autoscaling, version))
            if (cfg.autoscaling.max_replicas if cfg.autoscaling else cfg.replicas) > 1:  # from the spec, never live
                out.append(_pdb(graph, stage, version))
    if graph.spec.monitoring.pod_monitor:
        out.append(_pod_monitor(graph))
    return out


def child_kinds(kube_version: str) -> list[tuple[str, str, str, str]]:
    """Every kind render() can produce, as (group, version, plural, kind), in the version render picks for this
    server: watched in exactly that version (a server's preferred one may differ: autoscaling/v1 on 1.20), so a
    cached child compares like with like."""
    version = KubeVersion.parse(kube_version)
    return [
        ("", "v1", "services", "Service"),
        ("apps", "v1", "deployments", "Deployment"),
        ("policy", pdb_api_version(version).split("/")[1], "poddisruptionbudgets", "PodDisruptionBudget"),
        ("autoscaling", hpa_api_version(version).split("/")[1], "horizontalpodautoscalers", "HorizontalPodAutoscaler"),
        ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
        ("monitoring.coreos.com", "v1", "podmonitors", "PodMonitor"),  # optional: the Prometheus Operator's
    ]


def _pod_monitor(graph: MultimodalGraph) -> dict[str, Any]:
    """Every stage's pods, scraped on their HTTP port (named `http` in each): the NetworkPolicies admit it from
    spec.networkPolicy.scrapeFrom."""
    metadata = _metadata(graph, graph.name)
    metadata["labels"] = {**(graph.spec.monitoring.labels or {}), **metadata["labels"]}
    return {
        "apiVersion": POD_MONITOR[0],
        "kind": POD_MONITOR[1],
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": _selector(graph)},
            "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": graph.spec.monitoring.interval}],
        },
    }


# ---- per stage ----------------------------------------------------------------------------------------------


def _service(graph: MultimodalGraph, stage: StageName, api: StageName) -> dict[str, Any]:
    """Frontend: a ClusterIP Service clients use, on the pods that serve the API (`api`'s: agg's pd). Workers:
    headless, so peers resolve every ready pod."""
    cfg = graph.spec.stages.get(stage)
    assert cfg is not None
    if stage == StageName.FRONTEND:
        http = {"name": "http", "port": cfg.port, "targetPort": "http", "protocol": "TCP"}
        spec: dict[str, Any] = {
            "selector": _selector(graph, api),
            "ports": [http],
            "type": "ClusterIP",
        }
    else:
        ports = [
            {"name": p["name"], "port": p["containerPort"], "targetPort": p["name"], "protocol": "TCP"}
            for p in _ports(graph, stage, cfg)
        ]
        spec = {"selector": _selector(graph, stage), "ports": ports, "clusterIP": "None"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(graph, child_name(graph.name, stage), stage),
        "spec": spec,
    }


def _deployment(graph: MultimodalGraph, stage: StageName, cfg: StageSpec) -> dict[str, Any]:
    """Rolling updates one pod at a time with no pod down before its replacement is ready; scraped by Prometheus."""
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(cfg.port),
        "prometheus.io/path": "/metrics",
    }
    metadata = _metadata(graph, child_name(graph.name, stage), stage)
    if serves_api(graph.spec, stage):  # on the Deployment, not its pods' template: a marker must not roll them
        metadata["annotations"] = {**metadata.get("annotations", {}), SERVES_API: "true"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            **({} if cfg.autoscaling else {"replicas": cfg.replicas}),  # autoscaled: the HPA's (see apply.py)
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": _selector(graph, stage)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": _labels(graph, stage), "annotations": annotations},
                "spec": _pod_spec(graph, stage, cfg),
            },
        },
    }


def hpa_api_version(version: KubeVersion) -> str:
    """HorizontalPodAutoscaler with Pods metrics: autoscaling/v2 from Kubernetes 1.23, v2beta2 before."""
    return "autoscaling/v2" if version >= (1, 23) else "autoscaling/v2beta2"


def _hpa(graph: MultimodalGraph, stage: StageName, auto: Autoscaling, version: KubeVersion) -> dict[str, Any]:
    name = child_name(graph.name, stage)
    metric = AUTOSCALING_METRICS[stage.value][auto.metric]
    return {
        "apiVersion": hpa_api_version(version),
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(graph, name, stage),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": auto.min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": metric},
                        "target": {"type": "AverageValue", "averageValue": auto.target_average_value},
                    },
                }
            ],
        },
    }


def _pdb(graph: MultimodalGraph, stage: StageName, version: KubeVersion) -> dict[str, Any]:
    """At most one pod of a replicated stage down at a time during voluntary disruptions (drains)."""
    return {
        "apiVersion": pdb_api_version(version),
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(graph, child_name(graph.name, stage), stage),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(graph, stage)}},
    }


def peer_credential(graph: MultimodalGraph, token: str) -> dict[str, Any]:
    """The graph's peer credential Secret, holding `token` (the caller makes it: render stays pure and its output
    holds no secret). Owned by the graph, so it goes with it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(graph, peer_credential_name(graph)),
        "type": "Opaque",
        "stringData": {PEER_TOKEN_KEY: token},
    }


# Who reads from whom over NIXL as well as HTTP (any port: pd reads the encoder's embeddings, decode pd's KV
# cache); the frontend calls every worker over HTTP only.
READERS: dict[StageName, tuple[StageName, ...]] = {
    StageName.ENCODER: (StageName.PD,),
    StageName.PD: (StageName.DECODE,),
    StageName.DECODE: (),
}


def _network_policy(graph: MultimodalGraph, stage: StageName) -> dict[str, Any]:
    """A worker's pods admit the graph's frontend on their HTTP port, and the stage that reads from them (READERS)
    on any port: UCX over TCP listens on ephemeral ports, so readers are chosen by label, never by port. The HTTP
    port of the pods that serve the API (the frontend's; agg: pd's) admits anyone."""
    http = [{"port": "http", "protocol": "TCP"}]
    if stage == api_stage(graph.spec):
        ingress: list[dict[str, Any]] = [{"ports": http}]
    else:
        ingress = [{"from": [{"podSelector": {"matchLabels": _selector(graph, StageName.FRONTEND)}}], "ports": http}]
    readers = [r for r in READERS.get(stage, ()) if r in graph.spec.used_stages()]
    if readers:
        ingress.append({"from": [{"podSelector": {"matchLabels": _selector(graph, r)}} for r in readers]})
    scrapers = graph.spec.network_policy.scrape_from
    if scrapers is not None and stage != api_stage(graph.spec):  # the API's port is open to all already
        ingress.append({"from": [{"namespaceSelector": dict(scrapers)}], "ports": http})
    return _policy(graph, stage, ingress)


def _policy(graph: MultimodalGraph, stage: StageName, ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(graph, child_name(graph.name, stage), stage),
        "spec": {
            "podSelector": {"matchLabels": _selector(graph, stage)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
