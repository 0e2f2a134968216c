"""The vLLM engine's arguments: the user's (vLLM's own parser reads them, so every vLLM option works as vLLM
documents it) under what the graph decides (model, KV connector and lease, embeddings input)."""

from __future__ import annotations

import json
from typing import Any

import torch

from mmgraph_contract.settings import EngineSettings
from mmgraph_workers import cpu


def user_engine_args(settings: EngineSettings) -> tuple[list[str], dict[str, Any]]:
    """The user's engine arguments, and their --kv-transfer-config apart (it is merged into the graph's)."""
    user_args, user_kv = [], {}
    for arg in settings.engine_arg:
        if arg.startswith("--kv-transfer-config="):
            user_kv = json.loads(arg.split("=", 1)[1])
        else:
            user_args.append(arg)
    return user_args, user_kv


def engine_args(settings: EngineSettings, stage: str) -> Any:
    """AsyncEngineArgs from vLLM's own parser, plus what the graph decides (model, KV connector, embeddings).
    Pure: what the engine needs in its environment is set by `main`."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    user_args, user_kv = user_engine_args(settings)
    argv = ["--model", settings.weights.model, "--served-model-name", settings.weights.served_model_name, *user_args]
    if settings.weights.revision:
        argv += ["--revision", settings.weights.revision]
    if settings.weights.trust_remote_code:
        argv.append("--trust-remote-code")
    if settings.embeddings_input or stage == "decode":
        argv.append("--enable-mm-embeds")
    if settings.kv_role:
        config = {
            "kv_connector": "NixlConnector",
            "kv_role": f"kv_{settings.kv_role}",
            "kv_connector_extra_config": {"kv_lease_duration": settings.kv_lease_seconds},
        }
        if not torch.cuda.is_available():
            config["kv_buffer_device"] = "cpu"
        # the user's settings (e.g. NIXL backends) under the graph's: connector, role and lease are the graph's,
        # since the frontend times decode's pull by the graph's lease
        extra = {**user_kv.get("kv_connector_extra_config", {}), **config["kv_connector_extra_config"]}
        config = {**user_kv, **config, "kv_connector_extra_config": extra}
        argv += ["--kv-transfer-config", json.dumps(config)]
    argv += cpu.engine_executor_args(user_args)
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))
