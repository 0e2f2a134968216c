"""Invalid MultimodalGraphs: refused at apply time (schema or webhook) with a message a person can act on; and,
when the webhook is absent, reported Degraded with a Warning Event while nothing of them is applied."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from conftest import graph_manifest, webhook_absent
from kubecluster import wait_for
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.cluster


def _set(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set spec field `path` (dotted; a value of DELETE removes it) on a copy of `body`."""
    body = copy.deepcopy(body)
    node = body["spec"]
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return body


DELETE = object()

# (id, change to a valid e-p-d graph, who refuses it, a fragment the message must contain)
SCHEMA_CASES = [
    ("unknown-topology", ("topology", "p-d-e"), "spec.topology"),
    ("negative-replicas", ("stages.pd.replicas", -1), "spec.stages.pd.replicas"),
    ("gpus-not-a-number", ("stages.encoder.gpus", "two"), "spec.stages.encoder.gpus"),
    ("bad-scheme", ("media.allowedSchemes", ["ftp"]), "spec.media.allowedSchemes"),
    ("no-model-name", ("model.name", ""), "spec.model.name"),
    ("port-out-of-range", ("stages.frontend.port", 70000), "spec.stages.frontend.port"),
    ("bad-image-pull-policy", ("imagePullPolicy", "Sometimes"), "spec.imagePullPolicy"),
    ("zero-max-bytes", ("media.maxBytes", 0), "spec.media.maxBytes"),
    ("bad-toleration-type", ("stages.pd.tolerations", [{"key": 1}]), "spec.stages.pd.tolerations"),
]
WEBHOOK_CASES = [
    ("stage-not-in-topology", {"topology": "e-pd"}, "spec.stages.decode is set but topology e-pd does not use it"),
    ("missing-stage", {"stages.encoder": DELETE}, "topology e-p-d needs spec.stages.encoder"),
    ("agg-with-encoder", {"topology": "agg", "stages.decode": DELETE}, "spec.stages.encoder is set but topology agg"),
    (
        "two-model-sources",
        {"model.pvc": {"claimName": "models"}},
        "spec.model must name exactly one of huggingFace, pvc or path (found: huggingFace, pvc)",
    ),
    ("no-model-source", {"model.huggingFace": DELETE}, "exactly one of huggingFace, pvc or path (found: none)"),
    (
        "gpus-vs-tensor-parallel",
        {"stages.pd.gpus": 2, "stages.pd.engineArgs": {"tensor-parallel-size": 4}},
        "spec.stages.pd.gpus is 2 but its engineArgs ask for 4 GPUs",
    ),
    ("bad-tp-value", {"stages.decode.engineArgs": {"tensor-parallel-size": "many"}}, "must be a positive integer"),
    ("reserved-engine-arg", {"stages.pd.engineArgs": {"port": 9000}}, "engineArgs.port is set by the operator"),
    (
        "remote-code-behind-the-models-back",
        {"stages.decode.engineArgs": {"trust-remote-code": True}},
        "engineArgs.trust-remote-code runs code from the model repository; set spec.model.trustRemoteCode",
    ),
    ("port-clash", {"stages.encoder.port": 5600}, "spec.stages.encoder.port 5600 clashes with the NIXL side channels"),
    ("kv-port-clash", {"stages.pd.port": 5601}, "spec.stages.pd.port 5601 clashes"),
    (
        "too-many-video-frames",
        {"media.videoFrames": 100},
        "spec.media.videoFrames (100) is more than spec.media.maxFrames (64)",
    ),
    (
        "transfer-outlives-kv-lease",
        {"transfer": {"timeoutSeconds": 60, "kvLeaseSeconds": 30}},
        "spec.transfer.timeoutSeconds (60) must be shorter than spec.transfer.kvLeaseSeconds (30)",
    ),
]
LONG_NAME = "a" * 55  # the longest derived name, <name>-frontend, would pass 63 characters


def _webhook_body(namespace: str, changes: dict[str, Any], name: str = "bad") -> dict[str, Any]:
    body = graph_manifest(name, namespace)
    for path, value in changes.items():
        body = _set(body, path, value)
    return body


def _create(api: client.ApiClient, body: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "mmgraph.io", "v1alpha1", body["metadata"]["namespace"], "multimodalgraphs", body
    )


def _refusal(api: client.ApiClient, body: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as info:
        _create(api, body)
    assert info.value.status in (400, 422), info.value.body
    return json.loads(info.value.body)["message"]


def test_schema_refuses(api, operator, namespace):
    """Refused by the CRD's schema itself, with the webhook out of the way (it is mutating, so the API server asks
    it before the schema, and its denial would name the same field): what `kubectl explain` documents is what the
    server enforces, webhook or not."""
    with webhook_absent(api):
        for case, change, field in SCHEMA_CASES:
            message = _refusal(api, _set(graph_manifest("bad", namespace), *change))
            assert field in message, (case, message)
            assert "admission webhook" not in message and "denied the request" not in message, (case, message)


@pytest.mark.parametrize(("changes", "expected"), [c[1:] for c in WEBHOOK_CASES], ids=[c[0] for c in WEBHOOK_CASES])
def test_webhook_refuses_with_actionable_message(api, operator, namespace, changes, expected):
    message = _refusal(api, _webhook_body(namespace, changes))
    assert "denied the request" in message
    assert expected in message


def test_webhook_refuses_names_too_long_for_derived_objects(api, operator, namespace):
    message = _refusal(api, _webhook_body(namespace, {}, name=LONG_NAME))
    assert "at most 54 characters" in message


def test_webhook_refuses_invalid_update_and_keeps_the_stored_graph(api, operator, namespace):
    _create(api, graph_manifest("g", namespace))
    with pytest.raises(ApiException) as info:
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            "mmgraph.io", "v1alpha1", namespace, "multimodalgraphs", "g", {"spec": {"topology": "agg"}}
        )
    assert "topology agg does not use it" in json.loads(info.value.body)["message"]
    stored = client.CustomObjectsApi(api).get_namespaced_custom_object(
        "mmgraph.io", "v1alpha1", namespace, "multimodalgraphs", "g"
    )
    assert stored["spec"]["topology"] == "e-p-d"


def test_without_webhook_invalid_graphs_are_degraded_with_event_and_nothing_applied(api, cluster, operator, namespace):
    """Every webhook case, forced in with the webhook absent: Degraded=True + Warning Event; no child created."""
    cases = WEBHOOK_CASES
    with webhook_absent(api):
        for i, (_, changes, _) in enumerate(cases):
            _create(api, _webhook_body(namespace, changes, name=f"bad{i}"))
        _create(api, _webhook_body(namespace, {}, name=LONG_NAME))
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    expectations = [(f"bad{i}", expected) for i, (_, _, expected) in enumerate(cases)]
    expectations.append((LONG_NAME, "at most 54 characters"))
    for name, expected in expectations:
        graph = wait_for(
            lambda name=name: (
                (
                    g := custom.get_namespaced_custom_object(
                        "mmgraph.io", "v1alpha1", namespace, "multimodalgraphs", name
                    )
                )
                .get("status", {})
                .get("phase")
                == "Degraded"
                and g
            ),
            what=f"{name} Degraded",
        )
        degraded = next(c for c in graph["status"]["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
        assert expected in degraded["message"]
        events = wait_for(
            lambda name=name: core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items,
            what=f"{name} Event",
        )
        assert [(e.type, e.reason) for e in events] == [("Warning", "InvalidSpec")]
        assert expected in events[0].message
    assert client.AppsV1Api(api).list_namespaced_deployment(namespace).items == []
    assert client.CoreV1Api(api).list_namespaced_service(namespace).items == []


def test_fixing_a_degraded_graph_applies_it(api, cluster, operator, namespace):
    with webhook_absent(api):
        _create(api, _webhook_body(namespace, {"topology": "e-pd"}, name="g"))
    custom = client.CustomObjectsApi(api)
    get = lambda: custom.get_namespaced_custom_object("mmgraph.io", "v1alpha1", namespace, "multimodalgraphs", "g")  # noqa: E731
    wait_for(lambda: get().get("status", {}).get("phase") == "Degraded", what="Degraded")
    custom.patch_namespaced_custom_object(
        "mmgraph.io", "v1alpha1", namespace, "multimodalgraphs", "g", {"spec": {"stages": {"decode": None}}}
    )
    wait_for(lambda: len(client.AppsV1Api(api).list_namespaced_deployment(namespace).items) == 3, what="3 Deployments")
    graph = wait_for(lambda: (g := get())["status"]["phase"] == "Progressing" and g, what="Progressing")
    degraded = next(c for c in graph["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "False"
