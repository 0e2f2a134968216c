"""Prometheus metrics of the operator (served on --metrics-port)."""

from prometheus_client import Counter, Gauge, Histogram

GRAPHS = Gauge("mmgraph_operator_graphs", "MultimodalGraphs the operator watches")
RECONCILES = Counter(
    "mmgraph_operator_reconciles_total", "Completed reconcile passes, by outcome (applied, or degraded)", ["result"]
)
ERRORS = Counter("mmgraph_operator_reconcile_errors_total", "Reconcile passes that failed and were retried")
DURATION = Histogram("mmgraph_operator_reconcile_seconds", "Time of one reconcile pass")
WRITES = Counter("mmgraph_operator_writes_total", "Writes the operator made to the API server", ["verb", "kind"])
LEADER = Gauge("mmgraph_operator_leader", "1 while this replica holds the leader Lease (and so reconciles), else 0")
LEADER_ACQUISITIONS = Counter("mmgraph_operator_leader_acquisitions_total", "Times this replica became the leader")
