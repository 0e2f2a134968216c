"""The CRD is generated from the pydantic model, is structural, and every checked-in copy is current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mmgraph_contract.graph import MultimodalGraph
from mmgraph_operator.crd import crd

REPO = Path(__file__).resolve().parent.parent


def test_checked_in_crd_and_chart_copy_match_the_model():
    generated = yaml.safe_dump(crd(), sort_keys=False, width=120)
    assert (REPO / "crds" / "multimodalgraph.yaml").read_text() == generated, (
        "run: mmgraph crd > crds/multimodalgraph.yaml"
    )
    assert (REPO / "charts" / "mmgraph" / "crds" / "multimodalgraph.yaml").read_text() == generated, (
        "copy crds/ into the chart"
    )


def test_vendored_kubernetes_type_schemas_are_current():
    result = subprocess.run(
        [sys.executable, "-m", "mmgraph_contract.k8s_types", "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def structural_violations(node: Any, path: str = "") -> list[str]:
    """The rules of a structural schema that Kubernetes enforces (and CEL-free, for 1.20 servers)."""
    out = []
    if not isinstance(node, dict):
        return out
    for banned in ("$ref", "anyOf", "oneOf", "allOf", "not", "x-kubernetes-validations", "title", "const"):
        if banned in node:
            out.append(f"{path}: {banned}")
    free = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    if "type" not in node and not free:
        out.append(f"{path}: no type")
    if isinstance(node.get("type"), list):
        out.append(f"{path}: type list")
    if "properties" in node and "additionalProperties" in node:
        out.append(f"{path}: properties with additionalProperties")
    if node.get("default", 0) is None:
        out.append(f"{path}: null default")
    for key, child in (node.get("properties") or {}).items():
        out += structural_violations(child, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out += structural_violations(node[key], f"{path}[{key}]")
    return out


def test_schema_is_structural():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert structural_violations(schema) == []


def test_kubernetes_types_keep_their_real_schema_and_descriptions():
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    affinity = spec["properties"]["stages"]["properties"]["encoder"]["properties"]["affinity"]
    node = affinity["properties"]["nodeAffinity"]
    assert "required" in json.dumps(node) and node["description"].startswith("Describes node affinity")
    tolerations = spec["properties"]["stages"]["properties"]["pd"]["properties"]["tolerations"]
    assert set(tolerations["items"]["properties"]) >= {"key", "operator", "value", "effect", "tolerationSeconds"}
    limits = spec["properties"]["stages"]["properties"]["pd"]["properties"]["resources"]["properties"]["limits"]
    assert limits["additionalProperties"]["x-kubernetes-int-or-string"] is True  # quantities: "1Gi" or 2


def test_defaults_live_in_the_schema():
    """A graph with only the required fields, defaulted by the schema, equals the model's own defaults."""
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["topology"]["default"] == "e-p-d"
    assert spec["properties"]["media"]["default"] == {}
    media = spec["properties"]["media"]["properties"]
    model_defaults = MultimodalGraph.model_validate({"spec": {"model": {"name": "m", "path": "/m"}}}).spec.media
    assert media["allowedSchemes"]["default"] == model_defaults.allowed_schemes == ["https", "data"]
    assert media["allowPrivateNetworks"]["default"] is False


def test_printer_columns_show_topology_ready_stages_and_age():
    columns = {c["name"]: c["jsonPath"] for c in crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Topology"] == ".spec.topology"
    assert columns["Ready"] == ".status.readyStages"
    assert columns["Age"] == ".metadata.creationTimestamp"
