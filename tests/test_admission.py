"""The operator lends no power (issue 28), on the real API server with the session's operator and webhook.

A graph's author is a ServiceAccount bound to a Role that allows only MultimodalGraphs. What the graph's pods would
borrow (a Secret, a PersistentVolumeClaim, a ServiceAccount) the webhook refuses unless the author could use it; a
spec that got past the webhook is never applied; an object of a child's name that the graph does not own is left
alone and named.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import graph_manifest, webhook_absent
from kubecluster import OperatorProcess, wait_for
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from test_operator_integration import E_P_D_CHILDREN, GRAPHS, children, condition, create_graph, get_graph, patch_graph

from mmgraph_contract.graph import MultimodalGraph, parse
from mmgraph_operator.admission import AdmissionKey
from mmgraph_operator.webhook import needs

AUTHOR = "author"
GRAPH_RIGHTS = [{"apiGroups": ["mmgraph.io"], "resources": ["multimodalgraphs"], "verbs": ["*"]}]
SECRET_RIGHTS = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["api-key"]}]


# ---- offline: what the webhook asks about, and the stamp ------------------------------------------------------


def full_graph() -> MultimodalGraph:
    """A graph whose pods would borrow one of everything a spec can name."""
    body = with_api_key(graph_manifest("g", "team"))
    body["spec"].update(serviceAccountName="builder", imagePullSecrets=[{"name": "registry"}])
    body["spec"]["model"] = {"name": "m", "pvc": {"claimName": "weights"}}
    body["spec"]["stages"]["pd"]["env"] = [
        {"name": "A", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "x"}}},
    ]
    return parse(body)


def test_the_webhook_asks_about_everything_the_pods_would_borrow_and_nothing_of_the_operators():
    """Read from what render produced, so no field can add a reference the check misses; the graph's own peer
    credential (which the operator makes) is not the author's to read."""
    graph = full_graph()
    wanted = {(n.verb, n.resource, n.name) for n in needs(graph, "1.20")}
    assert wanted == {
        ("get", "secrets", "api-key"),
        ("get", "secrets", "db"),
        ("get", "secrets", "registry"),
        ("get", "configmaps", "tuning"),
        ("get", "persistentvolumeclaims", "weights"),
        ("impersonate", "serviceaccounts", "builder"),
    }
    plain = parse(graph_manifest("g", "team"))
    assert needs(plain, "1.20") == []


def test_a_secret_named_like_the_peer_credential_is_asked_about():
    """The exemption covers only the reference render adds: a spec that names the credential's name (as a create's
    admission would compute it without a uid, or with a uid the client chose) is asked about like any Secret."""
    body = graph_manifest("g", "team")
    body["metadata"]["uid"] = "abcdefgh-0000-0000-0000-000000000000"  # a client may send one
    body["spec"]["stages"]["pd"]["env"] = [
        {"name": "A", "valueFrom": {"secretKeyRef": {"name": "g-peer-credential", "key": "token"}}},
        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "g-peer-credential-abcdefgh", "key": "token"}}},
    ]
    wanted = {n.name for n in needs(parse(body), "1.20")}
    assert wanted == {"g-peer-credential", "g-peer-credential-abcdefgh"}


def keyed(secret: bytes = b"k" * 32) -> AdmissionKey:
    key = AdmissionKey(client.ApiClient(), "mmgraph-system", "unused")
    key.key = secret
    return key


def stamped(body: dict[str, Any], key: AdmissionKey) -> dict[str, Any]:
    body["metadata"]["annotations"] = {"mmgraph.io/admitted": key.stamp(parse(body))}
    return body


def test_a_stamp_admits_its_spec_under_its_name_only():
    key = keyed()
    body = stamped(graph_manifest("g", "team"), key)
    assert key.admitted(parse(body))
    spelled_out = copy.deepcopy(body)  # the CRD's defaults filled in, engineArgs in the other spelling
    spelled_out["spec"]["stages"]["pd"]["engineArgs"] = {"max_model_len": 32768, "gpu-memory-utilization": 0.9}
    spelled_out["spec"]["imagePullPolicy"] = parse(body).spec.image_pull_policy
    assert key.admitted(parse(spelled_out))
    for change in (
        lambda b: b["metadata"].update(name="other"),
        lambda b: b["metadata"].update(namespace="other"),
        lambda b: b["spec"].update(serviceAccountName="builder"),
        lambda b: b["metadata"].pop("annotations"),
        lambda b: b["metadata"]["annotations"].update({"mmgraph.io/admitted": keyed(b"o" * 32).stamp(parse(b))}),
    ):
        changed = copy.deepcopy(body)
        change(changed)
        assert not keyed().admitted(parse(changed))
    assert not AdmissionKey(client.ApiClient(), "ns", "unused").admitted(parse(body))  # no key loaded: nothing


@pytest.fixture
def author(api: client.ApiClient, cluster: Any, namespace: str) -> Iterator[client.ApiClient]:
    """A client authenticated as a ServiceAccount of the test's namespace that may do anything to MultimodalGraphs
    there, and nothing else."""
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": AUTHOR}})
    grant(api, namespace, "graphs", GRAPH_RIGHTS)
    token_secret = wait_for(
        lambda: (core.read_namespaced_service_account(AUTHOR, namespace).secrets or [None])[0], what="token Secret"
    ).name
    token = base64.b64decode(core.read_namespaced_secret(token_secret, namespace).data["token"]).decode()
    kubeconfig = cluster.kubeconfig_for_token(f"author-{namespace}", token, namespace)
    author_api = config.new_client_from_config(str(kubeconfig))
    yield author_api
    author_api.close()


def grant(api: client.ApiClient, namespace: str, name: str, rules: list[dict[str, Any]]) -> None:
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
    subject = {"kind": "ServiceAccount", "name": AUTHOR, "namespace": namespace}
    binding = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
    rbac.create_namespaced_role_binding(
        namespace, {"metadata": {"name": name}, "roleRef": binding, "subjects": [subject]}
    )


def with_api_key(body: dict[str, Any]) -> dict[str, Any]:
    body["spec"]["stages"]["frontend"]["apiKeySecret"] = {"name": "api-key", "key": "token"}
    return body


BORROWS = {
    "a Secret": (with_api_key, "read Secret api-key (get secrets/api-key)"),
    "a PersistentVolumeClaim": (
        lambda b: b["spec"].update(model={"name": "m", "pvc": {"claimName": "weights"}}) or b,
        "mount PersistentVolumeClaim weights (get persistentvolumeclaims/weights)",
    ),
    "a ServiceAccount": (
        lambda b: b["spec"].update(serviceAccountName="builder") or b,
        "run as ServiceAccount builder (impersonate serviceaccounts/builder)",
    ),
    "a Secret in an env var": (
        lambda b: (
            b["spec"]["stages"]["pd"].update(
                env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]
            )
            or b
        ),
        "read Secret db (get secrets/db)",
    ),
}


@pytest.mark.cluster
@pytest.mark.parametrize("what", BORROWS)
def test_a_graph_that_borrows_what_its_author_may_not_use_is_refused(api, operator, namespace, author, what):
    """Refused at the door with a 403 naming what is missing, and nothing is stored; the same graph from a user
    who may use it (the test's admin) is admitted and stamped."""
    change, named = BORROWS[what]
    body = change(graph_manifest("g", namespace))
    with pytest.raises(ApiException) as refused:
        create_graph(author, body)
    assert refused.value.status == 403, refused.value.body
    assert named in refused.value.body and f"system:serviceaccount:{namespace}:{AUTHOR} may not" in refused.value.body
    with pytest.raises(ApiException, match="Not Found"):
        get_graph(api, namespace, "g")
    assert create_graph(api, body)["metadata"]["annotations"]["mmgraph.io/admitted"].startswith("v1.")


@pytest.mark.cluster
def test_a_plain_graph_is_admitted_and_a_right_granted_later_counts(api, operator, namespace, author):
    """A graph that borrows nothing needs only the right to create graphs; a Secret the author was granted since
    (by name) is then admitted too, and the graph runs."""
    created = create_graph(author, graph_manifest("g", namespace))
    assert created["metadata"]["annotations"]["mmgraph.io/admitted"]
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="the plain graph's children")
    grant(api, namespace, "api-key", SECRET_RIGHTS)
    create_graph(author, with_api_key(graph_manifest("keyed", namespace)))
    wait_for(lambda: api_key_env(api, namespace, "keyed"), what="the keyed graph's frontend")


def api_key_env(api: client.ApiClient, namespace: str, graph: str) -> dict[str, Any] | None:
    """The frontend's MMGRAPH_API_KEY env var, if its Deployment has one."""
    with contextlib.suppress(ApiException):
        dep = client.AppsV1Api(api).read_namespaced_deployment(f"{graph}-frontend", namespace)
        env = dep.spec.template.spec.containers[0].env or []
        return next((api.sanitize_for_serialization(e) for e in env if e.name == "MMGRAPH_API_KEY"), None)
    return None


@pytest.mark.cluster
def test_a_spec_that_skipped_the_webhook_is_never_applied(api, operator, namespace, author):
    """Created past the webhook (as if it were not called): reported Degraded NotAdmitted, with a Warning Event
    and the command that has it checked, and nothing of it is made; checked then as the author, it stays so
    (they may not read the Secret); checked as the admin, it runs."""
    with webhook_absent(api):
        create_graph(author, with_api_key(graph_manifest("g", namespace)))
    graph = wait_for(lambda: degraded(api, namespace, "g", "NotAdmitted"), what="NotAdmitted")
    assert "mmgraph.io/recheck" in condition(graph, "Degraded")["message"]
    assert children(api, namespace, "g") == {kind: set() for kind in E_P_D_CHILDREN}
    recheck(author, namespace, "g")  # a metadata edit: it passes, and the spec stays unapplied
    assert "mmgraph.io/admitted" not in (get_graph(api, namespace, "g")["metadata"].get("annotations") or {})
    patch_graph(api, namespace, "g", {"metadata": {"labels": {"team": "vision"}}})  # routine: approves nothing
    assert "mmgraph.io/admitted" not in (get_graph(api, namespace, "g")["metadata"].get("annotations") or {})
    recheck(api, namespace, "g")
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="children once checked")
    assert api_key_env(api, namespace, "g")


@pytest.mark.cluster
def test_while_the_operator_is_down_updates_pass_and_wait_for_the_check(
    api, cluster, operator: OperatorProcess, namespace, author
):
    """With the operator down: a create is refused (it cannot be checked); a spec update, a label edit and a
    finalizer's removal pass (so a deletion never waits on the operator). Back up, the operator applies none of
    the unchecked spec: the graph is NotAdmitted and its pods' Deployments are as they were."""
    create_graph(author, graph_manifest("g", namespace))
    held = graph_manifest("held", namespace)
    held["metadata"]["finalizers"] = ["example.com/hold"]
    create_graph(api, held)
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="children")
    apps = client.AppsV1Api(api)
    wait_for(lambda: len(apps.list_namespaced_deployment(namespace).items) == 8, what="both graphs' Deployments")
    before = {d.metadata.name: d.metadata.generation for d in apps.list_namespaced_deployment(namespace).items}
    operator.stop()
    try:
        with pytest.raises(ApiException) as refused:
            create_graph(author, graph_manifest("late", namespace))
        assert refused.value.status == 500 and "failed calling webhook" in refused.value.body
        patch_graph(author, namespace, "g", with_api_key({"spec": {"stages": {"frontend": {}}}}))
        patch_graph(author, namespace, "g", {"metadata": {"labels": {"team": "vision"}}})
        client.CustomObjectsApi(api).delete_namespaced_custom_object(*GRAPHS[:2], namespace, GRAPHS[2], "held")
        patch_graph(api, namespace, "held", {"metadata": {"finalizers": None}})
        wait_for(lambda: not graph_exists(api, namespace, "held"), what="the held graph deleted")
    finally:
        operator.start()
    graph = wait_for(lambda: degraded(api, namespace, "g", "NotAdmitted"), what="NotAdmitted")
    assert graph["metadata"]["labels"] == {"team": "vision"}
    now = {d.metadata.name: d.metadata.generation for d in apps.list_namespaced_deployment(namespace).items}
    assert {k: v for k, v in now.items() if k.startswith("g-")} == {
        k: v for k, v in before.items() if k.startswith("g-")
    }
    assert api_key_env(api, namespace, "g") is None


@pytest.mark.cluster
def test_an_object_of_a_childs_name_not_owned_by_the_graph_is_left_alone(api, operator, namespace, author):
    """A Service `g-frontend` someone else made is neither taken over (its selector kept) nor deleted with the
    graph; the graph is Degraded NotOwned naming it, and the rest is applied. Once it is gone, the graph makes
    its own."""
    core = client.CoreV1Api(api)
    theirs = {"selector": {"app": "payments"}, "ports": [{"port": 443}]}
    core.create_namespaced_service(namespace, {"metadata": {"name": "g-frontend"}, "spec": theirs})
    create_graph(author, graph_manifest("g", namespace))
    graph = wait_for(lambda: degraded(api, namespace, "g", "NotOwned"), what="NotOwned")
    assert "Service g-frontend already exists and is not this graph's" in condition(graph, "Degraded")["message"]
    made = children(api, namespace, "g")
    assert made["Deployment"] == E_P_D_CHILDREN["Deployment"]
    assert made["Service"] == E_P_D_CHILDREN["Service"] - {"g-frontend"}
    assert core.read_namespaced_service("g-frontend", namespace).spec.selector == {"app": "payments"}
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=g").items
    assert [e.reason for e in events if e.type == "Warning"] == ["NotOwned"]
    core.delete_namespaced_service("g-frontend", namespace, _preload_content=False)  # (the client misreads a Status)
    wait_for(lambda: children(api, namespace, "g") == E_P_D_CHILDREN, what="the graph's own Service")
    wait_for(lambda: condition(get_graph(api, namespace, "g"), "Degraded")["status"] == "False", what="not Degraded")


@pytest.mark.cluster
def test_deleting_the_graph_leaves_an_object_it_does_not_own(api, operator, namespace, author):
    core = client.CoreV1Api(api)
    core.create_namespaced_service(namespace, {"metadata": {"name": "g-frontend"}, "spec": {"ports": [{"port": 1}]}})
    create_graph(author, graph_manifest("g", namespace))
    wait_for(lambda: degraded(api, namespace, "g", "NotOwned"), what="NotOwned")
    client.CustomObjectsApi(author).delete_namespaced_custom_object(*GRAPHS[:2], namespace, GRAPHS[2], "g")
    apps = client.AppsV1Api(api)
    wait_for(lambda: not apps.list_namespaced_deployment(namespace).items, what="the graph's Deployments collected")
    assert core.read_namespaced_service("g-frontend", namespace).spec.ports[0].port == 1


def degraded(api: client.ApiClient, namespace: str, name: str, reason: str) -> dict[str, Any] | None:
    graph = get_graph(api, namespace, name)
    found = condition(graph, "Degraded")
    return graph if found and (found["status"], found["reason"]) == ("True", reason) else None


def recheck(api: client.ApiClient, namespace: str, name: str) -> None:
    patch_graph(api, namespace, name, {"metadata": {"annotations": {"mmgraph.io/recheck": str(time.time_ns())}}})


def graph_exists(api: client.ApiClient, namespace: str, name: str) -> bool:
    try:
        get_graph(api, namespace, name)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


@pytest.mark.cluster
def test_any_replica_makes_a_missing_key_and_only_the_leader_replaces_a_bad_one(api, namespace):
    """A new replica beside an older leader that knows nothing of the key must not wait for it forever; two
    replicas racing to make it end with one key; an unusable key is the leader's to replace."""
    first, second = (AdmissionKey(api, namespace, "admission") for _ in range(2))

    async def both_standby() -> None:
        await asyncio.gather(first._load(repair=False), second._load(repair=False))

    asyncio.run(both_standby())
    assert first.key and first.key == second.key
    core = client.CoreV1Api(api)
    core.patch_namespaced_secret("admission", namespace, {"data": {"hmac.key": base64.b64encode(b"short").decode()}})
    standby = AdmissionKey(api, namespace, "admission")
    asyncio.run(standby._load(repair=False))
    assert standby.key is None and not standby.ready.is_set()
    leader = AdmissionKey(api, namespace, "admission")
    asyncio.run(leader._load(repair=True))
    assert leader.key and len(leader.key) == 32 and leader.key != first.key
