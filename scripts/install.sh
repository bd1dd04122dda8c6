#!/usr/bin/env bash
# Create .venv and install dfastllm-ray with its serving and test extras.
# torch goes first and pinned: an unpinned torch requirement can pull a multi-GB CUDA build,
# while torch==2.13.0 resolves to the CPU wheel the package index offers for this platform.
# On a GPU machine, install the CUDA torch you want first (TORCH_SPEC="torch==2.13.0" works too).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "$TORCH_SPEC"
fi
.venv/bin/pip install -q -e '.[serve,test]'
echo "dfastllm-ray installed in .venv ($(.venv/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
