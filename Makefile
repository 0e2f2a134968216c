# The two commands a newcomer needs; both set everything up first (idempotent, cached).
.PHONY: demo test setup lint images push-images

# The two images (README, "Images"): nobody publishes them, so build them and push them to a registry of yours.
#   make images REGISTRY=registry.example.com/team TAG=0.1.0 [ENGINE=podman]  then  make push-images REGISTRY=...
# The default names are what the chart (image.repository) and a graph (spec.image) use unless told otherwise.
REGISTRY ?= localhost/mmgraph
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null || echo docker)

setup:
	@bash scripts/setup.sh

demo:
	@bash scripts/setup.sh demo
	.venv/bin/mmgraph up examples/tiny-e-p-d.yaml --demo

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

images:
	$(ENGINE) build -f Dockerfile.operator -t $(REGISTRY)/operator:$(TAG) .
	$(ENGINE) build -f Dockerfile.worker -t $(REGISTRY)/worker:$(TAG) .

push-images:
	$(ENGINE) push $(REGISTRY)/operator:$(TAG)
	$(ENGINE) push $(REGISTRY)/worker:$(TAG)
