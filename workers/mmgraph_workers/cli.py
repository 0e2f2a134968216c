"""The data plane's subcommands of `mmgraph`: `worker <stage>`, `up FILE`, `tiny-model DIR`.

`mmgraph worker STAGE` parses the stage's command line once, into its settings model (mmgraph_contract/settings.py),
and hands that to the stage's `main`; a stage module is imported only when that stage runs, so `mmgraph render`
never imports torch and `mmgraph worker frontend` never imports vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from mmgraph_contract.flags import from_argv
from mmgraph_contract.settings import SETTINGS, EncoderSettings, EngineSettings
from mmgraph_contract.vocabulary import StageName

MODULES = {
    StageName.FRONTEND: "frontend",
    StageName.ENCODER: "encoder_app",
    StageName.PD: "engine_app",
    StageName.DECODE: "engine_app",
}

# torch backs host allocations of 2 MiB and more with transparent huge pages: a fresh tensor that a transfer fills
# then costs 512x fewer page faults (bench/transfer.py: 64 MiB read 54 -> 16 ms), and vLLM's CPU tensors gain too.
WORKER_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="run one stage of a graph (what a Deployment's pod runs)", add_help=False)
    worker.add_argument(
        "stage", choices=[s.value for s in MODULES], help="the stage; `mmgraph worker STAGE --help` for its flags"
    )
    worker.add_argument("rest", nargs=argparse.REMAINDER)
    worker.set_defaults(func=run_worker)

    up = sub.add_parser("up", help="run a MultimodalGraph as local processes (no cluster needed)")
    up.add_argument("file", help="MultimodalGraph YAML file")
    up.add_argument("--demo", action="store_true", help="send one image request, print the answer, then stop")
    up.add_argument("--host", default="127.0.0.1")
    up.set_defaults(func=run_up)

    tiny = sub.add_parser("tiny-model", help="build a tiny random-weight model of a supported family (no download)")
    tiny.add_argument("dir")
    tiny.add_argument("--family", default="qwen2-vl", help="qwen2-vl, qwen2.5-vl, llava or qwen2-audio")
    tiny.set_defaults(func=run_tiny_model)


def run_worker(args: argparse.Namespace) -> int:
    stage = StageName(args.stage)
    settings = from_argv(SETTINGS[stage], args.rest, prog=f"mmgraph worker {stage.value}")
    for key, value in WORKER_ENV.items():  # before the stage imports torch; an operator's own value wins
        os.environ.setdefault(key, value)
    if isinstance(settings, EncoderSettings | EngineSettings):  # the stages that move tensors over NIXL
        # UCX (under NIXL) opens its sockets on every interface unless told otherwise: a worker advertising a
        # loopback address keeps its transfers on loopback too.
        loopback = settings.transfer.advertise_host.startswith("127.")
        os.environ.setdefault("UCX_NET_DEVICES", "lo" if loopback else "all")
    module = importlib.import_module(f"mmgraph_workers.{MODULES[stage]}")
    if isinstance(settings, EngineSettings):
        module.main(settings, stage.value)
    else:
        module.main(settings)
    return 0


def run_up(args: argparse.Namespace) -> int:
    from mmgraph_workers.up import up

    return up(args.file, host=args.host, demo=args.demo)


def run_tiny_model(args: argparse.Namespace) -> int:
    from mmgraph_workers.tiny_model import build

    try:
        print(f"tiny {args.family} model written to {build(args.dir, family=args.family)}")
    except ValueError as err:  # no such family: the message lists them
        print(f"mmgraph tiny-model: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The data plane's subcommands alone: how `mmgraph up` starts its stages (`python -m mmgraph_workers.cli`)."""
    parser = argparse.ArgumentParser(prog="mmgraph")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
