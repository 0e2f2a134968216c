"""The product as its users run it, on a real node (tests/kubenode.py): the operator image built here, the chart
installed with the real `helm` CLI, graphs applied with the real `kubectl`, every request the cluster makes going
where it would in a cluster (the webhook through its Service, the operator to the API server through the
`kubernetes` Service, from pods that run as UID 1000 on a read-only root filesystem)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubecluster import wait_for
from kubenode import kubectl_json, tool

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]  # set-up builds the operator image, starts the node

REPO = Path(__file__).resolve().parent.parent


def test_helm_install_runs_two_operator_replicas_one_leading(chart_on_node):
    pods = kubectl_json(chart_on_node, "get", "pods", "-n", "mmgraph-system")["items"]
    assert len(pods) == 2 and all(_ready(p) for p in pods), [p["status"] for p in pods]
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert (
            pod["spec"]["securityContext"].get("runAsUser"),
            pod["spec"]["securityContext"].get("runAsNonRoot"),
        ) == (1000, True)
    lease = kubectl_json(chart_on_node, "get", "lease", "mmgraph-operator", "-n", "mmgraph-system")
    assert lease["spec"]["holderIdentity"].split("_")[0] in {p["metadata"]["name"] for p in pods}
    config = kubectl_json(chart_on_node, "get", "mutatingwebhookconfiguration", "mmgraph-operator")
    assert all(hook["clientConfig"].get("caBundle") for hook in config["webhooks"])


def test_kubectl_apply_is_checked_by_the_webhook_through_its_service_and_reconciled(chart_on_node):
    """The API server asks the webhook at its Service (kube-proxy to a pod): a bad graph is refused with the
    operator's message, a good one is stamped, and the leader makes its children."""
    tool(chart_on_node, "kubectl", "create", "namespace", "demo")
    graph = yaml.safe_load((REPO / "examples" / "tiny-e-p-d.yaml").read_text())
    bad = json.loads(json.dumps(graph))
    bad["spec"]["topology"] = "e-pd"  # decode is still set
    refused = tool(chart_on_node, "kubectl", "apply", "-n", "demo", "-f", "-", stdin=yaml.safe_dump(bad), check=False)
    assert refused.returncode != 0 and "denied the request" in refused.stderr, refused.stderr
    assert "topology e-pd does not use it" in refused.stderr
    tool(chart_on_node, "kubectl", "apply", "-n", "demo", "-f", "-", stdin=yaml.safe_dump(graph))
    stored = kubectl_json(chart_on_node, "get", "multimodalgraph", "tiny", "-n", "demo")
    assert stored["metadata"]["annotations"]["mmgraph.io/admitted"].startswith("v1.")
    wanted = {f"tiny-{stage}" for stage in ("frontend", "encoder", "pd", "decode")}
    wait_for(
        lambda: (
            {d["metadata"]["name"] for d in kubectl_json(chart_on_node, "get", "deployments", "-n", "demo")["items"]}
            == wanted
        ),
        timeout=60,
        what="the graph's Deployments",
    )
    columns = tool(chart_on_node, "kubectl", "get", "mmg", "-n", "demo").stdout.splitlines()
    assert columns[0].split()[:2] == ["NAME", "TOPOLOGY"] and columns[1].split()[:2] == ["tiny", "e-p-d"], columns


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])
