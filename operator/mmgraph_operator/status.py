"""Pure functions from what the cluster shows (the stage Deployments) to a MultimodalGraph's status.

Kept apart from the reconcile loop so that the rules (when a stage counts as ready, when a condition changes,
what a transition time is) are unit-tested without a cluster. The clock is an argument.
"""

from __future__ import annotations

from typing import Any

from mmgraph_contract.graph import MultimodalGraph, peer_credential_name

Status = dict[str, Any]


def stage_counts(deployment: dict[str, Any] | None) -> dict[str, int]:
    status = (deployment or {}).get("status") or {}
    return {
        "replicas": int(status.get("replicas") or 0),
        "readyReplicas": int(status.get("readyReplicas") or 0),
        "updatedReplicas": int(status.get("updatedReplicas") or 0),
    }


def stage_ready(deployment: dict[str, Any] | None) -> bool:
    """Rolled out: the controller saw the current template, every pod is updated and ready, none left over."""
    if deployment is None:
        return False
    want = _want(deployment)
    status = deployment.get("status") or {}
    seen = int(status.get("observedGeneration") or 0) >= int(deployment["metadata"].get("generation") or 0)
    counts = stage_counts(deployment)
    return seen and counts["updatedReplicas"] >= want and counts["readyReplicas"] >= want and counts["replicas"] == want


def _want(deployment: dict[str, Any] | None) -> int:
    return int((deployment or {}).get("spec", {}).get("replicas", 1))


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def running_status(
    graph: MultimodalGraph, deployments: dict[str, dict[str, Any] | None], endpoint: str
) -> dict[str, Any]:
    """Status of a valid graph whose objects were applied; `deployments` maps each used stage to its Deployment."""
    generation = graph.metadata.get("generation")
    stages = {stage: stage_counts(dep) for stage, dep in deployments.items()}
    waiting = [stage for stage, dep in deployments.items() if not stage_ready(dep)]
    ready = not waiting
    detail = ", ".join(f"{s} ({stages[s]['readyReplicas']}/{_want(deployments[s])} ready)" for s in waiting)
    conditions = [
        _condition(
            "Ready",
            ready,
            "StagesReady" if ready else "StagesNotReady",
            "every stage is rolled out and ready" if ready else f"waiting for {detail}",
            generation,
        ),
        _condition(
            "Progressing",
            not ready,
            "RollingOut" if waiting else "Converged",
            f"rolling out {', '.join(waiting)}" if waiting else "all stages run the current spec",
            generation,
        ),
        _condition("Degraded", False, "Reconciled", "the spec is valid and applied", generation),
    ]
    return {
        "observedGeneration": generation,
        "phase": "Ready" if ready else "Progressing",
        "readyStages": f"{len(deployments) - len(waiting)}/{len(deployments)}",
        "endpoint": endpoint,
        "peerCredential": peer_credential_name(graph),  # reached only once the Secret exists
        "stages": stages,
        "conditions": conditions,
    }


def degraded_status(graph_body: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    """Status of a graph the operator could not apply: what is running stays, Degraded says why."""
    generation = graph_body.get("metadata", {}).get("generation")
    old = dict(graph_body.get("status") or {})
    kept = [c for c in old.get("conditions") or [] if c.get("type") not in ("Degraded", "Progressing")]
    old.update(
        {
            "observedGeneration": generation,
            "phase": "Degraded",
            "conditions": [
                *kept,
                _condition("Degraded", True, reason, message, generation),
                _condition("Progressing", False, reason, "not applied: fix the spec", generation),
            ],
        }
    )
    return old


def with_degraded(status: Status, reason: str, message: str, generation: int | None) -> Status:
    """A running graph that lacks something it asked for: what could be applied runs, Degraded says what not."""
    conditions = [c for c in status["conditions"] if c["type"] != "Degraded"]
    return {
        **status,
        "phase": "Degraded",
        "conditions": [*conditions, _condition("Degraded", True, reason, message, generation)],
    }


def already_degraded(status: Status | None, reason: str, message: str) -> bool:
    """The status already says Degraded for this reason and message (so its Event was posted)."""
    old = next((c for c in (status or {}).get("conditions") or [] if c.get("type") == "Degraded"), {})
    return (old.get("status"), old.get("reason"), old.get("message")) == ("True", reason, message)


def with_transition_times(new: Status, old: Status | None, now: str) -> Status:
    """Copy each condition's lastTransitionTime from `old` when its status did not change, else stamp `now`."""
    before = {c["type"]: c for c in (old or {}).get("conditions") or []}
    conditions = []
    for cond in new.get("conditions") or []:
        prev = before.get(cond["type"])
        same = prev is not None and prev.get("status") == cond["status"] and prev.get("lastTransitionTime")
        conditions.append({**cond, "lastTransitionTime": prev["lastTransitionTime"] if same else now})
    return {**new, "conditions": conditions}


def status_patch(new: Status, old: Status | None) -> Status | None:
    """A JSON merge patch turning `old` into `new`, or None when they already agree (so no write is made)."""
    old = old or {}
    patch: Status = {}
    for key in set(new) | set(old):
        if key == "kopf":
            continue
        if key not in new:
            patch[key] = None
        elif new[key] != old.get(key):
            if isinstance(new[key], dict) and isinstance(old.get(key), dict):
                patch[key] = {**new[key], **{k: None for k in old[key] if k not in new[key]}}
            else:
                patch[key] = new[key]
    return patch or None
