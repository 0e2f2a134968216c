"""Pure checks the loop makes on the objects it reads: which graph a child belongs to, which copy is newer, and
whether a live object still carries its manifest. No I/O, so they are unit-tested on their own (test_status.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

from kubernetes.utils.quantity import parse_quantity

from mmgraph_contract.vocabulary import KIND
from mmgraph_operator.names import GRAPH_LABEL

GraphKey = tuple[str, str]  # namespace, name


class ChildKey(NamedTuple):
    api_version: str
    kind: str
    namespace: str
    name: str


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


def digest(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


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
