"""Session fixtures: one real control plane, the chart installed into it by Helm, and the operator running under
the ServiceAccount that install created (so every integration test also proves the chart's RBAC suffices).

The operator runs as a subprocess (`mmgraph operator`) with its own token, so the API server's audit log tells
its requests apart from the tests'. The webhook is served by that process on 127.0.0.1 and registered by URL,
since there is no kubelet to run the chart's in-cluster Deployment.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, dynamic
from kubernetes.client.exceptions import ApiException

sys.path.insert(0, str(Path(__file__).parent))
from kubecluster import KubeCluster, free_port, start_cluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "mmgraph"
OPERATOR_NS = "mmgraph-system"
RELEASE = "mmgraph"
OPERATOR_SA = f"{RELEASE}-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"
WEBHOOK_NAME = "mmgraph-test-webhook"


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll until `predicate()` is truthy; its value is returned. Fails the test with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except ApiException as err:
            last = err
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: last={last!r}")


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
def helm_install(cluster: KubeCluster, api: client.ApiClient) -> Any:
    """`helm install mmgraph charts/mmgraph -n mmgraph-system` through helm-python-sdk (CRD included)."""
    import helm_python as helm

    client.CoreV1Api(api).create_namespace({"metadata": {"name": OPERATOR_NS}})
    cfg = helm.Config(kubeconfig_path=str(cluster.kubeconfig), namespace=OPERATOR_NS)
    release = cfg.install(str(CHART), RELEASE, {"webhook": {"enabled": False}}, namespace=OPERATOR_NS, timeout=60)
    ext = client.ApiextensionsV1Api(api)
    wait_for(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition("multimodalgraphs.mmgraph.io").status.conditions or []
        ),
        what="CRD Established",
    )
    cluster.start_controller_manager()
    return release


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: KubeCluster, api: client.ApiClient, helm_install: Any) -> Path:
    """A kubeconfig with the token of the ServiceAccount the chart created (no other rights)."""
    core = client.CoreV1Api(api)
    secret_name = wait_for(
        lambda: (core.read_namespaced_service_account(OPERATOR_SA, OPERATOR_NS).secrets or [None])[0],
        what="ServiceAccount token Secret",
    ).name
    token = base64.b64decode(core.read_namespaced_secret(secret_name, OPERATOR_NS).data["token"]).decode()
    return cluster.kubeconfig_for_token("operator", token)


@pytest.fixture(scope="session")
def webhook_certs(cluster: KubeCluster) -> Path:
    d = cluster.workdir / "webhook"
    d.mkdir(exist_ok=True)
    crt, key = cluster.pki.issue("webhook", "mmgraph-webhook", sans=["127.0.0.1"])
    (d / "tls.crt").write_bytes(crt.read_bytes())
    (d / "tls.key").write_bytes(key.read_bytes())
    return d


class OperatorProcess:
    """`mmgraph operator` as a child process; start/stop can be repeated (restart tests)."""

    def __init__(self, kubeconfig: Path, cert_dir: Path, logdir: Path):
        self.kubeconfig, self.cert_dir, self.logdir = kubeconfig, cert_dir, logdir
        self.webhook_port, self.metrics_port, self.health_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.logdir / f"operator-{self.starts}.log", "wb")  # noqa: SIM115
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "mmgraph_operator.cli", "operator"]
        argv += [f"--webhook-port={self.webhook_port}", f"--webhook-cert-dir={self.cert_dir}"]
        argv += [f"--metrics-port={self.metrics_port}", f"--health-port={self.health_port}"]
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._healthy, timeout=60, what="operator /healthz")

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        return (self.logdir / f"operator-{self.starts}.log").read_text()[-5000:]

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="session")
def operator(
    cluster: KubeCluster, api: client.ApiClient, operator_kubeconfig: Path, webhook_certs: Path
) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(operator_kubeconfig, webhook_certs, cluster.workdir)
    proc.start()
    register_webhook(api, cluster, proc.webhook_port)
    try:
        yield proc
    finally:
        proc.stop()


def register_webhook(api: client.ApiClient, cluster: KubeCluster, port: int) -> None:
    ca = base64.b64encode((cluster.workdir / "ca.crt").read_bytes()).decode()
    body = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_NAME},
        "webhooks": [
            {
                "name": "multimodalgraphs.mmgraph.io",
                "admissionReviewVersions": ["v1", "v1beta1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
                "clientConfig": {"url": f"https://127.0.0.1:{port}/multimodalgraph", "caBundle": ca},
                "rules": [
                    {
                        "apiGroups": ["mmgraph.io"],
                        "apiVersions": ["v1alpha1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["multimodalgraphs"],
                        "scope": "Namespaced",
                    }
                ],
            }
        ],
    }
    client.AdmissionregistrationV1Api(api).create_validating_webhook_configuration(body)


@contextlib.contextmanager
def webhook_absent(api: client.ApiClient, cluster: KubeCluster, port: int) -> Iterator[None]:
    """Unregister the webhook for the duration (as if it were never installed), then put it back."""
    admission = client.AdmissionregistrationV1Api(api)
    admission.delete_validating_webhook_configuration(WEBHOOK_NAME)
    time.sleep(1.5)  # the API server's webhook informer catches up
    try:
        yield
    finally:
        register_webhook(api, cluster, port)
        time.sleep(1.5)


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
