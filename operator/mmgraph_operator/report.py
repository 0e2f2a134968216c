"""What the loop tells people about a graph: its status (patched only when it changed), Degraded with a Warning
Event once per condition, and a Normal Event naming what a pass wrote.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from mmgraph_contract.graph import MultimodalGraph
from mmgraph_contract.vocabulary import GROUP, KIND, PLURAL, VERSION
from mmgraph_operator import metrics
from mmgraph_operator.apply import FIELD_MANAGER
from mmgraph_operator.drift import GraphKey, _rv
from mmgraph_operator.kubeapi import call
from mmgraph_operator.served import RECHECK
from mmgraph_operator.status import (
    already_degraded,
    degraded_status,
    status_patch,
    with_degraded,
    with_transition_times,
)

log = logging.getLogger("mmgraph.operator")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reporter:
    """Mixed into the Reconciler (reconcile.py), whose __init__ sets these attributes; it writes through the
    Reconciler's `_writing` (apply.py) and looks again through its `poke`."""

    api: client.ApiClient
    graphs: dict[GraphKey, dict[str, Any]]

    async def _partly_applied(self, body: dict[str, Any], status: dict[str, Any], reason: str, msg: str) -> None:
        """What was asked but cannot be made here: Degraded (with an Event once) while the rest runs, and looked at
        again every RECHECK seconds, since what is in the way (a missing CRD, an object not ours) may go."""
        said = already_degraded(body.get("status"), reason, msg)
        await self._write_status(body, with_degraded(status, reason, msg, body["metadata"].get("generation")))
        if not said:
            await self._event(body, "Warning", reason, msg)
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        asyncio.get_running_loop().call_later(RECHECK, lambda: key in self.graphs and self.poke(key))

    async def _degraded(self, key: GraphKey, body: dict[str, Any], reason: str, msg: str) -> None:
        """Degraded with a Warning Event, posted when the condition changes: the stored status is the memory of
        what was said, so a restarted operator does not post it again."""
        log.warning("MultimodalGraph %s/%s is not applied: %s", *key, msg)
        said = already_degraded(body.get("status"), reason, msg)
        await self._write_status(body, degraded_status(body, reason, msg))
        if not said:
            await self._event(body, "Warning", reason, msg)
        metrics.RECONCILES.labels(result="degraded").inc()

    async def _write_status(self, body: dict[str, Any], new: dict[str, Any]) -> None:
        old = body.get("status") or {}
        new = with_transition_times(new, old, now())  # unchanged conditions keep their time: no spurious diff
        patch = status_patch(new, old)
        if patch is None:
            return
        meta = body["metadata"]
        result = await call(
            self._writing(client.CustomObjectsApi(self.api).patch_namespaced_custom_object_status),
            GROUP,
            VERSION,
            meta["namespace"],
            PLURAL,
            meta["name"],
            {"status": patch},
        )
        metrics.WRITES.labels(verb="patch", kind="MultimodalGraph/status").inc()
        key = (meta["namespace"], meta["name"])
        if key in self.graphs and _rv(result) >= _rv(self.graphs[key]):
            self.graphs[key] = result

    async def _event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        stamp = now()
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": body["apiVersion"],
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": kind,
            "reason": reason,
            "message": message,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await call(self._writing(client.CoreV1Api(self.api).create_namespaced_event), meta["namespace"], event)
            metrics.WRITES.labels(verb="create", kind="Event").inc()
        except ApiException as err:  # an Event is a courtesy: never fail a reconcile over it
            log.warning("could not post Event %s for %s: %s", reason, meta["name"], err.reason)


def not_admitted(graph: MultimodalGraph) -> str:
    return (
        f"generation {graph.metadata.get('generation')} of the spec was not checked by the admission webhook (it was "
        "sent while the operator was down, or past the webhook), so it is not applied: what runs is the last spec "
        "that was. To have it checked, touch it as someone allowed to use what it asks for, e.g. kubectl annotate "
        f'multimodalgraph {graph.name} -n {graph.namespace} mmgraph.io/recheck="$(date +%s)" --overwrite'
    )


def not_owned(foreign: list[str]) -> str:
    return (
        f"{', '.join(foreign)} already exists and is not this graph's, so it is left as it is and the rest is applied: "
        "delete or rename it, or give the graph another name"
    )


def not_served(unserved: list[dict[str, Any]]) -> str:
    kinds = ", ".join(sorted({f"{m['kind']} ({m['apiVersion']})" for m in unserved}))
    return (
        f"spec.monitoring asks for a {kinds}, which this cluster does not serve: install the Prometheus "
        "Operator's CRDs, or set spec.monitoring.podMonitor to false; everything else is applied"
    )
