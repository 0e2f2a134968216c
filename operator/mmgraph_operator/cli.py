"""The `mmgraph` command: one entry point for the control plane (crd, render, operator) and the data plane.

Subcommands import what they need when they run, so `mmgraph render` works with only the base install and
`mmgraph worker` does not pay for kopf.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml


def _load_graphs(path: str) -> list[dict]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def cmd_crd(args: argparse.Namespace) -> int:
    from mmgraph_operator.crd import crd

    sys.stdout.write(yaml.safe_dump(crd(), sort_keys=False, width=120))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from mmgraph_operator.api import parse
    from mmgraph_operator.render import InvalidGraph, render

    manifests = []
    for body in _load_graphs(args.file):
        try:
            manifests += render(parse(body), args.kube_version)
        except (ValidationError, InvalidGraph) as err:
            name = (body.get("metadata") or {}).get("name", "?")
            print(f"mmgraph render: MultimodalGraph {name!r} is invalid:\n{err}", file=sys.stderr)
            return 1
    sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False, width=120))
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from mmgraph_operator.main import run

    return run(
        namespaces=args.namespace,
        webhook_port=args.webhook_port,
        webhook_cert_dir=args.webhook_cert_dir,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from mmgraph_operator.render import DEFAULT_KUBE_VERSION

    parser = argparse.ArgumentParser(prog="mmgraph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("crd", help="print the MultimodalGraph CustomResourceDefinition")
    p.set_defaults(func=cmd_crd)
    p = sub.add_parser("render", help="print the manifests the operator would apply for a MultimodalGraph file")
    p.add_argument("file", help="MultimodalGraph YAML file, or - for standard input")
    p.add_argument("--kube-version", default=DEFAULT_KUBE_VERSION, help="target Kubernetes version, e.g. 1.20")
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("operator", help="run the operator (kopf) against the current kubeconfig or in-cluster")
    p.add_argument("--namespace", action="append", default=[], help="watch only this namespace (repeatable)")
    p.add_argument("--webhook-port", type=int, default=0, help="serve the validating webhook on this port")
    p.add_argument("--webhook-cert-dir", default=None, help="directory with tls.crt and tls.key for the webhook")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0: off)")
    p.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port (0: off)")
    p.set_defaults(func=cmd_operator)
    try:
        from mmgraph_workers.cli import add_subcommands
    except ImportError:
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
