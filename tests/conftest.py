"""Session fixtures: one real control plane, the chart installed into it by Helm, and the operator running under
the ServiceAccount that install created (so every integration test also proves the chart's RBAC suffices).

The operator runs as a subprocess (`mmgraph operator`) with its own token, so the API server's audit log tells
its requests apart from the tests'. The webhook is served by that process on 127.0.0.1, and the chart's webhook
configuration names it by URL (webhook.url), since there is no kubelet to run the chart's in-cluster Deployment;
the operator makes its certificate and sets the caBundle as it does in a cluster.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, dynamic
from kubernetes.client.exceptions import ApiException

sys.path.insert(0, str(Path(__file__).parent))
from kubecluster import (
    WEBHOOK_CONFIG,
    KubeCluster,
    OperatorProcess,
    install_chart,
    operator_kubeconfig_of,
    start_cluster,
    wait_for,
)

from mmgraph_workers.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--order",
        default="file",
        help="file (as written), reverse, or random[:SEED]: tests must pass in any order (module fixtures included)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--order reverse: every test in reverse. --order random[:SEED]: modules in random order and the tests of
    each in random order (as pytest-randomly does: a module's fixtures are set up once); the seed is printed."""
    order = config.getoption("--order")
    if order == "reverse":
        items.reverse()
    elif order.startswith("random"):
        seed = int(order.partition(":")[2] or random.randrange(1 << 16))
        shuffle = random.Random(seed).shuffle
        modules: dict[str, list[pytest.Item]] = {}
        for item in items:
            modules.setdefault(item.nodeid.split("::")[0], []).append(item)
        groups = list(modules.values())
        shuffle(groups)
        for group in groups:
            shuffle(group)
        items[:] = [item for group in groups for item in group]
        print(f"\ntest order: random, seed {seed} (--order random:{seed} repeats it)")
    elif order != "file":
        raise pytest.UsageError(f"--order must be file, reverse or random[:SEED], not {order!r}")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    kube = start_cluster(tmp_path_factory.mktemp("kube"))
    try:
        yield kube
    finally:
        kube.stop()


@pytest.fixture(scope="session")
def api(cluster: KubeCluster) -> client.ApiClient:
    return config.new_client_from_config(str(cluster.kubeconfig))


@pytest.fixture(scope="session")
def dyn(api: client.ApiClient) -> dynamic.DynamicClient:
    return dynamic.DynamicClient(api)


@pytest.fixture(scope="session")
def webhook_port() -> int:
    """Where the session's operator serves the webhook: the chart's webhook configuration names it by URL."""
    return free_port()


@pytest.fixture(scope="session")
def helm_install(cluster: KubeCluster, api: client.ApiClient, webhook_port: int) -> Any:
    """`helm install mmgraph charts/mmgraph -n mmgraph-system` with the real helm CLI (CRD included)."""
    return install_chart(cluster, api, chart_values(webhook_port))


def chart_values(webhook_port: int) -> dict[str, Any]:
    return {"webhook": {"url": f"https://127.0.0.1:{webhook_port}/multimodalgraph"}}


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: KubeCluster, api: client.ApiClient, helm_install: Any) -> Path:
    """A kubeconfig with the token of the ServiceAccount the chart created (no other rights)."""
    return operator_kubeconfig_of(cluster, api)


@pytest.fixture(scope="session")
def operator(
    cluster: KubeCluster, api: client.ApiClient, operator_kubeconfig: Path, webhook_port: int
) -> Iterator[OperatorProcess]:
    """The operator as the chart runs it: it makes the webhook's certificate and sets the caBundle itself."""
    proc = OperatorProcess(operator_kubeconfig, cluster.workdir, webhook_port=webhook_port)
    proc.start()
    wait_for(lambda: ca_bundle(api), what="the operator sets its webhook's caBundle")
    try:
        yield proc
    finally:
        proc.stop()


def ca_bundle(api: client.ApiClient) -> str | None:
    """The caBundle of the chart's webhooks (one for creates, one for updates), once the operator set them all."""
    hooks = client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration(WEBHOOK_CONFIG).webhooks
    bundles = {hook.client_config.ca_bundle for hook in hooks}
    return bundles.pop() if len(bundles) == 1 else None


@contextlib.contextmanager
def webhook_absent(api: client.ApiClient) -> Iterator[None]:
    """Unregister the webhook for the duration (as if it were never installed, or the operator were down and the
    request were let through), then put it back as it was."""
    admission = client.AdmissionregistrationV1Api(api)
    saved = api.sanitize_for_serialization(admission.read_mutating_webhook_configuration(WEBHOOK_CONFIG))
    admission.delete_mutating_webhook_configuration(WEBHOOK_CONFIG)
    time.sleep(1.5)  # the API server's webhook informer catches up
    try:
        yield
    finally:
        meta = saved["metadata"]
        saved["metadata"] = {k: meta[k] for k in ("name", "labels", "annotations") if k in meta}
        admission.create_mutating_webhook_configuration(saved)
        time.sleep(1.5)


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real node (kubelet, containerd, kube-proxy, cluster DNS) with a control plane of its own, for the tests
    that run pods (tests/kubenode.py). Started once, and only by a session that asks for it."""
    from kubenode import KubeNode

    started = KubeNode(tmp_path_factory.mktemp("node")).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def operator_image(node: Any) -> str:
    """The operator image, built here by `make base-image operator-image` and loaded into the node."""
    from localimages import OPERATOR_IMAGE, make, save

    make("base-image", "operator-image")
    node.import_image_archive(save(OPERATOR_IMAGE))
    return OPERATOR_IMAGE


@pytest.fixture(scope="session")
def worker_image(node: Any) -> str:
    """The CPU worker image, built here by `make base-image worker-image WORKER=cpu` and loaded into the node."""
    from localimages import WORKER_IMAGE, make, save

    make("base-image", "worker-image")
    node.import_image_archive(save(WORKER_IMAGE))
    return WORKER_IMAGE


@pytest.fixture(scope="session")
def previous_worker_image(node: Any, worker_image: str) -> str:
    """The previous release's CPU worker image (a thin layer over this tree's), loaded into the node."""
    from localimages import build_previous, save

    image = build_previous()
    node.import_image_archive(save(image))
    return image


@pytest.fixture(scope="session")
def chart_on_node(node: Any, operator_image: str) -> Any:
    """`helm install` as the README says, with the chart's defaults: two operator replicas, leader election, the
    operator's own webhook certificate; --wait returns once both replicas are Ready (serving the webhook)."""
    from kubenode import tool

    chart = str(REPO / "charts" / "mmgraph")
    tool(node, "helm", "install", "mmgraph", chart, "-n", "mmgraph-system", "--create-namespace", "--wait")
    return node


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name)


def graph_manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    base = yaml.safe_load((REPO / "examples" / "qwen2.5-vl-e-p-d.yaml").read_text())
    base["metadata"] = {"name": name, "namespace": namespace}
    base["spec"].update(spec)
    return base
