"""The loop's writes to a graph's children: apply what drifted, hand an autoscaled Deployment's replicas over to its
HPA, create the peer credential, prune what render no longer produces; every write guarded by the lease.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from mmgraph_contract.graph import MultimodalGraph
from mmgraph_operator import metrics
from mmgraph_operator.drift import ChildKey, GraphKey, _owners, _rv_text, digest, drifted, owned
from mmgraph_operator.kubeapi import call
from mmgraph_operator.render import peer_credential

FIELD_MANAGER = "mmgraph-operator"
HANDOVER_MANAGER = "mmgraph-operator-handover"  # holds an autoscaled Deployment's replicas until the HPA writes them
WRITE_MARGIN = 1.0  # seconds before the lease could be taken over by which a write has been given up

log = logging.getLogger("mmgraph.operator")


class NotLeading(RuntimeError):
    """A write this replica may no longer make."""


def hands_over_replicas(manifest: dict[str, Any], live: dict[str, Any]) -> bool:
    """The manifest leaves a Deployment's replicas out while the live object's replicas are still ours."""
    if manifest["kind"] != "Deployment" or "replicas" in manifest["spec"]:
        return False
    return any(
        entry.get("manager") == FIELD_MANAGER and "f:replicas" in (entry.get("fieldsV1") or {}).get("f:spec", {})
        for entry in (live.get("metadata") or {}).get("managedFields") or []
    )


class ChildWriter:
    """Mixed into the Reconciler (reconcile.py), whose __init__ sets these attributes."""

    api: client.ApiClient
    dyn: dynamic.DynamicClient
    children: dict[GraphKey, dict[ChildKey, dict[str, Any]]]
    applied: dict[ChildKey, tuple[str, str]]
    leading: asyncio.Event
    lease_ends: Callable[[], float]

    async def _ensure(
        self, key: GraphKey, uid: str, ck: ChildKey, manifest: dict[str, Any], foreign: list[str]
    ) -> bool:
        """Apply `manifest` if the child is missing or differs; True when a write was made. Read before writing
        (the cache may lag, and it holds only what carries our labels): an object of the child's name that this
        graph does not own is left alone and named in `foreign`, since applying would take it over, and deleting
        the graph would then have the garbage collector delete it."""
        live = self.children[key].get(ck)
        if live is not None and owned(live, uid) and not drifted(manifest, live):
            return False
        fresh = await self._get(ck)
        if fresh is not None and not owned(fresh, uid):
            self.children[key].pop(ck, None)
            foreign.append(f"{ck.kind} {ck.name}{_owners(fresh, key[1])}")
            return False
        if fresh is not None:
            self.children[key][ck] = fresh
            where = drifted(manifest, fresh)
            if not where or self.applied.get(ck) == (digest(manifest), _rv_text(fresh)):
                return False  # in sync, or the server normalised what we applied last time
            log.info("%s %s/%s drifted at %s; applying", ck.kind, ck.namespace, ck.name, where)
        if fresh is not None and hands_over_replicas(manifest, fresh):
            await self._hand_over_replicas(ck, fresh)
        live = await self._apply(ck, manifest, FIELD_MANAGER)
        self.children[key][ck] = live
        self.applied[ck] = (digest(manifest), _rv_text(live))
        return True

    async def _apply(self, ck: ChildKey, body: dict[str, Any], manager: str) -> dict[str, Any]:
        """Server-side apply `body` as `manager` (taking its fields from anyone else); the object as written."""
        result = await call(
            self._writing(self._resource(ck).server_side_apply),
            body=body,
            name=ck.name,
            namespace=ck.namespace,
            field_manager=manager,
            force_conflicts=True,
        )
        metrics.WRITES.labels(verb="apply", kind=ck.kind).inc()
        return result.to_dict()

    async def _hand_over_replicas(self, ck: ChildKey, live: dict[str, Any]) -> None:
        """Before an apply that leaves `replicas` out (the stage became autoscaled), a second field manager takes
        the field at its live value. Otherwise the API server would drop a field its only owner stopped applying,
        and the Deployment would run at the default of 1 replica until the HPA scaled it back."""
        body = {
            "apiVersion": ck.api_version,
            "kind": ck.kind,
            # the count we read, or a 409 (the HPA scaled since: the pass is retried with what it wrote)
            "metadata": {"name": ck.name, "namespace": ck.namespace, "resourceVersion": _rv_text(live)},
            "spec": {"replicas": max(1, live["spec"]["replicas"])},  # an HPA does not scale a stage at 0
        }
        await self._apply(ck, body, HANDOVER_MANAGER)
        log.info(
            "%s %s/%s: replicas (%d) handed over to the autoscaler",
            ck.kind,
            ck.namespace,
            ck.name,
            live["spec"]["replicas"],
        )

    async def _create_credential(self, graph: MultimodalGraph) -> list[str]:
        """Create the graph's peer credential Secret with a random token, once: status records it (running_status),
        and a 409 means a lost status write. The operator never reads Secrets, so it never compares or rotates."""
        manifest = peer_credential(graph, secrets.token_urlsafe(32))
        try:
            await call(self._writing(client.CoreV1Api(self.api).create_namespaced_secret), graph.namespace, manifest)
        except ApiException as err:
            if err.status != 409:
                raise
            return []
        metrics.WRITES.labels(verb="create", kind="Secret").inc()
        return [f"Secret {manifest['metadata']['name']}"]

    async def _prune(self, key: GraphKey, uid: str, ck: ChildKey) -> bool:
        fresh = await self._get(ck)
        self.children[key].pop(ck, None)
        self.applied.pop(ck, None)
        if fresh is None or not owned(fresh, uid):  # labels anyone could set do not make it ours to delete
            return False
        uid = fresh["metadata"].get("uid")  # the object we read, not one of the same name made since
        options = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}}
        try:
            await call(self._writing(self._resource(ck).delete), name=ck.name, namespace=ck.namespace, body=options)
        except ApiException as err:
            if err.status not in (404, 409):  # 409: its uid is another's now: not ours to delete
                raise
            return False
        metrics.WRITES.labels(verb="delete", kind=ck.kind).inc()
        return True

    async def _get(self, ck: ChildKey) -> dict[str, Any] | None:
        try:
            return (await call(self._resource(ck).get, name=ck.name, namespace=ck.namespace)).to_dict()
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def _writing(self, fn: Any) -> Any:
        """`fn`, refused in its thread at the last moment if this replica no longer leads, and given up (its
        client timeout) before another replica could take the lease over (`lease_ends`): a write queued before
        the lease was lost, or slow past it, must not land while another replica reconciles."""

        def guarded(*args: Any, **kwargs: Any) -> Any:
            left = self.lease_ends() - time.monotonic() - WRITE_MARGIN
            if not self.leading.is_set() or left <= 0:
                raise NotLeading("this replica lost the lease")
            kwargs["_request_timeout"] = min(kwargs.get("_request_timeout") or left, left)
            return fn(*args, **kwargs)

        return guarded

    def _resource(self, ck: ChildKey) -> Any:
        return self.dyn.resources.get(api_version=ck.api_version, kind=ck.kind)
