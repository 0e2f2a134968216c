"""The webhook certificate's decisions (certs.py) and the leader election's timing rules (leader.py), offline;
tests/test_ha.py runs both on the real API server."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl

import kopf
import pytest
from cryptography import x509

from mmgraph_operator.certs import ServingCert, issue_ca, issue_leaf, leaf_problem, service_sans
from mmgraph_operator.leader import Timing
from mmgraph_operator.webhook import admit_graph

SANS = (*service_sans("mmgraph-operator", "mmgraph-system"), "127.0.0.1")


def test_a_fresh_leaf_is_kept_and_names_the_service_every_way_it_is_dialled():
    data = issue_ca()
    data |= issue_leaf(data, SANS)
    assert leaf_problem(data, SANS) is None
    leaf = x509.load_pem_x509_certificate(data["tls.crt"])
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(data["ca.crt"]))
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "mmgraph-operator",
        "mmgraph-operator.mmgraph-system",
        "mmgraph-operator.mmgraph-system.svc",
        "mmgraph-operator.mmgraph-system.svc.cluster.local",
    ]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_a_leaf_is_reissued_when_expiring_renamed_foreign_or_missing():
    data = issue_ca()
    data |= issue_leaf(data, SANS)
    expires = x509.load_pem_x509_certificate(data["tls.crt"]).not_valid_after_utc
    assert leaf_problem(data, SANS, now=expires - datetime.timedelta(days=31)) is None
    assert leaf_problem(data, SANS, now=expires - datetime.timedelta(days=29)).startswith("expires")
    assert leaf_problem(data, (*SANS, "other.example")) == "names other hosts"
    other = issue_ca()
    assert leaf_problem({**data, **other}, SANS) == "not signed by ca.crt"  # a new CA: the old leaf must go
    assert leaf_problem({k: v for k, v in data.items() if k != "tls.key"}, SANS) == "incomplete"


def test_the_serving_context_is_reloaded_in_place():
    """A real TLS server on the context: a new handshake after `load` gets the new certificate, same server."""
    data = issue_ca()
    first, second = issue_leaf(data, ("127.0.0.1",)), issue_leaf(data, ("127.0.0.1",))

    async def run() -> list[bytes]:
        serving = ServingCert()
        serving.load(first["tls.crt"], first["tls.key"], "test")
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=serving.context)
        port = server.sockets[0].getsockname()[1]
        seen = []
        for leaf in (None, second):
            if leaf:
                serving.load(leaf["tls.crt"], leaf["tls.key"], "test")
            client = ssl.create_default_context(cadata=data["ca.crt"].decode())
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
            seen.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
            writer.close()
        server.close()
        assert serving.certfile.read_bytes() == first["tls.crt"]  # kopf's files never change (it would restart)
        return seen

    seen = asyncio.run(run())
    assert seen == [ssl.PEM_cert_to_DER_cert(leaf["tls.crt"].decode()) for leaf in (first, second)]


@pytest.mark.parametrize(
    ("duration", "deadline", "retry"),
    [(15, 10, 0), (15, 10, 10), (15, 14, 2), (14, 10, 2), (6, 4, 1)],
    ids=["no-retry", "retry-not-below-deadline", "deadline-too-close", "just-too-close", "too-short"],
)
def test_lease_timings_that_could_let_two_lead_are_refused(duration, deadline, retry):
    """A leader notices a missed renewal up to two retries late; it must have stepped down before a standby, which
    waits a whole lease duration, takes over."""
    with pytest.raises(ValueError, match="renew deadline"):
        Timing(duration, deadline, retry)
    Timing()  # the defaults: 15, 10, 2
    Timing(7, 4, 1)  # the tests'


def test_the_webhook_admits_graphs_outside_the_namespaces_it_watches():
    """1.20 cannot select namespaces by name: the webhook is asked about every namespace, and leaves graphs that
    another operator (or none) watches alone."""
    bad = {"apiVersion": "mmgraph.io/v1alpha1", "kind": "MultimodalGraph", "metadata": {"name": "g"}, "spec": {}}

    def admit(namespace: str) -> None:
        body = kopf.Body({**bad, "metadata": {"name": "g", "namespace": namespace}})
        review = admit_graph(
            body, None, "CREATE", {}, kopf.Patch(), [], namespaces=["team-a"], key=None, api=None, kube_version="1.20"
        )
        asyncio.run(review)

    admit("elsewhere")
    with pytest.raises(kopf.AdmissionError):
        admit("team-a")


def _without_san(data: dict[str, bytes]) -> dict[str, bytes]:
    """A leaf for our names, but with no subjectAltName extension (a hand-made one, say)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mmgraph_operator.certs import _builder, _pem_key

    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    key = ec.generate_private_key(ec.SECP256R1())
    signer = serialization.load_pem_private_key(data["ca.key"], None)
    cert = _builder(SANS[0], ca.subject, key.public_key(), datetime.timedelta(days=365)).sign(signer, hashes.SHA256())
    return {**data, "tls.crt": cert.public_bytes(serialization.Encoding.PEM), "tls.key": _pem_key(key)}


BAD_PEM = b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
MALFORMED = {
    "unparseable-leaf": lambda d: {**d, "tls.crt": BAD_PEM},
    "leaf-without-san": _without_san,
    "leaf-key-of-another": lambda d: {**d, "tls.key": issue_leaf(d, SANS)["tls.key"]},
    "unparseable-ca": lambda d: {**d, "ca.crt": b"garbage"},
    "ca-key-of-another": lambda d: {**d, "ca.key": issue_ca()["ca.key"]},
}


@pytest.mark.parametrize("damage", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_secret_is_a_reason_to_reissue_not_an_exception(damage):
    """A Secret edited by hand or cut short must not make every pass of the certificate keeper raise (the
    webhook would never become ready on a fresh start): each defect is a reason, and what it leads to is valid."""
    from mmgraph_operator.certs import ca_problem

    data = issue_ca()
    data = damage(data | issue_leaf(data, SANS))
    reason = ca_problem(data) or leaf_problem(data, SANS)
    assert reason is not None
    if ca_problem(data):
        data |= issue_ca()
    data |= issue_leaf(data, SANS)
    assert ca_problem(data) is None and leaf_problem(data, SANS) is None


def test_a_leaf_never_outlives_its_ca(monkeypatch):
    import mmgraph_operator.certs as certs

    monkeypatch.setattr(certs, "CA_VALIDITY", datetime.timedelta(days=100))
    data = issue_ca()
    leaf = x509.load_pem_x509_certificate(issue_leaf(data, SANS)["tls.crt"])
    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc


@pytest.mark.cluster
def test_the_keeper_repairs_a_malformed_secret_on_the_api_server(api, namespace):
    """On the real API server: a Secret whose leaf is unparseable and whose CA is garbage is repaired by one pass
    of `ensure` (it used to raise on every pass), and what it now holds serves TLS for our names."""
    import base64

    from kubernetes import client

    from mmgraph_operator.certs import CertKeeper, CertSettings, ca_problem, decode

    broken = MALFORMED["unparseable-ca"](MALFORMED["unparseable-leaf"](issue_ca() | {"ca.key": b"x"}))
    body = {k: base64.b64encode(v).decode() for k, v in broken.items() if v}
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "webhook"}, "data": body})
    settings = CertSettings(namespace=namespace, secret="webhook", webhook_config="", sans=SANS)
    asyncio.run(CertKeeper(api, settings, ServingCert()).ensure())
    repaired = decode(core.read_namespaced_secret("webhook", namespace))
    assert ca_problem(repaired) is None and leaf_problem(repaired, SANS) is None
