"""`render(graph, kube_version)`: the pure compiler from a MultimodalGraph to the Kubernetes objects that run it.

No I/O and no clock: the same graph and version always give the same manifests, so the operator's reconcile loop
is "render, then make the cluster match", `mmgraph render` shows a GitOps reviewer exactly what will be applied,
and golden tests pin the output. Anything that needs the cluster (the server's version, the graph's uid) is an
argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmgraph_operator.api import (
    API_VERSION,
    AUTOSCALING_METRICS,
    KIND,
    PEER_TOKEN_ENV,
    PEER_TOKEN_KEY,
    POD_GRACE_SECONDS,
    PRESTOP_SECONDS,
    Autoscaling,
    EngineSpec,
    GpuStageSpec,
    MultimodalGraph,
    StageName,
    StageSpec,
    peer_credential_name,
    problems,
)
from mmgraph_operator.commands import api_stage, process_stages, worker_command

DEFAULT_KUBE_VERSION = "1.29"
GRAPH_LABEL = "mmgraph.io/graph"
STAGE_LABEL = "mmgraph.io/stage"
MANAGED_BY = "mmgraph-operator"
WORKER_UID = 1000
MODEL_DIR = "/models"
CACHE_DIR = "/cache"

# The preStop hook (Kubernetes 1.20 has no `sleep` action, so an exec). SIGWINCH tells the worker (PID 1: the
# container's entrypoint) that the pod is going: it answers `Connection: close` and fails readiness while it serves
# on, until the endpoints, DNS and the frontends' peer lists have let it go; then the kubelet's SIGTERM drains it.
PRESTOP = ["sh", "-c", f"kill -WINCH 1; sleep {PRESTOP_SECONDS}"]


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
OPTIONAL_KINDS = {POD_MONITOR}  # another operator's CRDs: a cluster may not serve them (reconcile.py copes)


def child_name(graph: str, stage: StageName) -> str:
    """The name of a stage's Deployment, Service and PodDisruptionBudget."""
    return f"{graph}-{stage.value}"


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


# ---- metadata -----------------------------------------------------------------------------------------------


def _labels(graph: MultimodalGraph, stage: StageName | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "mmgraph",
        "app.kubernetes.io/instance": graph.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        GRAPH_LABEL: graph.name,
    }
    if stage is not None:
        labels["app.kubernetes.io/component"] = stage.value
        labels[STAGE_LABEL] = stage.value
    return labels


def _selector(graph: MultimodalGraph, stage: StageName | None = None) -> dict[str, str]:
    selector = {GRAPH_LABEL: graph.name}
    if stage is not None:
        selector[STAGE_LABEL] = stage.value
    return selector


def _metadata(graph: MultimodalGraph, name: str, stage: StageName | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": graph.namespace, "labels": _labels(graph, stage)}
    uid = graph.metadata.get("uid")
    if uid:
        meta["ownerReferences"] = [
            {"apiVersion": API_VERSION, "kind": KIND, "name": graph.name, "uid": uid, "controller": True}
        ]
    return meta


# ---- per stage ----------------------------------------------------------------------------------------------


def _ports(graph: MultimodalGraph, stage: StageName, cfg: StageSpec) -> list[dict[str, Any]]:
    ports = [{"name": "http", "containerPort": cfg.port, "protocol": "TCP"}]
    if stage != StageName.FRONTEND:
        ports.append({"name": "nixl", "containerPort": graph.spec.transfer.port, "protocol": "TCP"})
    if isinstance(cfg, EngineSpec):
        ports.append({"name": "nixl-kv", "containerPort": graph.spec.transfer.kv_port, "protocol": "TCP"})
    return ports


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


def _peer_urls(graph: MultimodalGraph) -> dict[StageName, str]:
    peers = {}
    for stage in graph.spec.used_stages():
        if stage != StageName.FRONTEND:
            cfg = graph.spec.stages.get(stage)
            host = f"{child_name(graph.name, stage)}.{graph.namespace}.svc"
            peers[stage] = f"http://{host}:{cfg.port}"  # type: ignore[union-attr]
    return peers


def _model_location(graph: MultimodalGraph) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]], list[dict]]:
    """(--model value, volumes, volumeMounts, env) for the graph's model source."""
    model = graph.spec.model
    if model.pvc is not None:
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": model.pvc.claim_name, "readOnly": True}}
        mount = {"name": "model", "mountPath": MODEL_DIR, "readOnly": True}
        path = f"{MODEL_DIR}/{model.pvc.path or ''}".rstrip("/")
        return path, [volume], [mount], []
    if model.hugging_face is not None:
        hf = model.hugging_face
        env: list[dict[str, Any]] = []
        if hf.token_secret:
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": dict(hf.token_secret)}})
        return hf.id, [], [], env
    assert model.path is not None
    return model.path, [], [], []


def _probes(stage_cfg: StageSpec) -> dict[str, dict[str, Any]]:
    """HTTP /health probes; the startup probe allows 20 minutes, since loading a large model takes minutes."""

    def get(period: int, failures: int, timeout: int = 3) -> dict[str, Any]:
        return {
            "httpGet": {"path": "/health", "port": "http", "scheme": "HTTP"},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": timeout,
            "successThreshold": 1,
        }

    given = stage_cfg.probes
    return {
        "startupProbe": given.startup or get(10, 120),
        "readinessProbe": given.readiness or get(5, 3),
        "livenessProbe": given.liveness or get(10, 6, timeout=5),
    }


def _resources(cfg: StageSpec) -> dict[str, Any]:
    resources = {k: dict(v) for k, v in (cfg.resources or {}).items() if k in ("requests", "limits")}
    gpus = cfg.gpus if isinstance(cfg, GpuStageSpec) else 0
    if gpus:
        for kind in ("requests", "limits"):
            resources.setdefault(kind, {})["nvidia.com/gpu"] = str(gpus)
    return resources


def _env(graph: MultimodalGraph, stage: StageName, cfg: StageSpec, model_env: list[dict]) -> list[dict[str, Any]]:
    """The pod's identity (for NIXL's advertise address), cache locations, the model's token, the graph's peer
    credential, CPU threads, UCX transports, the API key (frontend) and the user's own variables, last so they
    win."""
    spec = graph.spec
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        *model_env,
    ]
    secret = {"name": peer_credential_name(graph), "key": PEER_TOKEN_KEY}
    env.append({"name": PEER_TOKEN_ENV, "valueFrom": {"secretKeyRef": secret}})
    if stage != StageName.FRONTEND:  # torch's and vLLM's CPU threads: the container's CPU limit (rounded up; the
        # node's CPUs where none is set), since os.cpu_count() counts the node's cores whatever the limit
        cpus = {"resource": "limits.cpu", "divisor": "1"}
        env.append({"name": "OMP_NUM_THREADS", "valueFrom": {"resourceFieldRef": cpus}})
    if stage != StageName.FRONTEND and spec.transfer.ucx_tls:
        env.append({"name": "UCX_TLS", "value": spec.transfer.ucx_tls})
    api_key = spec.stages.frontend.api_key_secret
    if stage == api_stage(spec) and api_key:
        env.append({"name": "MMGRAPH_API_KEY", "valueFrom": {"secretKeyRef": dict(api_key)}})
    return env + [dict(e) for e in cfg.env or []]


def _container(graph: MultimodalGraph, stage: StageName, cfg: StageSpec) -> tuple[dict[str, Any], list[dict]]:
    """The stage's one container (non-root, read-only root filesystem), and the volumes it mounts."""
    spec = graph.spec
    model, volumes, mounts, model_env = _model_location(graph)
    argv = worker_command(spec, stage, model=model, host="0.0.0.0", advertise_host="$(POD_IP)", peers=_peer_urls(graph))
    volumes = [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}, *volumes]
    mounts = [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}, *mounts]
    if isinstance(cfg, EngineSpec):  # vLLM's workers share tensors through /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    container: dict[str, Any] = {
        "name": stage.value,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["mmgraph"],
        "args": argv,
        "ports": _ports(graph, stage, cfg),
        "env": _env(graph, stage, cfg, model_env),
        "volumeMounts": mounts,
        **_probes(cfg),
        "lifecycle": {"preStop": {"exec": {"command": PRESTOP}}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    resources = _resources(cfg)
    if resources:
        container["resources"] = resources
    return container, volumes


def _pod_spec(graph: MultimodalGraph, stage: StageName, cfg: StageSpec) -> dict[str, Any]:
    """The pod: its container, volumes, security context, and where it may run."""
    spec = graph.spec
    container, volumes = _container(graph, stage, cfg)
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # workers never call the Kubernetes API
        "terminationGracePeriodSeconds": POD_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "fsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    for key, value in (
        ("serviceAccountName", spec.service_account_name),
        ("imagePullSecrets", [dict(s) for s in spec.image_pull_secrets or []] or None),
        ("nodeSelector", dict(cfg.node_selector or {}) or None),
        ("tolerations", [dict(t) for t in cfg.tolerations or []] or None),
        ("affinity", dict(cfg.affinity) if cfg.affinity else None),
    ):
        if value:
            pod[key] = value
    return pod


def _deployment(graph: MultimodalGraph, stage: StageName, cfg: StageSpec) -> dict[str, Any]:
    """Rolling updates one pod at a time with no pod down before its replacement is ready; scraped by Prometheus."""
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(cfg.port),
        "prometheus.io/path": "/metrics",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(graph, child_name(graph.name, stage), stage),
        "spec": {
            **({} if cfg.autoscaling else {"replicas": cfg.replicas}),  # autoscaled: the HPA's (see reconcile.py)
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
