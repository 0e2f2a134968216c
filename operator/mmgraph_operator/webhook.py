"""The validating admission webhook: refuse at `kubectl apply` time what the CRD schema cannot.

The same two checks as reconcile (the pydantic model, then `problems`), so a graph refused here would also be
reported Degraded if it got in with the webhook absent. Messages name the field and say what to change.
"""

from __future__ import annotations

from typing import Any

import kopf
from pydantic import ValidationError

from mmgraph_operator.api import explain, parse, problems


def validate_graph(body: kopf.Body, namespaces: list[str], **_: Any) -> None:
    """`namespaces`: the operator's; a graph elsewhere is another operator's business (and a 1.20 server cannot
    select namespaces by name, so the webhook is asked about every namespace)."""
    if namespaces and body.get("metadata", {}).get("namespace") not in namespaces:
        return
    try:
        graph = parse(dict(body))
    except ValidationError as err:
        raise kopf.AdmissionError(explain(err), code=422) from None
    found = problems(graph)
    if found:
        raise kopf.AdmissionError("; ".join(found), code=422)
