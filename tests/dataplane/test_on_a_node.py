"""A graph served from real pods (issue 29): the chart installed by helm on the real node (tests/kubenode.py), the
tiny model on a hostPath PersistentVolume bound to the PVC the graph names, the graph applied with kubectl, and
the oracle's requests sent to the frontend Service's ClusterIP (kube-proxy): each answer is the single in-process
engine's tokens. What the pods need (CPU threads, shared memory, UCX, ports) comes from the operator's render."""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubecluster import wait_for
from kubenode import kubectl_json, tool

from .conftest import REPO, metric, tokens

# the first test's set-up builds and loads the worker image and starts a graph of engines on two cores
pytestmark = [pytest.mark.node, pytest.mark.timeout(2400)]

NAMESPACE = "serving"


@pytest.fixture(scope="module")
def model_claim(chart_on_node: Any, tiny_model: Path) -> Iterator[str]:
    """The tiny model on a hostPath PersistentVolume, bound to the PVC `tiny` (readable by the pods' UID 1000)."""
    node = chart_on_node
    shared = Path(tempfile.mkdtemp(prefix="mmgraph-node-models-"))  # outside pytest's 0700 directories
    try:
        shutil.copytree(tiny_model, shared / "tiny-qwen2-vl")
        for path in [shared, *shared.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IRGRP | stat.S_IROTH | (0o055 if path.is_dir() else 0))
        # the README's file, on this test's copy of the model
        volumes = (REPO / "examples" / "cluster" / "tiny-model-volume.yaml").read_text()
        volumes = volumes.replace("/var/lib/mmgraph/models", str(shared))
        tool(node, "kubectl", "create", "namespace", NAMESPACE)
        tool(node, "kubectl", "apply", "-f", "-", stdin=volumes)
        yield "tiny"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture(scope="module")
def served(chart_on_node: Any, worker_image: str, model_claim: str) -> Iterator[str]:
    """The README's graph (examples/tiny-e-p-d-cpu-cluster.yaml: the worker image built here, the model from the
    PVC, at most a CPU each for the encoder and the engines); the frontend Service's address once it is Ready."""
    node = chart_on_node
    graph = yaml.safe_load((REPO / "examples" / "tiny-e-p-d-cpu-cluster.yaml").read_text())
    assert graph["spec"]["image"] == worker_image and graph["spec"]["model"]["pvc"]["claimName"] == model_claim
    tool(node, "kubectl", "apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump(graph))
    wait_for(lambda: _phase(node) == "Ready", timeout=600, interval=2, what=f"the graph Ready: {_pods(node)}")
    service = kubectl_json(node, "get", "service", "tiny-frontend", "-n", NAMESPACE)
    yield f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
    # its engines go before the model's folder does
    tool(node, "kubectl", "delete", "multimodalgraph", "tiny", "-n", NAMESPACE, "--cascade=foreground", "--wait")
    wait_for(lambda: not _pods(node), timeout=120, interval=1, what="the graph's pods gone")


@pytest.mark.parametrize("case", ["one-image", "two-images", "one-video", "text-only"])
def test_a_graph_of_pods_answers_with_the_single_engines_tokens(served, reference, case):
    assert tokens(served, case) == reference[case]


def test_embeddings_and_kv_cross_pods_over_nixl(chart_on_node, served, reference):
    """A prompt no engine has cached: pd pulls its embeddings from the encoder's pod and decode its KV from pd's,
    both over NIXL (the stages' own counters, read at the pods' addresses), and the answer is the oracle's."""
    pd, decode = (_pod_endpoint(chart_on_node, stage) for stage in ("pd", "decode"))
    pulls, moved = "mmgraph_engine_embedding_pull_seconds_count", "vllm:nixl_bytes_transferred_sum"
    before = metric(pd, pulls), metric(decode, moved)
    assert tokens(served, "nixl-probe") == reference["nixl-probe"]
    assert metric(pd, pulls) > before[0], "pd pulled no embeddings over NIXL"
    assert metric(decode, moved) > before[1], "decode's NixlConnector pulled no KV bytes"


def _pod_endpoint(node: Any, stage: str) -> str:
    (pod,) = kubectl_json(node, "get", "pods", "-n", NAMESPACE, "-l", f"mmgraph.io/stage={stage}")["items"]
    port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    return f"http://{pod['status']['podIP']}:{port}"


def _phase(node: Any) -> str | None:
    return (kubectl_json(node, "get", "multimodalgraph", "tiny", "-n", NAMESPACE).get("status") or {}).get("phase")


def _pods(node: Any) -> list[tuple[str, str, list[str]]]:
    """Each pod's name, phase and its containers' waiting or terminated reasons: what a timeout says."""
    out = []
    for pod in kubectl_json(node, "get", "pods", "-n", NAMESPACE)["items"]:
        states = [
            (s.get("state", {}).get("waiting") or s.get("state", {}).get("terminated") or {}).get("reason", "")
            for s in pod["status"].get("containerStatuses") or []
        ]
        out.append((pod["metadata"]["name"], pod["status"]["phase"], states))
    return out
