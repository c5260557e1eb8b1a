"""benchmarks/learning.py: the aggregation arithmetic (pure) and one end-to-end run on a tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "learning.py"


lb = load_script("benchmarks/learning.py", "learning_benchmark")


# ---------------------------------------------------------------------------------------------------
# Pure arithmetic


def test_mean_std_is_sample_std():
    # values 10, 20, 30: mean 20; squared deviations 100 + 0 + 100 = 200; / (3 - 1) = 100; sqrt = 10
    assert lb.mean_std([10.0, 20.0, 30.0]) == (20.0, 10.0)
    assert lb.mean_std([7.0]) == (7.0, 0.0)
    # nan is ignored: mean of 1 and 3 = 2, std = sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2)
    mean, std = lb.mean_std([1.0, math.nan, 3.0])
    assert mean == 2.0 and std == pytest.approx(math.sqrt(2))
    assert all(math.isnan(v) for v in lb.mean_std([]))


def test_mean_avg_at_k_averages_sources_in_percent():
    # (0.25 + 0.5) / 2 = 0.375 -> 37.5 %
    summary = {"results": {"a": {"avg@k": 0.25}, "b": {"avg@k": 0.5}}}
    assert lb.mean_avg_at_k(summary) == pytest.approx(37.5)
    assert math.isnan(lb.mean_avg_at_k({"results": {}}))


def test_eval_curve_uses_training_time_of_the_evaluated_step():
    evals = {
        0: {"results": {"s": {"avg@k": 0.1}}},
        2: {"results": {"s": {"avg@k": 0.3}}},
        5: {"results": {"s": {"avg@k": 0.2}}},
    }
    metrics = [{"step": 1, "train_time_s": 30.0}, {"step": 2, "train_time_s": 90.0}]
    # step 0 -> 0 min; step 2 -> 90 s = 1.5 min; step 5 has no logged time (torn log) -> left out
    assert lb.eval_curve(evals, metrics) == [(0.0, pytest.approx(10.0)), (1.5, pytest.approx(30.0))]


def test_interpolate_linear_inside_nan_outside():
    curve = [(0.0, 10.0), (2.0, 20.0), (4.0, 0.0)]
    # x=1: 10 + (20-10)*(1-0)/(2-0) = 15; x=3: 20 + (0-20)*(3-2)/(4-2) = 10; x=4: last point = 0
    values = lb.interpolate(curve, [0.0, 1.0, 3.0, 4.0, 5.0])
    assert values[:4] == [10.0, 15.0, 10.0, 0.0]
    assert math.isnan(values[4])
    assert lb.interpolate([(0.0, 7.0)], [0.0]) == [7.0]  # a single point is its own value


def test_time_grid_ends_at_the_budget():
    assert lb.time_grid(20.0, 5.0) == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert lb.time_grid(12.0, 5.0) == [0.0, 5.0, 10.0, 12.0]  # 12 / 5 = 2.4 -> 0, 5, 10, then 12


def test_extend_flat_holds_the_final_value():
    assert lb.extend_flat([(0.0, 40.0), (4.4, 37.5)], 4.7) == [(0.0, 40.0), (4.4, 37.5), (4.7, 37.5)]
    assert lb.extend_flat([(0.0, 40.0), (4.7, 15.0)], 4.7) == [(0.0, 40.0), (4.7, 15.0)]
    assert lb.extend_flat([], 3.0) == []


def test_binned_means():
    points = [(0.0, 1.0), (0.5, 3.0), (1.0, 10.0), (2.0, 4.0), (3.0, 8.0)]
    # bins [0,1): 1, 3 -> 2; [1,2): 10; [2,3] (last bin closed): 4, 8 -> 6
    assert lb.binned_means(points, [0.0, 1.0, 2.0, 3.0]) == [2.0, 10.0, 6.0]
    assert math.isnan(lb.binned_means([(5.0, 1.0)], [0.0, 1.0])[0])


def test_early_late_quarters():
    rows = [{"r": v} for v in [-1, -1, 0, 0, 0, 0, 1, 0.5]]
    # 8 rows -> quarter of 2: first (-1 + -1)/2 = -1; last (1 + 0.5)/2 = 0.75
    assert lb.early_late(rows, "r") == (-1.0, 0.75)
    assert lb.early_late([{"r": 2.0}], "r") == (2.0, 2.0)


def test_run_scores_base_final_best_gain():
    evals = {s: {"results": {"s": {"avg@k": v}}} for s, v in [(0, 0.2), (3, 0.5), (6, 0.4)]}
    scores = lb.run_scores(evals)
    # base 20 %, final (step 6) 40 %, best after step 0 = 50 %, gain = 40 - 20 = 20
    assert scores == pytest.approx({"base": 20.0, "final": 40.0, "best": 50.0, "gain": 20.0})


def test_delta_histogram_bins_by_hand():
    import torch

    from sgsd.metrics import DELTA_EDGES, delta_histogram

    # edges -4, -2, -1, -0.5, -0.25, -0.1, -0.03, 0, 0.03, ...; bin i holds edges[i-1] <= x < edges[i]
    delta = torch.tensor([[-5.0, -4.0, -0.01, 0.0], [0.03, 4.0, 9.0, 0.2]])
    keep = torch.tensor([[True, True, True, True], [True, True, True, False]])  # 0.2 is not kept
    counts = delta_histogram(delta, keep)
    assert len(counts) == len(DELTA_EDGES) + 1 and sum(counts) == 7
    # -5 -> bin 0; -4 -> bin 1 ([-4, -2)); -0.01 -> bin 7 ([-0.03, 0)); 0 -> bin 8 ([0, 0.03));
    # 0.03 -> bin 9 ([0.03, 0.1)); 4 and 9 -> last bin (>= 4)
    assert counts[0] == 1 and counts[1] == 1 and counts[7] == 1 and counts[8] == 1 and counts[9] == 1
    assert counts[-1] == 2
    assert lb.delta_bin_labels()[7] == "[-0.03,0)" and lb.delta_bin_labels()[-1] == ">=4"


def test_quantile_is_linear_interpolation():
    values = [1.0, 2.0, 4.0, 8.0]
    # q=0.5: position 1.5 -> 2 + (4-2)*0.5 = 3; q=0.1: position 0.3 -> 1 + (2-1)*0.3 = 1.3
    assert lb.quantile(values, 0.5) == pytest.approx(3.0)
    assert lb.quantile(values, 0.1) == pytest.approx(1.3)
    assert lb.quantile(values, 1.0) == 8.0 and math.isnan(lb.quantile([], 0.5))


def test_support_summary_counts_around_the_dead_zone():
    # (support, rho, reward); eps_a = 0.05
    decisions = [(0.2, 1, 1.0), (0.01, 0, 1.0), (-0.3, -1, 1.0), (0.1, -1, -1.0), (-0.06, 1, -1.0)]
    s = lb.support_summary(decisions, eps_a=0.05)
    assert s["n"] == 5
    # above +0.05: 0.2, 0.1 -> 2/5; below -0.05: -0.3, -0.06 -> 2/5
    assert s["above"] == pytest.approx(0.4) and s["below"] == pytest.approx(0.4)
    # correct rollouts 0.2, 0.01, -0.3 -> 1/3 above; wrong 0.1, -0.06 -> 1/2 above
    assert s["above_if_correct"] == pytest.approx(1 / 3) and s["above_if_wrong"] == pytest.approx(0.5)
    # sorted -0.3, -0.06, 0.01, 0.1, 0.2: median 0.01
    assert s["median"] == pytest.approx(0.01)
    # mean support: correct (0.2 + 0.01 - 0.3) / 3 = -0.03; wrong (0.1 - 0.06) / 2 = 0.02
    assert s["mean_if_correct"] == pytest.approx(-0.03) and s["mean_if_wrong"] == pytest.approx(0.02)


def test_delta_fractions_sum_every_step():
    class Run:
        metrics = [{"delta_hist": [1, 0, 3]}, {"step": 2}, {"delta_hist": [0, 2, 2]}]

    # totals 1, 2, 5 over 8 tokens
    assert lb.delta_fractions([Run()]) == pytest.approx([1 / 8, 2 / 8, 5 / 8])
    assert lb.delta_fractions([]) == []
    assert lb.decisions_of([Run()]) == []


def test_train_command_orders_overrides(tmp_path):
    cmd = lb.train_command(Path("c.yaml"), tmp_path / "r", "opsd", 3, 600.0, 120.0, 1000, ["x.y=1"], True)
    assert cmd[1:8] == ["-m", "sgsd", "train", "-c", "c.yaml", "-o", str(tmp_path / "r")]
    assert "--resume" in cmd
    tail = cmd[cmd.index("train.seed=3") :]
    assert tail == [
        "train.seed=3",
        "train.time_budget_s=600",
        "train.eval_every_s=120",
        "train.steps=1000",
        "x.y=1",
    ]
    assert "teachers.mode=frozen" in cmd and "train.method=opsd" in cmd


def test_every_variant_is_a_valid_config():
    from sgsd.config import load_config

    for name, (_label, overrides) in lb.VARIANTS.items():
        cfg = load_config(lb.DEFAULT_CONFIG, overrides)
        assert cfg.train.method in name or cfg.train.method == "sgsd"
    assert load_config(lb.DEFAULT_CONFIG, lb.VARIANTS["sgsd_no_polarity"][1]).objective.use_polarity is False
    assert load_config(lb.DEFAULT_CONFIG, lb.VARIANTS["sgsd_single_teacher"][1]).teachers.count == 1


# ---------------------------------------------------------------------------------------------------
# End to end on a tiny random model


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_two_methods_one_seed_then_skip_and_resume(tmp_path, tiny_model_dir):
    out = tmp_path / "learning"
    args = [
        "--config",
        str(ROOT / "sgsd" / "configs" / "tiny.yaml"),
        "--set",
        f"model.name={tiny_model_dir}",
        "--methods",
        "sgsd,grpo",
        "--seeds",
        "0",
        "--budget-min",
        "0.05",
        "--eval-every-min",
        "0.02",
        "--out",
        str(out),
    ]
    first = _run(args)
    assert first.returncode == 0, first.stdout + first.stderr
    for variant in ("sgsd", "grpo"):
        run = out / "runs" / variant / "seed-0"
        done = json.loads((run / "done.json").read_text())
        assert done["steps"] >= 1 and done["variant"] == variant
    # only the seed's first run evaluates step 0; the second reuses it (same model, problems and seed)
    assert (out / "runs" / "sgsd" / "seed-0" / "eval" / "step-000000" / "summary.json").is_file()
    assert not (out / "runs" / "grpo" / "seed-0" / "eval" / "step-000000").exists()
    assert (
        "train.eval_at_start=false"
        in json.loads((out / "runs" / "grpo" / "seed-0" / "done.json").read_text())["command"]
    )
    table = (out / "table.md").read_text()
    assert "| SGSD |" in table and "| GRPO |" in table
    grpo_row = next(line for line in table.splitlines() if line.startswith("| GRPO |"))
    assert grpo_row.split("|")[2].strip() not in ("", "–")  # base avg@k filled from the shared step 0
    for name in ("learning.png", "diagnostics.png", "evidence.png"):
        assert (out / name).stat().st_size > 10_000
    diagnostics = (out / "diagnostics.md").read_text()
    sgsd_row = next(line for line in diagnostics.splitlines() if line.startswith("| SGSD |"))
    assert "–" not in sgsd_row.split("|")[6]  # the helpful fraction is logged for SGSD
    assert "## Robust support and Δ" in diagnostics
    assert (out / "runs" / ".gitignore").read_text() == "*\n"

    metrics = (out / "runs" / "sgsd" / "seed-0" / "metrics.jsonl").read_text()
    second = _run(args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("[skip]") == 2
    assert (out / "runs" / "sgsd" / "seed-0" / "metrics.jsonl").read_text() == metrics

    # an unfinished run with a checkpoint is resumed; one without is started again
    (out / "runs" / "grpo" / "seed-0" / "done.json").unlink()
    dry = _run([*args, "--dry-run", "--seeds", "0,1"])
    lines = [line for line in dry.stdout.splitlines() if "-m sgsd train" in line]
    assert len(lines) == 3  # sgsd seed 0 is done; grpo seed 0 and both seed-1 runs remain
    assert "--resume" in lines[0] and "grpo/seed-0" in lines[0]
    assert all("--resume" not in line for line in lines[1:])

    report = _run([*args, "--report-only"])
    assert report.returncode == 0 and "wrote" in report.stdout
