"""Proof that a graph's spec passed the webhook, which the reconciler asks for before it applies anything.

The webhook is not called while the operator is down, and its configuration lets updates through then
(`failurePolicy: Ignore`; 1.20 has no `matchConditions` to let only metadata through), so that a finalizer's
removal or a label edit never waits on us. What keeps a spec that skipped the check from running is this stamp:
the webhook, having checked a spec for the user who sent it, writes an HMAC of (namespace, name, spec) into the
`mmgraph.io/admitted` annotation, and the reconciler applies a spec only when its stamp verifies. Nobody but the
operator holds the key (a Secret in its own namespace, which the leader makes once), so a stamp cannot be forged,
only copied from a spec of that same graph name that was checked before.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from mmgraph_contract.graph import MultimodalGraph
from mmgraph_operator.kubeapi import call

STAMP = "mmgraph.io/admitted"
RECHECK = "mmgraph.io/recheck"  # an edit that sets or changes it asks the webhook to check a spec not admitted
STAMP_VERSION = "v1"
KEY_FIELD = "hmac.key"
MIN_KEY = 32  # bytes

log = logging.getLogger("mmgraph.admission")


def spec_digest(graph: MultimodalGraph) -> bytes:
    """The spec as the operator reads it (one spelling of engineArgs, defaults left out): a default the CRD's
    schema fills in on read, or a field a newer operator adds, does not change what was checked."""
    spec = graph.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    subject = json.dumps([graph.namespace, graph.name, spec], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(subject.encode()).digest()


def stamp_of(metadata: dict[str, Any]) -> str:
    return (metadata.get("annotations") or {}).get(STAMP, "")


class AdmissionKey:
    """The HMAC key, kept in a Secret of the operator's namespace, read by every replica (again every `interval`
    seconds, so a re-made key reaches every replica). Any replica makes it when it is missing (a create is atomic:
    the loser of a race reads the winner's), so a new replica starting beside an older leader that knows nothing of
    it does not wait forever; only the leader replaces an unusable one."""

    def __init__(self, api: client.ApiClient, namespace: str, secret: str):
        self.core = client.CoreV1Api(api)
        self.namespace, self.secret = namespace, secret
        self.key: bytes | None = None
        self.ready = asyncio.Event()

    def stamp(self, graph: MultimodalGraph) -> str:
        assert self.key is not None, "the admission key is not loaded yet"
        mac = hmac.new(self.key, spec_digest(graph), hashlib.sha256).digest()
        return f"{STAMP_VERSION}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"

    def admitted(self, graph: MultimodalGraph) -> bool:
        """Whether this graph's spec, under this name, is one the webhook checked."""
        return self.key is not None and hmac.compare_digest(stamp_of(graph.metadata), self.stamp(graph))

    async def keep(self, leading: Callable[[], bool], interval: float) -> None:
        while True:
            try:
                await self._load(repair=leading())
            except Exception as err:  # the API server away: keep the key we have, look again
                log.warning("admission key: %s", err)
            await asyncio.sleep(interval)

    async def _load(self, repair: bool) -> None:
        key, exists = await self._read()
        if len(key) < MIN_KEY and (repair or not exists):
            key = await self._make(exists)
        if len(key) < MIN_KEY:
            if not self.ready.is_set():
                log.info("waiting for the leader to make Secret %s/%s", self.namespace, self.secret)
            return
        if key != self.key:
            log.info(
                "admission key %s Secret %s/%s",
                "changed in" if self.key else "loaded from",
                self.namespace,
                self.secret,
            )
        self.key = key
        self.ready.set()

    async def _read(self) -> tuple[bytes, bool]:
        """The key (b"" when missing or unreadable) and whether the Secret exists."""
        try:
            secret = await call(self.core.read_namespaced_secret, self.secret, self.namespace)
        except ApiException as err:
            if err.status == 404:
                return b"", False
            raise
        try:
            return base64.b64decode((secret.data or {}).get(KEY_FIELD) or "", validate=True), True
        except ValueError:
            return b"", True

    async def _make(self, exists: bool) -> bytes:
        """A Secret without a usable key gets a new one (the leader only): the graphs stamped with the old key are
        then not admitted until someone applies them again, which beats a webhook that never becomes ready."""
        key = secrets.token_bytes(MIN_KEY)
        data = {KEY_FIELD: base64.b64encode(key).decode()}
        if exists:
            await call(self.core.patch_namespaced_secret, self.secret, self.namespace, {"data": data})
            log.warning("Secret %s/%s held no usable admission key: made a new one", self.namespace, self.secret)
            return key
        body = {"metadata": {"name": self.secret, "namespace": self.namespace}, "type": "Opaque", "data": data}
        try:
            await call(self.core.create_namespaced_secret, self.namespace, body)
        except ApiException as err:
            if err.status != 409:
                raise
            return (await self._read())[0]  # another replica made it first: theirs
        log.info("made the admission key in Secret %s/%s", self.namespace, self.secret)
        return key
