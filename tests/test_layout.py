"""The code's layout, as docs/architecture.md draws it: the contract between the operator and the workers imports
neither, neither imports the other, the contract stays free of Kubernetes, torch and vLLM (the operator's image
has none of torch or vLLM, a worker needs no Kubernetes client), settings are parsed once at a stage's entry, and
no product module grows past what a reader holds in their head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"mmgraph_contract": "contract", "mmgraph_operator": "operator", "mmgraph_workers": "workers"}
HEAVY = {"kubernetes", "kopf", "torch", "vllm", "transformers", "nixl", "fastapi", "uvicorn", "httpx"}
MAX_LINES = 400


def modules(package: str) -> list[Path]:
    return sorted((REPO / PACKAGES[package] / package).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (a function's lazy import counts)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("mmgraph_contract", {"mmgraph_operator", "mmgraph_workers", *HEAVY}),
        ("mmgraph_operator", {"mmgraph_workers", "torch", "vllm", "transformers", "nixl"}),
        ("mmgraph_workers", {"mmgraph_operator", "kubernetes", "kopf"}),
    ],
)
def test_each_side_imports_only_the_contract_of_the_other(package: str, forbidden: set[str]) -> None:
    found = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in modules(package)
        for name in imports(path)
        if top(name) in forbidden
    }
    assert not found, sorted(found)


def test_the_contract_imports_no_cycle() -> None:
    """Within the contract, modules form a DAG (a cycle would make its import order matter)."""
    graph = {
        f"mmgraph_contract.{p.stem}": {n for n in imports(p) if n.startswith("mmgraph_contract.")}
        for p in modules("mmgraph_contract")
    }
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, " -> ".join((*path, node))
        if node not in done:
            for nxt in graph.get(node, ()):
                visit(nxt, (*path, node))
            done.add(node)

    for node in graph:
        visit(node, ())


def test_no_stage_sees_an_argparse_namespace() -> None:
    """Flags are parsed once, into the stage's settings model (mmgraph_contract/flags.py), at `mmgraph worker`'s
    entry: nothing else in the workers imports argparse."""
    users = [str(p.relative_to(REPO)) for p in modules("mmgraph_workers") if "argparse" in imports(p)]
    assert users == ["workers/mmgraph_workers/cli.py"]


def test_no_product_module_is_over_400_lines() -> None:
    long = {
        str(path.relative_to(REPO)): n
        for package in PACKAGES
        for path in modules(package)
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
