"""The chart's Grafana dashboard asks only for series the workers export: every metric its queries name is in
the /metrics of a running e-p-d graph's stages (after a request through every stage), as a sample or as a
declared family (a labelled series has samples once something is counted)."""

from __future__ import annotations

import json
import re

import httpx

from .conftest import REPO, tokens

DASHBOARD = REPO / "charts" / "mmgraph" / "dashboards" / "mmgraph.json"
# the sample names a family declared as `# TYPE <name> <type>` takes, in the text format prometheus_client writes
# (a counter is declared by its sample name, `_total` included; its `_created` is a gauge family of its own)
SAMPLES = {
    "counter": ("",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "untyped": ("",),
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}


def panels(items: list[dict]) -> list[dict]:
    """Every panel, those inside rows included."""
    return [p for item in items for p in (item, *panels(item.get("panels") or []))]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: its identifiers, once strings, label matchers, ranges and
    label lists are gone, but for functions and keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {n for n in names if n not in PROMQL_WORDS}


def queried(dashboard: dict) -> set[str]:
    """The metric names in the dashboard's panel queries and template variables."""
    exprs = [t["expr"] for panel in panels(dashboard["panels"]) for t in panel.get("targets") or []]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and query:
            exprs += re.findall(r"label_values\(([^,)]+)", query)  # its series selector
    return set().union(*(metric_names(expr) for expr in exprs))


def exported(text: str) -> set[str]:
    """The sample names of one /metrics page: those with samples, and those each declared family takes (a
    labelled family has no samples until something is counted)."""
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    types = [line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE ")]
    return samples | {family + suffix for family, kind in types for suffix in SAMPLES.get(kind, ("",))}


def test_the_extraction_finds_what_a_query_reads():
    """Guards the guard: a name without braces, inside a function, beside label lists and strings, is found."""
    expr = 'sum by (le, stage) (rate(a_total{x="b_total"}[5m])) / ignoring(pod) c + histogram_quantile(0.5, d_bucket)'
    assert metric_names(expr) == {"a_total", "c", "d_bucket"}
    page = '# TYPE h histogram\nh_bucket{le="1"} 0\n# TYPE c_total counter\n# TYPE g gauge\ng 1\n'
    assert exported(page) == {"h_bucket", "h_sum", "h_count", "c_total", "g"}


def test_the_dashboard_queries_only_series_the_workers_export(graph, endpoints, reference):
    assert tokens(endpoints["e-p-d"], "one-image") == reference["one-image"]  # every stage has counted something
    pages = [httpx.get(f"http://127.0.0.1:{stage.port}/metrics", timeout=10).text for stage in graph.stages.values()]
    series = set().union(*(exported(page) for page in pages))
    names = queried(json.loads(DASHBOARD.read_text()))
    assert len(names) >= 15, names
    assert names - series == set()
