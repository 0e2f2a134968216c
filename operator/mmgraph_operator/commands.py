"""The `mmgraph worker <stage>` command line of each stage, derived from a MultimodalGraph.

This is the one mapping from the graph onto worker flags: `render` puts it in Deployments (peers are
headless-Service DNS names) and `mmgraph up` runs it as local processes (peers are 127.0.0.1 ports), so the two
cannot drift apart. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from mmgraph_operator.api import (
    PEER_TOKEN_ENV,
    EncoderSpec,
    EngineSpec,
    MediaSpec,
    MultimodalGraphSpec,
    StageName,
    max_request_bytes,
)


def worker_command(
    spec: MultimodalGraphSpec,
    stage: StageName,
    *,
    model: str,
    host: str,
    advertise_host: str,
    peers: Mapping[StageName, str],
    ports: Mapping[StageName, int] | None = None,
    transfer_port: int | None = None,
) -> list[str]:
    """argv after `mmgraph`, e.g. ["worker", "pd", "--model", ...]; `ports`/`transfer_port` override the graph's."""
    cfg = spec.stages.get(stage)
    assert cfg is not None, f"topology {spec.topology.value} has no {stage.value} stage"
    port = (ports or {}).get(stage, cfg.port)
    argv = [
        "worker",
        stage.value,
        f"--model={model}",
        f"--served-model-name={spec.model.name}",
        f"--host={host}",
        f"--port={port}",
        f"--max-request-bytes={max_request_bytes(spec.media, stage)}",
        f"--peer-token-env={PEER_TOKEN_ENV}",
    ]
    if spec.model.hugging_face is not None:
        argv.append(f"--revision={spec.model.hugging_face.revision}")
    if spec.model.trust_remote_code:
        argv.append("--trust-remote-code")
    xfer = spec.transfer
    if stage == StageName.FRONTEND:
        argv.append(f"--topology={spec.topology.value}")
        argv += [f"--{peer.value}-url={url}" for peer, url in sorted(peers.items(), key=lambda kv: kv[0].value)]
        if StageName.ENCODER in peers:
            routing = {"content": "content", "leastBusy": "least-busy"}[spec.embedding_cache.routing]
            argv.append(f"--encoder-routing={routing}")
            if spec.stages.encoder is not None:
                argv.append(f"--encoder-batch-size={spec.stages.encoder.max_batch_size}")
        argv += _media_flags(spec)
        argv.append(f"--kv-lease-seconds={xfer.kv_lease_seconds}")
        argv.append(f"--transfer-timeout-seconds={xfer.timeout_seconds:g}")
        return argv + _api_key_flag(spec)
    argv.append(f"--advertise-host={advertise_host}")
    argv.append(f"--transfer-backend={xfer.backend}")
    argv.append(f"--transfer-port={transfer_port or xfer.port}")
    argv.append(f"--transfer-timeout-seconds={xfer.timeout_seconds:g}")
    if isinstance(cfg, EncoderSpec):
        argv.append("--device=" + ("cuda" if cfg.gpus else "cpu"))
        argv += _media_flags(spec)
        argv.append(f"--max-batch-size={cfg.max_batch_size}")
        argv.append(f"--cache-bytes={spec.embedding_cache.capacity_bytes}")
    if isinstance(cfg, EngineSpec):
        argv.append(f"--kv-lease-seconds={xfer.kv_lease_seconds}")
        if spec.topology.value == "e-p-d":
            argv.append("--kv-role=" + ("producer" if stage == StageName.PD else "consumer"))
        if stage == StageName.PD and spec.topology.value != "agg":
            argv.append("--embeddings-input")
        # where pd may pull embeddings from, and decode the KV cache: the graph's own replicas, never a message's
        upstream = {StageName.PD: StageName.ENCODER, StageName.DECODE: StageName.PD}.get(stage)
        if upstream in peers and upstream in spec.used_stages():
            argv.append(f"--{upstream.value}-url={peers[upstream]}")
        if serves_api(spec, stage):  # agg's pd fetches and decodes the media itself, and serves the OpenAI API
            argv += _media_flags(spec)
            argv += ["--openai", f"--api-max-request-bytes={max_request_bytes(spec.media, StageName.FRONTEND)}"]
            argv += _api_key_flag(spec)
            if StageName.PD in peers:  # its sibling replicas, over which its router also routes
                argv.append(f"--pd-url={peers[StageName.PD]}")
        engine_args = dict(cfg.engine_args or {})
        if cfg.gpus > 1 and cfg.engine_arg("tensor-parallel-size") is None:
            engine_args["tensor-parallel-size"] = cfg.tensor_parallel_size()
        argv += [f"--engine-arg={flag}" for flag in vllm_flags(engine_args)]
    return argv


def serves_api(spec: MultimodalGraphSpec, stage: StageName) -> bool:
    """agg's pd serves the OpenAI API itself: the frontend runs in its process, where the engine is one call away
    instead of an HTTP hop (bench/peers.py measured the hop at 4-17% of vLLM's server's requests/s on 2 cores).
    Its pods are the frontend Service's; a request may still go to a less busy sibling replica over HTTP."""
    return spec.topology.value == "agg" and stage == StageName.PD


def api_stage(spec: MultimodalGraphSpec) -> StageName:
    """The stage whose pods serve the OpenAI API (the frontend Service's)."""
    return StageName.PD if serves_api(spec, StageName.PD) else StageName.FRONTEND


def process_stages(spec: MultimodalGraphSpec) -> tuple[StageName, ...]:
    """The stages that run processes of their own (a Deployment each): agg's frontend runs inside pd."""
    return tuple(s for s in spec.used_stages() if s != StageName.FRONTEND or api_stage(spec) == StageName.FRONTEND)


def _api_key_flag(spec: MultimodalGraphSpec) -> list[str]:
    return ["--api-key-env=MMGRAPH_API_KEY"] if spec.stages.frontend.api_key_secret else []


def _media_flags(spec: MultimodalGraphSpec) -> list[str]:
    """spec.media as worker flags, one per MediaSpec field (the workers parse them back from the same fields:
    mmgraph_workers/media/policy.py): lists comma-joined, true booleans bare, false ones left out."""
    flags = []
    for name in MediaSpec.model_fields:
        value, flag = getattr(spec.media, name), "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif isinstance(value, list):
            flags.append(f"{flag}={','.join(value)}")
        else:
            flags.append(f"{flag}={value:g}" if isinstance(value, float) else f"{flag}={value}")
    return flags


def vllm_flags(engine_args: Mapping[str, object]) -> list[str]:
    """Engine arguments in vLLM's own CLI spelling, sorted: --max-model-len=8192; booleans become bare flags
    (--enforce-eager / --no-...). The same list starts vLLM's own server with the graph's arguments."""
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
