"""Generates the MultimodalGraph CustomResourceDefinition from the pydantic model in api.py.

The schema must be structural (Kubernetes refuses $ref, type-less nodes and `anyOf` with null), so pydantic's
JSON schema is rewritten: $refs inlined, Optional collapsed to its type, titles dropped, `None` defaults dropped.
Never edit crds/multimodalgraph.yaml by hand: `mmgraph crd > crds/multimodalgraph.yaml` (tests check it).
"""

from __future__ import annotations

from typing import Any

from mmgraph_contract.graph import MultimodalGraphSpec, MultimodalGraphStatus
from mmgraph_contract.vocabulary import GROUP, KIND, PLURAL, SHORT_NAME, VERSION

PRINTER_COLUMNS = [
    {"name": "Topology", "type": "string", "jsonPath": ".spec.topology", "description": "How the model is split"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.readyStages", "description": "Ready stages / stages"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Summary of the conditions"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name", "priority": 1},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def openapi_schema(model: type) -> dict[str, Any]:
    """The model's JSON schema (validation mode, camelCase aliases) made structural."""
    raw = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    return _structural(raw, raw.get("$defs", {}))


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _structural({**target, **extra}, defs)
    any_of = node.get("anyOf")
    if any_of is not None:
        kinds = [a for a in any_of if a.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(kinds) < len(any_of) and rest.get("default") is not None:
            rest["nullable"] = True  # null is a choice here, not "unset": the server keeps it, defaults nothing
        if len(kinds) == 1:
            return _structural({**kinds[0], **rest}, defs)
        if rest.get("x-kubernetes-preserve-unknown-fields"):  # engine arguments: any JSON value
            return _structural(rest, defs)
        raise ValueError(f"cannot make {node} structural")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs") or (key == "default" and value is None):
            continue
        if key == "additionalProperties" and value is False:
            continue  # structural schemas forbid it beside properties; the server prunes unknown fields
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out[key.replace("exclusive", "").lower()] = value  # JSON Schema 2020 -> OpenAPI 3.0 form
            out[key] = True
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        else:
            out[key] = _structural(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "const" in out:
        out["enum"] = [out.pop("const")]
    return out


def crd() -> dict[str, Any]:
    spec = openapi_schema(MultimodalGraphSpec)
    status = openapi_schema(MultimodalGraphStatus)
    status["x-kubernetes-preserve-unknown-fields"] = False
    schema = {
        "type": "object",
        "description": "MultimodalGraph serves one multimodal model split into encode / prefill / decode stages.",
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object (mmgraph.io/v1alpha1)."},
            "kind": {"type": "string", "description": "Kind of this object (MultimodalGraph)."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": {k: v for k, v in status.items() if k != "x-kubernetes-preserve-unknown-fields"},
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "mmgraph"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["all", "mmgraph"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }
