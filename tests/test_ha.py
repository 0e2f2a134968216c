"""Two operators on the real API server: one leads (the Lease) and reconciles, both serve the webhook, the
standby takes over when the leader dies, and a certificate rotated in its Secret is served without a restart."""

from __future__ import annotations

import base64
import contextlib
import ssl
import time
from collections import Counter
from typing import Any

import pytest
from conftest import ca_bundle, graph_manifest
from kubecluster import OPERATOR_NS, WEBHOOK_CONFIG, OperatorProcess, wait_for
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from test_operator_integration import E_P_D_CHILDREN, children, create_graph

from mmgraph_operator.certs import decode, issue_leaf

pytestmark = pytest.mark.cluster

LEASE_DURATION, LEASE_RETRY = 7, 1  # kubecluster.LEASE_TIMING
SECRET = f"{WEBHOOK_CONFIG}-webhook"
PROBE = "mmgraph-ha-probe"
CHILD_RESOURCES = {"deployments", "services", "poddisruptionbudgets", "networkpolicies"}


def by(replica: OperatorProcess, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests `replica` made: the two share a ServiceAccount, the user agent names the replica."""
    return [e for e in events if e.get("userAgent", "").startswith(f"mmgraph-operator/{replica.name}_")]


def child_of(event: dict[str, Any]) -> tuple[str, str]:
    return event["objectRef"]["resource"], event["objectRef"]["name"]


def served_certificate(port: int) -> str:
    return ssl.get_server_certificate(("127.0.0.1", port))


def probe_standby(api: client.ApiClient, standby: OperatorProcess, namespace: str) -> None:
    """A second webhook configuration that asks only the standby, for the test's namespace (failurePolicy Fail: a
    standby that did not answer would refuse every graph there)."""
    ca = decode(client.CoreV1Api(api).read_namespaced_secret(SECRET, OPERATOR_NS))["ca.crt"]
    hook = {
        "name": "standby.multimodalgraphs.mmgraph.io",
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": "Fail",
        "reinvocationPolicy": "IfNeeded",
        "clientConfig": {
            "url": f"https://127.0.0.1:{standby.webhook_port}/multimodalgraph",
            "caBundle": base64.b64encode(ca).decode(),
        },
        "rules": [
            {
                "apiGroups": ["mmgraph.io"],
                "apiVersions": ["v1alpha1"],
                "operations": ["CREATE", "UPDATE"],
                "resources": ["multimodalgraphs"],
            }
        ],
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
    }
    label = {"metadata": {"labels": {"kubernetes.io/metadata.name": namespace}}}  # 1.20 does not set it
    client.CoreV1Api(api).patch_namespace(namespace, label)
    body = {"metadata": {"name": PROBE}, "webhooks": [hook]}
    client.AdmissionregistrationV1Api(api).create_mutating_webhook_configuration(body)
    time.sleep(1.5)  # the API server's webhook informer catches up


def test_two_operators_one_leader_takeover_and_certificate_rotation(
    api, cluster, operator, operator_kubeconfig, namespace
):
    standby = OperatorProcess(operator_kubeconfig, cluster.workdir, name="standby")
    standby.start()
    try:
        assert operator.leading() and not standby.leading()

        # The webhook answers from both: the standby admits a good graph and refuses a bad one with the message.
        probe_standby(api, standby, namespace)
        create_graph(api, graph_manifest("g0", namespace))
        bad = graph_manifest("bad", namespace)
        bad["spec"]["topology"] = "e-pd"  # decode is still set
        with pytest.raises(ApiException) as refused:
            create_graph(api, bad)
        assert refused.value.status == 422 and "topology e-pd does not use it" in refused.value.body

        # A leaf rotated in the Secret is served by both, without a restart; the leader keeps it (valid, same CA).
        core = client.CoreV1Api(api)
        data = decode(core.read_namespaced_secret(SECRET, OPERATOR_NS))
        leaf = issue_leaf(data, ("127.0.0.1",))
        pids = operator.proc.pid, standby.proc.pid
        core.patch_namespaced_secret(
            SECRET, OPERATOR_NS, {"data": {k: base64.b64encode(v).decode() for k, v in leaf.items()}}
        )
        new = ssl.PEM_cert_to_DER_cert(leaf["tls.crt"].decode())
        for replica in (operator, standby):
            wait_for(
                lambda r=replica: ssl.PEM_cert_to_DER_cert(served_certificate(r.webhook_port)) == new,
                timeout=10,
                what=f"{replica.name} serves the rotated certificate",
            )
        assert (operator.proc.pid, standby.proc.pid) == pids
        create_graph(api, graph_manifest("g1", namespace))  # the API server still trusts both (same CA)

        # The leader dies (SIGKILL: no release) mid-burst; the standby takes over within the lease duration.
        for i in range(2, 9):
            create_graph(api, graph_manifest(f"g{i}", namespace))
        wait_for(lambda: client.AppsV1Api(api).list_namespaced_deployment(namespace).items, what="first children")
        operator.proc.kill()
        operator.proc.wait()
        killed = time.monotonic()
        wait_for(standby.leading, timeout=LEASE_DURATION + 5 * LEASE_RETRY, interval=0.2, what="standby leads")
        took = time.monotonic() - killed
        assert took <= LEASE_DURATION + 3 * LEASE_RETRY, took
        for i in range(9):
            want = {kind: {n.replace("g-", f"g{i}-", 1) for n in names} for kind, names in E_P_D_CHILDREN.items()}
            wait_for(lambda i=i, want=want: children(api, namespace, f"g{i}") == want, timeout=60, what=f"g{i}")
        # Each child written once. The killed leader's writes in flight when it died are in the audit log as 500s
        # (the server had no one to answer): whether they landed is unknown, so they count neither as a write nor
        # as a missing one; together with the writes that were answered they account for every child.
        writes = [
            e
            for e in cluster.audit_events()
            if e.get("userAgent", "").startswith("mmgraph-operator/")
            and e.get("verb") == "patch"
            and e["objectRef"].get("namespace") == namespace
            and e["objectRef"]["resource"] in CHILD_RESOURCES
        ]
        answered = Counter(child_of(e) for e in writes if e["responseStatus"]["code"] < 300)
        unanswered = {child_of(e) for e in by(operator, writes) if e["responseStatus"]["code"] >= 500}
        assert answered and max(answered.values()) == 1, {k: n for k, n in answered.items() if n > 1}
        assert len(set(answered) | unanswered) == 9 * sum(len(names) for names in E_P_D_CHILDREN.values())

        # Steady state, the old leader back as a standby: no writes from either but the leader's Lease renewals.
        operator.start()
        assert not operator.leading()
        settled = len(cluster.audit_events())
        time.sleep(LEASE_DURATION)
        window = cluster.audit_events()[settled:]
        writes = [e for e in window if e.get("verb") not in ("get", "list", "watch")]
        assert by(operator, writes) == [], [(e["verb"], e["requestURI"]) for e in by(operator, writes)]
        renewals = by(standby, writes)
        assert renewals and {(e["verb"], e["objectRef"]["resource"]) for e in renewals} == {("update", "leases")}
        assert not [e for e in writes if e.get("userAgent", "").startswith("mmgraph-operator/") and e not in renewals]
    finally:
        with contextlib.suppress(ApiException):
            client.AdmissionregistrationV1Api(api).delete_mutating_webhook_configuration(PROBE)
        standby.stop()  # a clean exit gives the lease up: the session's operator leads again at once
        if operator.proc is None or operator.proc.poll() is not None:
            operator.start()
        wait_for(operator.leading, timeout=LEASE_DURATION + 5 * LEASE_RETRY, what="the session's operator leads")


def test_a_deleted_certificate_secret_is_made_again_and_trusted(api, operator, namespace):
    """Deleting the Secret is a full rotation: the leader makes a new CA and certificate, points the caBundle at
    the new CA, and the replica serves the new certificate without a restart; graphs are admitted again."""
    core = client.CoreV1Api(api)
    old_ca = decode(core.read_namespaced_secret(SECRET, OPERATOR_NS))["ca.crt"]
    pid = operator.proc.pid
    core.delete_namespaced_secret(SECRET, OPERATOR_NS)

    def remade() -> dict[str, bytes] | None:
        data = decode(core.read_namespaced_secret(SECRET, OPERATOR_NS))
        return data if data["ca.crt"] != old_ca else None

    new = wait_for(remade, timeout=15, what="a new CA and certificate")
    # for the first minutes the bundle trusts the old CA too: a replica that has not loaded the new leaf yet is
    # still trusted
    wait_for(lambda: base64.b64decode(ca_bundle(api)) == new["ca.crt"] + old_ca, timeout=15, what="both CAs trusted")
    served = ssl.PEM_cert_to_DER_cert(new["tls.crt"].decode())
    wait_for(
        lambda: ssl.PEM_cert_to_DER_cert(served_certificate(operator.webhook_port)) == served,
        timeout=15,
        what="the new certificate served",
    )
    assert operator.proc.pid == pid
    wait_for(lambda: create_graph(api, graph_manifest("g", namespace)), timeout=30, what="graphs admitted again")
