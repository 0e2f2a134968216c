"""The pure rules under the reconcile loop: condition transition times, the Degraded Event's memory, and drift
detection that accepts the API server's canonical quantities."""

from __future__ import annotations

from argocd import health

from mmgraph_operator.drift import drifted
from mmgraph_operator.status import already_degraded, degraded_status, with_transition_times


def _cond(kind: str, status: str, time: str | None = None, **more: str) -> dict:
    return {"type": kind, "status": status, **({"lastTransitionTime": time} if time else {}), **more}


def test_a_condition_keeps_its_transition_time_until_its_status_changes():
    old = {"conditions": [_cond("Ready", "False", "T0"), _cond("Degraded", "False", "T0")]}
    same = with_transition_times({"conditions": [_cond("Ready", "False", reason="x")]}, old, "T1")
    assert same["conditions"][0]["lastTransitionTime"] == "T0"  # a new reason or message is not a transition
    flipped = with_transition_times({"conditions": [_cond("Ready", "True"), _cond("Degraded", "False")]}, old, "T1")
    assert [c["lastTransitionTime"] for c in flipped["conditions"]] == ["T1", "T0"]
    first = with_transition_times({"conditions": [_cond("Progressing", "True")]}, old, "T1")
    assert first["conditions"][0]["lastTransitionTime"] == "T1"  # a condition seen for the first time
    assert (
        with_transition_times({"conditions": [_cond("Ready", "True")]}, None, "T2")["conditions"][0][
            "lastTransitionTime"
        ]
        == "T2"
    )


def test_the_stored_degraded_condition_remembers_what_was_said():
    body = {"metadata": {"generation": 3}, "status": {"conditions": [_cond("Ready", "True", "T0")]}}
    assert not already_degraded(body["status"], "InvalidSpec", "bad topology")
    status = degraded_status(body, "InvalidSpec", "bad topology")
    assert already_degraded(status, "InvalidSpec", "bad topology")
    assert not already_degraded(status, "InvalidSpec", "another problem")
    assert not already_degraded(status, "ApplyFailed", "bad topology")
    assert _cond("Ready", "True", "T0") in status["conditions"]  # what runs is still reported


def test_drift_ignores_the_servers_canonical_quantities_but_not_other_values():
    desired = {"resources": {"limits": {"cpu": "1000m", "memory": "1Gi", "nvidia.com/gpu": 1}}}
    canonical = {"resources": {"limits": {"cpu": "1", "memory": "1073741824", "nvidia.com/gpu": "1"}}}
    assert drifted(desired, canonical) is None
    assert drifted(desired, {"resources": {"limits": {**canonical["resources"]["limits"], "cpu": "2"}}}) == (
        ".resources.limits.cpu"
    )
    assert drifted({"image": "a:1"}, {"image": "a:2"}) == ".image"
    assert drifted({"replicas": 1}, {"replicas": 1, "added": "by the server"}) is None
    assert drifted({"args": ["a", "b"]}, {"args": ["a"]}) == ".args"
    assert drifted({"cpu": "1000m"}, {"cpu": "1"}) == ".cpu"  # only under requests/limits is a quantity a quantity


def test_argo_cd_health_before_the_operator_has_answered():
    """Argo CD (docs/argocd/health.lua) waits while the operator has not written a status for this generation,
    whatever an older status said."""
    assert health({"metadata": {"generation": 1}})[0] == "Progressing"
    ready = {"observedGeneration": 1, "conditions": [_cond("Ready", "True", message="every stage is ready")]}
    assert health({"metadata": {"generation": 1}, "status": ready}) == ("Healthy", "every stage is ready")
    status, message = health({"metadata": {"generation": 2}, "status": ready})
    assert (status, message) == ("Progressing", "waiting for the mmgraph operator to apply generation 2")
