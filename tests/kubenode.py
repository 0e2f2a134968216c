"""A real Kubernetes node on this machine, for the tests that need pods to run: kubelet, kube-proxy, containerd
(its CRI plugin, runc, the CNI bridge plugin) and a cluster DNS, beside a control plane of its own.

Everything of the node lives in a network namespace the harness makes (`mmgraph-node-<pid>`), joined to the host
by one veth pair: the API server listens on the host's end (HOST), the kubelet and kube-proxy run on the node's end
(NODE), pods get addresses from POD_CIDR on a bridge inside the namespace, and the host routes POD_CIDR and the
Service CIDR to NODE, so a test on the host reaches pods and ClusterIPs while kube-proxy's and the bridge plugin's
iptables rules stay inside the namespace. Nothing in it has a route elsewhere. containerd, kubelet and CNI keep
their state in the harness's directory; pods run under a cgroup of their own. `stop()` kills every container and
process it started, unmounts what they mounted, deletes the namespace (its iptables and routes go with it) and
puts back the host sysctls the kubelet changes. Measured constraints of these machines: shared/FACTS.md.

The cluster DNS is dnsmasq (authoritative for cluster.local, no upstream), fed from Services and Endpoints by a
thread that rewrites its hosts file, as CoreDNS's kubernetes plugin would answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubecluster import KubeCluster, cli, kube_bin_dir, terminate, wait_for

HOST, NODE = "198.19.255.1", "198.19.255.2"  # the veth pair's two ends (TEST-NET-2 benchmark range: never routed)
POD_CIDR, POD_GATEWAY = "198.18.0.0/24", "198.18.0.1"
SERVICE_CIDR = "198.18.128.0/17"  # the API server's --service-cluster-ip-range: a range no real traffic uses
NODE_NAME = "mmgraph-node"
PAUSE_IMAGE = "localhost/mmgraph/pause:3.4.1"
KUBELET_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")  # it sets these host-wide
# Fixed host paths the kubelet, containerd and CNI write beside the directories we give them (pod logs, device
# plugin sockets, CNI results, shim sockets): removed at stop() where they did not exist before start().
HOST_PATHS = tuple(
    Path(p) for p in ("/var/log/pods", "/var/log/containers", "/var/lib/kubelet", "/var/lib/cni", "/run/containerd")
)


def run(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=check)


@dataclass
class KubeNode:
    workdir: Path
    cluster: KubeCluster = field(init=False)
    netns: str = field(default_factory=lambda: f"mmgraph-node-{os.getpid()}")
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    dns_stop: threading.Event = field(default_factory=threading.Event)
    dns_thread: threading.Thread | None = None
    lock: io.TextIOWrapper | None = None
    absent: list[Path] = field(default_factory=list)

    @property
    def veth(self) -> str:
        return f"mmg{os.getpid()}"  # 10 characters at most (a pid is at most 7 digits): within IFNAMSIZ

    @property
    def sock(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    def start(self) -> KubeNode:
        """The namespace, then a control plane listening on HOST, then containerd, the kubelet, kube-proxy and the
        DNS; returns once the node is Ready and schedulable."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lock = _one_node_at_a_time()
        self.sysctls = {name: Path("/proc/sys", name).read_text().strip() for name in KUBELET_SYSCTLS}
        self.absent = [path for path in HOST_PATHS if not path.exists()]
        try:
            self._network()
            self.cluster = KubeCluster(
                self.workdir / "control-plane", kube_bin_dir(), address=HOST, service_cidr=SERVICE_CIDR
            )
            self.cluster.start()
            self.cluster.start_controller_manager()
            self.cluster.start_scheduler()
            self._containerd()
            self.import_image_archive(self._pause_archive())
            self._kubelet()
            self._kube_proxy()
            self._dns()
            wait_for(self._ready, timeout=120, interval=1, what="the node Ready, without the not-ready taint")
        except BaseException:
            self.stop()
            raise
        return self

    # ---- network -------------------------------------------------------------------------------------------

    def _network(self) -> None:
        run("ip", "netns", "add", self.netns)
        peer = f"{self.veth}n"
        run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", peer, "netns", self.netns)
        run("ip", "addr", "add", f"{HOST}/30", "dev", self.veth)
        run("ip", "link", "set", self.veth, "up")
        for argv in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "addr", "add", f"{NODE}/30", "dev", peer),
            ("ip", "link", "set", peer, "up"),
            ("sysctl", "-qw", "net.ipv4.ip_forward=1"),
            ("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"),  # a pod's reply to a ClusterIP is de-NATed
        ):
            run(*argv, netns=self.netns)
        for cidr in (POD_CIDR, SERVICE_CIDR):  # the host reaches pods and ClusterIPs through the node, only there
            run("ip", "route", "add", cidr, "via", NODE, "dev", self.veth)
        (self.workdir / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        bridge = {
            "cniVersion": "0.4.0",
            "name": "mmgraph",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                        "routes": [{"dst": "0.0.0.0/0"}],  # via the gateway: the node's namespace, no further
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }
        (self.workdir / "cni" / "net.d" / "10-mmgraph.conflist").write_text(json.dumps(bridge))

    # ---- containerd ----------------------------------------------------------------------------------------

    def _containerd(self) -> None:
        root = self.workdir / "containerd"
        root.mkdir(parents=True, exist_ok=True)
        cri = "io.containerd.grpc.v1.cri"
        config = f"""
version = 2
root = "{root / "root"}"
state = "{root / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = "{root / "debug.sock"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"
[plugins."{cri}"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
[plugins."{cri}".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{self.workdir / "cni" / "net.d"}"
[plugins."{cri}".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[plugins."{cri}".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."{cri}".containerd.runtimes.runc.options]
  SystemdCgroup = false
"""
        (root / "config.toml").write_text(config)
        self._spawn("containerd", ["containerd", f"--config={root / 'config.toml'}"], netns=True)
        wait_for(self.sock.exists, timeout=30, what="containerd's socket")

    def ctr(self, *argv: str) -> subprocess.CompletedProcess:
        return run("ctr", "-a", str(self.sock), "-n", "k8s.io", *argv)

    def import_image_archive(self, archive: Path) -> None:
        """An OCI or docker archive into the node's image store, as `ctr images import` does (no registry)."""
        self.ctr("images", "import", "--all-platforms", str(archive))  # unpacked now, not in a pod's creation

    def _pause_archive(self) -> Path:
        """The sandbox image: the static pause binary that scripts/kube-binaries.sh built from the source's
        pause.c, as a one-layer docker archive."""
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as tar:
            info = tarfile.TarInfo("pause")
            data = (kube_bin_dir() / "pause").read_bytes()
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
        layer_bytes = layer.getvalue()
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer_bytes).hexdigest()}"]},
        }
        manifest = [{"Config": "config.json", "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]
        archive = self.workdir / "pause.tar"
        with tarfile.open(archive, "w") as tar:
            for name, data in (
                ("layer.tar", layer_bytes),
                ("config.json", json.dumps(config).encode()),
                ("manifest.json", json.dumps(manifest).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return archive

    # ---- kubelet and kube-proxy ----------------------------------------------------------------------------

    def _cgroup_root(self) -> None:
        """The pods' cgroup root, in every hierarchy (the kubelet wants it to exist); a new cpuset starts empty, so
        it gets its parent's CPUs and memory nodes."""
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            if not (hierarchy / "cgroup.procs").exists():
                continue
            mine = hierarchy / self.netns
            mine.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if (hierarchy / name).exists():
                    (mine / name).write_text((hierarchy / name).read_text())

    def _kubelet(self) -> None:
        self._cgroup_root()
        w = self.workdir / "kubelet"
        w.mkdir(parents=True, exist_ok=True)
        pki = self.cluster.pki
        cert, key = pki.issue("kubelet-client", f"system:node:{NODE_NAME}", org="system:nodes")
        serving = pki.issue("kubelet-serving", NODE_NAME, sans=[NODE, NODE_NAME])
        kubeconfig = w / "kubeconfig"
        self.cluster._write_kubeconfig(kubeconfig, {"client-certificate": str(cert), "client-key": str(key)})
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE,
            "readOnlyPort": 0,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.cluster.workdir / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(serving[0]),
            "tlsPrivateKeyFile": str(serving[1]),
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.netns}",  # pods' cgroups are ours alone, so stop() can find every process
            "clusterDNS": [NODE],
            "clusterDomain": "cluster.local",
            "resolvConf": "",  # no host nameserver in any pod
            "failSwapOn": False,
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,  # never collect the images the tests imported
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "volumePluginDir": str(w / "volume-plugins"),
            "maxPods": 60,
        }
        (w / "config.yaml").write_text(yaml.safe_dump(config))
        self._spawn(
            "kubelet",
            [
                str(kube_bin_dir() / "kubelet"),
                f"--config={w / 'config.yaml'}",
                f"--kubeconfig={kubeconfig}",
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{self.sock}",
                f"--root-dir={w / 'root'}",
                f"--cert-dir={w / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE}",
                "--v=1",
            ],
            netns=True,
        )

    def _kube_proxy(self) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.cluster.kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": POD_CIDR,
            "mode": "iptables",
            "conntrack": {"maxPerCore": 0},  # leave the (host-wide) conntrack table size alone
            "bindAddress": NODE,
            "metricsBindAddress": "127.0.0.1:10249",  # the namespace's own loopback
            "healthzBindAddress": "127.0.0.1:10256",
        }
        path = self.workdir / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        self._spawn("kube-proxy", [str(kube_bin_dir() / "kube-proxy"), f"--config={path}", "--v=1"], netns=True)

    # ---- cluster DNS ---------------------------------------------------------------------------------------

    def _dns(self) -> None:
        hosts = self.workdir / "dns" / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text("")
        self._spawn(
            "dnsmasq",
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",  # no upstream: a name outside cluster.local is refused at once
                "--no-hosts",
                "--local=/cluster.local/",  # authoritative: a search-path miss is NXDOMAIN at once
                f"--listen-address={NODE}",
                "--bind-interfaces",
                f"--addn-hosts={hosts}",
                "--user=root",
                "--pid-file",
                "--log-facility=-",
            ],
            netns=True,
        )
        self.dns_thread = threading.Thread(target=self._feed_dns, args=(hosts,), name="cluster DNS", daemon=True)
        self.dns_thread.start()

    def _feed_dns(self, hosts: Path) -> None:
        """Services and Endpoints as dnsmasq hosts lines, as CoreDNS answers them: a Service's name is its
        ClusterIP; a headless Service's name is each of its ready addresses, and an endpoint with a hostname is
        also `<hostname>.<service>...`."""
        from kubernetes import client, config

        api = config.new_client_from_config(str(self.cluster.kubeconfig))
        core = client.CoreV1Api(api)
        written = None
        while not self.dns_stop.wait(0.5):
            try:
                lines, headless = set(), set()
                for svc in core.list_service_for_all_namespaces().items:
                    name = f"{svc.metadata.name}.{svc.metadata.namespace}.svc.cluster.local"
                    if svc.spec.cluster_ip in (None, "", "None"):
                        headless.add(name)
                    else:
                        lines.add(f"{svc.spec.cluster_ip} {name}")
                for ep in core.list_endpoints_for_all_namespaces().items:
                    name = f"{ep.metadata.name}.{ep.metadata.namespace}.svc.cluster.local"
                    if name not in headless:
                        continue
                    for subset in ep.subsets or []:
                        for address in subset.addresses or []:
                            lines.add(f"{address.ip} {name}")
                            if address.hostname:
                                lines.add(f"{address.ip} {address.hostname}.{name}")
                text = "".join(f"{line}\n" for line in sorted(lines))
                if text != written:
                    hosts.write_text(text)
                    self.procs["dnsmasq"].send_signal(signal.SIGHUP)
                    written = text
            except Exception:  # the API server restarting, or stopping: look again
                continue
        api.close()

    # ---- readiness and the end -----------------------------------------------------------------------------

    def _ready(self) -> bool:
        from kubernetes import client, config

        with config.new_client_from_config(str(self.cluster.kubeconfig)) as api:
            node = client.CoreV1Api(api).read_node(NODE_NAME)
        ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        return ready and not [t for t in node.spec.taints or [] if t.key.startswith("node.kubernetes.io/")]

    def _spawn(self, name: str, argv: list[str], netns: bool = False) -> None:
        for proc in self.procs.values():
            assert proc.poll() is None, f"{proc.args[0]} exited: see {self.workdir}"
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        # nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroup hierarchies the kubelet needs
        prefix = ["nsenter", f"--net=/run/netns/{self.netns}"] if netns else []
        self.procs[name] = subprocess.Popen(
            [*prefix, *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self) -> None:
        """Every container and process the node started, its mounts, the namespace (with its iptables and
        routes), the host paths it made and the host sysctls the kubelet set, in that order; every step runs even
        if one before it failed, and it is safe on a half-started node."""
        cluster = getattr(self, "cluster", None)
        steps = [
            self.dns_stop.set,
            *(lambda n=name: terminate(self.procs.pop(n, None), grace=15) for name in ("kubelet", "kube-proxy")),
            self._kill_pods,
            lambda: terminate(self.procs.pop("dnsmasq", None), grace=5),
            lambda: terminate(self.procs.pop("containerd", None), grace=15),
            lambda: self.dns_thread and self.dns_thread.join(5),
            cluster.stop if cluster else (lambda: None),
            lambda: _unmount_under(self.workdir, *self.absent),
            lambda: run("ip", "link", "del", self.veth, check=False),  # the host's routes to the node go with it
            lambda: run("ip", "netns", "del", self.netns, check=False),
            *(lambda p=path: shutil.rmtree(p, ignore_errors=True) for path in self.absent),
            *(lambda n=name, v=value: Path("/proc/sys", n).write_text(v) for name, value in self.sysctls.items()),
            lambda: self.lock and self.lock.close(),  # the next session's node may start
        ]
        failed: BaseException | None = None
        for step in steps:
            try:
                step()
            except BaseException as err:  # go on: what is left must still be undone
                failed = failed or err
        if failed:
            raise failed

    def _kill_pods(self) -> None:
        """Every process in the pods' cgroup tree (each controller's), then the (containerd) shims, by PID."""
        for _ in range(3):
            pids = _cgroup_pids(self.netns)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not pids:
                break
            time.sleep(0.5)
        for pid in _pids_with_arg(str(self.sock)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for top in Path("/sys/fs/cgroup").glob(f"*/{self.netns}"):
            for sub in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


def _one_node_at_a_time(timeout: float = 3600) -> io.TextIOWrapper:
    """The node's addresses are fixed, so two test sessions on one machine take turns: an exclusive lock, held
    until stop() closes the file (or the process ends)."""
    lock = open("/run/lock/mmgraph-test-node.lock", "a")  # noqa: SIM115 - held for the node's life
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise TimeoutError("another test session's node held the lock for an hour") from None
            time.sleep(2)


def _cgroup_pids(root: str) -> set[int]:
    pids: set[int] = set()
    for procs in Path("/sys/fs/cgroup").glob(f"*/{root}/**/cgroup.procs"):
        with contextlib.suppress(OSError):
            pids |= {int(p) for p in procs.read_text().split()}
    return pids


def _pids_with_arg(arg: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if arg.encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
    return found


def _unmount_under(*roots: Path) -> None:
    """Mounts the kubelet and containerd made under `roots` (volumes, overlay snapshots, pod namespaces)."""
    prefixes = tuple(str(root.resolve()) + "/" for root in roots)
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if (m + "/").startswith(prefixes)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True)


def tool(
    node: KubeNode, name: str, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`helm ...` or `kubectl ...` against the node's cluster, as a user types it."""
    home = node.workdir / "home"  # kubectl's and helm's caches and configuration: the test's, not the user's
    home.mkdir(exist_ok=True)
    env = {**os.environ, "KUBECONFIG": str(node.cluster.kubeconfig), "HOME": str(home)}
    result = subprocess.run([cli(name), *args], input=stdin, capture_output=True, text=True, env=env, timeout=600)
    assert not check or result.returncode == 0, (
        f"{name} {' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    )
    return result


def kubectl_json(node: KubeNode, *args: str) -> Any:
    return json.loads(tool(node, "kubectl", *args, "-o", "json").stdout)
