"""A 200-step CPU soak with the tiny model: resident memory stays flat and no file handle leaks.

The run is a subprocess (tests/reliability_driver.py) that appends, after each metrics row, its
VmRSS (/proc/self/status) and the number of entries in /proc/self/fd. Online bank updates run every
25 steps with scripted extraction, so the bank, the retriever's embedding cache, the ledger and the
evolver window all change during the soak; a checkpoint is written every 100 steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgsd.fileio import read_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STEPS = 200
WARM_UP = 50  # steps before the baseline is taken (allocator pools, caches, lazy imports settle)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_soak_memory_and_file_handles_stay_flat(tmp_path, tiny_model_dir):
    log = tmp_path / "rss.jsonl"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        SGSD_TEST_SCRIPTED_EXTRACTOR="1",
        SGSD_TEST_RSS_LOG=str(log),
        OMP_NUM_THREADS="1",
    )
    env.pop("SGSD_FAULT", None)
    cmd = [sys.executable, str(ROOT / "tests" / "reliability_driver.py"), "train", "-c", "tiny"]
    cmd += ["-o", str(tmp_path / "run"), f"model.name={tiny_model_dir}", f"train.steps={STEPS}"]
    cmd += ["train.batch_size=1", "teachers.count=1", "rollout.max_new_tokens=4", "data.eval_sources=[]"]
    cmd += ["train.save_every=100", "skills.update_every=25", "skills.success_threshold=1.0"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]

    rows = read_jsonl(log)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    baseline = rows[WARM_UP - 1]["rss_kb"]
    peak_after = max(r["rss_kb"] for r in rows[WARM_UP:])
    growth = (peak_after - baseline) / baseline
    last = rows[-1]["rss_kb"]
    print(f"RSS at step {WARM_UP}: {baseline / 1024:.1f} MiB, peak after: {peak_after / 1024:.1f} MiB, "
          f"at step {STEPS}: {last / 1024:.1f} MiB ({growth:+.2%}); fds {rows[WARM_UP - 1]['fds']} -> "
          f"{rows[-1]['fds']}")  # fmt: skip
    assert growth < 0.05
    assert rows[-1]["fds"] <= rows[WARM_UP - 1]["fds"]  # no handle opened per step stays open
    assert max(r["fds"] for r in rows[WARM_UP:]) <= rows[WARM_UP - 1]["fds"] + 2
    bank_steps = sorted(p.name for p in (tmp_path / "run" / "bank").glob("bank-step*.json"))
    assert len(bank_steps) == STEPS // 25  # the bank really changed at every update
