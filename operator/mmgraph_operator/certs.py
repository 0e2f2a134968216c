"""The webhook's serving certificate, kept by the operator itself, so no render of the chart can break it.

A CA (ten years) and a leaf (one year) live in one Secret in the operator's own namespace (ca.crt, ca.key,
tls.crt, tls.key). The leader makes the Secret when it is missing, reissues the leaf from the same CA when it has
less than 30 days left or names other hosts, and keeps the caBundle of its own MutatingWebhookConfiguration equal
to ca.crt. Every replica (leader or standby) serves the webhook and reads the Secret every few seconds, loading a
changed certificate into its live TLS context: no restart, and the API server's trust (the CA) never changes
when only the leaf does. `helm template`, Argo CD and `helm upgrade` render no certificate at all.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from mmgraph_operator.kubeapi import call

log = logging.getLogger("mmgraph.certs")

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)
BACKDATE = datetime.timedelta(minutes=5)  # certificates start this much before they were made
CA_OVERLAP = datetime.timedelta(minutes=5)  # a new CA's first minutes: the bundle trusts the old one too
KEYS = ("ca.crt", "ca.key", "tls.crt", "tls.key")


@dataclass(frozen=True)
class CertSettings:
    namespace: str  # the operator's own namespace, where the Secret lives
    secret: str
    webhook_config: str  # the MutatingWebhookConfiguration whose caBundle the leader keeps ("" = none)
    sans: tuple[str, ...]  # DNS names and IP addresses the leaf names
    interval: float = 10.0  # seconds between two reads of the Secret


def service_sans(service: str, namespace: str) -> tuple[str, ...]:
    """The names the API server may dial a webhook Service by."""
    return (service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, none)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _builder(
    subject: str,
    issuer: x509.Name | None,
    public_key: Any,
    validity: datetime.timedelta,
    not_after: datetime.datetime | None = None,
) -> x509.CertificateBuilder:
    """`not_after`: no later than this (a leaf never outlives its CA)."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)  # clocks a little behind ours
        .not_valid_after(min(now + validity, not_after or now + validity))
    )


def issue_ca() -> dict[str, bytes]:
    key = _key()
    cert = (
        _builder("mmgraph-webhook-ca", None, key.public_key(), CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return {"ca.crt": cert.public_bytes(serialization.Encoding.PEM), "ca.key": _pem_key(key)}


def issue_leaf(ca: dict[str, bytes], sans: tuple[str, ...]) -> dict[str, bytes]:
    """A serving certificate for `sans`, signed by the CA in `ca` (its ca.crt and ca.key)."""
    ca_cert = x509.load_pem_x509_certificate(ca["ca.crt"])
    ca_key = serialization.load_pem_private_key(ca["ca.key"], None)
    key = _key()
    cert = (
        _builder(sans[0], ca_cert.subject, key.public_key(), LEAF_VALIDITY, ca_cert.not_valid_after_utc)
        .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return {"tls.crt": cert.public_bytes(serialization.Encoding.PEM), "tls.key": _pem_key(key)}


def _pair(data: dict[str, bytes], crt: str, key: str) -> x509.Certificate:
    """The certificate `crt` of `data`, checked to parse and to match its private key `key` (ValueError if not)."""
    cert = x509.load_pem_x509_certificate(data[crt])
    private = serialization.load_pem_private_key(data[key], None)
    if private.public_key().public_bytes(*PUBLIC) != cert.public_key().public_bytes(*PUBLIC):
        raise ValueError(f"{key} is not the key of {crt}")
    return cert


PUBLIC = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def ca_problem(data: dict[str, bytes], now: datetime.datetime | None = None) -> str | None:
    """Why the CA in `data` must be replaced (missing, unparseable, not a CA, its key another's, expiring: a
    Secret edited by hand or cut short must not stop the webhook for ever), else None."""
    if not (data.get("ca.crt") and data.get("ca.key")):
        return "missing"
    try:
        ca = _pair(data, "ca.crt", "ca.key")
        if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "not a CA"
    except (ValueError, TypeError, x509.ExtensionNotFound) as err:
        return f"unusable: {err}"
    if ca.not_valid_after_utc - (now or datetime.datetime.now(datetime.UTC)) < RENEW_BEFORE:
        return f"expires {ca.not_valid_after_utc:%Y-%m-%d}"
    return None


def leaf_problem(data: dict[str, bytes], sans: tuple[str, ...], now: datetime.datetime | None = None) -> str | None:
    """Why the leaf in `data` must be reissued (missing, unparseable, expiring, outliving its CA, other names,
    another CA's), else None."""
    if not all(data.get(k) for k in KEYS):
        return "incomplete"
    try:
        leaf = _pair(data, "tls.crt", "tls.key")
        ca = x509.load_pem_x509_certificate(data["ca.crt"])
        named = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "names no hosts (no subjectAltName)"
    except (ValueError, TypeError) as err:
        return f"unusable: {err}"
    if leaf.not_valid_after_utc - (now or datetime.datetime.now(datetime.UTC)) < RENEW_BEFORE:
        return f"expires {leaf.not_valid_after_utc:%Y-%m-%d}"
    if leaf.not_valid_after_utc > ca.not_valid_after_utc:
        return "outlives its CA"
    if set(named) != {_san(s) for s in sans}:
        return "names other hosts"
    try:  # by signature: two CAs of ours share a name
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by ca.crt"
    return None


def _other_cas(bundle: bytes, current: bytes) -> bytes:
    """The unexpired CA certificates in `bundle` other than `current`, as PEM."""
    now = datetime.datetime.now(datetime.UTC)
    return b"".join(
        cert.public_bytes(serialization.Encoding.PEM)
        for cert in x509.load_pem_x509_certificates(bundle)
        if cert.public_bytes(serialization.Encoding.PEM) not in current and cert.not_valid_after_utc > now
    )


def decode(secret: client.V1Secret) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


class ServingCert:
    """The webhook server's TLS context, reloaded in place when the certificate changes: new handshakes get the
    new one, open connections keep theirs, the server never restarts. ssl loads chains from files only, so each
    pair is written to a private directory first. kopf is given the first pair's paths (it needs some, or it would
    load a self-signed certificate into the context); they never change, since kopf restarts its server (a moment
    of refused connections) when the files it was given change."""

    def __init__(self) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.dir = Path(tempfile.mkdtemp(prefix="mmgraph-webhook-"))
        self.certfile, self.keyfile = self.dir / "tls-0.crt", self.dir / "tls-0.key"
        self.loaded: bytes | None = None
        self.loads = 0
        self.ready = asyncio.Event()  # set once the context has a certificate

    def load(self, crt: bytes, key: bytes, source: str) -> None:
        if crt == self.loaded:
            return
        certfile, keyfile = self.dir / f"tls-{self.loads}.crt", self.dir / f"tls-{self.loads}.key"
        keyfile.touch(mode=0o600)
        keyfile.write_bytes(key)
        certfile.write_bytes(crt)
        self.context.load_cert_chain(certfile, keyfile)
        if self.loads > 1:  # the seed pair stays (kopf's); the one before this is done with
            (self.dir / f"tls-{self.loads - 1}.key").unlink(missing_ok=True)
            (self.dir / f"tls-{self.loads - 1}.crt").unlink(missing_ok=True)
        log.info("serving the webhook certificate %s %s", "rotated in" if self.loaded else "from", source)
        self.loaded, self.loads = crt, self.loads + 1
        self.ready.set()

    async def watch_files(self, directory: Path, interval: float) -> None:
        """Bring-your-own files (cert-manager's Secret, mounted): the kubelet rewrites them when it renews."""
        while True:
            try:
                self.load((directory / "tls.crt").read_bytes(), (directory / "tls.key").read_bytes(), str(directory))
            except (OSError, ssl.SSLError) as err:  # missing or half-written: serve what we have, look again
                log.warning("webhook certificate in %s: %s", directory, err)
            await asyncio.sleep(interval)


class CertKeeper:
    """`ensure` (the leader) keeps the Secret and the caBundle right; `keep` (every replica) runs it while
    leading and loads the Secret's current certificate into `serving`."""

    def __init__(self, api: client.ApiClient, settings: CertSettings, serving: ServingCert):
        self.core = client.CoreV1Api(api)
        self.admission = client.AdmissionregistrationV1Api(api)
        self.settings, self.serving = settings, serving

    async def read(self) -> dict[str, bytes] | None:
        try:
            return decode(await call(self.core.read_namespaced_secret, self.settings.secret, self.settings.namespace))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    async def ensure(self) -> dict[str, bytes]:
        """Leader only: the Secret holds a CA and a valid leaf for our names, and the webhook trusts that CA;
        returns what the Secret now holds."""
        s = self.settings
        data = await self.read()
        if data is None:
            data = issue_ca()
            data |= issue_leaf(data, s.sans)
            body = client.V1Secret(
                metadata=client.V1ObjectMeta(name=s.secret, namespace=s.namespace),
                type="Opaque",
                data={k: base64.b64encode(v).decode() for k, v in data.items()},
            )
            try:
                await call(self.core.create_namespaced_secret, s.namespace, body)
                log.info("created the webhook certificate in Secret %s/%s", s.namespace, s.secret)
            except ApiException as err:
                if err.status != 409:
                    raise
                data = await self.read() or {}  # another replica made it first: keep theirs
        if reason := ca_problem(data):
            log.warning("issuing a new webhook CA: the one in Secret %s/%s is %s", s.namespace, s.secret, reason)
            data |= issue_ca()  # its leaf is then another CA's: reissued below
        if reason := leaf_problem(data, s.sans):
            data |= issue_leaf(data, s.sans)
            patch = {"data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
            await call(self.core.patch_namespaced_secret, s.secret, s.namespace, patch)
            log.info("reissued the webhook certificate (%s)", reason)
        if s.webhook_config:
            await self._trust(data["ca.crt"])
        return data

    async def _trust(self, ca: bytes) -> None:
        """caBundle = ca.crt; for CA_OVERLAP after a new CA, also the CAs it trusted before, so a replica that has
        not yet loaded the new leaf (it looks every few seconds) is still trusted."""
        try:
            config = await call(self.admission.read_mutating_webhook_configuration, self.settings.webhook_config)
        except ApiException as err:
            if err.status == 404:  # not installed (yet): nothing to keep
                return
            raise
        bundle = ca
        issued = x509.load_pem_x509_certificate(ca).not_valid_before_utc + BACKDATE
        if datetime.datetime.now(datetime.UTC) - issued < CA_OVERLAP:
            before = {h.client_config.ca_bundle for h in config.webhooks or [] if h.client_config.ca_bundle}
            bundle += b"".join(_other_cas(base64.b64decode(b), ca) for b in sorted(before))
        wanted = base64.b64encode(bundle).decode()
        hooks = config.webhooks or []
        stale = [h for h in hooks if h.client_config.ca_bundle != wanted]
        if not stale:
            return
        for hook in stale:
            hook.client_config.ca_bundle = wanted
        await call(self.admission.replace_mutating_webhook_configuration, self.settings.webhook_config, config)
        log.info("set caBundle of %s (%d webhooks)", self.settings.webhook_config, len(stale))

    async def keep(self, leading: Callable[[], bool]) -> None:
        """Every replica, forever: the leader keeps the Secret and caBundle right; everyone serves what the Secret
        holds now. A failed pass (the API server away) serves what was loaded and tries again."""
        while True:
            try:
                data = await self.ensure() if leading() else await self.read()
                if data and data.get("tls.crt") and data.get("tls.key"):
                    self.serving.load(data["tls.crt"], data["tls.key"], f"Secret {self.settings.secret}")
                elif not self.serving.ready.is_set():
                    log.info(
                        "waiting for the leader to make Secret %s/%s", self.settings.namespace, self.settings.secret
                    )
            except Exception as err:
                log.warning("webhook certificate: %s", err)
            await asyncio.sleep(self.settings.interval)
