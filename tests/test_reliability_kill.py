"""SIGKILL during training, then `--resume`: nothing corrupt, nothing lost, nothing repeated.

Each case runs the real CLI in a subprocess (tests/reliability_driver.py, scripted skill extraction
so online bank updates really write) with `SGSD_FAULT=POINT:STEP` (sgsd/faults.py), which makes the
process SIGKILL itself at that moment. After the kill every file a user cares about must be valid;
after `--resume` the metrics hold steps 1..4 exactly once, and losses, final weights and the final
bank equal those of an uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sgsd.checkpoint import complete_checkpoints
from sgsd.fileio import read_jsonl
from sgsd.skills.bank import load_bank

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
COMMON = [
    "train.method=sgsd",
    f"train.steps={STEPS}",
    "skills.update_every=2",
    "skills.success_threshold=1.0",  # a random tiny model never succeeds: every 2nd step updates the bank
    "data.eval_sources=[]",
]


def _train(run_dir: Path, model_dir: Path, *extra: str, fault: str | None = None, resume: bool = False):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", SGSD_TEST_SCRIPTED_EXTRACTOR="1")
    env.pop("SGSD_FAULT", None)
    if fault:
        env["SGSD_FAULT"] = fault
    cmd = [sys.executable, str(ROOT / "tests" / "reliability_driver.py"), "train", "-c", "tiny"]
    cmd += ["-o", str(run_dir), *(["--resume"] if resume else []), f"model.name={model_dir}", *COMMON, *extra]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    done = _train(run, tiny_model_dir, "train.save_every=1")
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def _assert_files_valid(run: Path) -> None:
    """Every checkpoint folder is complete and loadable, `latest` names one, banks and logs parse."""
    ckpts = run / "checkpoints"
    folders = sorted(d for d in ckpts.iterdir() if d.name.startswith("step-")) if ckpts.is_dir() else []
    assert folders == complete_checkpoints(run)  # no torn step-N folder is visible
    for d in folders:
        assert set(load_file(str(d / "trainable.safetensors")))
        torch.load(d / "trainer_state.pt", map_location="cpu", weights_only=False)
        load_bank(d / "bank.json")
        json.loads((d / "ledger.json").read_text())
        json.loads((d / "evolver.json").read_text())
    if folders:
        assert (ckpts / "latest").read_text().strip() in {d.name for d in folders}
    for bank_file in sorted((run / "bank").glob("*.json")) if (run / "bank").is_dir() else []:
        load_bank(bank_file)
    if (run / "metrics.jsonl").exists():
        read_jsonl(run / "metrics.jsonl", skip_torn_tail=False)  # no torn line either


def _assert_resumed_like_straight(run: Path, straight: Path) -> None:
    rows = read_jsonl(run / "metrics.jsonl", skip_torn_tail=False)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # once each: no gap, no duplicate
    expected = read_jsonl(straight / "metrics.jsonl")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in expected], abs=1e-5)
    final = f"step-{STEPS:06d}"
    a = load_file(str(run / "checkpoints" / final / "trainable.safetensors"))
    b = load_file(str(straight / "checkpoints" / final / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    got, want = (
        load_bank(run / "bank" / "bank-latest.json"),
        load_bank(straight / "bank" / "bank-latest.json"),
    )
    assert got.fingerprint() == want.fingerprint() and got.dynamic_mistakes  # the update wrote
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary folder of the killed process is left behind


@pytest.mark.parametrize(
    "fault, save_every, survivors",
    [
        # killed inside checkpoint.save of step 2, after the weights were written, before the rename
        ("checkpoint:2", 1, ["step-000001"]),
        # killed in the online bank update of step 2, after extraction/merge, before the bank is saved
        ("bank_update:2", 1, ["step-000001"]),
        # killed after the optimizer step of step 4, before its metrics row: row 3 is logged but step 3
        # was never saved, so the resume drops row 3 and redoes steps 3 and 4
        ("after_step:4", 2, ["step-000002"]),
    ],
)
def test_kill_then_resume(tmp_path, tiny_model_dir, straight_run, fault, save_every, survivors):
    run = tmp_path / "run"
    killed = _train(run, tiny_model_dir, f"train.save_every={save_every}", fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _assert_files_valid(run)
    assert [d.name for d in complete_checkpoints(run)] == survivors
    if fault.startswith("bank_update"):
        assert not (run / "bank").exists()  # killed before the first bank snapshot was written
    resumed = _train(run, tiny_model_dir, f"train.save_every={save_every}", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {int(survivors[-1][5:])}" in resumed.stdout
    _assert_files_valid(run)
    _assert_resumed_like_straight(run, straight_run)
