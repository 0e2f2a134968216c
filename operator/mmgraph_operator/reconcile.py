"""The thin loop around `render`: make the cluster match it, and write what was observed into status.

Level-triggered and coalescing. kopf's watches feed two caches (graphs, and the children they own) and poke the
graph concerned; one asyncio task per graph then reconciles it until no poke is pending, so a burst of child
events costs one pass. A pass renders the graph, server-side-applies (concurrently) only the children that
differ from the cache, deletes children render no longer produces, and patches status only when it changed: an
unchanged graph causes no writes at all. The child cache is primed by one LIST per kind before the first pass,
so a restart does not mistake "not yet seen" for "missing"; a child that the cache shows as different is read
fresh before it is written, so a lagging cache costs a GET, never a needless write. Failures are retried with
backoff; every API call runs in a thread with a deadline.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException
from kubernetes.utils.quantity import parse_quantity
from pydantic import ValidationError

from mmgraph_operator import metrics
from mmgraph_operator.admission import AdmissionKey
from mmgraph_operator.api import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    MultimodalGraph,
    StageName,
    explain,
    parse,
    peer_credential_name,
)
from mmgraph_operator.commands import api_stage, process_stages
from mmgraph_operator.kubeapi import call
from mmgraph_operator.render import (
    GRAPH_LABEL,
    MANAGED_BY,
    OPTIONAL_KINDS,
    STAGE_LABEL,
    InvalidGraph,
    child_name,
    endpoint,
    peer_credential,
    render,
)
from mmgraph_operator.status import (
    already_degraded,
    degraded_status,
    running_status,
    stage_ready,
    status_patch,
    with_degraded,
    with_transition_times,
)

FIELD_MANAGER = "mmgraph-operator"
HANDOVER_MANAGER = "mmgraph-operator-handover"  # holds an autoscaled Deployment's replicas until the HPA writes them
DEBOUNCE = 0.05  # seconds to gather a burst of events into one pass
MAX_BACKOFF = 60.0
RECHECK = 5.0  # seconds before asking the server again whether it serves an optional kind it did not
SERVED_RECHECK = 60.0  # ... and one it did (its CRD may be deleted)
WRITE_MARGIN = 1.0  # seconds before the lease could be taken over by which a write has been given up

GraphKey = tuple[str, str]  # namespace, name


class ChildKey(NamedTuple):
    api_version: str
    kind: str
    namespace: str
    name: str


log = logging.getLogger("mmgraph.operator")


class NotLeading(RuntimeError):
    """A write this replica may no longer make."""


def child_key(obj: dict[str, Any]) -> ChildKey:
    meta = obj["metadata"]
    return ChildKey(obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


def owned(obj: dict[str, Any], uid: str) -> bool:
    """Whether the graph of this uid owns `obj`: its name and labels say nothing (anyone may set them)."""
    return any(
        ref.get("kind") == KIND and ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or []
    )


def owner_of(obj: dict[str, Any]) -> GraphKey | None:
    meta = obj.get("metadata", {})
    graph = (meta.get("labels") or {}).get(GRAPH_LABEL)
    owned = any(ref.get("kind") == KIND for ref in meta.get("ownerReferences") or [])
    return (meta.get("namespace", ""), graph) if graph and owned else None


def drifted(desired: Any, live: Any, path: tuple[str | int, ...] = ()) -> str | None:
    """The first path where `live` does not carry `desired` (fields the server added are fine), else None."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return _path(path)
        for key, value in desired.items():
            if where := drifted(value, live.get(key), (*path, key)):
                return where
        return None
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return _path(path)
        for i, (d, v) in enumerate(zip(desired, live, strict=True)):
            if where := drifted(d, v, (*path, i)):
                return where
        return None
    if desired == live:
        return None
    if path[-2:-1] in (("requests",), ("limits",)) or path[-1:] == ("averageValue",):  # quantities: the server
        # writes canonical forms (an HPA's 1.5 comes back as 1500m)
        try:
            return None if parse_quantity(desired) == parse_quantity(live) else _path(path)
        except ValueError:
            return _path(path)
    return _path(path)


def _path(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path) or "."


def hands_over_replicas(manifest: dict[str, Any], live: dict[str, Any]) -> bool:
    """The manifest leaves a Deployment's replicas out while the live object's replicas are still ours."""
    if manifest["kind"] != "Deployment" or "replicas" in manifest["spec"]:
        return False
    return any(
        entry.get("manager") == FIELD_MANAGER and "f:replicas" in (entry.get("fieldsV1") or {}).get("f:spec", {})
        for entry in (live.get("metadata") or {}).get("managedFields") or []
    )


def digest(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class GraphState:
    pending: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class Reconciler:
    """Owns the caches and the per-graph tasks; kopf handlers only call graph_event/child_event."""

    def __init__(
        self, api: client.ApiClient, kube_version: str, concurrency: int = 8, admission: AdmissionKey | None = None
    ):
        self.api = api
        self.dyn = dynamic.DynamicClient(api)
        self.kube_version = kube_version
        self.graphs: dict[GraphKey, dict[str, Any]] = {}
        self.children: dict[GraphKey, dict[ChildKey, dict[str, Any]]] = defaultdict(dict)
        self.state: dict[GraphKey, GraphState] = {}
        self.applied: dict[ChildKey, tuple[str, str]] = {}  # child -> (digest of what we applied, its rv)
        self.slots = asyncio.Semaphore(concurrency)
        self.primed = asyncio.Event()
        self.served: dict[tuple[str, str], tuple[bool, float]] = {}  # optional kinds: served?, when we asked
        self.leading = asyncio.Event()  # only the leader reconciles (leader.py); a standby keeps its caches warm
        self.lease_ends: Callable[[], float] = lambda: math.inf  # the elector's held_until, where there is one
        self.admission = admission  # with the webhook: apply only a spec it stamped (admission.py)

    async def prime(self, namespaces: list[str], kinds: list[tuple[str, str]]) -> None:
        """Fill the child cache with one LIST per kind (and namespace) before any reconcile pass runs."""
        selector = f"{GRAPH_LABEL},app.kubernetes.io/managed-by={MANAGED_BY}"
        for api_version, kind in kinds:
            if not await self._serves(api_version, kind):
                log.info("%s (%s) is not served here: graphs that ask for one are reported Degraded", kind, api_version)
                continue
            resource = self.dyn.resources.get(api_version=api_version, kind=kind)
            for ns in namespaces or [None]:
                listed = await call(resource.get, namespace=ns, label_selector=selector)
                for item in listed.to_dict()["items"]:
                    item.update(apiVersion=api_version, kind=kind)
                    self.child_event(None, item)
        self.primed.set()

    # ---- event intake (called by kopf handlers) ------------------------------------------------------------

    def graph_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.graphs.pop(key, None)
            for ck in self.children.pop(key, {}):  # Kubernetes' garbage collector removes the children
                self.applied.pop(ck, None)
            state = self.state.pop(key, None)
            if state and state.task:
                state.task.cancel()
            metrics.GRAPHS.set(len(self.graphs))
            return
        cached = self.graphs.get(key)
        if cached is None or _rv(body) >= _rv(cached):  # never go back to a body older than our own last write
            self.graphs[key] = body
        metrics.GRAPHS.set(len(self.graphs))
        self.poke(key)

    def child_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        owner = owner_of(body)
        if owner is None:
            return
        ck = child_key(body)
        if event_type == "DELETED":
            self.children[owner].pop(ck, None)
        else:
            cached = self.children[owner].get(ck)
            if cached is None or _rv(body) >= _rv(cached):
                self.children[owner][ck] = body
        if owner in self.graphs:
            self.poke(owner)

    def poke(self, key: GraphKey) -> None:
        state = self.state.setdefault(key, GraphState())
        state.pending.set()
        if state.task is None or state.task.done():
            state.task = asyncio.create_task(self._run(key, state), name=f"reconcile {key[0]}/{key[1]}")

    async def _run(self, key: GraphKey, state: GraphState) -> None:
        backoff = 1.0
        while state.pending.is_set():
            await asyncio.sleep(DEBOUNCE)
            await self.primed.wait()
            await self.leading.wait()
            if self.admission:
                await self.admission.ready.wait()  # no key yet: no graph can be told admitted
            state.pending.clear()
            try:
                async with self.slots:
                    await self.reconcile(key)
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as err:  # any failure: retry later, never lose the graph
                metrics.ERRORS.inc()
                log.warning("reconcile of %s/%s failed, retrying in %.0fs: %s", *key, backoff, err)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                state.pending.set()

    def lead(self) -> None:
        """Became the leader: the graphs waiting on it reconcile now, from caches the watches kept current."""
        self.leading.set()

    def follow(self) -> None:
        """Lost the lease: stop at once (another replica may take over any moment) and wait to lead again."""
        self.leading.clear()
        for key, state in self.state.items():
            if state.task and not state.task.done():
                state.task.cancel()
            state.task = None
            if key in self.graphs:
                self.poke(key)  # a task that waits for leadership

    async def stop(self) -> None:
        tasks = [s.task for s in self.state.values() if s.task and not s.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- one pass -------------------------------------------------------------------------------------------

    async def reconcile(self, key: GraphKey) -> None:
        body = self.graphs.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        with metrics.DURATION.time():
            try:
                graph = parse(body)
                api_pods = self._api_pods(key, graph)
                manifests = render(graph, self.kube_version, api_pods)
            except (ValidationError, InvalidGraph) as err:
                await self._degraded(
                    key, body, "InvalidSpec", explain(err) if isinstance(err, ValidationError) else str(err)
                )
                return
            if self.admission and not self.admission.admitted(graph):
                await self._degraded(key, body, "NotAdmitted", not_admitted(graph))
                return
            unserved = [m for m in manifests if not await self._serves(m["apiVersion"], m["kind"])]
            desired = {child_key(m): m for m in manifests if m not in unserved}
            uid = body["metadata"].get("uid", "")
            changed: list[str] = []
            foreign: list[str] = []
            try:
                if (body.get("status") or {}).get("peerCredential") != peer_credential_name(graph):
                    changed += await self._create_credential(graph)
                applied = await asyncio.gather(*(self._ensure(key, uid, ck, m, foreign) for ck, m in desired.items()))
                changed += [f"{ck.kind} {ck.name}" for ck, wrote in zip(desired, applied, strict=True) if wrote]
                # while agg's API moves into pd, nothing goes: the old frontend serves, through the stages it calls
                moving_in = api_pods != api_stage(graph.spec) == StageName.PD
                stale = [] if moving_in else [ck for ck in self.children[key] if ck not in desired]
                pruned = await asyncio.gather(*(self._prune(key, uid, ck) for ck in stale))
                changed += [f"deleted {ck.kind} {ck.name}" for ck, gone in zip(stale, pruned, strict=True) if gone]
            except ApiException as err:
                if _terminating(err):
                    return  # the namespace is being deleted: nothing to converge to
                if err.status in (400, 403, 422):  # the server refuses what we render: retrying will not help
                    await self._degraded(key, body, "ApplyFailed", _api_message(err))
                    return
                raise
            if changed:
                await self._event(body, "Normal", "Applied", "; ".join(changed)[:1000])
            deployments = {
                stage.value: self.children[key].get(
                    ChildKey("apps/v1", "Deployment", key[0], child_name(key[1], stage))
                )
                for stage in process_stages(graph.spec)
            }
            status = running_status(graph, deployments, endpoint(graph))
            if foreign:
                await self._partly_applied(body, status, "NotOwned", not_owned(foreign))
            elif unserved:
                await self._partly_applied(body, status, "KindNotServed", not_served(unserved))
            else:
                await self._write_status(body, status)
        metrics.RECONCILES.labels(result="applied").inc()

    async def _serves(self, api_version: str, kind: str) -> bool:
        """Whether the server serves `kind`: always for Kubernetes' own kinds; asked (again after RECHECK seconds
        while absent) for optional kinds, another operator's CRDs that may be installed after ours."""
        if (api_version, kind) not in OPTIONAL_KINDS:
            return True
        known = self.served.get((api_version, kind))
        if known and time.monotonic() - known[1] < (SERVED_RECHECK if known[0] else RECHECK):
            return known[0]
        try:
            group, version = api_version.split("/")
            found = await call(client.CustomObjectsApi(self.api).get_api_resources, group, version)
            served = any(r.kind == kind for r in found.resources or [])
        except ApiException as err:
            if err.status != 404:
                raise
            served = False
        self.served[(api_version, kind)] = (served, time.monotonic())
        return served

    async def _partly_applied(self, body: dict[str, Any], status: dict[str, Any], reason: str, msg: str) -> None:
        """What was asked but cannot be made here: Degraded (with an Event once) while the rest runs, and looked at
        again every RECHECK seconds, since what is in the way (a missing CRD, an object not ours) may go."""
        said = already_degraded(body.get("status"), reason, msg)
        await self._write_status(body, with_degraded(status, reason, msg, body["metadata"].get("generation")))
        if not said:
            await self._event(body, "Warning", reason, msg)
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        asyncio.get_running_loop().call_later(RECHECK, lambda: key in self.graphs and self.poke(key))

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

    def _api_pods(self, key: GraphKey, graph: MultimodalGraph) -> StageName:
        """Whose pods the API's Service selects: the stage that serves the API (agg: pd), except while the API moves
        between a frontend Deployment and pd's pods (an older operator's agg graph; a topology changed to or from
        agg). Then it stays where the live Service has it until the new side has rolled out pods that serve it,
        and never moves back."""
        target, children, namespace = api_stage(graph.spec), self.children[key], key[0]

        def cached(kind: str, stage: StageName) -> dict[str, Any] | None:
            version = "apps/v1" if kind == "Deployment" else "v1"
            return children.get(ChildKey(version, kind, namespace, child_name(graph.name, stage)))

        service = cached("Service", StageName.FRONTEND)
        now = ((service or {}).get("spec") or {}).get("selector", {}).get(STAGE_LABEL)
        if now not in (StageName.FRONTEND.value, StageName.PD.value) or now == target.value:
            return target
        deployment = cached("Deployment", target)
        template = (((deployment or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
        serving = target == StageName.FRONTEND or "--openai" in (
            (template.get("containers") or [{}])[0].get("args") or []
        )
        return target if stage_ready(deployment) and serving else StageName(now)

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


def _owners(obj: dict[str, Any], graph: str) -> str:
    refs = obj["metadata"].get("ownerReferences") or []
    if any(ref.get("kind") == KIND and ref.get("name") == graph for ref in refs):
        return " (left by an earlier graph of this name, until the garbage collector deletes it)"
    owners = ", ".join(f"{ref.get('kind')} {ref.get('name')}" for ref in refs)
    return f" (owned by {owners})" if refs else ""


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def _rv_text(obj: dict[str, Any]) -> str:
    return str(obj["metadata"].get("resourceVersion") or "")


def _terminating(err: ApiException) -> bool:
    return err.status == 403 and "being terminated" in (err.body or "")


def _api_message(err: ApiException) -> str:
    try:
        return json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{err.status} {err.reason}"
