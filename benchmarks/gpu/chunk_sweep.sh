#!/usr/bin/env bash
# How `sgsd.scoring`'s chunking (teacher rows per forward, positions per head chunk) sets its speed on a
# GPU, with the reference way measured again in the same call. Writes $OUT/gpu_step-*.json and log.txt.
#
#   OUT=/tmp/gpu bash benchmarks/gpu/chunk_sweep.sh
source benchmarks/gpu/common.sh

step 90 --size qwen2.5-0.5b "${SMALL[@]}" --chunk-rows 16 --chunk-size 512
step 90 --size qwen2.5-0.5b "${SMALL[@]}" --chunk-rows 16 --chunk-size 128 --ways ours
step 90 --size qwen2.5-0.5b "${SMALL[@]}" --chunk-rows 8 --chunk-size 256 --ways ours
step 90 --size smollm2-135m "${SMALL[@]}" --chunk-rows 16 --chunk-size 512
step 90 --size smollm2-135m "${SMALL[@]}" --chunk-rows 16 --chunk-size 128 --ways ours
step 90 --size qwen3-1.7b --chunk-rows 16 --chunk-size 512
step 90 --size qwen3-1.7b --chunk-rows 8 --chunk-size 256 --ways ours
echo "=== done"
