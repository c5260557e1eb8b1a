"""benchmarks/gpu/step_benchmark.py on CPU with --tiny: both ways run, agree, and the JSON lands in $OUT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
step_benchmark = load_script("benchmarks/gpu/step_benchmark.py", "gpu_step_benchmark")


def test_tiny_run_on_cpu_writes_out_json(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert step_benchmark.main(["--tiny", "--device", "cpu", "--repeats", "1"]) == 0
    result = json.loads((tmp_path / "gpu_step-tiny-t32-r4-c128.json").read_text())
    assert result["model"] == "tiny" and result["shape"] == {"b": 2, "k": 3, "p": 16, "s": 24, "t": 32}
    assert result["gradient_checkpointing"] is True and result["lora"]["rank"] == 64
    ours, ref = result["results"]["ours"], result["results"]["reference"]
    for way in (ours, ref):
        assert way["median_s"] > 0 and len(way["times_s"]) == 1 and way["grad_norm"] > 0
    # the same loss and gradient either way (fp32): only the way of computing differs
    assert ours["loss"] != 0.0
    assert result["loss_abs_diff"] < 1e-5
    assert result["grad_norm_rel_diff"] < 1e-4


def test_out_of_memory_is_reported_not_raised():
    model = torch.nn.Linear(2, 2)

    def oom_step(model, inputs, pad_id):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    result = step_benchmark.measure(oom_step, model, None, 0, repeats=1, device=torch.device("cpu"))
    assert result["error"] == "OOM" and "Tried to allocate" in result["message"]


def test_other_errors_propagate():
    def broken_step(model, inputs, pad_id):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        step_benchmark.measure(
            broken_step, torch.nn.Linear(2, 2), None, 0, repeats=1, device=torch.device("cpu")
        )
