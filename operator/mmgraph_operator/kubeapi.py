"""The one way the operator calls the API server: the official client, in a thread, with a deadline."""

from __future__ import annotations

import asyncio
from typing import Any

from kubernetes import client, config

API_TIMEOUT = 30.0  # seconds for one API call


def api_client(user_agent: str) -> client.ApiClient:
    """In-cluster credentials, else the kubeconfig. The user agent names the replica, so the audit log tells
    two operators apart (they share a ServiceAccount)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 16
    configuration.retries = 0  # every caller retries on its own terms (urllib3's would outlive a lost lease)
    api = client.ApiClient(configuration)
    api.user_agent = user_agent
    return api


async def call(fn: Any, *args: Any, timeout: float = API_TIMEOUT, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` off the event loop; never waits past `timeout` (plus the thread's own grace)."""
    kwargs.setdefault("_request_timeout", timeout)
    return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), timeout + 5)
