"""spec.monitoring on the real API server: the Prometheus Operator's kinds are optional. The session's operator
started on a cluster without them (and works); a graph that asks for a PodMonitor there runs and is Degraded with
what to do, and gets its PodMonitor once the CRD is installed, without an operator restart."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from conftest import graph_manifest
from kubecluster import wait_for
from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException
from test_operator_integration import E_P_D_CHILDREN, _events, children, condition, create_graph, get_graph

pytestmark = pytest.mark.cluster

POD_MONITOR_CRD: dict[str, Any] = {  # the Prometheus Operator's CRD, reduced to what a test needs
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "podmonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {"kind": "PodMonitor", "plural": "podmonitors", "singular": "podmonitor"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                    }
                },
            }
        ],
    },
}


def test_a_pod_monitor_on_a_cluster_without_the_prometheus_operator(api, operator, namespace):
    body = graph_manifest("g", namespace)
    body["spec"]["monitoring"] = {"podMonitor": True, "labels": {"release": "kps"}}
    create_graph(api, body)
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="everything else applied")
    graph = wait_for(
        lambda: (g := get_graph(api, namespace, "g")).get("status", {}).get("phase") == "Degraded" and g,
        what="Degraded",
    )
    degraded = condition(graph, "Degraded")
    assert degraded["reason"] == "KindNotServed", degraded
    assert "PodMonitor (monitoring.coreos.com/v1)" in degraded["message"]
    assert "install the Prometheus Operator's CRDs" in degraded["message"]
    assert set(graph["status"]["stages"]) == {"frontend", "encoder", "pd", "decode"}  # the rest runs, reported
    wait_for(lambda: ("Warning", "KindNotServed") in _events(api, namespace, "g"), what="the Warning Event")

    ext = client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(POD_MONITOR_CRD)
    try:
        wait_for(
            lambda: any(
                c.type == "Established" and c.status == "True"
                for c in ext.read_custom_resource_definition(POD_MONITOR_CRD["metadata"]["name"]).status.conditions
                or []
            ),
            what="CRD Established",
        )
        monitors = dynamic.DynamicClient(api).resources.get(api_version="monitoring.coreos.com/v1", kind="PodMonitor")
        monitor = wait_for(lambda: monitors.get(namespace=namespace).items, timeout=60, what="the PodMonitor")[0]
        assert monitor.metadata.labels["release"] == "kps"
        assert [e.port for e in monitor.spec.podMetricsEndpoints] == ["http"]
        wait_for(
            lambda: condition(get_graph(api, namespace, "g"), "Degraded")["status"] == "False",
            timeout=60,
            what="Degraded cleared",
        )
        assert _events(api, namespace, "g").count(("Warning", "KindNotServed")) == 1
    finally:
        with contextlib.suppress(ApiException):
            ext.delete_custom_resource_definition(POD_MONITOR_CRD["metadata"]["name"])
