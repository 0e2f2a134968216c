"""The admission webhook: refuse at `kubectl apply` time what the CRD schema cannot, and what the graph's author
could not do themselves; stamp what passes, so the reconciler can tell (admission.py).

Three checks, in order: the pydantic model, then `problems` (the same two the reconciler runs, so a graph refused
here would also be reported Degraded if it got in without the webhook), then authorization: the API server is
asked, as the user who sent the graph (SubjectAccessReview), whether they could create its pods and use what those
pods would borrow (Secrets, ConfigMaps, PersistentVolumeClaims, a ServiceAccount). The operator's own power is not
lent: a graph's pods get no credential or volume its author could not read. What the right to create a graph
itself grants (pods of the image, commands and placement the spec names, under the namespace's default
ServiceAccount) is the cluster admin's to give: docs/architecture.md, "what a graph's author may ask for".

A metadata-only update never waits on the check: the stamp of an admitted spec carries over, and a spec not
admitted yet (say, it was applied while the operator was down) is checked as whoever sets the `mmgraph.io/recheck`
annotation; the edit passes either way, and the spec is stamped only if they could use what it asks for.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client
from pydantic import ValidationError

from mmgraph_contract.graph import MultimodalGraph, explain, parse, peer_credential_name
from mmgraph_contract.rules import problems
from mmgraph_contract.settings import api_stage
from mmgraph_operator.admission import RECHECK, STAMP, AdmissionKey, spec_digest
from mmgraph_operator.kubeapi import call
from mmgraph_operator.render import InvalidGraph, render


@dataclass(frozen=True, order=True)
class Need:
    """One right the graph's pods would exercise: `verb` on `resource` (named `name`, in the graph's namespace)."""

    what: str  # as a person says it: "Secret api-key"
    verb: str
    resource: str
    name: str = ""
    group: str = ""

    def __str__(self) -> str:
        target = f"{self.resource}/{self.name}" if self.name else self.resource
        return f"{self.what} ({self.verb} {target})"


# Rendered in place of the graph's uid (which a create's admission does not see yet, and which a client could set):
# the peer credential is then named `<graph>-peer-credential-________`, which no Secret can be named, so exempting
# that name exempts only the reference render itself adds.
PLACEHOLDER_UID = "_" * 8


def needs(graph: MultimodalGraph, kube_version: str) -> list[Need]:
    """What the graph's pods could do, read from the pod templates render produces (so no field of the spec can
    add a reference this misses). The graph's own peer credential is the operator's to make, not the author's to
    read."""
    graph = graph.model_copy(update={"metadata": {**graph.metadata, "uid": PLACEHOLDER_UID}})
    found: set[Need] = set()
    for manifest in render(graph, kube_version, api_stage(graph.spec)):
        if manifest["kind"] != "Deployment":
            continue
        pod = manifest["spec"]["template"]["spec"]
        if account := pod.get("serviceAccountName"):
            found.add(Need(f"run as ServiceAccount {account}", "impersonate", "serviceaccounts", account))
        secrets = {s["name"] for s in pod.get("imagePullSecrets") or []}
        configmaps: set[str] = set()
        claims: set[str] = set()
        for volume in pod.get("volumes") or []:
            secrets |= {volume["secret"]["secretName"]} if "secret" in volume else set()
            configmaps |= {volume["configMap"]["name"]} if "configMap" in volume else set()
            claims |= {volume["persistentVolumeClaim"]["claimName"]} if "persistentVolumeClaim" in volume else set()
            for source in (volume.get("projected") or {}).get("sources") or []:
                secrets |= {source["secret"]["name"]} if "secret" in source else set()
                configmaps |= {source["configMap"]["name"]} if "configMap" in source else set()
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            for env in container.get("env") or []:
                ref = env.get("valueFrom") or {}
                secrets |= {ref["secretKeyRef"]["name"]} if "secretKeyRef" in ref else set()
                configmaps |= {ref["configMapKeyRef"]["name"]} if "configMapKeyRef" in ref else set()
            for source in container.get("envFrom") or []:
                secrets |= {source["secretRef"]["name"]} if "secretRef" in source else set()
                configmaps |= {source["configMapRef"]["name"]} if "configMapRef" in source else set()
        secrets.discard(peer_credential_name(graph))
        found |= {Need(f"read Secret {name}", "get", "secrets", name) for name in secrets}
        found |= {Need(f"read ConfigMap {name}", "get", "configmaps", name) for name in configmaps}
        found |= {Need(f"mount PersistentVolumeClaim {n}", "get", "persistentvolumeclaims", n) for n in claims}
    return sorted(found)


async def lacking(api: client.ApiClient, user: dict[str, Any], namespace: str, wanted: list[Need]) -> list[Need]:
    """The needs the API server's authorizers deny `user` (an admission request's userInfo), asked in parallel."""
    spec = {k: user[k] for k in ("uid", "groups", "extra") if user.get(k)} | {"user": user.get("username", "")}

    async def allowed(need: Need) -> bool:
        attributes = {"namespace": namespace, "verb": need.verb, "group": need.group, "resource": need.resource}
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": spec | {"resourceAttributes": attributes | ({"name": need.name} if need.name else {})},
        }
        result = await call(client.AuthorizationV1Api(api).create_subject_access_review, review, timeout=5)
        return bool(result.status.allowed)

    verdicts = await asyncio.gather(*(allowed(need) for need in wanted))
    return [need for need, ok in zip(wanted, verdicts, strict=True) if not ok]


def unchecked(err: Exception) -> str:
    return f"the API server could not be asked whether this user may use what the graph references ({err}): try again"


def refusal(user: dict[str, Any], missing: list[Need]) -> str:
    return (
        f"{user.get('username') or 'this user'} may not {'; '.join(map(str, missing))} in this namespace, and a "
        "graph's pods get only what its author could use: ask for these rights, or take them out of the spec"
    )


async def admit_graph(
    body: kopf.Body,
    old: kopf.Body | None,
    operation: str,
    userinfo: dict[str, Any],
    patch: kopf.Patch,
    warnings: list[str],
    *,
    namespaces: list[str],
    key: AdmissionKey,
    api: client.ApiClient,
    kube_version: str,
    **_: Any,
) -> None:
    """`namespaces`: the operator's; a graph elsewhere is another operator's business (and a 1.20 server cannot
    select namespaces by name, so the webhook is asked about every namespace)."""
    meta = body.get("metadata", {})
    if namespaces and meta.get("namespace") not in namespaces:
        return
    if _meta(old, "deletionTimestamp") or meta.get("deletionTimestamp"):
        return  # on its way out, never applied again: finalizers come off without any check
    graph = _valid(body, kube_version)
    before = _parsed(old) if operation == "UPDATE" else None
    if before is None or spec_digest(before) != spec_digest(graph):  # a new spec: checked, refused or stamped
        try:
            missing = await lacking(api, userinfo, graph.namespace, needs(graph, kube_version))
        except Exception as err:
            raise kopf.AdmissionError(unchecked(err), code=503) from None
        if missing:
            raise kopf.AdmissionError(refusal(userinfo, missing), code=403)
        patch.meta.annotations[STAMP] = key.stamp(graph)
        return
    # Metadata only: it always passes. The stamp of an admitted spec carries over; a spec not admitted (it came in
    # while the operator was down) is checked only when the edit asks for it, so nobody's routine edit (a label,
    # a controller's annotation) approves another's spec unawares.
    if key.admitted(before):
        patch.meta.annotations[STAMP] = key.stamp(graph)
        return
    patch.meta.annotations[STAMP] = None
    if _meta(old, "annotations", RECHECK) == _meta(body, "annotations", RECHECK):
        return
    try:
        missing = await lacking(api, userinfo, graph.namespace, needs(graph, kube_version))
    except Exception as err:
        warnings.append(f"the spec is not applied: {unchecked(err)}")
        return
    if missing:
        warnings.append(f"the spec is not applied: {refusal(userinfo, missing)}")
        return
    patch.meta.annotations[STAMP] = key.stamp(graph)


def _valid(body: kopf.Body, kube_version: str) -> MultimodalGraph:
    """The graph, once it parses, passes the rules and renders; else a 422 naming every field to change."""
    try:
        graph = parse(dict(body))
    except ValidationError as err:
        raise kopf.AdmissionError(explain(err), code=422) from None
    if found := problems(graph):
        raise kopf.AdmissionError("; ".join(found), code=422)
    try:
        render(graph, kube_version, api_stage(graph.spec))
    except InvalidGraph as err:
        raise kopf.AdmissionError(str(err), code=422) from None
    return graph


def _meta(body: kopf.Body | None, *path: str) -> Any:
    found: Any = (body or {}).get("metadata") or {}
    for step in path:
        found = (found or {}).get(step)
    return found


def _parsed(body: kopf.Body | None) -> MultimodalGraph | None:
    try:
        return parse(dict(body)) if body is not None else None
    except ValidationError:
        return None
