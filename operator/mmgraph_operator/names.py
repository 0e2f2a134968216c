"""What a graph's children are called and labelled: render writes these names, labels and owner references, and
the loop (reconcile.py) finds and watches children by them.
"""

from __future__ import annotations

from typing import Any

from mmgraph_contract.graph import MultimodalGraph
from mmgraph_contract.vocabulary import API_VERSION, KIND, StageName

GRAPH_LABEL = "mmgraph.io/graph"
STAGE_LABEL = "mmgraph.io/stage"
MANAGED_BY = "mmgraph-operator"
# on the Deployment of a stage whose pods serve the OpenAI API besides their own (agg's pd): the loop moves the
# API's Service onto them only once they are rolled out
SERVES_API = "mmgraph.io/serves-api"


def child_name(graph: str, stage: StageName) -> str:
    """The name of a stage's Deployment, Service and PodDisruptionBudget."""
    return f"{graph}-{stage.value}"


def _labels(graph: MultimodalGraph, stage: StageName | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "mmgraph",
        "app.kubernetes.io/instance": graph.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        GRAPH_LABEL: graph.name,
    }
    if stage is not None:
        labels["app.kubernetes.io/component"] = stage.value
        labels[STAGE_LABEL] = stage.value
    return labels


def _selector(graph: MultimodalGraph, stage: StageName | None = None) -> dict[str, str]:
    selector = {GRAPH_LABEL: graph.name}
    if stage is not None:
        selector[STAGE_LABEL] = stage.value
    return selector


def _metadata(graph: MultimodalGraph, name: str, stage: StageName | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": graph.namespace, "labels": _labels(graph, stage)}
    uid = graph.metadata.get("uid")
    if uid:
        meta["ownerReferences"] = [
            {"apiVersion": API_VERSION, "kind": KIND, "name": graph.name, "uid": uid, "controller": True}
        ]
    return meta
