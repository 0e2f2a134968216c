"""Autoscaled stages on the real API server (with kube-controller-manager's HPA controller running): the operator
renders the HPA, hands the Deployment's replicas over without a moment at the default of 1, makes no write when
the replicas change through the scale subresource (as the HPA controller changes them), and takes them back."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from conftest import graph_manifest
from kubecluster import wait_for
from kubernetes import client, dynamic, watch
from test_operator_integration import _operator_writes, create_graph, get_graph, patch_graph

from mmgraph_operator.render import KubeVersion, hpa_api_version

pytestmark = pytest.mark.cluster


class ReplicaWatch:
    """Every spec.replicas the API server reports for one Deployment, from a watch (no poll can miss a dip)."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str):
        self.seen: list[int] = []
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, args=(api, namespace, name), daemon=True)
        self._thread.start()

    def _run(self, api: client.ApiClient, namespace: str, name: str) -> None:
        apps = client.AppsV1Api(api)
        stream = self._watch.stream(
            apps.list_namespaced_deployment, namespace, field_selector=f"metadata.name={name}", timeout_seconds=300
        )
        try:
            for event in stream:
                self.seen.append(event["object"].spec.replicas)
        except Exception:  # stop() closes the stream under the loop
            if not self._stopped:
                raise

    _stopped = False

    def stop(self) -> list[int]:
        self._stopped = True
        self._watch.stop()
        self._thread.join(10)
        return self.seen


def child_writes(cluster: Any, namespace: str) -> list[tuple[str, str]]:
    return [
        (e["verb"], e["requestURI"])
        for e in _operator_writes(cluster)
        if e["objectRef"].get("namespace") == namespace and e["objectRef"]["resource"] != "multimodalgraphs"
    ]


def test_autoscaling_on_and_off_never_drops_the_live_replicas(api, cluster, operator, namespace):
    body = graph_manifest("g", namespace)
    body["spec"]["stages"]["pd"]["replicas"] = 3
    create_graph(api, body)
    apps = client.AppsV1Api(api)
    server = client.VersionApi(api).get_code()
    version = hpa_api_version(KubeVersion.parse(f"{server.major}.{server.minor}"))  # what the operator renders here
    hpas = dynamic.DynamicClient(api).resources.get(api_version=version, kind="HorizontalPodAutoscaler")
    wait_for(lambda: apps.read_namespaced_deployment("g-pd", namespace).spec.replicas == 3, what="3 pd replicas")
    watcher = ReplicaWatch(api, namespace, "g-pd")
    try:
        # On, with another change in the same edit: the Deployment is applied without replicas at once, while
        # the operator still owns them; the handover keeps them at 3 (without it, the server would reset them to 1).
        autoscaling = {"minReplicas": 2, "maxReplicas": 5, "metric": "waiting", "targetAverageValue": "2"}
        env = [{"name": "MMGRAPH_TEST", "value": "1"}]
        patch_graph(api, namespace, "g", {"spec": {"stages": {"pd": {"autoscaling": autoscaling, "env": env}}}})
        hpa = wait_for(lambda: hpas.get(name="g-pd", namespace=namespace).to_dict(), what="the HPA")
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
        assert hpa["spec"]["scaleTargetRef"]["name"] == "g-pd"
        wait_for(
            lambda: any(e.name == "MMGRAPH_TEST" for e in _container(apps, namespace).env or []),
            what="the edit applied",
        )
        time.sleep(1)  # the watch has seen what followed the apply
        assert apps.read_namespaced_deployment("g-pd", namespace).spec.replicas == 3
        assert min(watcher.seen) == 3, watcher.seen
        managers = {m.manager for m in apps.read_namespaced_deployment("g-pd", namespace).metadata.managed_fields}
        assert "mmgraph-operator-handover" in managers

        # The HPA controller's write, through the scale subresource: the operator writes nothing to the children
        # and reports the new count.
        time.sleep(2)
        before = len(child_writes(cluster, namespace))
        apps.patch_namespaced_deployment_scale("g-pd", namespace, {"spec": {"replicas": 4}})
        wait_for(
            lambda: get_graph(api, namespace, "g")["status"]["stages"]["pd"]["replicas"] == 4, what="status shows 4"
        )
        time.sleep(3)
        assert child_writes(cluster, namespace)[before:] == []
        assert apps.read_namespaced_deployment("g-pd", namespace).spec.replicas == 4

        # Off: the HPA goes and the spec's replicas apply again (force-applied: the operator owns them once more).
        patch_graph(api, namespace, "g", {"spec": {"stages": {"pd": {"autoscaling": None, "replicas": 3}}}})
        wait_for(lambda: not hpas.get(namespace=namespace).items, what="the HPA gone")
        wait_for(lambda: apps.read_namespaced_deployment("g-pd", namespace).spec.replicas == 3, what="back to 3")
    finally:
        seen = watcher.stop()
    assert seen and min(seen) >= 3, seen  # never the default of 1 (nor anything below what was asked)
    assert 4 in seen


def _container(apps: client.AppsV1Api, namespace: str) -> client.V1Container:
    return apps.read_namespaced_deployment("g-pd", namespace).spec.template.spec.containers[0]
