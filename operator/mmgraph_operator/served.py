"""Whether the API server serves a kind render produces: Kubernetes' own always; an optional kind (another
operator's CRD) is asked about, and asked again, since its CRD may be installed or deleted while we run.
"""

from __future__ import annotations

import time

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from mmgraph_operator.kubeapi import call
from mmgraph_operator.render import OPTIONAL_KINDS

RECHECK = 5.0  # seconds before asking the server again whether it serves an optional kind it did not
SERVED_RECHECK = 60.0  # ... and one it did (its CRD may be deleted)


class ServedKinds:
    """Mixed into the Reconciler (reconcile.py), whose __init__ sets these attributes."""

    api: client.ApiClient
    served: dict[tuple[str, str], tuple[bool, float]]

    async def _serves(self, api_version: str, kind: str) -> bool:
        """Whether the server serves `kind`: always for Kubernetes' own kinds; asked (again after RECHECK seconds
        while absent) for optional kinds, another operator's CRDs that may be installed after ours."""
        if (api_version, kind) not in OPTIONAL_KINDS:
            return True
        known = self.served.get((api_version, kind))
        if known and time.monotonic() - known[1] < (SERVED_RECHECK if known[0] else RECHECK):
            return known[0]
        try:
            group, version = api_version.split("/")
            found = await call(client.CustomObjectsApi(self.api).get_api_resources, group, version)
            served = any(r.kind == kind for r in found.resources or [])
        except ApiException as err:
            if err.status != 404:
                raise
            served = False
        self.served[(api_version, kind)] = (served, time.monotonic())
        return served
