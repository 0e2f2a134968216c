# The two commands a newcomer needs; both set everything up first (idempotent, cached).
.PHONY: demo test setup lint images operator-image worker-image push-images base-image

# The two images (README, "Images"): nobody publishes them, so build them and push them to a registry of yours.
#   make images REGISTRY=registry.example.com/team TAG=0.1.0 [ENGINE=podman]  then  make push-images REGISTRY=...
# The default names are what the chart (image.repository) and a graph (spec.image) use unless told otherwise.
REGISTRY ?= localhost/mmgraph
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null || echo docker)
# WORKER=cpu builds Dockerfile.worker-cpu (vLLM for CPU) as $(REGISTRY)/worker-cpu instead of the CUDA worker.
WORKER ?= cuda
WORKER_FILE = $(if $(filter cpu,$(WORKER)),Dockerfile.worker-cpu,Dockerfile.worker)
WORKER_NAME = $(if $(filter cpu,$(WORKER)),worker-cpu,worker)
# BASE: a local base image for the operator and the CPU worker, where no registry is reachable (make base-image);
# BUILD_FLAGS: anything else your engine's build needs (mounts of a local pip mirror, --network=host, ...).
BASE ?=
BUILD_FLAGS ?=
BUILD = $(ENGINE) build $(BUILD_FLAGS) $(if $(BASE),--build-arg BASE=$(BASE))

setup:
	@bash scripts/setup.sh

demo:
	@bash scripts/setup.sh demo
	.venv/bin/mmgraph up examples/tiny-e-p-d.yaml --demo

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

images: operator-image worker-image

operator-image:
	$(BUILD) -f Dockerfile.operator -t $(REGISTRY)/operator:$(TAG) .

worker-image:
	$(BUILD) -f $(WORKER_FILE) -t $(REGISTRY)/$(WORKER_NAME):$(TAG) .

push-images:
	$(ENGINE) push $(REGISTRY)/operator:$(TAG)
	$(ENGINE) push $(REGISTRY)/$(WORKER_NAME):$(TAG)

# A Debian bookworm base from Debian's packages (mmdebstrap), for BASE= where no registry is reachable.
base-image:
	@ENGINE="$(ENGINE)" bash scripts/base-image.sh $(REGISTRY)/base:bookworm
