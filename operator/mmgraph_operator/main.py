"""Runs the operator: kopf watches (graphs and every kind of child), the webhook, metrics; no logic of its own.

kopf is configured to write nothing by itself (standalone: no peering objects; no progress annotations or
finalizers, since only event handlers are used; Events are posted by the reconciler, deduplicated), so every
write the operator makes is one the reconciler decided on.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client, config

from mmgraph_operator.api import GROUP, PLURAL, VERSION
from mmgraph_operator.reconcile import Reconciler
from mmgraph_operator.render import GRAPH_LABEL, MANAGED_BY, KubeVersion, pdb_api_version

CHILD_LABELS = {GRAPH_LABEL: kopf.PRESENT, "app.kubernetes.io/managed-by": MANAGED_BY}
CHILD_KINDS = [  # every kind render() can produce: (group, version, plural, kind); PDBs in the served version
    ("", "v1", "services", "Service"),
    ("apps", "v1", "deployments", "Deployment"),
    ("policy", None, "poddisruptionbudgets", "PodDisruptionBudget"),
    ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
]


def _api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 16
    return client.ApiClient(configuration)


def register(registry: kopf.OperatorRegistry, namespaces: list[str], webhook_port: int, cert_dir: str | None) -> None:
    """All handlers, on an explicit registry (no import-time globals)."""

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
        settings.posting.enabled = False
        settings.peering.standalone = True
        # Watching given namespaces: use exactly those, without listing the cluster's namespaces (which a
        # namespaced install's Roles do not allow; kopf would retry for minutes before falling back).
        settings.scanning.disabled = bool(namespaces)
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        if webhook_port:
            cert = Path(cert_dir or ".")
            settings.admission.server = kopf.WebhookServer(
                addr="0.0.0.0", port=webhook_port, certfile=str(cert / "tls.crt"), pkeyfile=str(cert / "tls.key")
            )
            settings.admission.managed = None  # the chart (or the tests) own the webhook configuration
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(32, thread_name_prefix="kube-api"))
        api = _api_client()
        version = client.VersionApi(api).get_code()
        kube_version = f"{version.major}.{version.minor}"
        memo.reconciler = Reconciler(api, kube_version)
        pdb = pdb_api_version(KubeVersion.parse(kube_version))
        kinds = [(f"{g}/{v}" if g else v, kind) if v else (pdb, kind) for g, v, _, kind in CHILD_KINDS]
        await memo.reconciler.prime(namespaces, kinds)
        logger.info("mmgraph operator for Kubernetes %s", kube_version)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)  # the same kubeconfig / in-cluster token as our API client

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        await memo.reconciler.stop()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def graph_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.reconciler.graph_event(type, _plain(body))

    for group, version, plural, _ in CHILD_KINDS:
        kopf.on.event(group, version, plural, labels=CHILD_LABELS, registry=registry, id=f"child-{plural}")(
            _child_event
        )

    if webhook_port:
        from mmgraph_operator.webhook import validate_graph

        kopf.on.validate(GROUP, VERSION, PLURAL, id="multimodalgraph", registry=registry)(validate_graph)


async def _child_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.child_event(type, _plain(body))


def _plain(body: kopf.Body) -> dict[str, Any]:
    return dict(body)


def run(
    namespaces: list[str], webhook_port: int, webhook_cert_dir: str | None, metrics_port: int, health_port: int
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per watch event is noise
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
    registry = kopf.OperatorRegistry()
    register(registry, namespaces, webhook_port, webhook_cert_dir)
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
    )
    return 0
