"""The MultimodalGraph resource: the one pydantic model behind the CRD, `render`, the webhook and `mmgraph up`.

Everything a user can write in a MultimodalGraph is declared here once. The CRD's openAPIV3Schema is generated
from these classes (`mmgraph crd`, see crd.py), so attribute docstrings become `kubectl explain` text and field
defaults become schema defaults (what is stored is what runs). Rules that a structural schema cannot express
(which stages a topology needs, conflicting model sources, GPU counts versus parallelism, name lengths) live in
`problems()`, which both the admission webhook and the reconcile loop call. This module does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from mmgraph_operator.k8s_types import K8sType

GROUP = "mmgraph.io"
VERSION = "v1alpha1"
KIND = "MultimodalGraph"
PLURAL = "multimodalgraphs"
SHORT_NAME = "mmg"
API_VERSION = f"{GROUP}/{VERSION}"

Affinity = Annotated[dict[str, Any], K8sType("io.k8s.api.core.v1.Affinity")]
Toleration = Annotated[dict[str, Any], K8sType("io.k8s.api.core.v1.Toleration")]
Resources = Annotated[dict[str, Any], K8sType("io.k8s.api.core.v1.ResourceRequirements")]
EnvVar = Annotated[dict[str, Any], K8sType("io.k8s.api.core.v1.EnvVar")]
Probe = Annotated[dict[str, Any], K8sType("io.k8s.api.core.v1.Probe")]
LocalObjectReference = Annotated[dict[str, Any], K8sType("io.k8s.api.core.v1.LocalObjectReference")]
SecretKeySelector = Annotated[dict[str, Any], K8sType("io.k8s.api.core.v1.SecretKeySelector")]
LabelSelector = Annotated[dict[str, Any], K8sType("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector")]
# A vLLM argument: a scalar, or an object/list that vLLM takes as JSON (e.g. compilation-config).
EngineArgValue = Annotated[
    str | int | float | bool | dict[str, Any] | list[Any],
    Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}),
]


def section(model: type[BaseModel]) -> Any:
    """A nested object that is always present: schema default `{}`, which the API server fills field by field."""
    return Field(default_factory=model, json_schema_extra={"default": {}})


class Spec(BaseModel):
    """Base of every part of the resource: camelCase on the wire, unknown fields refused, docstrings kept."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


class Topology(StrEnum):
    """How the model is split into stages."""

    AGG = "agg"
    E_PD = "e-pd"
    E_P_D = "e-p-d"


class StageName(StrEnum):
    FRONTEND = "frontend"
    ENCODER = "encoder"
    PD = "pd"
    DECODE = "decode"


STAGES_OF: dict[Topology, tuple[StageName, ...]] = {
    Topology.AGG: (StageName.FRONTEND, StageName.PD),
    Topology.E_PD: (StageName.FRONTEND, StageName.ENCODER, StageName.PD),
    Topology.E_P_D: (StageName.FRONTEND, StageName.ENCODER, StageName.PD, StageName.DECODE),
}


class HuggingFaceSource(Spec):
    """Weights downloaded from the Hugging Face Hub by each worker at start-up."""

    id: str = Field(min_length=1, max_length=256, pattern=r"^[\w.\-]+(/[\w.\-]+)?$")
    """Repository id, e.g. Qwen/Qwen2.5-VL-7B-Instruct."""
    revision: str = Field(default="main", min_length=1, max_length=128)
    """Branch, tag or commit of the repository."""
    token_secret: SecretKeySelector | None = None
    """Secret key holding a Hugging Face token (HF_TOKEN) for gated models."""


class PvcSource(Spec):
    """Weights already present on a PersistentVolumeClaim (a shared model cache), mounted read-only."""

    claim_name: str = Field(min_length=1, max_length=253)
    """Name of the PersistentVolumeClaim in the graph's namespace."""
    path: str | None = Field(default=None, max_length=1024, pattern=r"^[^/].*$")
    """Directory of the model inside the volume, relative to its root (the root when unset)."""


class ModelSpec(Spec):
    """Which model is served and where its weights come from (exactly one of huggingFace, pvc, path)."""

    name: str = Field(min_length=1, max_length=128)
    """Model name clients send in requests (the OpenAI `model` field)."""
    hugging_face: HuggingFaceSource | None = None
    """Download the weights from the Hugging Face Hub."""
    pvc: PvcSource | None = None
    """Read the weights from a PersistentVolumeClaim."""
    path: str | None = Field(default=None, max_length=1024, pattern=r"^/.*")
    """An absolute local path to the weights: for `mmgraph up`, or a path baked into the image."""
    trust_remote_code: bool = False
    """Allow the model repository's own Python code to run (transformers' trust_remote_code)."""

    def sources(self) -> list[str]:
        return [n for n, v in (("huggingFace", self.hugging_face), ("pvc", self.pvc), ("path", self.path)) if v]


class Probes(Spec):
    """Overrides of the probes the operator puts on a stage's container (defaults: HTTP GET /health)."""

    startup: Probe | None = None
    """Startup probe; the default allows 20 minutes for a model load."""
    readiness: Probe | None = None
    """Readiness probe; a pod leaves its Service's endpoints while this fails."""
    liveness: Probe | None = None
    """Liveness probe; the kubelet restarts the container when this fails."""


QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G)?$"


class Autoscaling(Spec):
    """A HorizontalPodAutoscaler for the stage: it keeps between minReplicas and maxReplicas pods, adding pods
    while the average per pod of `metric` is above `targetAverageValue`. The metric is a per-pod series the stage
    exports, served to the HPA as a Pods metric by prometheus-adapter (docs/autoscaling.md has the rules). The
    operator then leaves the Deployment's replicas to the HPA (`replicas` applies again when this is removed)."""

    min_replicas: int = Field(default=1, ge=1, le=1000)
    """Fewest pods."""
    max_replicas: int = Field(ge=1, le=1000)
    """Most pods."""
    metric: Literal["waiting", "running"] = "waiting"
    """waiting: work queued ahead of the stage (the encoder's media items waiting for its tower; an engine's
    requests waiting for a slot); running: requests being served (pd and decode: in the engine; the frontend:
    in flight). Stages export each as its own series (see `autoscaling_metric`)."""
    target_average_value: str = Field(default="4", pattern=QUANTITY)
    """Per-pod average of the metric the HPA steers to (a Kubernetes quantity, e.g. 4 or 500m)."""


# The series behind each stage's metrics, by the names prometheus-adapter serves them (vllm:x becomes vllm_x).
AUTOSCALING_METRICS: dict[str, dict[str, str]] = {
    "frontend": {"running": "mmgraph_requests_in_flight"},
    "encoder": {"waiting": "mmgraph_encoder_items_waiting"},
    "pd": {"waiting": "vllm_num_requests_waiting", "running": "vllm_num_requests_running"},
    "decode": {"waiting": "vllm_num_requests_waiting", "running": "vllm_num_requests_running"},
}


class StageSpec(Spec):
    """Settings every stage has: how many pods, where they run and with what."""

    replicas: int = Field(default=1, ge=0, le=1000)
    """Number of pods of this stage (while `autoscaling` is unset)."""
    autoscaling: Autoscaling | None = None
    """Scale the stage's pods on a metric it exports (a HorizontalPodAutoscaler) instead of `replicas`."""
    resources: Resources | None = None
    """CPU and memory requests and limits; GPUs come from `gpus`."""
    node_selector: dict[str, str] | None = None
    """Node labels the pods must match."""
    tolerations: list[Toleration] | None = None
    """Taints the pods tolerate (e.g. nvidia.com/gpu:NoSchedule)."""
    affinity: Affinity | None = None
    """Node and pod affinity of the pods."""
    env: list[EnvVar] | None = None
    """Extra environment variables of the stage's container."""
    probes: Probes = section(Probes)
    """Probe overrides."""


class FrontendSpec(StageSpec):
    """The OpenAI-compatible HTTP frontend: chat template, tokenization, request checks and routing. In agg it
    runs in pd's pods (pd serves the API, the engine one call away instead of an HTTP hop): there only `port`
    and `apiKeySecret` apply, and pd's replicas are the API's."""

    port: int = Field(default=8000, ge=1, le=65535)
    """Port of the OpenAI API's Service (the frontend's HTTP port, also /health and /metrics; agg: the Service's
    port, onto pd's)."""
    api_key_secret: SecretKeySelector | None = None
    """Secret key holding the API key clients must send as a Bearer token; no authentication when unset."""


class GpuStageSpec(StageSpec):
    """A stage that runs model weights on GPUs."""

    gpus: int = Field(default=1, ge=0, le=64)
    """nvidia.com/gpu requested (and limited) per pod; 0 runs on CPU."""
    port: int = Field(default=8001, ge=1, le=65535)
    """HTTP port of the worker's control API (also /health and /metrics)."""


class EncoderSpec(GpuStageSpec):
    """Fetches and decodes media, runs only the vision/audio tower and publishes embeddings over NIXL."""

    max_batch_size: int = Field(default=16, ge=1, le=1024)
    """Most media items encoded in one forward pass of the tower."""


class EngineSpec(GpuStageSpec):
    """A vLLM engine stage (pd or decode)."""

    engine_args: dict[str, EngineArgValue] | None = None
    """vLLM engine arguments, e.g. {max-model-len: 8192, gpu-memory-utilization: 0.9}; passed as --key=value."""

    @field_validator("engine_args", mode="before")
    @classmethod
    def _one_spelling(cls, args: Any) -> Any:
        """Keys in vLLM's CLI spelling (dashes) before any rule reads them: `trust_remote-code` is the
        `--trust-remote-code` it renders, so every rule sees it under that one name; two spellings of one key are
        refused (which would vLLM take?)."""
        if not isinstance(args, dict):
            return args
        out: dict[Any, Any] = {}
        for key, value in args.items():
            name = key.replace("_", "-") if isinstance(key, str) else key
            if name in out:
                raise ValueError(f"engineArgs names {name} twice (one of them as {key!r}): keep one")
            out[name] = value
        return out

    def tensor_parallel_size(self) -> int:
        """The engine's tensor parallelism: as given, else whatever spreads the engine over all its GPUs."""
        given = self.engine_arg("tensor-parallel-size")
        return int(given) if given is not None else max(1, self.gpus // self._other_parallelism())

    def parallel_size(self) -> int:
        """GPUs the engine uses: tensor x pipeline x data parallel size."""
        return self.tensor_parallel_size() * self._other_parallelism()

    def _other_parallelism(self) -> int:
        return int(self.engine_arg("pipeline-parallel-size") or 1) * int(self.engine_arg("data-parallel-size") or 1)

    def engine_arg(self, key: str) -> EngineArgValue | None:
        """An engine argument by its dashed name (the only spelling `engine_args` holds)."""
        return (self.engine_args or {}).get(key)


class Stages(Spec):
    """The stages of the graph; name exactly those the topology uses (frontend is always there)."""

    frontend: FrontendSpec = section(FrontendSpec)
    """The HTTP frontend; used by every topology."""
    encoder: EncoderSpec | None = None
    """The media encoder; used by e-pd and e-p-d."""
    pd: EngineSpec | None = None
    """The prefill engine (it also decodes in agg and e-pd); used by every topology."""
    decode: EngineSpec | None = None
    """The decode engine, fed the KV cache by pd; used by e-p-d."""

    def get(self, name: StageName) -> FrontendSpec | EncoderSpec | EngineSpec | None:
        return getattr(self, name.value)


Scheme = Literal["https", "http", "data"]


class MediaSpec(Spec):
    """What media requests may carry, and the caps that keep one request from exhausting a worker."""

    modalities: list[Literal["image", "video", "audio"]] = Field(default=["image"], min_length=1)
    """Accepted media kinds."""
    max_items: int = Field(default=8, ge=0, le=256)
    """Most media items in one request."""
    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1, le=2**31)
    """Largest encoded media item, in bytes (URL downloads are cut off past it)."""
    max_pixels: int = Field(default=4096 * 4096, ge=1, le=2**31)
    """Largest decoded image (or video frame), in pixels; larger ones are refused, not resized."""
    max_frames: int = Field(default=64, ge=1, le=100000)
    """Most frames taken from a video."""
    video_frames: int = Field(default=8, ge=1, le=100000)
    """Frames taken from each video, evenly over its whole length (the frames vLLM's loader takes with this
    num_frames); a shorter video gives all of its frames. At most maxFrames."""
    max_seconds: float = Field(default=600.0, gt=0, le=86400)
    """Longest video or audio accepted, in seconds."""
    allowed_schemes: list[Scheme] = Field(default=["https", "data"], min_length=1)
    """URL schemes the encoder may fetch; http must be named here to be allowed."""
    allow_private_networks: bool = False
    """Allow URLs resolving to private or loopback addresses; link-local ones (cloud metadata) stay refused."""
    fetch_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    """Deadline for fetching one media URL, redirects included."""


def kv_side_channel_port(transfer_port: int) -> int:
    """The KV side channel's port, given the embeddings' side channel port (both NIXL, in the same pod)."""
    return transfer_port + 1


def max_request_bytes(media: MediaSpec, stage: StageName) -> int:
    """The largest request body a stage reads: every media item as base64 at its cap, plus 1 MiB of text; stages
    behind the frontend take twice that (their messages wrap what the frontend accepted)."""
    client = media.max_items * -(-media.max_bytes * 4 // 3) + (1 << 20)
    return client if stage == StageName.FRONTEND else 2 * client


# The graph's inter-stage credential: a Secret the operator creates once (it never reads Secrets), in every pod as
# this variable; each stage refuses calls without it and sends it on its own calls (workers' server.py).
PEER_TOKEN_ENV = "MMGRAPH_PEER_TOKEN"
PEER_TOKEN_KEY = "token"


def peer_credential_name(graph: MultimodalGraph) -> str:
    """The name of the graph's peer credential Secret: with the graph's uid, so a graph deleted and created again
    under its name gets a Secret of its own, not the old one that garbage collection is about to delete."""
    uid = str(graph.metadata.get("uid") or "")
    return f"{graph.name}-peer-credential" + (f"-{uid[:8]}" if uid else "")


# A worker pod's terminationGracePeriodSeconds. It holds, in order: the preStop delay, uvicorn's drain of the
# requests in flight (--drain-seconds), a stage's wait for its readers (pd's KV, the encoder's embeddings) and the
# exit itself.
POD_GRACE_SECONDS = 60
# The preStop delay: the pod is deleted, so it leaves its Services' endpoints, but kube-proxy's rules, the cluster
# DNS (CoreDNS answers headless Services with a 5 s TTL) and the frontends' peer refresh (2 s) take a while to
# follow, so the process keeps serving, telling callers to go elsewhere, before SIGTERM stops its listener.
PRESTOP_SECONDS = 10


class TransferSpec(Spec):
    """How embeddings (encoder to pd) and the KV cache (pd to decode) move between pods."""

    backend: Literal["nixl"] = "nixl"
    """Transfer implementation."""
    port: int = Field(default=5600, ge=1, le=65535)
    """Port of the NIXL side channel (metadata exchange between agents)."""
    ucx_tls: str | None = Field(default=None, max_length=256)
    """UCX transports (UCX_TLS), e.g. rc,cuda_copy,cuda_ipc; UCX chooses when unset."""
    kv_lease_seconds: int = Field(default=30, ge=1, le=3600)
    """How long pd keeps a request's KV blocks for decode to pull; decode must start within it."""
    timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    """Deadline for one transfer; shorter than kvLeaseSeconds, so no pull can outlive its lease."""

    @property
    def kv_port(self) -> int:
        """vLLM's NixlConnector side channel (KV metadata), next to the embeddings' one."""
        return kv_side_channel_port(self.port)


class EmbeddingCacheSpec(Spec):
    """Cache of encoder outputs keyed by media content, so a repeated image is encoded once."""

    capacity_bytes: int = Field(default=1 << 30, ge=0, le=2**40)
    """Most bytes of embeddings the encoder keeps; 0 disables the cache."""
    routing: Literal["content", "leastBusy"] = "content"
    """How the frontend picks an encoder replica for a media item: content sends it to the replica that owns a
    hash of its bytes (consistent hashing with bounded loads), so replicas' caches do not hold the same items and
    a repeated item skips the tower; leastBusy sends it to the replica with the fewest calls in flight."""


class NetworkPolicySpec(Spec):
    """The NetworkPolicy that fences the graph's pods."""

    enabled: bool = True
    """One NetworkPolicy per stage: a worker admits the graph's frontend on its HTTP port and the stage that reads
    from it on any port (pd from the encoder, decode from pd); anyone reaches the frontend's port (agg: pd's)."""
    scrape_from: LabelSelector | None = Field(default={"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}})
    """Namespaces whose pods (Prometheus) may reach every stage's HTTP port, where /metrics is (the pods' own
    prometheus.io annotations invite the scrape). Default: the namespace named `monitoring` (Kubernetes labels
    each namespace with its name from 1.21; label it yourself below that). null: no scrapes from other
    namespaces; {} selects every namespace."""


class MonitoringSpec(Spec):
    """Prometheus Operator objects for the graph. (Every stage's pods also carry prometheus.io annotations, which a
    plain Prometheus's kubernetes-pods job follows.)"""

    pod_monitor: bool = False
    """A PodMonitor (monitoring.coreos.com/v1) that scrapes every stage's /metrics. It needs the Prometheus
    Operator's CRDs: on a cluster without them the graph runs and is reported Degraded until they are installed."""
    labels: dict[str, str] | None = None
    """Labels of the PodMonitor, for a Prometheus that picks monitors by label (kube-prometheus-stack:
    `release: <its release name>`)."""
    interval: str = Field(default="30s", pattern=r"^[0-9]+(ms|s|m|h)$")
    """How often Prometheus scrapes each pod."""


class MultimodalGraphSpec(Spec):
    """One served multimodal model and the stages it is split into."""

    model: ModelSpec
    """The model served and where its weights come from."""
    image: str = Field(default="localhost/mmgraph/worker:0.1.0", min_length=1, max_length=512)
    """Worker image (vLLM, NIXL, media libraries and mmgraph). The default is the name `make images` builds
    locally; push it to your registry and set this to that name (README, "Images")."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """When the kubelet pulls the image."""
    image_pull_secrets: list[LocalObjectReference] | None = None
    """Secrets for pulling the image from a private registry."""
    topology: Topology = Topology.E_P_D
    """agg: one engine does everything; e-pd: encoder + engine; e-p-d: encoder + prefill + decode."""
    stages: Stages = section(Stages)
    """Per-stage settings."""
    media: MediaSpec = section(MediaSpec)
    """Accepted media and their limits."""
    transfer: TransferSpec = section(TransferSpec)
    """NIXL transfer settings."""
    embedding_cache: EmbeddingCacheSpec = section(EmbeddingCacheSpec)
    """Encoder output cache."""
    network_policy: NetworkPolicySpec = section(NetworkPolicySpec)
    """Network fencing of the graph's pods."""
    monitoring: MonitoringSpec = section(MonitoringSpec)
    """Prometheus Operator scraping (off by default)."""
    service_account_name: str | None = Field(default=None, max_length=253)
    """ServiceAccount of the worker pods; the namespace's default when unset."""

    def used_stages(self) -> tuple[StageName, ...]:
        return STAGES_OF[self.topology]


class StageStatus(Spec):
    """Replica counts of one stage's Deployment."""

    replicas: int = 0
    """Pods the Deployment has."""
    ready_replicas: int = 0
    """Pods that pass their readiness probe."""
    updated_replicas: int = 0
    """Pods running the current pod template."""


class Condition(Spec):
    """A Kubernetes-style condition."""

    type: str
    """Ready, Progressing or Degraded."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str | None = None
    """One CamelCase word for machines."""
    message: str | None = None
    """What a person should know, and do."""
    observed_generation: int | None = None
    """The spec generation the condition was computed from."""
    last_transition_time: str | None = None
    """When status last changed (RFC 3339)."""


class MultimodalGraphStatus(Spec):
    """What the operator observed; written only by the operator."""

    observed_generation: int | None = None
    """The spec generation this status describes."""
    phase: Literal["Pending", "Progressing", "Ready", "Degraded"] | None = None
    """Summary of the conditions."""
    ready_stages: str | None = None
    """Ready stages out of the stages the topology uses, e.g. 3/4."""
    endpoint: str | None = None
    """The frontend's in-cluster URL."""
    peer_credential: str | None = None
    """The Secret holding the stages' shared credential, once the operator has created it (it never reads it)."""
    stages: dict[str, StageStatus] | None = None
    """Per-stage replica counts."""
    conditions: list[Condition] | None = None
    """Ready, Progressing and Degraded."""


class MultimodalGraph(Spec):
    """The custom resource as a whole (apiVersion/kind/metadata are Kubernetes')."""

    model_config = ConfigDict(extra="ignore")
    api_version: Literal["mmgraph.io/v1alpha1"] = API_VERSION
    kind: Literal["MultimodalGraph"] = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: MultimodalGraphSpec
    status: MultimodalGraphStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.get("name", "")

    @property
    def namespace(self) -> str:
        return self.metadata.get("namespace") or "default"


# ---- cross-field rules: what a structural schema cannot say -------------------------------------------------

DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 63 - len("-frontend")  # the longest derived child name must still be a DNS label


def problems(graph: MultimodalGraph) -> list[str]:
    """Every reason this graph cannot be rendered, each a sentence that says what to change; [] when valid.
    Each rule below is checked on its own, so one problem never hides another."""
    return [problem for rule in RULES for problem in rule(graph)]


def _name_is_a_dns_label(graph: MultimodalGraph) -> list[str]:
    name = graph.name
    if DNS_LABEL.match(name) and len(name) <= MAX_NAME:
        return []
    return [
        f"metadata.name {name!r} must be a DNS label (lower-case letters, digits and '-', starting with a "
        f"letter) of at most {MAX_NAME} characters, because the Services are named <name>-<stage>"
    ]


def _one_model_source(graph: MultimodalGraph) -> list[str]:
    sources = graph.spec.model.sources()
    if len(sources) == 1:
        return []
    what = ", ".join(sources) if sources else "none"
    return [f"spec.model must name exactly one of huggingFace, pvc or path (found: {what})"]


def _stages_match_the_topology(graph: MultimodalGraph) -> list[str]:
    spec, out = graph.spec, []
    used = spec.used_stages()
    for stage in StageName:
        given = spec.stages.get(stage) is not None
        if given and stage not in used:
            out.append(
                f"spec.stages.{stage.value} is set but topology {spec.topology.value} does not use it; "
                f"remove it or choose a topology that does ({_topologies_with(stage)})"
            )
        if not given and stage in used:
            out.append(f"topology {spec.topology.value} needs spec.stages.{stage.value}; add it (e.g. `{{}}`)")
    return out


def _autoscaling_makes_sense(graph: MultimodalGraph) -> list[str]:
    out = []
    for stage in graph.spec.used_stages():
        auto = (cfg := graph.spec.stages.get(stage)) and cfg.autoscaling
        if not auto or (stage == StageName.FRONTEND and graph.spec.topology == Topology.AGG):
            continue
        where = f"spec.stages.{stage.value}.autoscaling"
        if auto.min_replicas > auto.max_replicas:
            out.append(f"{where}: minReplicas {auto.min_replicas} is above maxReplicas {auto.max_replicas}")
        if auto.metric not in AUTOSCALING_METRICS[stage.value]:
            known = " or ".join(AUTOSCALING_METRICS[stage.value])
            out.append(f"{where}.metric: the {stage.value} stage exports no {auto.metric!r} series; use {known}")
    if graph.spec.topology == Topology.AGG and graph.spec.stages.frontend.autoscaling:
        out.append("spec.stages.frontend.autoscaling: in agg the API runs in pd's pods; autoscale pd instead")
    return out


def _engines(graph: MultimodalGraph) -> list[tuple[StageName, EngineSpec]]:
    return [(s, e) for s in (StageName.PD, StageName.DECODE) if isinstance(e := graph.spec.stages.get(s), EngineSpec)]


def _gpus_match_parallelism(graph: MultimodalGraph) -> list[str]:
    out = []
    for stage, engine in _engines(graph):
        bad = []
        for key in ("tensor-parallel-size", "pipeline-parallel-size", "data-parallel-size"):
            value = engine.engine_arg(key)
            if value is not None and (isinstance(value, bool) or not str(value).isdigit() or int(value) < 1):
                bad.append(f"spec.stages.{stage.value}.engineArgs.{key} must be a positive integer, not {value!r}")
        out += bad
        if not bad and engine.gpus and engine.parallel_size() != engine.gpus:
            out.append(
                f"spec.stages.{stage.value}.gpus is {engine.gpus} but its engineArgs ask for "
                f"{engine.parallel_size()} GPUs (tensor x pipeline x data parallel size); make them equal"
            )
    return out


def _no_reserved_engine_args(graph: MultimodalGraph) -> list[str]:
    # kv-transfer-config is not reserved: a user's is merged into the NixlConnector config the graph implies
    reserved = {"model", "port", "host", "served-model-name"}
    return [
        f"spec.stages.{stage.value}.engineArgs.{key} is set by the operator from the graph; remove it"
        for stage, engine in _engines(graph)
        for key in engine.engine_args or {}
        if key.replace("_", "-") in reserved
    ]


def _video_frames_within_the_cap(graph: MultimodalGraph) -> list[str]:
    media = graph.spec.media
    if media.video_frames <= media.max_frames:
        return []
    return [f"spec.media.videoFrames ({media.video_frames}) is more than spec.media.maxFrames ({media.max_frames})"]


def _remote_code_only_where_allowed(graph: MultimodalGraph) -> list[str]:
    """Running a model repository's own code is spec.model.trustRemoteCode's decision, for every stage."""
    if graph.spec.model.trust_remote_code:
        return []
    return [
        f"spec.stages.{stage.value}.engineArgs.trust-remote-code runs code from the model repository; set "
        "spec.model.trustRemoteCode: true instead (it applies to every stage)"
        for stage, engine in _engines(graph)
        if engine.engine_arg("trust-remote-code")
    ]


GRAPH_KV_KEYS = ("kv_connector", "kv_role", "kv_connector_extra_config.kv_lease_duration")


def _kv_transfer_config_only_tunes(graph: MultimodalGraph) -> list[str]:
    """A user's kv-transfer-config is merged under the graph's (NIXL backends, handshake checks), but the
    connector, the roles and the lease are the graph's: the frontend times decode's pull by spec.transfer."""
    out = []
    for stage, engine in _engines(graph):
        config = engine.engine_arg("kv-transfer-config")
        if config is None:
            continue
        where = f"spec.stages.{stage.value}.engineArgs.kv-transfer-config"
        if graph.spec.topology != Topology.E_P_D:
            out.append(f"{where} is set but topology {graph.spec.topology.value} moves no KV cache; remove it")
            continue
        if not isinstance(config, dict):
            out.append(f"{where} must be an object (vLLM's KVTransferConfig fields)")
            continue
        extra = config.get("kv_connector_extra_config") or {}
        given = [k for k in ("kv_connector", "kv_role") if k in config]
        given += ["kv_connector_extra_config.kv_lease_duration"] if "kv_lease_duration" in extra else []
        if given:
            out.append(
                f"{where} sets {', '.join(given)}, which the graph decides (the NixlConnector, the producer and "
                "consumer roles, and spec.transfer.kvLeaseSeconds); remove them"
            )
    return out


def _transfers_end_within_the_kv_lease(graph: MultimodalGraph) -> list[str]:
    xfer = graph.spec.transfer
    if graph.spec.topology != Topology.E_P_D or xfer.timeout_seconds < xfer.kv_lease_seconds:
        return []
    return [
        f"spec.transfer.timeoutSeconds ({xfer.timeout_seconds:g}) must be shorter than "
        f"spec.transfer.kvLeaseSeconds ({xfer.kv_lease_seconds}): decode must finish "
        "pulling the KV cache before pd may reuse its blocks"
    ]


def _ports_do_not_clash(graph: MultimodalGraph) -> list[str]:
    spec, out = graph.spec, []
    for stage in spec.used_stages():
        cfg = spec.stages.get(stage)
        port = cfg.port if cfg is not None else None
        if stage != StageName.FRONTEND and port in (spec.transfer.port, spec.transfer.kv_port):
            out.append(
                f"spec.stages.{stage.value}.port {port} clashes with the NIXL side channels in the same pod "
                f"(spec.transfer.port {spec.transfer.port} and the KV channel on port {spec.transfer.kv_port})"
            )
    return out


RULES: tuple[Callable[[MultimodalGraph], list[str]], ...] = (
    _name_is_a_dns_label,
    _one_model_source,
    _stages_match_the_topology,
    _gpus_match_parallelism,
    _no_reserved_engine_args,
    _remote_code_only_where_allowed,
    _kv_transfer_config_only_tunes,
    _transfers_end_within_the_kv_lease,
    _ports_do_not_clash,
    _video_frames_within_the_cap,
    _autoscaling_makes_sense,
)


def _topologies_with(stage: StageName) -> str:
    return ", ".join(t.value for t, stages in STAGES_OF.items() if stage in stages)


def default(model: type[BaseModel], field: str) -> Any:
    """A field's default, for the worker flags that mirror it (their defaults live here, once)."""
    return model.model_fields[field].get_default(call_default_factory=True)


def parse(body: dict[str, Any]) -> MultimodalGraph:
    """Validate a MultimodalGraph body (as stored or as a file) into the model; raises pydantic.ValidationError."""
    return MultimodalGraph.model_validate(body)


def explain(err: ValidationError) -> str:
    """A pydantic error as one line per field, named by its path in the resource (spec.media.maxBytes: ...)."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors(include_url=False))
