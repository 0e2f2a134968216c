"""The engine arguments a pd/decode stage hands vLLM (mmgraph_workers.vllm_args): the CPU executor choice, and a
user's kv-transfer-config merged into what the graph decides, or refused where it would change it."""

from __future__ import annotations

import pytest

from mmgraph_contract.flags import from_argv
from mmgraph_contract.settings import EngineSettings


@pytest.mark.parametrize(
    ("engine_arg", "backend"),
    [(None, "uni"), ("--distributed-executor-backend=mp", "mp"), ("--tensor-parallel-size=2", None)],
)
def test_cpu_engines_keep_the_model_in_the_engine_core_unless_told_otherwise(monkeypatch, engine_arg, backend):
    """On CPU the pd/decode engines run vLLM's `uni` executor (the worker-process queue stalled under load), and
    say so to vLLM's CPU platform, which would turn `uni` back into `mp`; a user's parallelism settings win."""
    import os

    import torch

    from mmgraph_workers import cpu
    from mmgraph_workers import vllm_args as engine

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    argv = ["--model=/models/tiny", "--served-model-name=tiny", "--port=1", "--kv-role=consumer"]
    args = from_argv(EngineSettings, argv + ([f"--engine-arg={engine_arg}"] if engine_arg else []))
    built = engine.engine_args(args, "decode")
    assert built.distributed_executor_backend == backend
    assert built.kv_transfer_config.kv_connector == "NixlConnector"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1", "engine_args has no side effects"
    cpu.apply_engine_env(engine.user_engine_args(args)[0])
    assert (engine_arg is None) == (os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0")


def test_a_users_kv_transfer_config_is_accepted_and_merged_into_the_graphs():
    """One behaviour everywhere: the webhook's rules accept it, the engine merges it over what the graph implies."""
    from pathlib import Path

    import yaml

    from mmgraph_contract.graph import parse
    from mmgraph_contract.rules import problems
    from mmgraph_contract.settings import worker_command
    from mmgraph_contract.vocabulary import StageName
    from mmgraph_workers import vllm_args as engine

    body = yaml.safe_load((Path(__file__).parents[1] / "examples" / "tiny-e-p-d.yaml").read_text())
    user = {"kv_connector_extra_config": {"enforce_handshake_compat": False}}
    body["spec"]["stages"]["decode"]["engineArgs"]["kv-transfer-config"] = user
    graph = parse(body)
    assert problems(graph) == []
    argv = worker_command(
        graph.spec, StageName.DECODE, model="/m", host="127.0.0.1", advertise_host="127.0.0.1", peers={}
    )
    config = engine.engine_args(from_argv(EngineSettings, argv[2:]), "decode").kv_transfer_config
    assert config.kv_connector == "NixlConnector" and config.kv_role == "kv_consumer"
    assert config.kv_connector_extra_config == {"kv_lease_duration": 30, "enforce_handshake_compat": False}


@pytest.mark.parametrize(
    ("topology", "config", "refused"),
    [
        ("e-p-d", {"kv_role": "kv_both"}, "sets kv_role"),
        ("e-p-d", {"kv_connector_extra_config": {"kv_lease_duration": 5}}, "kv_lease_duration"),
        ("e-pd", {"kv_connector_extra_config": {"backends": ["UCX"]}}, "moves no KV cache"),
    ],
)
def test_kv_transfer_config_cannot_change_what_the_graph_decides(topology, config, refused):
    """The frontend times decode's pull by spec.transfer.kvLeaseSeconds: a user's lease, role or connector would
    make that timing wrong, and outside e-p-d the setting would be silently unused."""
    from pathlib import Path

    import yaml

    from mmgraph_contract.graph import parse
    from mmgraph_contract.rules import problems

    body = yaml.safe_load((Path(__file__).parents[1] / "examples" / "tiny-e-p-d.yaml").read_text())
    body["spec"]["topology"] = topology
    if topology != "e-p-d":
        del body["spec"]["stages"]["decode"]
    body["spec"]["stages"]["pd"]["engineArgs"]["kv-transfer-config"] = config
    assert any(refused in p for p in problems(parse(body))), problems(parse(body))
