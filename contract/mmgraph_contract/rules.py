"""What a structural schema cannot say about a MultimodalGraph: cross-field rules, each a sentence that says what
to change. The admission webhook and the reconcile loop both call `problems`. No I/O."""

from __future__ import annotations

import re
from collections.abc import Callable

from mmgraph_contract.graph import MultimodalGraph
from mmgraph_contract.spec import EngineSpec
from mmgraph_contract.vocabulary import STAGES_OF, StageName, Topology
from mmgraph_contract.wire import AUTOSCALING_METRICS

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
