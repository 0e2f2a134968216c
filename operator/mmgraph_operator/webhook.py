"""The admission webhook: refuse at `kubectl apply` time what the CRD schema cannot, and what the graph's author
could not do themselves; stamp what passes, so the reconciler can tell (admission.py).

Three checks, in order: the pydantic model, then `problems` (the same two the reconciler runs, so a graph refused
here would also be reported Degraded if it got in without the webhook), then authorization: the API server is
asked, as the user who sent the graph (SubjectAccessReview), whether they could create its pods and use what those
pods would borrow (Secrets, ConfigMaps, PersistentVolumeClaims, a ServiceAccount). The operator's own power is not
lent: a graph's pods get no credential or volume its author could not read. What the right to create a graph
itself grants (pods of the image, commands and placement the spec names, under the namespace's default
ServiceAccount) is the cluster admin's to give: docs/architecture.md, "what a graph's author may ask for".

A metadata-only update never waits on the check: the stamp of an admitted spec carries over, and an update of a
spec not admitted yet (say, it was applied while the operator was down) is checked as whoever sends it, and passes
either way, stamped only if they could use what it asks for.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client
from pydantic import ValidationError

from mmgraph_operator.admission import STAMP, AdmissionKey, spec_digest
from mmgraph_operator.api import MultimodalGraph, explain, parse, peer_credential_name, problems
from mmgraph_operator.commands import api_stage
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


def needs(graph: MultimodalGraph, manifests: list[dict[str, Any]]) -> list[Need]:
    """What creating `manifests` would let the graph's pods do, read from the pod templates render produced (so
    no field of the spec can add a reference this misses). The graph's own peer credential is the operator's to
    make, not the author's to read."""
    found: set[Need] = set()
    for manifest in manifests:
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
    if meta.get("deletionTimestamp"):
        return  # on its way out, never applied again: finalizers come off without any check
    graph, manifests = _valid(body, kube_version)
    before = _parsed(old) if operation == "UPDATE" else None
    same_spec = before is not None and spec_digest(before) == spec_digest(graph)
    if same_spec and key.admitted(before):
        patch.meta.annotations[STAMP] = key.stamp(graph)  # metadata only: the stamp carries over
        return
    missing = await lacking(api, userinfo, graph.namespace, needs(graph, manifests))
    if not missing:
        patch.meta.annotations[STAMP] = key.stamp(graph)
        return
    if not same_spec:
        raise kopf.AdmissionError(refusal(userinfo, missing), code=403)
    patch.meta.annotations[STAMP] = None  # a metadata edit passes, and the spec stays unapplied
    warnings.append(f"the spec is not applied: {refusal(userinfo, missing)}")


def _valid(body: kopf.Body, kube_version: str) -> tuple[MultimodalGraph, list[dict[str, Any]]]:
    """The graph and what it renders to, or a 422 naming every field to change."""
    try:
        graph = parse(dict(body))
    except ValidationError as err:
        raise kopf.AdmissionError(explain(err), code=422) from None
    if found := problems(graph):
        raise kopf.AdmissionError("; ".join(found), code=422)
    try:
        return graph, render(graph, kube_version, api_stage(graph.spec))
    except InvalidGraph as err:
        raise kopf.AdmissionError(str(err), code=422) from None


def _parsed(body: kopf.Body | None) -> MultimodalGraph | None:
    try:
        return parse(dict(body)) if body is not None else None
    except ValidationError:
        return None
