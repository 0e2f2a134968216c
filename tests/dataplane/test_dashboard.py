"""The chart's Grafana dashboard asks only for series the workers export: every metric its queries name is in
the /metrics of a running e-p-d graph's stages (after a request through every stage), as a sample or as a
declared family (a labelled series has samples once something is counted)."""

from __future__ import annotations

import json
import re

import httpx

from .conftest import REPO, tokens

DASHBOARD = REPO / "charts" / "mmgraph" / "dashboards" / "mmgraph.json"
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")


def queried(dashboard: dict) -> set[str]:
    """The metric names in the dashboard's panel queries and template variables."""
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))  # a selector: name{labels}
        names |= set(re.findall(r"label_values\(([a-zA-Z_:][a-zA-Z0-9_:]*)", expr))
    return names


def exported(text: str) -> set[str]:
    """Sample names and declared families (with the suffixes their samples take) of one /metrics page."""
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    return samples | {family + suffix for family in families for suffix in SUFFIXES}


def test_the_dashboard_queries_only_series_the_workers_export(graph, endpoints, reference):
    assert tokens(endpoints["e-p-d"], "one-image") == reference["one-image"]  # every stage has counted something
    pages = [httpx.get(f"http://127.0.0.1:{stage.port}/metrics", timeout=10).text for stage in graph.stages.values()]
    series = set().union(*(exported(page) for page in pages))
    names = queried(json.loads(DASHBOARD.read_text()))
    assert len(names) >= 15, names
    assert names - series == set()
