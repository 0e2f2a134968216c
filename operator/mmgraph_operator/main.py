"""Runs the operator: kopf watches (graphs and every kind of child), the webhook, metrics; no logic of its own.

Two replicas may run: both watch and serve the webhook, only the leader (leader.py) reconciles and keeps the
webhook's certificate (certs.py). kopf is configured to write nothing by itself (standalone: no peering objects;
no progress annotations or
finalizers, since only event handlers are used; Events are posted by the reconciler, deduplicated), so every
write the operator makes is one the reconciler decided on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client

from mmgraph_contract.vocabulary import GROUP, PLURAL, VERSION
from mmgraph_operator.admission import AdmissionKey
from mmgraph_operator.certs import CertKeeper, CertSettings, ServingCert
from mmgraph_operator.kubeapi import api_client
from mmgraph_operator.leader import LeaseElector, Timing
from mmgraph_operator.names import GRAPH_LABEL, MANAGED_BY
from mmgraph_operator.reconcile import Reconciler
from mmgraph_operator.render import child_kinds

CHILD_LABELS = {GRAPH_LABEL: kopf.PRESENT, "app.kubernetes.io/managed-by": MANAGED_BY}


@dataclass(frozen=True)
class Options:
    """What `mmgraph operator` was told (cli.py): namespaces, ports, the webhook's certificate, the election."""

    namespaces: list[str] = field(default_factory=list)
    own_namespace: str = "default"  # where the Lease and the certificate Secret live
    identity: str = "mmgraph-operator"
    webhook_port: int = 0
    webhook_cert_dir: str | None = None  # tls.crt/tls.key files (bring your own, e.g. cert-manager's Secret)
    webhook_secret: str = ""  # else: keep the certificate in this Secret (certs.py)
    webhook_config: str = ""  # the MutatingWebhookConfiguration whose caBundle the leader keeps
    admission_secret: str = "mmgraph-operator-admission"  # the key of the webhook's stamps (admission.py)
    webhook_sans: tuple[str, ...] = ()
    cert_interval: float = 10.0
    lease: str = ""  # "" = no election: lead at once (one replica)
    timing: Timing = field(default_factory=Timing)


def register(registry: kopf.OperatorRegistry, opts: Options, api: client.ApiClient, kube_version: str) -> None:
    """All handlers, on an explicit registry (no import-time globals)."""
    kinds = child_kinds(kube_version)
    # With the webhook, a spec is applied only once the webhook has checked it; without one, nothing is checked.
    key = AdmissionKey(api, opts.own_namespace, opts.admission_secret) if opts.webhook_port else None

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
        settings.posting.enabled = False
        settings.peering.standalone = True
        # Watching given namespaces: use exactly those, without listing the cluster's namespaces (which a
        # namespaced install's Roles do not allow; kopf would retry for minutes before falling back).
        settings.scanning.disabled = bool(opts.namespaces)
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(32, thread_name_prefix="kube-api"))
        await _stop(getattr(memo, "tasks", []))  # kopf retries a failed startup: one election, one keeper
        memo.reconciler = reconciler = Reconciler(api, kube_version, admission=key)
        memo.tasks = []
        memo.elector = None
        if opts.lease:
            memo.elector = LeaseElector(
                api, opts.own_namespace, opts.lease, opts.identity, opts.timing, reconciler.lead, reconciler.follow
            )
            reconciler.lease_ends = memo.elector.held_until
            memo.tasks.append(asyncio.create_task(memo.elector.run(), name="leader election"))
        else:
            reconciler.lead()
        if key:
            memo.tasks.append(
                asyncio.create_task(key.keep(reconciler.leading.is_set, opts.cert_interval), name="admission key")
            )
            settings.admission.server = await _webhook_server(api, opts, reconciler, memo.tasks)
            await key.ready.wait()  # kopf serves once startup returns: every stamp needs the key
            settings.admission.managed = None  # the chart (or the tests) own the webhook configuration
        await reconciler.prime(opts.namespaces, [(f"{g}/{v}" if g else v, kind) for g, v, _, kind in kinds])
        logger.info("mmgraph operator %s for Kubernetes %s", opts.identity, kube_version)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)  # the same kubeconfig / in-cluster token as our API client

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        await _stop(memo.tasks)  # the election first: it must not renew what we are about to give up
        await memo.reconciler.stop()
        if memo.elector:
            await memo.elector.release()  # the standby takes over now, not a lease duration later

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def graph_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.reconciler.graph_event(type, _plain(body))

    for group, version, plural, _ in kinds:
        kopf.on.event(group, version, plural, labels=CHILD_LABELS, registry=registry, id=f"child-{plural}")(
            _child_event
        )

    if key:
        from mmgraph_operator.webhook import admit_graph

        kopf.on.mutate(GROUP, VERSION, PLURAL, id="multimodalgraph", registry=registry)(
            functools.partial(admit_graph, namespaces=opts.namespaces, key=key, api=api, kube_version=kube_version)
        )


async def _stop(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _webhook_server(
    api: client.ApiClient, opts: Options, reconciler: Reconciler, tasks: list[asyncio.Task]
) -> kopf.WebhookServer:
    """Every replica serves the webhook, from a certificate reloaded in place when it changes: the one the leader
    keeps in a Secret (the default), or files someone else renews (cert-manager's Secret, mounted). kopf starts
    the server once startup returns, so this waits for the first certificate."""
    serving = ServingCert()
    if opts.webhook_secret:
        settings = CertSettings(
            opts.own_namespace, opts.webhook_secret, opts.webhook_config, opts.webhook_sans, opts.cert_interval
        )
        keep = CertKeeper(api, settings, serving).keep(reconciler.leading.is_set)
    else:
        keep = serving.watch_files(Path(opts.webhook_cert_dir or "."), opts.cert_interval)
    tasks.append(asyncio.create_task(keep, name="webhook certificate"))
    await serving.ready.wait()
    return kopf.WebhookServer(
        addr="0.0.0.0",
        port=opts.webhook_port,
        context=serving.context,
        certfile=str(serving.certfile),  # what the context holds: else kopf would load a self-signed one into it
        pkeyfile=str(serving.keyfile),
    )


async def _child_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.child_event(type, _plain(body))


def _plain(body: kopf.Body) -> dict[str, Any]:
    return dict(body)


def run(opts: Options, metrics_port: int, health_port: int) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # a retried request: our own line says what failed
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per watch event is noise
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
    api = api_client(f"mmgraph-operator/{opts.identity}")
    version = client.VersionApi(api).get_code()  # which versions of the child kinds to watch, before kopf starts
    registry = kopf.OperatorRegistry()
    register(registry, opts, api, f"{version.major}.{version.minor}")
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=not opts.namespaces,
        namespaces=opts.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
    )
    return 0
