"""The parts of a MultimodalGraph's spec: the model source and the stages (the graph as a whole is graph.py).

Attribute docstrings become `kubectl explain` text and field defaults schema defaults (crd.py generates the CRD's
openAPIV3Schema from these classes). No I/O.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from mmgraph_contract.k8s_types import K8sType
from mmgraph_contract.vocabulary import StageName

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
