#!/usr/bin/env bash
# The whole GPU check as one command for a lent device machine (no internet; torch, transformers and
# peft installed; models built from configs with random weights). Writes to $OUT:
#   log.txt                      GPU, versions, the GPU-marked scoring tests, progress
#   gpu_step-SIZE-tT-rR-cC.json   benchmarks/gpu/step_benchmark.py, ours against the reference way
#   engine_step-SIZE-KIND.json    benchmarks/gpu/engine_step.py: plain / 1-GPU DDP / 1-GPU FSDP2 steps
# Items run most-wanted first, each under its own time limit, so a slow one cannot take the rest.
#
#   OUT=/tmp/gpu bash benchmarks/gpu/device_check.sh
source benchmarks/gpu/common.sh

step 90 --size qwen2.5-0.5b "${SMALL[@]}"
step 120 --size qwen3-1.7b
echo "=== GPU-marked tests"
timeout 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_scoring.py || echo "gpu tests exit $?"
engine 120 --path plain
engine 150 --config benchmarks/gpu/accelerate-1gpu-ddp.yaml
engine 150 --config benchmarks/gpu/accelerate-1gpu-fsdp.yaml
step 60 --size smollm2-135m "${SMALL[@]}"
step 90 --size qwen2.5-0.5b "${SMALL[@]}" --t 1024
step 60 --size smollm2-135m "${SMALL[@]}" --t 1024
echo "=== done"
