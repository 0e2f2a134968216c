"""Graphs served from real pods (issue 29): the chart installed by helm on the real node (tests/kubenode.py), the
tiny models on a hostPath PersistentVolume bound to the claim the graphs name, the README's graphs applied with
kubectl (e-p-d and agg on the tiny Qwen2-VL, e-pd on the tiny Qwen2-Audio), and the oracle's requests sent to
each frontend Service's ClusterIP (kube-proxy): each answer is the single in-process engine's tokens. What the
pods need (CPU threads, shared memory, UCX, ports) comes from the operator's render; the test only asks UCX to
say which transport it chose."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubecluster import wait_for
from kubenode import kubectl_json, tool

from mmgraph_workers.media.samples import tone

from .conftest import CLUSTER, NAMESPACE, ask, input_audio, metric, reference_tokens, tokens

# the first test's set-up builds and loads the worker image and starts three graphs of engines on two cores
pytestmark = [pytest.mark.node, pytest.mark.timeout(2400)]

GRAPHS = {"tiny": "tiny-e-p-d.yaml", "tiny-agg": "tiny-agg.yaml", "tiny-audio": "tiny-qwen2-audio.yaml"}
AUDIO_CASES = {"one-clip": ask(input_audio(tone(seconds=2.0)))}
# UCX prints each protocol it selects (transport and lanes) to the pod's log: how the test names what crossed pods
UCX_SAYS = [{"name": "UCX_PROTO_INFO", "value": "y"}]


@pytest.fixture(scope="module")
def graphs(chart_on_node: Any, worker_image: str, node_models: Path) -> Iterator[float]:
    """The README's three graphs, applied at once so their engines load side by side; deleted (their pods before
    the models' folder) when the module ends. Yields when they were applied."""
    node = chart_on_node
    for name, file in GRAPHS.items():
        graph = yaml.safe_load((CLUSTER / file).read_text())
        assert graph["metadata"]["name"] == name and graph["spec"]["image"] == worker_image
        assert graph["spec"]["model"]["pvc"]["claimName"] == "tiny-models"
        if name == "tiny":
            for stage in ("pd", "decode"):
                graph["spec"]["stages"][stage]["env"] = UCX_SAYS
        # as JSON: PyYAML writes "y" bare, which kubectl's YAML 1.1 reads as a boolean
        tool(node, "kubectl", "apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(graph))
    yield time.monotonic()
    tool(node, "kubectl", "delete", "multimodalgraphs", "--all", "-n", NAMESPACE, "--cascade=foreground", "--wait")
    wait_for(lambda: not _pods(node), timeout=120, interval=1, what="the graphs' pods gone")


@pytest.fixture(scope="module")
def audio_reference(node_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    return reference_tokens(node_models / "tiny-qwen2-audio", AUDIO_CASES, tmp_path_factory.mktemp("audio-reference"))


def frontend(node: Any, graphs: float, name: str) -> str:
    """The graph's frontend Service address, once the graph is Ready (printing how long that took)."""
    wait_for(lambda: _phase(node, name) == "Ready", timeout=900, interval=2, what=f"{name} Ready: {_pods(node)}")
    print(f"{name} Ready {time.monotonic() - graphs:.0f} s after the graphs were applied")
    service = kubectl_json(node, "get", "service", f"{name}-frontend", "-n", NAMESPACE)
    return f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"


@pytest.mark.parametrize("case", ["one-image", "two-images", "one-video", "text-only"])
@pytest.mark.parametrize("name", ["tiny", "tiny-agg"])
def test_a_graph_of_pods_answers_with_the_single_engines_tokens(chart_on_node, graphs, reference, name, case):
    assert tokens(frontend(chart_on_node, graphs, name), case) == reference[case]


def test_an_audio_graph_of_pods_answers_a_clip_with_the_single_engines_tokens(chart_on_node, graphs, audio_reference):
    endpoint = frontend(chart_on_node, graphs, "tiny-audio")
    got = tokens(endpoint, "one-clip", model="tiny-qwen2-audio", cases=AUDIO_CASES)
    assert got == audio_reference["one-clip"]


def test_embeddings_and_kv_cross_pods_over_nixl_on_ucx_tcp(chart_on_node, graphs, reference):
    """A prompt no engine has cached: pd pulls its embeddings from the encoder's pod and decode its KV from pd's,
    both over NIXL (the stages' own counters, read at the pods' addresses), and the answer is the oracle's. The
    transport of those reads, as UCX reports its choice: TCP on the pod's interface (the pods share no IPC or PID
    namespace, so neither shared memory nor CMA can reach across), in software emulation (TCP has no remote
    reads: the owner's progress answers them)."""
    node = chart_on_node
    endpoint = frontend(node, graphs, "tiny")
    pd, decode = (_pod_endpoint(node, "tiny", stage) for stage in ("pd", "decode"))
    pulls, moved = "mmgraph_engine_embedding_pull_seconds_count", "vllm:nixl_bytes_transferred_sum"
    before = metric(pd, pulls), metric(decode, moved)
    assert tokens(endpoint, "nixl-probe") == reference["nixl-probe"]
    assert metric(pd, pulls) > before[0], "pd pulled no embeddings over NIXL"
    assert metric(decode, moved) > before[1], "decode's NixlConnector pulled no KV bytes"
    for stage in ("pd", "decode"):
        selector = f"mmgraph.io/graph=tiny,mmgraph.io/stage={stage}"
        log = tool(node, "kubectl", "logs", "-n", NAMESPACE, "-l", selector, "--tail=-1").stdout
        assert ucx_reads(log) == {("software emulation", "tcp/eth0")}, f"{stage}: {ucx_reads(log)}"


def ucx_reads(log: str) -> set[tuple[str, str]]:
    """How UCX carries remote memory reads (NIXL's), from the tables UCX_PROTO_INFO prints: (method, transport)."""
    found, inside = set(), False
    for line in log.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if len(cells) == 1:  # a table's title: the endpoint, then the operation
            inside = cells[0].startswith("remote memory read")
        elif inside and len(cells) == 3 and cells[0] != "Range":
            found.add((cells[1], cells[2]))
    return found


def _pod_endpoint(node: Any, graph: str, stage: str) -> str:
    selector = f"mmgraph.io/graph={graph},mmgraph.io/stage={stage}"
    (pod,) = kubectl_json(node, "get", "pods", "-n", NAMESPACE, "-l", selector)["items"]
    port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    return f"http://{pod['status']['podIP']}:{port}"


def _phase(node: Any, name: str) -> str | None:
    return (kubectl_json(node, "get", "multimodalgraph", name, "-n", NAMESPACE).get("status") or {}).get("phase")


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
