"""The control plane's subcommands of `mmgraph`: crd, render, operator.

Each imports what it needs when it runs, so `mmgraph render` works with only the base install and `mmgraph worker`
does not pay for kopf.
"""

from __future__ import annotations

import argparse
import sys
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

    from mmgraph_contract.graph import parse
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
    import os
    import secrets
    import socket

    from mmgraph_operator.certs import service_sans
    from mmgraph_operator.leader import Timing
    from mmgraph_operator.main import Options, run

    own = args.operator_namespace or os.environ.get("POD_NAMESPACE") or _serviceaccount_namespace() or "default"
    sans = (service_sans(args.webhook_service, own) if args.webhook_service else ()) + tuple(args.webhook_san)
    if args.webhook_secret and not sans:
        print("mmgraph operator: --webhook-secret needs --webhook-service or --webhook-san", file=sys.stderr)
        return 2
    try:
        timing = Timing(args.lease_duration, args.lease_renew_deadline, args.lease_retry)
    except ValueError as err:
        print(f"mmgraph operator: {err}", file=sys.stderr)
        return 2
    # two replicas share a ServiceAccount: the identity (Lease holder, user agent) tells them apart
    identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}_{secrets.token_hex(4)}"
    opts = Options(
        namespaces=args.namespace,
        own_namespace=own,
        identity=identity,
        webhook_port=args.webhook_port,
        webhook_cert_dir=args.webhook_cert_dir,
        webhook_secret=args.webhook_secret,
        webhook_config=args.webhook_config,
        admission_secret=args.admission_secret,
        webhook_sans=sans,
        cert_interval=args.webhook_cert_check,
        lease=args.leader_election_lease,
        timing=timing,
    )
    return run(opts, metrics_port=args.metrics_port, health_port=args.health_port)


def _serviceaccount_namespace() -> str | None:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.exists() else None


def _operator_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", action="append", default=[], help="watch only this namespace (repeatable)")
    p.add_argument("--operator-namespace", default="", help="the operator's own namespace (default: POD_NAMESPACE)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0: off)")
    p.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port (0: off)")
    w = p.add_argument_group("admission webhook")
    w.add_argument(
        "--webhook-port",
        type=int,
        default=0,
        help="serve the admission webhook on this port; then only a spec it checked is applied",
    )
    w.add_argument(
        "--webhook-secret",
        default="",
        help="keep the webhook's CA and certificate in this Secret "
        "(in the operator's namespace): the leader makes and renews it, every replica serves it",
    )
    w.add_argument(
        "--webhook-config", default="", help="the MutatingWebhookConfiguration whose caBundle the leader keeps"
    )
    w.add_argument(
        "--admission-secret",
        default="mmgraph-operator-admission",
        help="the Secret (in the operator's namespace) holding the key of the webhook's stamps: the leader makes it",
    )
    w.add_argument("--webhook-service", default="", help="the webhook's Service: the certificate names it")
    w.add_argument("--webhook-san", action="append", default=[], help="another name or IP for the certificate")
    w.add_argument("--webhook-cert-check", type=float, default=10.0, help="seconds between reads of the Secret")
    w.add_argument(
        "--webhook-cert-dir",
        default=None,
        help="without --webhook-secret: a directory with tls.crt and tls.key (e.g. cert-manager's Secret)",
    )
    e = p.add_argument_group("leader election (two replicas: one reconciles, both serve the webhook)")
    e.add_argument(
        "--leader-election-lease",
        default="",
        help="the Lease to hold (in the operator's namespace); empty: no election, this replica leads",
    )
    e.add_argument("--lease-duration", type=float, default=15.0, help="seconds before a standby takes over")
    e.add_argument("--lease-renew-deadline", type=float, default=10.0, help="seconds a leader tries to renew")
    e.add_argument("--lease-retry", type=float, default=2.0, help="seconds between tries")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """The control plane's subcommands of `mmgraph` (mmgraph_contract/cli.py)."""
    from mmgraph_operator.render import DEFAULT_KUBE_VERSION

    p = sub.add_parser("crd", help="print the MultimodalGraph CustomResourceDefinition")
    p.set_defaults(func=cmd_crd)
    p = sub.add_parser("render", help="print the manifests the operator would apply for a MultimodalGraph file")
    p.add_argument("file", help="MultimodalGraph YAML file, or - for standard input")
    p.add_argument("--kube-version", default=DEFAULT_KUBE_VERSION, help="target Kubernetes version, e.g. 1.20")
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("operator", help="run the operator (kopf) against the current kubeconfig or in-cluster")
    _operator_parser(p)
    p.set_defaults(func=cmd_operator)
