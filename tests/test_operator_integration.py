"""The operator against a real kube-apiserver + etcd + kube-controller-manager (no kubelet, no scheduler)."""

from __future__ import annotations

import base64
import copy
import time
from typing import Any

import pytest
from argocd import health
from conftest import graph_manifest, webhook_absent
from kubecluster import OPERATOR_USER, OperatorProcess, operator_writes, wait_for
from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.cluster

GRAPHS = ("mmgraph.io", "v1alpha1", "multimodalgraphs")


def create_graph(api: client.ApiClient, body: dict[str, Any]) -> dict[str, Any]:
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        *GRAPHS[:2], body["metadata"]["namespace"], GRAPHS[2], body
    )


def get_graph(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(*GRAPHS[:2], ns, GRAPHS[2], name)


def patch_graph(api: client.ApiClient, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    return client.CustomObjectsApi(api).patch_namespaced_custom_object(*GRAPHS[:2], ns, GRAPHS[2], name, patch)


CHILD_KINDS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "PodDisruptionBudget": "policy/v1beta1",  # what a 1.20 server serves
    "NetworkPolicy": "networking.k8s.io/v1",
}


def children(api: client.ApiClient, ns: str, graph: str) -> dict[str, set[str]]:
    """Names of the graph's children by kind, read from the API server."""
    dyn = dynamic.DynamicClient(api)
    out = {}
    for kind, version in CHILD_KINDS.items():
        items = dyn.resources.get(api_version=version, kind=kind).get(
            namespace=ns, label_selector=f"mmgraph.io/graph={graph}"
        )
        out[kind] = {item.metadata.name for item in items.items}
    return out


E_P_D_CHILDREN = {
    "Deployment": {"g-frontend", "g-encoder", "g-pd", "g-decode"},
    "Service": {"g-frontend", "g-encoder", "g-pd", "g-decode"},
    "PodDisruptionBudget": {"g-frontend", "g-decode"},  # the stages with more than one replica
    "NetworkPolicy": {"g-frontend", "g-encoder", "g-pd", "g-decode"},
}


def condition(graph: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (graph.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def test_create_makes_every_child_with_owner_and_status(api, operator, namespace):
    create_graph(api, graph_manifest("g", namespace))
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="all children")
    dep = client.AppsV1Api(api).read_namespaced_deployment("g-pd", namespace)
    owner = dep.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.controller) == ("MultimodalGraph", "g", True)
    container = dep.spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert container.args[:2] == ["worker", "pd"]
    assert "--kv-role=producer" in container.args
    assert container.startup_probe.failure_threshold * container.startup_probe.period_seconds >= 600
    assert any(v.name == "dshm" and v.empty_dir.medium == "Memory" for v in dep.spec.template.spec.volumes)
    svc = client.CoreV1Api(api).read_namespaced_service("g-encoder", namespace)
    assert svc.spec.cluster_ip == "None"  # headless: peers resolve every ready pod
    graph = wait_for(lambda: (g := get_graph(api, namespace, "g")).get("status", {}).get("stages") and g, what="status")
    status = graph["status"]
    assert status["observedGeneration"] == graph["metadata"]["generation"]
    assert status["endpoint"] == f"http://g-frontend.{namespace}.svc:8000"
    assert set(status["stages"]) == {"frontend", "encoder", "pd", "decode"}
    assert condition(graph, "Ready")["status"] == "False"  # no kubelet: pods never become ready by themselves
    assert condition(graph, "Degraded")["status"] == "False"
    assert status["phase"] == "Progressing"
    assert health(graph) == ("Progressing", condition(graph, "Ready")["message"])  # Argo CD: "waiting for ..."


def test_the_peer_credential_is_created_once_and_never_readable_by_the_operator(api, operator, namespace):
    """Every pod gets the graph's credential from a Secret the operator created; status records it (so a restart
    creates nothing); the operator's own RBAC cannot read any Secret; the graph's deletion takes it along."""
    create_graph(api, graph_manifest("g", namespace))
    graph = wait_for(lambda: (g := get_graph(api, namespace, "g")).get("status", {}).get("stages") and g, what="status")
    name = f"g-peer-credential-{graph['metadata']['uid'][:8]}"  # a graph created again gets a Secret of its own
    assert graph["status"]["peerCredential"] == name
    core = client.CoreV1Api(api)
    secret = core.read_namespaced_secret(name, namespace)
    assert (secret.metadata.owner_references[0].kind, secret.metadata.owner_references[0].name) == (
        "MultimodalGraph",
        "g",
    )
    assert len(base64.b64decode(secret.data["token"])) >= 32
    for deployment in ("g-frontend", "g-encoder", "g-pd", "g-decode"):
        pod = client.AppsV1Api(api).read_namespaced_deployment(deployment, namespace).spec.template.spec
        container = pod.containers[0]
        ref = next(e for e in container.env if e.name == "MMGRAPH_PEER_TOKEN").value_from.secret_key_ref
        assert (ref.name, ref.key) == (name, "token")
        assert "--peer-token-env=MMGRAPH_PEER_TOKEN" in container.args
    for verb in ("get", "list", "watch"):
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=OPERATOR_USER,
                resource_attributes=client.V1ResourceAttributes(verb=verb, resource="secrets", namespace=namespace),
            )
        )
        assert not client.AuthorizationV1Api(api).create_subject_access_review(review).status.allowed, verb
    client.CustomObjectsApi(api).delete_namespaced_custom_object(
        *GRAPHS[:2], namespace, GRAPHS[2], "g", _preload_content=False
    )
    wait_for(
        lambda: not core.list_namespaced_secret(namespace, field_selector=f"metadata.name={name}").items,
        timeout=30,
        what="the Secret collected with its graph",
    )


def test_update_changes_children_and_topology_change_deletes_unneeded(api, operator, namespace):
    create_graph(api, graph_manifest("g", namespace))
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="children")
    apps = client.AppsV1Api(api)
    patch_graph(api, namespace, "g", {"spec": {"image": "example.com/worker:2", "stages": {"pd": {"replicas": 3}}}})
    wait_for(lambda: apps.read_namespaced_deployment("g-pd", namespace).spec.replicas == 3, what="pd scaled")
    dep = apps.read_namespaced_deployment("g-encoder", namespace)
    assert dep.spec.template.spec.containers[0].image == "example.com/worker:2"
    wait_for(lambda: "g-pd" in children(api, namespace, "g")["PodDisruptionBudget"], what="pd PDB")
    # e-p-d -> e-pd: decode is no longer used; its Deployment, Service and PDB must go.
    patch_graph(api, namespace, "g", {"spec": {"topology": "e-pd", "stages": {"decode": None}}})
    want = {
        "Deployment": {"g-frontend", "g-encoder", "g-pd"},
        "Service": {"g-frontend", "g-encoder", "g-pd"},
        "PodDisruptionBudget": {"g-frontend", "g-pd"},
        "NetworkPolicy": {"g-frontend", "g-encoder", "g-pd"},
    }
    wait_for(lambda: children(api, namespace, "g") == want, what="decode pruned")
    args = apps.read_namespaced_deployment("g-frontend", namespace).spec.template.spec.containers[0].args
    assert "--topology=e-pd" in args and not any(a.startswith("--decode-url") for a in args)
    graph = wait_for(
        lambda: (
            (g := get_graph(api, namespace, "g"))["status"].get("observedGeneration") == g["metadata"]["generation"]
            and g
        ),
        what="status caught up",
    )
    assert set(graph["status"]["stages"]) == {"frontend", "encoder", "pd"}
    # e-pd -> agg: pd's pods serve the API themselves. Until pd has rolled out pods that do, nothing goes: the
    # frontend keeps serving, through the encoder it calls, and its Service still selects it. Then the e-pd
    # objects go and the Service selects pd's pods. (The same handover moves an older operator's agg graph.)
    patch_graph(api, namespace, "g", {"spec": {"topology": "agg", "stages": {"encoder": None}}})
    core = client.CoreV1Api(api)
    selector = lambda: core.read_namespaced_service("g-frontend", namespace).spec.selector["mmgraph.io/stage"]  # noqa: E731
    pd_args = lambda: apps.read_namespaced_deployment("g-pd", namespace).spec.template.spec.containers[0].args  # noqa: E731
    wait_for(lambda: "--openai" in pd_args(), what="pd rolling out pods that serve the API")
    time.sleep(2)
    assert selector() == "frontend" and children(api, namespace, "g") == want  # e-pd's objects, all kept
    agg = {"Deployment": {"g-pd"}, "Service": {"g-frontend", "g-pd"}, "PodDisruptionBudget": {"g-pd"}}
    agg["NetworkPolicy"] = {"g-pd"}
    # pd's new pods become ready (the kubelet's part, played here) and the old ones go: then the handover
    wait_for(
        lambda: play_kubelet_mark_ready(api, namespace, "g") >= 0 and children(api, namespace, "g") == agg,
        timeout=60,
        what="the frontend folded into pd",
    )
    assert selector() == "pd"
    graph = wait_for(
        lambda: (
            (g := get_graph(api, namespace, "g"))["status"].get("observedGeneration") == g["metadata"]["generation"]
            and g
        ),
        what="status caught up",
    )
    assert set(graph["status"]["stages"]) == {"pd"}
    # agg -> e-pd: the Service stays on pd's pods until the new frontend's are ready, then moves to them.
    patch_graph(api, namespace, "g", {"spec": {"topology": "e-pd", "stages": {"encoder": {"gpus": 0}}}})
    wait_for(lambda: {"g-frontend", "g-encoder"} <= children(api, namespace, "g")["Deployment"], what="e-pd again")
    time.sleep(2)
    assert selector() == "pd"
    wait_for(
        lambda: play_kubelet_mark_ready(api, namespace, "g") >= 0 and selector() == "frontend",
        timeout=60,
        what="the API moved to the frontend",
    )


def test_scrape_from_null_is_kept_and_means_no_scrape_rule(api, operator, namespace):
    """spec.networkPolicy.scrapeFrom has a default (the namespace named monitoring) and null is a choice: the API
    server stores null rather than defaulting it, and the operator then renders no scrape rule."""
    create_graph(api, graph_manifest("g", namespace))
    create_graph(api, graph_manifest("h", namespace, networkPolicy={"scrapeFrom": None}))
    assert get_graph(api, namespace, "g")["spec"]["networkPolicy"]["scrapeFrom"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
    }
    assert get_graph(api, namespace, "h")["spec"]["networkPolicy"]["scrapeFrom"] is None
    networking = client.NetworkingV1Api(api)

    def scrapers(graph: str) -> list:
        policy = wait_for(
            lambda: next(
                (
                    p
                    for p in networking.list_namespaced_network_policy(namespace).items
                    if p.metadata.name == f"{graph}-pd"
                ),
                None,
            ),
            what=f"{graph}'s pd policy",
        )
        return [
            peer.namespace_selector
            for rule in policy.spec.ingress
            for peer in rule._from or []
            if peer.namespace_selector
        ]

    assert [s.match_labels for s in scrapers("g")] == [{"kubernetes.io/metadata.name": "monitoring"}]
    assert scrapers("h") == []


def test_deleted_or_edited_child_is_restored(api, operator, namespace):
    create_graph(api, graph_manifest("g", namespace))
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="children")
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    apps.delete_namespaced_deployment("g-decode", namespace, _preload_content=False)
    core.delete_namespaced_service("g-encoder", namespace, _preload_content=False)
    client.NetworkingV1Api(api).delete_namespaced_network_policy("g-pd", namespace, _preload_content=False)
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="children restored")
    apps.patch_namespaced_deployment("g-pd", namespace, {"spec": {"replicas": 7}})
    wait_for(lambda: apps.read_namespaced_deployment("g-pd", namespace).spec.replicas == 1, what="replicas reverted")
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "pd", "image": "evil.example/x:1"}]}}}}
    apps.patch_namespaced_deployment("g-pd", namespace, patch)
    wait_for(
        lambda: (
            apps.read_namespaced_deployment("g-pd", namespace).spec.template.spec.containers[0].image
            == "localhost/mmgraph/worker:0.1.0"
        ),
        what="image reverted",
    )


def test_graph_deleted_collects_everything(api, operator, namespace):
    create_graph(api, graph_manifest("g", namespace))
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="children")
    wait_for(
        lambda: client.AppsV1Api(api).list_namespaced_replica_set(namespace).items,
        what="controller-manager made ReplicaSets",
    )
    client.CustomObjectsApi(api).delete_namespaced_custom_object(
        *GRAPHS[:2], namespace, GRAPHS[2], "g", _preload_content=False
    )
    empty = {k: set() for k in E_P_D_CHILDREN}
    wait_for(lambda: children(api, namespace, "g") == empty, timeout=30, what="garbage collection")
    wait_for(lambda: not client.AppsV1Api(api).list_namespaced_replica_set(namespace).items, timeout=30, what="RS gone")


def play_kubelet_mark_ready(api: client.ApiClient, namespace: str, graph: str) -> int:
    """Stands in for the kubelet, which this test cluster lacks: marks the graph's pods Running and Ready."""
    core = client.CoreV1Api(api)
    pods = core.list_namespaced_pod(namespace, label_selector=f"mmgraph.io/graph={graph}").items
    for pod in pods:
        now = "2026-01-01T00:00:00Z"
        status = {
            "phase": "Running",
            "podIP": "10.1.0.1",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": now}
                for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
            ],
            "containerStatuses": [
                {
                    "name": pod.spec.containers[0].name,
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "image": pod.spec.containers[0].image,
                    "imageID": "",
                    "state": {"running": {"startedAt": now}},
                }
            ],
        }
        core.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": status})
    return len(pods)


def test_ready_condition_follows_pod_readiness(api, operator, namespace):
    body = graph_manifest("g", namespace)
    body["spec"]["stages"]["frontend"]["replicas"] = 1
    body["spec"]["stages"]["decode"]["replicas"] = 1
    create_graph(api, body)
    wait_for(lambda: len(client.CoreV1Api(api).list_namespaced_pod(namespace).items) == 4, timeout=30, what="4 pods")
    assert play_kubelet_mark_ready(api, namespace, "g") == 4
    graph = wait_for(
        lambda: (
            (g := get_graph(api, namespace, "g"))
            and condition(g, "Ready")
            and condition(g, "Ready")["status"] == "True"
            and g
        ),
        timeout=30,
        what="Ready=True",
    )
    assert graph["status"]["readyStages"] == "4/4"
    assert graph["status"]["phase"] == "Ready"
    assert graph["status"]["stages"]["pd"] == {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}
    assert health(graph) == ("Healthy", "every stage is rolled out and ready")  # what Argo CD shows


def _operator_writes(cluster) -> list[dict[str, Any]]:
    """What the operator's account wrote, in every namespace (a write the server refused wrote nothing), but the
    leader Lease's renewals (test_ha.py counts those)."""
    return [e for e in operator_writes(cluster) if e["objectRef"]["resource"] != "leases"]


def _settled(cluster) -> int:
    """The operator's write count once it has stopped growing (the controller-manager writing the Deployments'
    status pokes the operator for a while after a create)."""
    before = -1
    while (now := len(_operator_writes(cluster))) != before:
        before = now
        time.sleep(3)
    return now


def _events(api: client.ApiClient, namespace: str, name: str) -> list[tuple[str, str]]:
    items = client.CoreV1Api(api).list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return sorted((e.type, e.reason) for e in items)


def test_unchanged_graphs_cause_no_writes_even_across_restart(api, operator, namespace, cluster):
    """A running graph and a Degraded one: once settled, a restarted operator reconciles both and writes nothing,
    in any namespace: no apply, no status patch, and no second Warning Event (the Degraded condition in the
    stored status, not the process's memory, says the Event was posted)."""
    create_graph(api, graph_manifest("g", namespace))
    bad = graph_manifest("bad", namespace)
    bad["spec"]["topology"] = "e-pd"  # decode is still set: invalid
    with webhook_absent(api):
        create_graph(api, bad)
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="children")
    wait_for(lambda: get_graph(api, namespace, "g").get("status", {}).get("stages"), what="status")
    wait_for(lambda: _events(api, namespace, "bad") == [("Warning", "InvalidSpec")], what="the Warning Event")
    before = _settled(cluster)
    operator.stop()
    operator.start()
    passes = "mmgraph_operator_reconciles_total"
    wait_for(lambda: operator.metric(f'{passes}{{result="applied"}}') >= 1, what="the running graph reconciled")
    wait_for(lambda: operator.metric(f'{passes}{{result="degraded"}}') >= 1, what="the Degraded graph reconciled")
    time.sleep(3)
    writes = _operator_writes(cluster)[before:]
    assert writes == [], [(e["verb"], e["requestURI"]) for e in writes]
    assert _events(api, namespace, "bad") == [("Warning", "InvalidSpec")]


def test_operator_restarted_midway_converges_without_duplicates(api, operator, namespace):
    """Stopped while it was creating five graphs' children, restarted: each graph ends with exactly its children,
    each owned by that graph alone, and nothing else of their kinds is in the namespace."""
    for i in range(5):
        create_graph(api, graph_manifest(f"g{i}", namespace))
    wait_for(lambda: client.AppsV1Api(api).list_namespaced_deployment(namespace).items, what="first children")
    operator.stop()  # mid-way: some graphs have children, some have none yet
    operator.start()
    for i in range(5):
        want = {kind: {n.replace("g-", f"g{i}-", 1) for n in names} for kind, names in E_P_D_CHILDREN.items()}
        wait_for(lambda i=i, want=want: children(api, namespace, f"g{i}") == want, what=f"g{i} children")
    uids = {f"g{i}": get_graph(api, namespace, f"g{i}")["metadata"]["uid"] for i in range(5)}
    dyn = dynamic.DynamicClient(api)
    for kind, version in CHILD_KINDS.items():
        items = dyn.resources.get(api_version=version, kind=kind).get(namespace=namespace).items
        assert len(items) == 5 * len(E_P_D_CHILDREN[kind]), (kind, [i.metadata.name for i in items])
        for item in items:
            graph = item.metadata.labels["mmgraph.io/graph"]
            refs = [(r.kind, r.name, r.uid, r.controller) for r in item.metadata.ownerReferences]
            assert refs == [("MultimodalGraph", graph, uids[graph], True)], (kind, item.metadata.name, refs)


def test_a_running_graph_turned_invalid_keeps_its_children(api, cluster, operator, namespace):
    """Forced past the webhook, an edit that makes a running graph invalid is reported Degraded; what runs is left
    as it was (nothing pruned, nothing rewritten), and Ready keeps its transition time."""
    create_graph(api, graph_manifest("g", namespace))
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="children")
    ready = wait_for(lambda: condition(get_graph(api, namespace, "g"), "Ready"), what="Ready condition")
    apps = client.AppsV1Api(api)
    generations = {d.metadata.name: d.metadata.generation for d in apps.list_namespaced_deployment(namespace).items}
    with webhook_absent(api):
        patch_graph(api, namespace, "g", {"spec": {"topology": "e-pd"}})  # decode is still set: invalid
    graph = wait_for(
        lambda: (g := get_graph(api, namespace, "g"))["status"]["phase"] == "Degraded" and g, what="Degraded"
    )
    degraded = condition(graph, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert "topology e-pd does not use it" in degraded["message"]
    assert health(graph) == ("Degraded", degraded["message"])  # Argo CD shows the operator's message
    assert condition(graph, "Ready")["lastTransitionTime"] == ready["lastTransitionTime"]
    time.sleep(2)
    assert children(api, namespace, "g") == E_P_D_CHILDREN
    assert {
        d.metadata.name: d.metadata.generation for d in apps.list_namespaced_deployment(namespace).items
    } == generations
    assert ("Warning", "InvalidSpec") in _events(api, namespace, "g")


def test_a_child_the_server_refuses_is_reported_apply_failed(api, operator, namespace):
    """A graph the schema and webhook accept but whose Deployment the API server refuses (422: a toleration
    operator Kubernetes does not know) is Degraded with reason ApplyFailed and the server's message, once."""
    body = graph_manifest("g", namespace)
    body["spec"]["stages"]["pd"]["tolerations"] = [{"key": "gpu", "operator": "Sometimes"}]
    create_graph(api, body)
    graph = wait_for(
        lambda: (g := get_graph(api, namespace, "g")).get("status", {}).get("phase") == "Degraded" and g,
        what="Degraded",
    )
    degraded = condition(graph, "Degraded")
    assert degraded["reason"] == "ApplyFailed" and "Unsupported value" in degraded["message"], degraded
    assert "g-pd" not in children(api, namespace, "g")["Deployment"]
    wait_for(lambda: ("Warning", "ApplyFailed") in _events(api, namespace, "g"), what="the Warning Event")
    time.sleep(3)  # child events keep poking the graph: the Event is still posted once
    assert _events(api, namespace, "g").count(("Warning", "ApplyFailed")) == 1


def test_watch_namespaces_reconciles_only_those(api, cluster, operator, operator_kubeconfig, namespace):
    """`--namespace` (the chart's watchNamespaces): graphs there are reconciled, graphs elsewhere are not."""
    other = f"{namespace}-other"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": other}})
    operator.stop()  # the session's operator watches every namespace
    # serves the registered webhook meanwhile
    scoped = OperatorProcess(
        operator_kubeconfig, cluster.workdir, (namespace,), name="scoped", webhook_port=operator.webhook_port
    )
    try:
        scoped.start()
        create_graph(api, graph_manifest("g", namespace))
        create_graph(api, graph_manifest("g", other))
        wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="children in the watched namespace")
        time.sleep(3)
        assert children(api, other, "g") == {kind: set() for kind in E_P_D_CHILDREN}
        assert "status" not in get_graph(api, other, "g")
    finally:
        scoped.stop()
        operator.start()
        client.CoreV1Api(api).delete_namespace(other)


def test_changing_config_rolls_pods(api, operator, namespace):
    create_graph(api, graph_manifest("g", namespace))
    apps = client.AppsV1Api(api)
    wait_for(
        lambda: apps.list_namespaced_replica_set(namespace, label_selector="mmgraph.io/stage=encoder").items, what="rs"
    )
    patch_graph(api, namespace, "g", {"spec": {"media": {"maxPixels": 1024}}})
    wait_for(
        lambda: len(apps.list_namespaced_replica_set(namespace, label_selector="mmgraph.io/stage=encoder").items) == 2,
        what="a second ReplicaSet (new pod template) for the encoder",
    )
    args = apps.read_namespaced_deployment("g-encoder", namespace).spec.template.spec.containers[0].args
    assert "--max-pixels=1024" in args


def test_dry_run_server_accepts_every_rendered_child(api, dyn: dynamic.DynamicClient, namespace):
    """The manifests `render` produces (for the test server's version) pass the API server's own validation."""
    from mmgraph_contract.graph import parse
    from mmgraph_operator.render import render

    for example in ("qwen2.5-vl-e-p-d.yaml", "llava-agg.yaml", "tiny-e-p-d.yaml"):
        import yaml
        from kubecluster import REPO

        body = yaml.safe_load((REPO / "examples" / example).read_text())
        body["metadata"]["namespace"] = namespace
        for manifest in render(parse(copy.deepcopy(body)), "1.20"):
            resource = dyn.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
            try:
                resource.create(body=manifest, namespace=namespace, query_params=[("dryRun", "All")])
            except ApiException as err:
                raise AssertionError(
                    f"{example}: {manifest['kind']} {manifest['metadata']['name']}: {err.body}"
                ) from None
