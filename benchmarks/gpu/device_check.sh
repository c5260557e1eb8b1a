#!/usr/bin/env bash
# The whole GPU check as one command for a lent device machine (no internet; torch, transformers and
# peft installed; models built from configs with random weights). Writes to $OUT:
#   log.txt                      GPU, versions, the GPU-marked scoring tests, progress
#   gpu_step-SIZE-tT-rR-cC.json   benchmarks/gpu/step_benchmark.py, ours against the reference way
# Items run most-wanted first, each under its own time limit, so a slow one cannot take the rest.
#
#   OUT=/tmp/gpu bash benchmarks/gpu/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/sgsd-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/log.txt") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

step() {  # limit_s, then step_benchmark.py arguments
    local limit=$1
    shift
    echo "=== step_benchmark $* (limit ${limit} s)"
    timeout "$limit" $PY benchmarks/gpu/step_benchmark.py "$@" || echo "step_benchmark $* exit $?"
}
SMALL=(--lora-rank 16 --lora-alpha 32 --no-gradient-checkpointing)  # benchmarks/scoring.py's CPU set-up

step 90 --size qwen2.5-0.5b "${SMALL[@]}"
step 120 --size qwen3-1.7b
echo "=== GPU-marked tests"
timeout 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_scoring.py || echo "gpu tests exit $?"
step 60 --size smollm2-135m "${SMALL[@]}"
step 90 --size qwen2.5-0.5b "${SMALL[@]}" --t 1024
step 60 --size smollm2-135m "${SMALL[@]}" --t 1024
echo "=== done"
