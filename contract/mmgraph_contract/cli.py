"""The `mmgraph` command: its subcommands come from the installed sides (the `mmgraph.commands` entry points:
the operator's crd, render and operator; the workers' worker, up and tiny-model), so the command imports neither
side, and a side whose dependencies are not installed (the operator's image has no torch) just offers fewer."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmgraph", description="Multimodal LLM graphs on Kubernetes")
    sub = parser.add_subparsers(dest="command", required=True)
    for side in sorted(entry_points(group="mmgraph.commands"), key=lambda e: e.name):
        try:
            add_subcommands = side.load()
        except ImportError:
            continue
        add_subcommands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
