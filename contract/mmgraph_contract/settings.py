"""What each stage's process is told: one typed settings model per stage, and the compiler from a graph to them.

The operator renders a stage's settings into its Deployment as the worker's command line (flags.py, one flag per
field), `mmgraph up` passes the same argv to local processes, and a worker parses it once, at its entry, into the
same model: nothing after the entry sees a flag or an argparse Namespace. Flags, not a JSON document, because a
pod's command is what `kubectl describe` shows and what the previous release parses: this release renders only
flags the previous release's workers know (the rollout test runs them), so the graph never needs to say which
release an image is.

A field the compiler leaves unset keeps the worker's default and stays off the command line; the flags keep the
order 0.1 rendered them in (FLAG_ORDER), so an operator upgrade restarts no pod.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmgraph_contract.flags import Repeated, to_argv
from mmgraph_contract.graph import EmbeddingCacheSpec, MediaSpec, MultimodalGraphSpec, TransferSpec, default
from mmgraph_contract.spec import EncoderSpec, EngineSpec
from mmgraph_contract.vocabulary import StageName, Topology
from mmgraph_contract.wire import API_KEY_ENV, PEER_TOKEN_ENV, POD_GRACE_SECONDS, PRESTOP_SECONDS

BODY_SECONDS = 60.0  # a full-size body over a link of ~30 Mbit/s
MAX_CONNECTIONS = 1024  # x 64 KiB (uvicorn's read-ahead) is 64 MiB of small bodies at most
READERS_SECONDS = 10.0  # what the grace period keeps, after the drain, for the readers of a stage's memory


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The order of the flags on the command lines 0.1 rendered: an operator upgrade that renders the same flags in
# another order changes every pod template, and so restarts every graph's pods (GPU engines reload) for nothing.
COMMON_ORDER = (
    "model",
    "served_model_name",
    "host",
    "port",
    "max_request_bytes",
    "peer_token_env",
    "revision",
    "trust_remote_code",
)
TRANSFER_ORDER = ("advertise_host", "transfer_backend", "transfer_port", "transfer_timeout_seconds")
MEDIA_ORDER = tuple(MediaSpec.model_fields)


class Weights(Settings):
    """The model a stage serves."""

    model: str = Field(description="local path or Hugging Face id of the weights")
    served_model_name: str
    revision: str | None = None
    trust_remote_code: bool = False


class Server(Settings):
    """A stage's HTTP server, and what one stage holds at once."""

    host: str = "127.0.0.1"
    port: int
    max_request_bytes: int | None = Field(None, description="refuse request bodies larger than this (413)")
    peer_token_env: str | None = Field(
        None,
        description=f"deprecated, ignored: the graph's credential is read from {PEER_TOKEN_ENV}; rendered while "
        "pods of the previous release, which need it, may run",
    )
    max_buffered_bytes: int | None = Field(
        None, description="bytes of request bodies over 64 KiB held at once (default: 4 x --max-request-bytes)"
    )
    body_timeout_seconds: float = Field(BODY_SECONDS, description="a request body not all read by then gets 408")
    max_connections: int = Field(MAX_CONNECTIONS, description="open connections past which new requests get 503")
    drain_seconds: float = Field(
        POD_GRACE_SECONDS - PRESTOP_SECONDS - READERS_SECONDS - 5,
        description="on SIGTERM, how long requests in flight may take to finish (what the pod's grace period "
        "leaves after the preStop delay, the readers of this stage's memory, and 5 s to exit)",
    )


class Transfer(Settings):
    """A stage that moves tensors over NIXL (encoder, pd, decode)."""

    advertise_host: str = Field("127.0.0.1", description="the address peers reach this pod at")
    transfer_backend: str = default(TransferSpec, "backend")
    transfer_port: int = Field(default(TransferSpec, "port"), description="NIXL side channel (the KV's: + 1)")
    transfer_timeout_seconds: float = default(TransferSpec, "timeout_seconds")


class Routes(Settings):
    """Where the OpenAI API sends a request's stages, and how long each may take."""

    topology: Topology
    decode_url: str | None = None
    encoder_url: str | None = None
    pd_url: str | None = Field(None, description="the pd Service (required: every topology has pd)")
    encoder_routing: Literal["content", "least-busy"] = "content"
    encoder_batch_size: int = Field(
        default(EncoderSpec, "max_batch_size"),
        description="the encoders' --max-batch-size: a replica with fewer calls in flight keeps its keys (no spill)",
    )
    kv_lease_seconds: int = default(TransferSpec, "kv_lease_seconds")
    transfer_timeout_seconds: float = default(TransferSpec, "timeout_seconds")
    request_timeout_seconds: float = 120.0
    peer_hosts_file: str | None = Field(None, description="/etc/hosts-style file read before DNS (`mmgraph up`)")


class ApiSettings(Settings):
    """The OpenAI API, wherever it is served (the frontend; agg's pd): whose tokenizer and processor it uses, where
    it routes, what media it admits, and the environment variable of the key clients must send."""

    weights: Weights
    routes: Routes
    media: MediaSpec
    api_key_env: str | None = None


class FrontendSettings(Settings):
    FLAG_ORDER: ClassVar = (
        *COMMON_ORDER,
        *("topology", "decode_url", "encoder_url", "pd_url", "encoder_routing", "encoder_batch_size"),
        *MEDIA_ORDER,
        *("kv_lease_seconds", "transfer_timeout_seconds", "api_key_env"),
    )
    weights: Weights
    server: Server
    routes: Routes
    media: MediaSpec = Field(default_factory=MediaSpec)
    api_key_env: str | None = Field(None, description="environment variable holding the API key")

    def api(self) -> ApiSettings:
        return ApiSettings(weights=self.weights, routes=self.routes, media=self.media, api_key_env=self.api_key_env)


class EncoderSettings(Settings):
    FLAG_ORDER: ClassVar = (*COMMON_ORDER, *TRANSFER_ORDER, "device", *MEDIA_ORDER, "max_batch_size", "cache_bytes")
    weights: Weights
    server: Server
    transfer: Transfer
    device: str = Field("cpu", description="where the tower runs: cuda when the stage has GPUs")
    media: MediaSpec = Field(default_factory=MediaSpec)
    max_batch_size: int = default(EncoderSpec, "max_batch_size")
    cache_bytes: int = default(EmbeddingCacheSpec, "capacity_bytes")
    transfer_pool_bytes: int = Field(
        0, description="registered memory for embeddings; 0: room for a few requests of maxItems images at maxPixels"
    )


class EngineSettings(Settings):
    """pd or decode: a vLLM engine. agg's pd also serves the OpenAI API (`openai`), routed over its siblings."""

    FLAG_ORDER: ClassVar = (
        *COMMON_ORDER,
        *TRANSFER_ORDER,
        *("kv_lease_seconds", "kv_role", "embeddings_input", "encoder_url", *MEDIA_ORDER, "openai"),
        *("api_max_request_bytes", "api_key_env", "pd_url", "engine_arg"),
    )
    weights: Weights
    server: Server
    transfer: Transfer
    kv_lease_seconds: int = default(TransferSpec, "kv_lease_seconds")
    kv_role: Literal["producer", "consumer"] | None = None
    embeddings_input: bool = Field(False, description="accept precomputed embeddings (pd of e-pd and e-p-d)")
    encoder_url: str | None = Field(None, description="pd: the encoder Service (the embeddings' owners)")
    media: MediaSpec = Field(default_factory=MediaSpec)
    openai: bool = Field(False, description="agg's pd: serve the OpenAI API too, in this process")
    api_max_request_bytes: int | None = Field(None, description="--openai: a client's body limit")
    api_key_env: str | None = Field(None, description="--openai: environment variable holding the API key")
    pd_url: str | None = Field(None, description="decode: the pd Service (KV caches' owners); agg: pd's siblings")
    engine_arg: Annotated[list[str], Repeated()] = Field(
        default_factory=list, description="a vLLM engine argument, e.g. --dtype=half"
    )
    request_timeout_seconds: float = 120.0
    peer_hosts_file: str | None = Field(None, description="/etc/hosts-style file read before DNS (`mmgraph up`)")

    @model_validator(mode="after")
    def _openai_is_aggs(self) -> EngineSettings:
        if self.openai and (self.embeddings_input or self.kv_role):
            raise ValueError("--openai is agg's: a pd that takes embeddings or hands its KV cache on has a frontend")
        return self

    def api(self) -> ApiSettings:
        """agg's API: this engine's weights and media policy, routed over the pd replicas alone (this one reached
        without HTTP)."""
        own = f"http://{self.transfer.advertise_host}:{self.server.port}"
        routes = Routes(
            topology=Topology.AGG,
            pd_url=self.pd_url or own,
            kv_lease_seconds=self.kv_lease_seconds,
            transfer_timeout_seconds=self.transfer.transfer_timeout_seconds,
            request_timeout_seconds=self.request_timeout_seconds,
            peer_hosts_file=self.peer_hosts_file,
        )
        return ApiSettings(weights=self.weights, routes=routes, media=self.media, api_key_env=self.api_key_env)


StageSettings = FrontendSettings | EncoderSettings | EngineSettings
SETTINGS: dict[StageName, type[StageSettings]] = {
    StageName.FRONTEND: FrontendSettings,
    StageName.ENCODER: EncoderSettings,
    StageName.PD: EngineSettings,
    StageName.DECODE: EngineSettings,
}


def stage_settings(
    spec: MultimodalGraphSpec,
    stage: StageName,
    *,
    model: str,
    host: str,
    advertise_host: str,
    peers: Mapping[StageName, str],
    ports: Mapping[StageName, int] | None = None,
    transfer_port: int | None = None,
) -> StageSettings:
    """A stage's settings from the graph: `render` uses them in Deployments (peers are headless-Service DNS names),
    `mmgraph up` in local processes (peers are 127.0.0.1 ports), so the two cannot drift apart. `ports` and
    `transfer_port` override the graph's. Pure."""
    cfg = spec.stages.get(stage)
    assert cfg is not None, f"topology {spec.topology.value} has no {stage.value} stage"
    xfer = spec.transfer
    weights = Weights(
        model=model,
        served_model_name=spec.model.name,
        **({"revision": spec.model.hugging_face.revision} if spec.model.hugging_face is not None else {}),
        **({"trust_remote_code": True} if spec.model.trust_remote_code else {}),
    )
    server = Server(
        host=host,
        port=(ports or {}).get(stage, cfg.port),
        max_request_bytes=max_request_bytes(spec.media, stage),
        peer_token_env=PEER_TOKEN_ENV,
    )
    media = MediaSpec.model_validate(spec.media.model_dump())  # every field set: all on the command line
    api_key = {"api_key_env": API_KEY_ENV} if spec.stages.frontend.api_key_secret else {}
    if stage == StageName.FRONTEND:
        routing: dict = {f"{peer.value}_url": url for peer, url in peers.items()}
        if StageName.ENCODER in peers:
            routing["encoder_routing"] = {"content": "content", "leastBusy": "least-busy"}[spec.embedding_cache.routing]
            if spec.stages.encoder is not None:
                routing["encoder_batch_size"] = spec.stages.encoder.max_batch_size
        routes = Routes(
            topology=spec.topology,
            **routing,
            kv_lease_seconds=xfer.kv_lease_seconds,
            transfer_timeout_seconds=xfer.timeout_seconds,
        )
        return FrontendSettings(weights=weights, server=server, routes=routes, media=media, **api_key)
    transfer = Transfer(
        advertise_host=advertise_host,
        transfer_backend=xfer.backend,
        transfer_port=transfer_port or xfer.port,
        transfer_timeout_seconds=xfer.timeout_seconds,
    )
    if isinstance(cfg, EncoderSpec):
        return EncoderSettings(
            weights=weights,
            server=server,
            transfer=transfer,
            device="cuda" if cfg.gpus else "cpu",
            media=media,
            max_batch_size=cfg.max_batch_size,
            cache_bytes=spec.embedding_cache.capacity_bytes,
        )
    assert isinstance(cfg, EngineSpec)
    engine: dict = {"kv_lease_seconds": xfer.kv_lease_seconds}
    if spec.topology == Topology.E_P_D:
        engine["kv_role"] = "producer" if stage == StageName.PD else "consumer"
    if stage == StageName.PD and spec.topology != Topology.AGG:
        engine["embeddings_input"] = True
    # where pd may pull embeddings from, and decode the KV cache: the graph's own replicas, never a message's
    upstream = {StageName.PD: StageName.ENCODER, StageName.DECODE: StageName.PD}.get(stage)
    if upstream in peers and upstream in spec.used_stages():
        engine[f"{upstream.value}_url"] = peers[upstream]
    if serves_api(spec, stage):  # agg's pd fetches and decodes the media itself, and serves the OpenAI API
        engine |= {"media": media, "openai": True}
        engine["api_max_request_bytes"] = max_request_bytes(spec.media, StageName.FRONTEND)
        engine |= api_key
        if StageName.PD in peers:  # its sibling replicas, over which its router also routes
            engine["pd_url"] = peers[StageName.PD]
    engine_args = dict(cfg.engine_args or {})
    if cfg.gpus > 1 and cfg.engine_arg("tensor-parallel-size") is None:
        engine_args["tensor-parallel-size"] = cfg.tensor_parallel_size()
    if engine_args:
        engine["engine_arg"] = vllm_flags(engine_args)
    return EngineSettings(weights=weights, server=server, transfer=transfer, **engine)


def worker_command(spec: MultimodalGraphSpec, stage: StageName, **where) -> list[str]:
    """argv after `mmgraph`, e.g. ["worker", "pd", "--model=...", ...]: `stage_settings` as flags."""
    return ["worker", stage.value, *to_argv(stage_settings(spec, stage, **where))]


def max_request_bytes(media: MediaSpec, stage: StageName) -> int:
    """The largest request body a stage reads: every media item as base64 at its cap, plus 1 MiB of text; stages
    behind the frontend take twice that (their messages wrap what the frontend accepted)."""
    client = media.max_items * -(-media.max_bytes * 4 // 3) + (1 << 20)
    return client if stage == StageName.FRONTEND else 2 * client


def serves_api(spec: MultimodalGraphSpec, stage: StageName) -> bool:
    """agg's pd serves the OpenAI API itself: the frontend runs in its process, where the engine is one call away
    instead of an HTTP hop (bench/peers.py measured the hop at 4-17% of vLLM's server's requests/s on 2 cores).
    Its pods are the frontend Service's; a request may still go to a less busy sibling replica over HTTP."""
    return spec.topology == Topology.AGG and stage == StageName.PD


def api_stage(spec: MultimodalGraphSpec) -> StageName:
    """The stage whose pods serve the OpenAI API (the frontend Service's)."""
    return StageName.PD if serves_api(spec, StageName.PD) else StageName.FRONTEND


def process_stages(spec: MultimodalGraphSpec) -> tuple[StageName, ...]:
    """The stages that run processes of their own (a Deployment each): agg's frontend runs inside pd."""
    return tuple(s for s in spec.used_stages() if s != StageName.FRONTEND or api_stage(spec) == StageName.FRONTEND)


def vllm_flags(engine_args: Mapping[str, object]) -> list[str]:
    """Engine arguments in vLLM's own CLI spelling, sorted: --max-model-len=8192; booleans become bare flags
    (--enforce-eager / --no-...). The same list starts vLLM's own server with the graph's arguments."""
    import json

    flags = []
    for key, value in sorted(engine_args.items()):
        key = key.replace("_", "-")
        if value is True:
            flags.append(f"--{key}")
        elif value is False:
            flags.append(f"--no-{key}")
        elif isinstance(value, (dict, list)):
            flags.append(f"--{key}={json.dumps(value, separators=(',', ':'), sort_keys=True)}")
        else:
            flags.append(f"--{key}={value}")
    return flags
