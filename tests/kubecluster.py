"""A real Kubernetes control plane for tests: etcd + kube-apiserver + kube-controller-manager on 127.0.0.1.

No kubelet and no scheduler: Deployments get ReplicaSets and Pods, garbage collection and token Secrets work,
but Pods stay Pending (tests that need Ready pods play the kubelet themselves, see `play_kubelet_mark_ready`).
Binaries come from scripts/kube-binaries.sh (built once, cached). Every process started here is stopped by
`stop()`. The API server writes an audit log, so tests can count the requests a given identity made.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from mmgraph_workers.ports import free_port

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "mmgraph"
OPERATOR_NS = "mmgraph-system"
RELEASE = "mmgraph"
OPERATOR_SA = f"{RELEASE}-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata"}],
}


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll until `predicate()` is truthy; its value is returned. Raises AssertionError naming `what` on timeout."""
    from kubernetes.client.exceptions import ApiException

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


def kube_bin_dir() -> Path:
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "kube-binaries.sh")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


# ---- certificates ------------------------------------------------------------------------------------------


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _cert(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@dataclass
class Pki:
    """A CA and certificates signed by it, written as PEM files into `root`."""

    root: Path
    ca: x509.Certificate = field(init=False)
    ca_key: rsa.RSAPrivateKey = field(init=False)

    def __post_init__(self) -> None:
        self.ca_key = _key()
        self.ca = _cert(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mmgraph-test-ca")]), self.ca_key, None, ca=True
        )
        self.write("ca.crt", self.ca.public_bytes(serialization.Encoding.PEM))

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def issue(self, name: str, cn: str, org: str | None = None, sans: list[str] | None = None) -> tuple[Path, Path]:
        """(cert path, key path) for `cn`; `sans` are IP addresses or DNS names."""
        key = _key()
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        general: list[x509.GeneralName] = []
        for san in sans or []:
            try:
                general.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                general.append(x509.DNSName(san))
        cert = _cert(x509.Name(attrs), key, (self.ca, self.ca_key), sans=general or None)
        return (
            self.write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            self.write(f"{name}.key", _pem_key(key)),
        )


# ---- the cluster -------------------------------------------------------------------------------------------


@dataclass
class KubeCluster:
    """`address`: where the API server listens. 127.0.0.1 for the API-level tests (fast: no ServiceAccount
    admission, no endpoints); a node's host-side address (tests/kubenode.py) serves pods as a cluster does: the
    `kubernetes` Service's endpoints, ServiceAccount tokens mounted into pods, and the node controllers."""

    workdir: Path
    bin_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0
    address: str = "127.0.0.1"
    service_cidr: str = "10.0.0.0/16"

    @property
    def for_pods(self) -> bool:
        return self.address != "127.0.0.1"

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def start(self) -> KubeCluster:
        """etcd and the API server, ready; on any failure, whatever was started is stopped again."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> KubeCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = Pki(self.workdir)
        first_service_ip = str(next(ipaddress.ip_network(self.service_cidr).hosts()))  # the `kubernetes` Service's
        sans = ["127.0.0.1", "localhost", first_service_ip, self.address]
        sans += ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]
        serving = self.pki.issue("apiserver", "kube-apiserver", sans=sans)
        admin = self.pki.issue("admin", "admin", org="system:masters")
        sa_key = _key()
        self.pki.write("sa.key", _pem_key(sa_key))
        self.pki.write(
            "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        (self.workdir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
        etcd_port, peer_port = free_port(), free_port()
        etcd_dir = self.workdir / "etcd"
        self._spawn(
            "etcd",
            [
                shutil.which("etcd") or "/usr/bin/etcd",
                f"--data-dir={etcd_dir}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--logger=zap",
                "--log-level=error",
            ],
        )
        self.port = free_port()
        w = self.workdir
        kubelet_client = self.pki.issue("apiserver-kubelet-client", "kube-apiserver", org="system:masters")
        for_pods = (
            # the `kubernetes` Service's endpoint, which pods reach; the kubelet by its address (no DNS for nodes),
            # with a client certificate (logs, exec)
            [
                f"--advertise-address={self.address}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={kubelet_client[0]}",
                f"--kubelet-client-key={kubelet_client[1]}",
            ]
            if self.for_pods
            else ["--endpoint-reconciler-type=none", "--disable-admission-plugins=ServiceAccount"]
        )
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--bind-address={self.address}",
                f"--secure-port={self.port}",
                "--insecure-port=0",
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--client-ca-file={w / 'ca.crt'}",
                f"--tls-cert-file={serving[0]}",
                f"--tls-private-key-file={serving[1]}",
                f"--service-account-key-file={w / 'sa.pub'}",
                f"--service-account-signing-key-file={w / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--api-audiences=https://kubernetes.default.svc",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={self.service_cidr}",
                *for_pods,
                "--enable-priority-and-fairness=false",
                "--allow-privileged=true",
                f"--audit-policy-file={w / 'audit-policy.yaml'}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
                "--v=0",
            ],
        )
        self._write_kubeconfig(self.kubeconfig, {"client-certificate": str(admin[0]), "client-key": str(admin[1])})
        self._wait_ready()
        return self

    def start_controller_manager(self) -> None:
        """Separate from start(): its garbage collector learns custom kinds only at its periodic discovery
        (30 s), so tests start it once the CRD is installed, as in a cluster where the chart came first."""
        w = self.workdir
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                # a node's controllers only where there is a node (nodelifecycle lifts its not-ready taint)
                "--controllers=*,-nodeipam,-route,-service,-cloud-node-lifecycle,-bootstrapsigner,-tokencleaner"
                + ("" if self.for_pods else ",-nodelifecycle,-ttl"),
                f"--service-account-private-key-file={w / 'sa.key'}",
                f"--root-ca-file={w / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
                "--concurrent-gc-syncs=20",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--v=0",
            ],
        )

    def start_scheduler(self) -> None:
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--port=0",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=0",
            ],
        )

    def restart_api_server(self) -> float:
        """Stop the API server (SIGTERM, as a static pod's update or a control-plane node's reboot does) and start
        it again with the same flags; its state is etcd's. On SIGTERM it stops listening at once but lingers while
        the requests it holds (watches) run out: the new one starts as soon as the port is free, and the old one
        is killed once the new one is ready. The seconds it was not serving."""
        old = self.procs.pop("kube-apiserver")
        stopped = time.monotonic()
        try:
            old.terminate()
            wait_for(lambda: not _listening(self.address, self.port), timeout=30, interval=0.1, what="the port free")
            self._spawn("kube-apiserver", [str(arg) for arg in old.args])
            self._wait_ready()  # or stop() ends the new one
            return time.monotonic() - stopped
        finally:
            terminate(old, grace=0)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _write_kubeconfig(self, path: Path, user: dict[str, str], namespace: str = "default") -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.workdir / "ca.crt")},
                }
            ],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user", "namespace": namespace}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))

    def kubeconfig_for_token(self, name: str, token: str, namespace: str = "default") -> Path:
        """A kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's)."""
        path = self.workdir / f"{name}.kubeconfig"
        self._write_kubeconfig(path, {"token": token}, namespace)
        return path

    def _wait_ready(self, timeout: float = 60) -> None:
        import ssl
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(self.workdir / "ca.crt"))
        ctx.load_cert_chain(self.workdir / "admin.crt", self.workdir / "admin.key")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {(self.workdir / f'{name}.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("kube-apiserver did not become ready")

    def audit_events(self) -> list[dict]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            terminate(self.procs.pop(name, None), grace=10)


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def terminate(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; nothing if it is gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@functools.cache
def cli(name: str) -> str:
    """helm or kubectl: the official binaries scripts/node-tools.sh keeps (asked once)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "node-tools.sh")], capture_output=True, text=True, check=True)
    return str(Path(out.stdout.strip().splitlines()[-1]) / name)


@functools.cache
def _helm_home() -> Path:
    """helm's cache, configuration and data for this session: not the user's (gone at exit)."""
    home = Path(tempfile.mkdtemp(prefix="mmgraph-helm-"))
    atexit.register(shutil.rmtree, home, True)
    return home


def helm(
    *args: str, values: dict | None = None, kubeconfig: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """The real `helm` CLI, as a user runs it: `values` go in a values file (-f), `kubeconfig` names the cluster."""
    home = _helm_home()
    env = {**os.environ, **{f"HELM_{kind}_HOME": str(home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}}
    argv = [cli("helm"), *args]
    if kubeconfig:
        argv += ["--kubeconfig", str(kubeconfig)]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=home) as file:
        if values is not None:
            yaml.safe_dump(values, file)
            file.flush()
            argv += ["-f", file.name]
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert not check or result.returncode == 0, f"helm {' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


def install_chart(cluster: KubeCluster, api: Any, values: dict | None = None) -> dict[str, Any]:
    """`helm install mmgraph charts/mmgraph -n mmgraph-system --create-namespace` (CRD included), then start the
    controller-manager. There is no kubelet to run the chart's Deployment (nor kube-proxy for its Service): the
    tests run the operator as a process, so a chart with the webhook on must name it by URL."""
    from kubernetes import client

    values = values or {"webhook": {"enabled": False}}
    argv = ["install", RELEASE, str(CHART), "-n", OPERATOR_NS, "--create-namespace", "--timeout=60s", "-o", "json"]
    release = json.loads(helm(*argv, values=values, kubeconfig=cluster.kubeconfig).stdout)
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


def operator_kubeconfig_of(cluster: KubeCluster, api: Any) -> Path:
    """A kubeconfig with the token of the ServiceAccount the chart created (no other rights)."""
    import base64

    from kubernetes import client

    core = client.CoreV1Api(api)
    secret_name = wait_for(
        lambda: (core.read_namespaced_service_account(OPERATOR_SA, OPERATOR_NS).secrets or [None])[0],
        what="ServiceAccount token Secret",
    ).name
    token = base64.b64decode(core.read_namespaced_secret(secret_name, OPERATOR_NS).data["token"]).decode()
    return cluster.kubeconfig_for_token("operator", token)


WEBHOOK_CONFIG = f"{RELEASE}-operator"  # the chart's MutatingWebhookConfiguration (and Lease, and Secret prefix)
LEASE_TIMING = ["--lease-duration=7", "--lease-renew-deadline=4", "--lease-retry=1"]  # tests' short lease


class OperatorProcess:
    """`mmgraph operator` as a child process, as the chart runs it (leader election, the webhook certificate in
    its Secret) but with a short lease and a 1 s certificate check; start/stop can be repeated (restart tests)."""

    def __init__(
        self,
        kubeconfig: Path,
        logdir: Path,
        namespaces: tuple[str, ...] = (),
        name: str = "operator",
        webhook_port: int | None = None,
    ):
        self.kubeconfig, self.logdir = kubeconfig, logdir
        self.namespaces, self.name = namespaces, name
        self.webhook_port = webhook_port or free_port()
        self.metrics_port, self.health_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        log = open(self.logdir / f"{self.name}-{self.starts}.log", "wb")  # noqa: SIM115
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1", "POD_NAME": self.name}
        argv = [sys.executable, "-m", "mmgraph_contract.cli", "operator", f"--operator-namespace={OPERATOR_NS}"]
        argv += [f"--leader-election-lease={WEBHOOK_CONFIG}", *LEASE_TIMING]
        argv += [f"--webhook-port={self.webhook_port}", f"--webhook-secret={WEBHOOK_CONFIG}-webhook"]
        argv += [f"--webhook-config={WEBHOOK_CONFIG}", "--webhook-san=127.0.0.1", "--webhook-cert-check=1"]
        argv += [f"--admission-secret={WEBHOOK_CONFIG}-admission"]
        argv += [f"--metrics-port={self.metrics_port}", f"--health-port={self.health_port}"]
        argv += [f"--namespace={ns}" for ns in self.namespaces]
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            try:
                wait_for(self._healthy, timeout=60, what="operator /healthz")
            except BaseException:
                self.stop()  # never leave a process behind a failed start
                raise

    def leading(self) -> bool:
        return self.metric("mmgraph_operator_leader ") == 1

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as r:
                if r.status != 200:
                    return False
            with socket.create_connection(("127.0.0.1", self.webhook_port), timeout=1):
                return True  # the webhook server starts after /healthz answers
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
        return (self.logdir / f"{self.name}-{self.starts}.log").read_text()[-5000:]

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def operator_writes(cluster: KubeCluster) -> list[dict]:
    """Every write the operators' account made that the server accepted (a refused write wrote nothing)."""
    return [
        e
        for e in cluster.audit_events()
        if e.get("user", {}).get("username") == OPERATOR_USER
        and e.get("verb") not in ("get", "list", "watch")
        and e.get("responseStatus", {}).get("code", 200) < 300
    ]


def start_cluster(workdir: Path | None = None) -> KubeCluster:
    return KubeCluster(workdir or Path(tempfile.mkdtemp(prefix="mmgraph-kube-")), kube_bin_dir()).start()


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the control plane exactly as Ctrl-C does


if __name__ == "__main__":  # a cluster to poke at by hand: python tests/kubecluster.py
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    cluster = start_cluster()
    cluster.start_controller_manager()
    print(f"export KUBECONFIG={cluster.kubeconfig}  (Ctrl-C or SIGTERM stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.stop()
        os._exit(0)
