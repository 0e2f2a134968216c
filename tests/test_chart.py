"""The Helm chart through the real `helm` CLI (the binary scripts/node-tools.sh keeps): strict lint, `helm
template`, strict schema validation, install (conftest's session install is what every integration test's operator
runs under) and the documented CRD upgrade path. tests/test_node.py installs it on a real node."""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest
import yaml
from conftest import ca_bundle, chart_values
from kubecluster import CHART, OPERATOR_NS, RELEASE, helm, wait_for
from kubernetes import client, dynamic

from mmgraph_contract.graph import parse
from mmgraph_contract.rules import problems

VALUE_SETS = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"], "grafanaDashboard": {"enabled": True}},
    "cert-manager": {
        "webhook": {"certManager": {"enabled": True}},
        "replicas": 1,
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}},
    },
    "no-webhook": {
        "webhook": {"enabled": False},
        "image": {"repository": "registry.example/mmgraph-operator", "tag": "1.2.3"},
    },
}


def render_text(values: dict) -> str:
    """`helm template` (what Argo CD renders), with `values` in a values file."""
    return helm("template", RELEASE, str(CHART), "-n", OPERATOR_NS, values=values).stdout


def rendered(values: dict) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(render_text(values)) if doc]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    return doc


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints_strictly(values):
    """--strict fails on warnings too."""
    helm("lint", "--strict", str(CHART), "-n", OPERATOR_NS, values=values)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_manifest_validates_strictly(values):
    docs = rendered(values)
    assert docs
    for doc in docs:
        if doc["apiVersion"].split("/")[0] in ("cert-manager.io", "monitoring.coreos.com"):  # not Kubernetes' own
            continue
        kubernetes_validate.validate(doc, "1.29.0", strict=True)


def test_rbac_is_least_privilege():
    # rules by kind (rules limited to named objects: test_the_operator_may_touch_only_its_own_...)
    rules = [r for d in rendered({}) if d["kind"] == "ClusterRole" for r in d["rules"] if not r.get("resourceNames")]
    verbs = {(g, res): set(r["verbs"]) for r in rules for g in r["apiGroups"] for res in r["resources"]}
    assert verbs[("mmgraph.io", "multimodalgraphs")] == {"get", "list", "watch"}  # never writes a spec
    assert verbs[("mmgraph.io", "multimodalgraphs/status")] == {"get", "patch"}
    assert verbs[("", "events")] == {"create"}
    assert verbs[("apiextensions.k8s.io", "customresourcedefinitions")] == {"list", "watch"}
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in rules)
    assert verbs[("autoscaling", "horizontalpodautoscalers")] == {"get", "list", "watch", "create", "patch", "delete"}
    assert verbs[("", "secrets")] == {"create"}  # each graph's peer credential: made, never read (no get/list/watch)
    assert ("", "pods") not in verbs


def test_namespaced_install_uses_roles_in_each_namespace():
    docs = rendered(VALUE_SETS["namespaced"])
    roles = {
        (d["kind"], d["metadata"]["namespace"])
        for d in docs
        if d["kind"] in ("Role", "RoleBinding") and d["metadata"]["name"] == "mmgraph-operator"
    }
    assert roles == {(k, ns) for k in ("Role", "RoleBinding") for ns in ("team-a", "team-b")}
    operator = next(d for d in docs if d["kind"] == "Deployment")
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_operator_pod_is_non_root_and_read_only():
    operator = next(d for d in rendered({}) if d["kind"] == "Deployment")
    pod = operator["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize(
    ("values", "names"), [({"replicas": -1}, "replicas"), ({"webhook": {"url": "http://x/"}}, "url")]
)
def test_values_schema_refuses_bad_values(values, names):
    refused = helm("template", RELEASE, str(CHART), values=values, check=False)
    assert refused.returncode != 0 and "values don't meet the specifications of the schema" in refused.stderr
    assert names in refused.stderr, refused.stderr


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_two_renders_are_byte_identical_and_carry_no_certificate(values):
    """What Argo CD (helm template) renders never changes by itself: no generated CA, no lookup; the operator or
    cert-manager makes the certificate and sets the caBundle, which the render leaves out."""
    assert render_text(values) == render_text(values)
    docs = rendered(values)
    assert not [d for d in docs if d["kind"] == "Secret"]
    for config in [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]:
        assert all("caBundle" not in hook["clientConfig"] for hook in config["webhooks"])


def test_two_replicas_by_default_on_two_nodes_one_leading():
    docs = rendered({})
    operator = one(docs, "Deployment")
    spec, pod = operator["spec"], operator["spec"]["template"]["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": spec["selector"]}
    container = pod["containers"][0]
    assert "--leader-election-lease=mmgraph-operator" in container["args"]
    assert "--webhook-secret=mmgraph-operator-webhook" in container["args"]
    assert "--webhook-config=mmgraph-operator" in container["args"]
    assert container["readinessProbe"]["tcpSocket"] == {"port": "webhook"}  # in the Service once it serves
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert not [d for d in rendered({"replicas": 1}) if d["kind"] == "PodDisruptionBudget"]


def test_the_operator_may_touch_only_its_own_lease_secret_and_webhook():
    """Cluster-wide it may not read a Secret; in its own namespace it reads and patches the two it keeps (the
    webhook's certificate, the key of its stamps). Cluster-wide it may ask whether a user may do a thing."""
    docs = rendered({})
    self_role = one(docs, "Role", "-self")
    assert self_role["metadata"]["namespace"] == OPERATOR_NS
    rules = {(r["resources"][0], tuple(r.get("resourceNames", ()))): set(r["verbs"]) for r in self_role["rules"]}
    assert rules == {
        ("leases", ()): {"create"},
        ("leases", ("mmgraph-operator",)): {"get", "update"},
        ("secrets", ()): {"create"},
        ("secrets", ("mmgraph-operator-admission", "mmgraph-operator-webhook")): {"get", "patch"},
    }
    (rule,) = one(docs, "ClusterRole", "-review")["rules"]
    assert rule == {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}
    (rule,) = one(docs, "ClusterRole", "-webhook")["rules"]
    assert rule == {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["mutatingwebhookconfigurations"],
        "resourceNames": ["mmgraph-operator"],
        "verbs": ["get", "update"],
    }


def test_cert_manager_instead_makes_the_certificate_and_injects_the_ca():
    docs = rendered(VALUE_SETS["cert-manager"])
    certificate = one(docs, "Certificate")
    assert certificate["spec"]["secretName"] == "mmgraph-operator-webhook"
    assert certificate["spec"]["issuerRef"] == {"name": "mmgraph-operator-selfsigned", "kind": "Issuer"}
    config = one(docs, "MutatingWebhookConfiguration")
    assert config["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{OPERATOR_NS}/mmgraph-operator-webhook"
    }
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--webhook-cert-dir=/etc/mmgraph/webhook" in args and not any("--webhook-secret" in a for a in args)
    assert not [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-webhook")]
    secrets = [r for r in one(docs, "Role", "-self")["rules"] if r["resources"] == ["secrets"]]
    assert [r.get("resourceNames") for r in secrets] == [None, ["mmgraph-operator-admission"]]  # not the certificate
    named = rendered(
        {"webhook": {"certManager": {"enabled": True, "issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}}}
    )
    assert one(named, "Certificate")["spec"]["issuerRef"] == {"name": "ca", "kind": "ClusterIssuer"}
    for url, field, host in [
        ("https://10.0.0.7:9443/multimodalgraph", "ipAddresses", "10.0.0.7"),
        ("https://hooks.example:9443/multimodalgraph", "dnsNames", "hooks.example"),
    ]:
        values = {"webhook": {"url": url, "certManager": {"enabled": True}}}
        assert host in one(rendered(values), "Certificate")["spec"][field]  # the certificate names webhook.url's host
    assert not [d for d in named if d["kind"] == "Issuer"]


@pytest.mark.cluster
def test_crd_upgrade_path(api, cluster, helm_install, operator, webhook_port):
    """Helm never upgrades crds/: the README says to server-side apply the new CRD first, then `helm upgrade`.
    The upgrade keeps the caBundle the operator set (the chart renders none), so the webhook keeps admitting."""
    dyn = dynamic.DynamicClient(api)
    crds = dyn.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    new = yaml.safe_load((CHART / "crds" / "multimodalgraph.yaml").read_text())
    old = copy.deepcopy(new)  # an older release's CRD: it knew neither the cache, nor monitoring, nor autoscaling
    _drop_fields(
        old["spec"]["versions"][0]["schema"]["openAPIV3Schema"], {"embeddingCache", "monitoring", "autoscaling"}
    )
    crds.server_side_apply(body=old, name=old["metadata"]["name"], field_manager="kubectl", force_conflicts=True)
    # a graph stored by the older release
    ns = "crd-upgrade"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
    custom = client.CustomObjectsApi(api)
    before = yaml.safe_load((CHART.parent.parent / "examples" / "tiny-e-p-d.yaml").read_text())
    before["metadata"] = {"name": "stored-before", "namespace": ns}
    custom.create_namespaced_custom_object("mmgraph.io", "v1alpha1", ns, "multimodalgraphs", before)

    def field() -> bool:
        stored = crds.get(name=new["metadata"]["name"]).to_dict()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        return "embeddingCache" in stored["properties"]["spec"]["properties"]

    assert not field()
    # The documented upgrade: kubectl apply --server-side --force-conflicts -f charts/mmgraph/crds/
    crds.server_side_apply(body=new, name=new["metadata"]["name"], field_manager="kubectl", force_conflicts=True)
    assert field()
    trusted = ca_bundle(api)
    argv = ["upgrade", RELEASE, str(CHART), "-n", OPERATOR_NS, "--timeout=60s", "-o", "json"]
    release = json.loads(helm(*argv, values=chart_values(webhook_port), kubeconfig=cluster.kubeconfig).stdout)
    assert (release["version"], release["info"]["status"]) == (2, "deployed")
    assert ca_bundle(api) == trusted
    # The graph the older CRD stored reads back with the new fields' defaults, valid, and is reconciled.
    stored = custom.get_namespaced_custom_object("mmgraph.io", "v1alpha1", ns, "multimodalgraphs", "stored-before")
    assert stored["spec"]["embeddingCache"] == {"capacityBytes": 1 << 30, "routing": "content"}
    assert stored["spec"]["monitoring"] == {"podMonitor": False, "interval": "30s"}
    assert problems(parse(stored)) == []
    wait_for(
        lambda: (
            custom.get_namespaced_custom_object("mmgraph.io", "v1alpha1", ns, "multimodalgraphs", "stored-before")
            .get("status", {})
            .get("phase")
            == "Progressing"
        ),
        what="the old graph reconciled under the new CRD",
    )
    # The upgraded CRD serves the new field: a graph using it is stored with it.
    body = yaml.safe_load((CHART.parent.parent / "examples" / "tiny-e-p-d.yaml").read_text())
    body["metadata"]["namespace"] = ns
    body["spec"]["embeddingCache"] = {"capacityBytes": 1024}
    custom.create_namespaced_custom_object("mmgraph.io", "v1alpha1", ns, "multimodalgraphs", body)
    stored = custom.get_namespaced_custom_object("mmgraph.io", "v1alpha1", ns, "multimodalgraphs", "tiny")
    # stored with it, and with the new CRD's defaults for what the graph left out
    assert stored["spec"]["embeddingCache"] == {"capacityBytes": 1024, "routing": "content"}
    wait_for(
        lambda: client.AppsV1Api(api).list_namespaced_deployment(ns).items, what="operator reconciles after upgrade"
    )


def _drop_fields(schema: dict, names: set[str]) -> None:
    """Remove properties named `names` anywhere in an OpenAPI schema (what an older CRD did not have)."""
    for key in names & set(schema.get("properties", {})):
        del schema["properties"][key]
    for child in [*schema.get("properties", {}).values(), *([schema["items"]] if "items" in schema else [])]:
        _drop_fields(child, names)


def test_the_grafana_dashboard_ships_as_the_sidecar_loads_it():
    """Off by default; on, a ConfigMap with the sidecar's label holding dashboards/mmgraph.json as it is (its
    series are checked against a running graph's /metrics in tests/dataplane/test_dashboard.py)."""
    assert not [d for d in rendered({}) if d["kind"] == "ConfigMap"]
    (config_map,) = [d for d in rendered(VALUE_SETS["namespaced"]) if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(config_map["data"]["mmgraph.json"])
    assert shipped == json.loads((CHART / "dashboards" / "mmgraph.json").read_text())
    assert shipped["uid"] == "mmgraph" and shipped["panels"]


def test_a_service_monitor_scrapes_the_operators_metrics_when_asked():
    assert not [d for d in rendered({}) if d["kind"] == "ServiceMonitor"]
    docs = rendered(VALUE_SETS["cert-manager"])
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    no_webhook = one(rendered(VALUE_SETS["no-webhook"]), "Service")  # metrics are served without the webhook too
    assert [p["name"] for p in no_webhook["spec"]["ports"]] == ["metrics"]
