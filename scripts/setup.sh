#!/usr/bin/env bash
# Makes everything the demo and the tests need, idempotently: the virtual environment (.venv) with mmgraph and
# its extras, vLLM for CPU, NIXL, etcd, the Kubernetes test binaries (built once from Debian's source package and
# cached under ~/.cache/mmgraph), and the real node's tools (containerd, podman, helm, kubectl). Re-running it is
# cheap: each step is skipped when what it makes is already there and current.
#
# Usage: scripts/setup.sh            everything (tests and demo)
#        scripts/setup.sh demo       what the demo needs: the virtual environment only (no etcd, no kube binaries)
set -euo pipefail
MODE=${1:-all}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.mmgraph-setup"
want=$(cat pyproject.toml scripts/setup.sh scripts/install-cpu-engine.sh | sha256sum | cut -d' ' -f1)
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# System packages: etcd for the test control plane (the Go toolchain comes with kube-binaries.sh).
if [[ $MODE == all ]] && ! command -v etcd >/dev/null 2>&1; then
  say "installing etcd-server (apt)"
  $SUDO apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >&2
  $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  say "installing Python packages into $VENV (first time: a few minutes)"
  bash scripts/install-cpu-engine.sh "$VENV"
  "$VENV/bin/pip" install -q -e ".[operator,worker,dev]" >&2
  echo "$want" > "$stamp"
fi
# CPU-only shims, in every process (scripts/cpu-shims.sh): on every run, so an edit takes effect at once.
bash scripts/cpu-shims.sh "$VENV"

if [[ $MODE == all ]]; then
  say "Kubernetes binaries (control plane and node): $(bash scripts/kube-binaries.sh)"
  say "node tools (containerd, podman, helm, kubectl): $(bash scripts/node-tools.sh)"
fi
say "ready: $VENV"
