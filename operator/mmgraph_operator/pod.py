"""The pod template of a stage's Deployment: its one container (command, env, ports, probes, resources), the
volumes it mounts, its security context and where it may run. Pure, like render.py, which puts it in a Deployment.
"""

from __future__ import annotations

from typing import Any

from mmgraph_contract.graph import MultimodalGraph, peer_credential_name
from mmgraph_contract.settings import api_stage, worker_command
from mmgraph_contract.spec import EngineSpec, GpuStageSpec, StageSpec
from mmgraph_contract.vocabulary import StageName
from mmgraph_contract.wire import PEER_TOKEN_ENV, PEER_TOKEN_KEY, POD_GRACE_SECONDS, PRESTOP_SECONDS
from mmgraph_operator.names import child_name

WORKER_UID = 1000
MODEL_DIR = "/models"
CACHE_DIR = "/cache"

# The preStop hook (Kubernetes 1.20 has no `sleep` action, so an exec). SIGWINCH tells the worker (PID 1: the
# container's entrypoint) that the pod is going: it answers `Connection: close` and fails readiness while it serves
# on, until the endpoints, DNS and the frontends' peer lists have let it go; then the kubelet's SIGTERM drains it.
PRESTOP = ["sh", "-c", f"kill -WINCH 1; sleep {PRESTOP_SECONDS}"]


def _ports(graph: MultimodalGraph, stage: StageName, cfg: StageSpec) -> list[dict[str, Any]]:
    ports = [{"name": "http", "containerPort": cfg.port, "protocol": "TCP"}]
    if stage != StageName.FRONTEND:
        ports.append({"name": "nixl", "containerPort": graph.spec.transfer.port, "protocol": "TCP"})
    if isinstance(cfg, EngineSpec):
        ports.append({"name": "nixl-kv", "containerPort": graph.spec.transfer.kv_port, "protocol": "TCP"})
    return ports


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
