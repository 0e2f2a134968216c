# The two commands a newcomer needs; both set everything up first (idempotent, cached).
.PHONY: demo test setup lint

setup:
	@bash scripts/setup.sh

demo:
	@bash scripts/setup.sh demo
	.venv/bin/mmgraph up examples/tiny-e-p-d.yaml --demo

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
