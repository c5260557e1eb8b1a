#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the embedded offline default:
# `sgsd train` with configs/demo.yaml, starting over in runs/demo. Extra arguments go to `sgsd train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
sgsd train --overwrite "$@"
