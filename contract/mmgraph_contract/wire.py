"""Names that cross a process boundary between the operator and the workers, or between stages: environment
variables, ports, the pod's grace period, metric names and the stages' HTTP paths. Both sides read them from here,
so a rename cannot leave one side behind. No I/O, no dependencies."""

from __future__ import annotations


def kv_side_channel_port(transfer_port: int) -> int:
    """The KV side channel's port, given the embeddings' side channel port (both NIXL, in the same pod)."""
    return transfer_port + 1


# The graph's inter-stage credential: a Secret the operator creates once (it never reads Secrets), in every pod as
# this variable; each stage refuses calls without it and sends it on its own calls (workers' server.py).
PEER_TOKEN_ENV = "MMGRAPH_PEER_TOKEN"
PEER_TOKEN_KEY = "token"
# The API key clients send, from spec.stages.frontend.apiKeySecret, in the pods that serve the OpenAI API.
API_KEY_ENV = "MMGRAPH_API_KEY"


# A worker pod's terminationGracePeriodSeconds. It holds, in order: the preStop delay, uvicorn's drain of the
# requests in flight (--drain-seconds), a stage's wait for its readers (pd's KV, the encoder's embeddings) and the
# exit itself.
POD_GRACE_SECONDS = 60
# The preStop delay: the pod is deleted, so it leaves its Services' endpoints, but kube-proxy's rules, the cluster
# DNS (CoreDNS answers headless Services with a 5 s TTL) and the frontends' peer refresh (2 s) take a while to
# follow, so the process keeps serving, telling callers to go elsewhere, before SIGTERM stops its listener.
PRESTOP_SECONDS = 10


# The series behind each stage's metrics, by the names prometheus-adapter serves them (vllm:x becomes vllm_x).
AUTOSCALING_METRICS: dict[str, dict[str, str]] = {
    "frontend": {"running": "mmgraph_requests_in_flight"},
    "encoder": {"waiting": "mmgraph_encoder_items_waiting"},
    "pd": {"waiting": "vllm_num_requests_waiting", "running": "vllm_num_requests_running"},
    "decode": {"waiting": "vllm_num_requests_waiting", "running": "vllm_num_requests_running"},
}
