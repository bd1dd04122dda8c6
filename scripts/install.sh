#!/usr/bin/env bash
# Create .venv and install dfastllm-ray with its serving and test extras.
# torch goes first and pinned (torch==2.13.0): an unpinned torch requirement can pull a multi-GB
# CUDA build. Which build the pin installs is the package index's choice: on Linux the default
# index serves the CUDA build. For the CPU build, set TORCH_INDEX_URL to a CPU wheel index (used
# as --index-url for the torch install only), or configure pip (PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL). On a GPU machine, install the CUDA torch you want first, or set TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi
.venv/bin/pip install -q -e '.[serve,test]'
echo "dfastllm-ray installed in .venv ($(.venv/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
