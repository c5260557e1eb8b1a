"""Two CPU processes (torchrun + Accelerate, gloo): ranks end with identical weights and bank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_two_cpu_ranks_end_identical(tmp_path, tiny_model_dir):
    run = tmp_path / "ddp"
    worker = Path(__file__).with_name("dist_worker.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
        str(run),
        f"model.name={tiny_model_dir}",
        "train.method=sgsd",
        "train.steps=2",
        "train.batch_size=4",
        "train.micro_batch_size=1",
        "skills.update_every=2",
        "data.eval_sources=[]",
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((run / f"rank-{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["bank"] == ranks[1]["bank"] and ranks[0]["bank"] is not None
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
