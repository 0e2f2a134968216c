"""The real OpenAPI schemas of the Kubernetes types a MultimodalGraph embeds (affinity, tolerations, probes...).

The CRD must keep these types' real schemas (so `kubectl explain` and server-side validation work) and must be
structural (no $ref, one type per node, int-or-string marked as such). `k8s_types.json` holds them already
inlined and made structural; it is generated, never edited, by `python -m mmgraph_contract.k8s_types` from the
schemas that PyPI's kubernetes-validate ships, and a test checks that it is current. Runtime code only reads
the JSON file, so the operator image does not need kubernetes-validate.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

SCHEMA_FILE = Path(__file__).with_name("k8s_types.json")
SOURCE_VERSION = "v1.29.0"  # the oldest schema set kubernetes-validate ships that is close to our 1.20 floor
TYPES = (
    "io.k8s.api.core.v1.Affinity",
    "io.k8s.api.core.v1.Toleration",
    "io.k8s.api.core.v1.ResourceRequirements",
    "io.k8s.api.core.v1.EnvVar",
    "io.k8s.api.core.v1.Probe",
    "io.k8s.api.core.v1.LocalObjectReference",
    "io.k8s.api.core.v1.SecretKeySelector",
    "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector",
)
# Extensions whose rules (e.g. list-map keys must be required) a CRD would enforce differently from core types.
DROPPED_KEYS = {
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-patch-strategy",
    "x-kubernetes-patch-merge-key",
    "x-kubernetes-unions",
    "x-kubernetes-group-version-kind",
    "$schema",
    "$id",
}


@functools.cache
def schemas() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


@dataclass(frozen=True)
class K8sType:
    """Annotation for a `dict` field whose JSON schema is the named Kubernetes type's real schema."""

    name: str

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return copy.deepcopy(schemas()[self.name])


def structural(node: Any, definitions: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """Inline $refs and turn JSON-schema idioms that a CRD refuses into their structural equivalents."""
    if isinstance(node, list):
        return [structural(item, definitions, seen) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            raise ValueError(f"recursive Kubernetes type {name} cannot be inlined")
        merged = {**definitions[name], **{k: v for k, v in node.items() if k != "$ref"}}
        return structural(merged, definitions, (*seen, name))
    one_of = node.get("oneOf")
    if one_of and {_non_null(alt.get("type")) for alt in one_of} <= {"string", "number", "integer"}:
        rest = {k: v for k, v in node.items() if k != "oneOf"}
        return {**structural(rest, definitions, seen), "x-kubernetes-int-or-string": True}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED_KEYS:
            continue
        if key == "type":
            value = _non_null(value)
        elif key in ("properties", "patternProperties"):
            value = {k: structural(v, definitions, seen) for k, v in value.items()}
        else:
            value = structural(value, definitions, seen)
        out[key] = value
    if "properties" in out and "type" not in out:
        out["type"] = "object"
    return out


def _non_null(kind: Any) -> Any:
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return kinds[0] if len(kinds) == 1 else kinds
    return kind


def extract() -> dict[str, Any]:
    """Read the types from kubernetes-validate's schema set (a dev dependency) and make them structural."""
    import kubernetes_validate

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    definitions = json.loads((root / f"{SOURCE_VERSION}-local" / "_definitions.json").read_text())["$defs"]
    return {name: structural(definitions[name], definitions) for name in TYPES}


def main() -> None:
    text = json.dumps(extract(), indent=1, sort_keys=True) + "\n"
    if "--check" in sys.argv:
        sys.exit(0 if SCHEMA_FILE.read_text() == text else f"{SCHEMA_FILE} is stale: regenerate it")
    SCHEMA_FILE.write_text(text)


if __name__ == "__main__":
    main()
