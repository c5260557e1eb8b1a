#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# DeepSpeed for tests/test_engines.py's ZeRO-2 runs on CPU (tests only): built without compiled ops
# (pure Python, about 30 s from source, measured twice; no compiler needed)
DS_BUILD_OPS=0 python -m pip install -q "deepspeed==0.19.8"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q "$@"
