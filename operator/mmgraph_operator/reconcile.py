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
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from mmgraph_contract.graph import MultimodalGraph, explain, parse, peer_credential_name
from mmgraph_contract.settings import api_stage, process_stages
from mmgraph_contract.vocabulary import StageName
from mmgraph_operator import metrics
from mmgraph_operator.admission import AdmissionKey
from mmgraph_operator.apply import ChildWriter
from mmgraph_operator.drift import ChildKey, GraphKey, _rv, child_key, owner_of
from mmgraph_operator.kubeapi import call
from mmgraph_operator.names import GRAPH_LABEL, MANAGED_BY, SERVES_API, STAGE_LABEL, child_name
from mmgraph_operator.render import InvalidGraph, endpoint, render
from mmgraph_operator.report import Reporter, not_admitted, not_owned, not_served
from mmgraph_operator.served import ServedKinds
from mmgraph_operator.status import running_status, stage_ready

DEBOUNCE = 0.05  # seconds to gather a burst of events into one pass
MAX_BACKOFF = 60.0

log = logging.getLogger("mmgraph.operator")


@dataclass
class GraphState:
    pending: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class Reconciler(Reporter, ChildWriter, ServedKinds):
    """Owns the caches and the per-graph tasks; kopf handlers only call graph_event/child_event. Its writes to
    children (apply.py), its status and Events (report.py) and what the server serves (served.py) are mixed in."""

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
        marked = ((deployment or {}).get("metadata") or {}).get("annotations") or {}
        serving = target == StageName.FRONTEND or marked.get(SERVES_API) == "true"
        return target if stage_ready(deployment) and serving else StageName(now)


def _terminating(err: ApiException) -> bool:
    return err.status == 403 and "being terminated" in (err.body or "")


def _api_message(err: ApiException) -> str:
    try:
        return json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{err.status} {err.reason}"
