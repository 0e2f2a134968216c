"""A real Prometheus (Debian's binary, which scripts/node-tools.sh keeps) scraping a test node's pods as a
cluster's would: the widespread annotation-driven job keeps the pods the operator annotates `prometheus.io/scrape`,
on the port and path the annotations name, labelled with their namespace and pod.

Debian builds Prometheus without kubernetes_sd (and consul_sd): its Kubernetes client is not packaged. So a
thread here plays that discoverer's part, and names it: it lists the pods from the API server every 2 s and writes
them for file_sd with the very `__meta_kubernetes_pod_*` labels kubernetes_sd's pod role gives (a target per
container port), so Prometheus's own relabelling does the rest, unchanged from a cluster's configuration."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubecluster import cli, terminate, wait_for

from mmgraph_workers.ports import free_port

SCRAPE_SECONDS = 2


def scrape_config(targets: Path) -> dict[str, Any]:
    """The widespread annotation-driven pod job (the community Helm chart's `kubernetes-pods`), its targets from
    `targets` (file_sd) instead of kubernetes_sd."""
    annotation = "__meta_kubernetes_pod_annotation_prometheus_io_"
    return {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
        "scrape_configs": [
            {
                "job_name": "kubernetes-pods",
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": f"{SCRAPE_SECONDS}s"}],
                "relabel_configs": [
                    {"source_labels": [f"{annotation}scrape"], "action": "keep", "regex": "true"},
                    {"source_labels": [f"{annotation}path"], "target_label": "__metrics_path__", "regex": "(.+)"},
                    {
                        "source_labels": ["__address__", f"{annotation}port"],
                        "regex": r"([^:]+)(?::\d+)?;(\d+)",
                        "replacement": "$1:$2",
                        "target_label": "__address__",
                    },
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            }
        ],
    }


def label_name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", text)


def pod_targets(pods: list[Any]) -> list[dict[str, Any]]:
    """What kubernetes_sd's pod role discovers: a target per container port of each pod with an address, labelled
    `__meta_kubernetes_pod_*` (namespace, name, IP, phase, readiness, labels, annotations, container, port)."""
    groups = []
    for pod in pods:
        if not pod.status.pod_ip:
            continue
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        meta = {
            "__meta_kubernetes_namespace": pod.metadata.namespace,
            "__meta_kubernetes_pod_name": pod.metadata.name,
            "__meta_kubernetes_pod_ip": pod.status.pod_ip,
            "__meta_kubernetes_pod_phase": pod.status.phase,
            "__meta_kubernetes_pod_ready": str(ready).lower(),
            **{f"__meta_kubernetes_pod_label_{label_name(k)}": v for k, v in (pod.metadata.labels or {}).items()},
            **{
                f"__meta_kubernetes_pod_annotation_{label_name(k)}": v
                for k, v in (pod.metadata.annotations or {}).items()
            },
        }
        for container in pod.spec.containers:
            for port in container.ports or []:
                labels = {
                    **meta,
                    "__meta_kubernetes_pod_container_name": container.name,
                    "__meta_kubernetes_pod_container_port_number": str(port.container_port),
                }
                groups.append({"targets": [f"{pod.status.pod_ip}:{port.container_port}"], "labels": labels})
    return groups


@dataclass
class Prometheus:
    workdir: Path
    kubeconfig: Path
    namespaces: list[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    began: float = field(default_factory=time.time)  # Unix seconds: where queries over its whole life start

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config, self.pods_file = self.workdir / "prometheus.yml", self.workdir / "pods.json"
        self._discover_once()
        config.write_text(yaml.safe_dump(scrape_config(self.pods_file)))
        self.discovery = threading.Thread(target=self._discover, name="pod discovery", daemon=True)
        self.discovery.start()
        argv = [
            cli("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with open(self.workdir / "prometheus.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._ready, timeout=60, interval=0.5, what="Prometheus ready")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (self.workdir / "prometheus.log").read_text()
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _discover(self) -> None:
        while not self.stopping.wait(SCRAPE_SECONDS):
            with contextlib.suppress(Exception):  # the API server restarting: keep the last list, look again
                self._discover_once()

    def _discover_once(self) -> None:
        from kubernetes import client, config

        with config.new_client_from_config(str(self.kubeconfig)) as api:
            core = client.CoreV1Api(api)
            pods = [p for ns in self.namespaces for p in core.list_namespaced_pod(ns, _request_timeout=5).items]
        text = json.dumps(pod_targets(pods), sort_keys=True)
        partial = self.pods_file.with_suffix(".tmp")
        partial.write_text(text)
        os.replace(partial, self.pods_file)  # file_sd must never read half a file

    def stop(self) -> None:
        self.stopping.set()
        if discovery := getattr(self, "discovery", None):
            discovery.join(10)
        terminate(self.proc, grace=10)

    def targets(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]

    def query_range(self, expr: str, start: float, end: float | None = None, step: float = 5) -> list[dict]:
        """The series `expr` yields at any step from `start` to `end` (Unix seconds)."""
        params = {"query": expr, "start": start, "end": end or time.time(), "step": step}
        body = httpx.get(f"{self.url}/api/v1/query_range", params=params, timeout=30).json()
        assert body["status"] == "success", body
        return body["data"]["result"]
