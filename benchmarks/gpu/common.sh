# Sourced by the device scripts beside it: strict mode, $OUT, the Python path, a log in $OUT/log.txt,
# the GPU and library versions, and `step LIMIT_S ARGS...` (one step_benchmark.py run under a limit).
set -uo pipefail
OUT=${OUT:-/tmp/sgsd-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
# benchmarks/scoring.py's CPU set-up, for the small architectures
SMALL=(--lora-rank 16 --lora-alpha 32 --no-gradient-checkpointing)

step() {  # limit_s, then step_benchmark.py arguments
    local limit=$1
    shift
    echo "=== step_benchmark $* (limit ${limit} s)"
    timeout "$limit" $PY benchmarks/gpu/step_benchmark.py "$@" || echo "step_benchmark $* exit $?"
}

engine() {  # limit_s, then --path plain or --config ACCELERATE_CONFIG (benchmarks/gpu/engine_step.py)
    local limit=$1
    shift
    echo "=== engine_step $* (limit ${limit} s)"
    if [ "$1" = "--config" ]; then
        timeout "$limit" $PY -m accelerate.commands.launch --config_file "$2" benchmarks/gpu/engine_step.py \
            || echo "engine_step $* exit $?"
    else
        timeout "$limit" $PY benchmarks/gpu/engine_step.py "$@" || echo "engine_step $* exit $?"
    fi
}
