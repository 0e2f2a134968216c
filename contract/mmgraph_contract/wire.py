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


# Every stage's HTTP paths besides the OpenAI API's: probes and Prometheus (open), and the peers' calls (the graph's
# credential). A stage's own calls under /v1/ are PEER_PATHS: the API key never guards them.
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
INFO_PATH = "/v1/info"  # every stage: what it serves (WorkerInfo)
ENCODE_PATH = "/encode"  # the encoder: EncodeRequest -> EncodeResponse
GENERATE_PATH = "/generate"  # pd and decode: GenerateRequest -> NDJSON GenerateEvents
AGENT_PATH = "/v1/transfer/agent"  # the encoder: its NIXL agent's name and metadata (AgentInfo)
RELEASE_PATH = "/release/{handle}"  # the encoder: free a published buffer nobody will read
PEER_PATHS = (INFO_PATH, "/v1/transfer/")


def release_path(handle: str) -> str:
    return RELEASE_PATH.format(handle=handle)


# An idle kept-alive connection: a caller drops it after PEER_KEEPALIVE_SECONDS (the stages') or 5 s (httpx's
# default, the OpenAI SDK's), well before a stage closes it (KEEP_ALIVE_SECONDS), so no caller sends a request on a
# connection the stage is closing at that moment (uvicorn's default, 5 s, equals httpx's: that race failed about 1
# request in 160 under a steady load on the node).
KEEP_ALIVE_SECONDS = 20
PEER_KEEPALIVE_SECONDS = 10.0

# The series the stages export that something outside the process steers on (the HPA, via prometheus-adapter).
FRONTEND_IN_FLIGHT = "mmgraph_requests_in_flight"
ENCODER_WAITING = "mmgraph_encoder_items_waiting"

# The series behind each stage's metrics, by the names prometheus-adapter serves them (vllm:x becomes vllm_x).
AUTOSCALING_METRICS: dict[str, dict[str, str]] = {
    "frontend": {"running": FRONTEND_IN_FLIGHT},
    "encoder": {"waiting": ENCODER_WAITING},
    "pd": {"waiting": "vllm_num_requests_waiting", "running": "vllm_num_requests_running"},
    "decode": {"waiting": "vllm_num_requests_waiting", "running": "vllm_num_requests_running"},
}
