#!/usr/bin/env bash
# How `sgsd.scoring`'s chunking (teacher rows per forward, positions per head chunk) sets its speed on a
# GPU, with the reference way measured again in the same call. Writes $OUT/gpu_step-*.json and log.txt.
#
#   OUT=/tmp/gpu bash benchmarks/gpu/chunk_sweep.sh
set -uo pipefail
OUT=${OUT:-/tmp/sgsd-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
SMALL=(--lora-rank 16 --lora-alpha 32 --no-gradient-checkpointing)  # benchmarks/scoring.py's CPU set-up
run() {
    echo "=== $*"
    timeout 90 $PY benchmarks/gpu/step_benchmark.py "$@" | grep -E '^\{"(ours|reference)"' || echo "exit $?"
}
run --size qwen2.5-0.5b "${SMALL[@]}" --chunk-rows 16 --chunk-size 512
run --size qwen2.5-0.5b "${SMALL[@]}" --chunk-rows 16 --chunk-size 128 --ways ours
run --size qwen2.5-0.5b "${SMALL[@]}" --chunk-rows 8 --chunk-size 256 --ways ours
run --size smollm2-135m "${SMALL[@]}" --chunk-rows 16 --chunk-size 512
run --size smollm2-135m "${SMALL[@]}" --chunk-rows 16 --chunk-size 128 --ways ours
run --size qwen3-1.7b --chunk-rows 16 --chunk-size 512
run --size qwen3-1.7b --chunk-rows 8 --chunk-size 256 --ways ours
echo "=== done"
