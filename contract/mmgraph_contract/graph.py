"""The MultimodalGraph resource: the one pydantic model behind the CRD, `render`, the webhook and `mmgraph up`.

Everything a user can write in a MultimodalGraph is declared once, here and in spec.py. The CRD's openAPIV3Schema
is generated from these classes (`mmgraph crd`), so attribute docstrings become `kubectl explain` text and field
defaults become schema defaults (what is stored is what runs). Rules that a structural schema cannot express
live in rules.py, which both the admission webhook and the reconcile loop call. No I/O.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmgraph_contract.spec import LabelSelector, LocalObjectReference, ModelSpec, Spec, Stages, section
from mmgraph_contract.vocabulary import API_VERSION, KIND, STAGES_OF, StageName, Topology
from mmgraph_contract.wire import kv_side_channel_port

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


def peer_credential_name(graph: MultimodalGraph) -> str:
    """The name of the graph's peer credential Secret: with the graph's uid, so a graph deleted and created again
    under its name gets a Secret of its own, not the old one that garbage collection is about to delete."""
    uid = str(graph.metadata.get("uid") or "")
    return f"{graph.name}-peer-credential" + (f"-{uid[:8]}" if uid else "")


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


def default(model: type[BaseModel], field: str) -> Any:
    """A field's default, for the worker flags that mirror it (their defaults live here, once)."""
    return model.model_fields[field].get_default(call_default_factory=True)


def parse(body: dict[str, Any]) -> MultimodalGraph:
    """Validate a MultimodalGraph body (as stored or as a file) into the model; raises pydantic.ValidationError."""
    return MultimodalGraph.model_validate(body)


def explain(err: ValidationError) -> str:
    """A pydantic error as one line per field, named by its path in the resource (spec.media.maxBytes: ...)."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors(include_url=False))
