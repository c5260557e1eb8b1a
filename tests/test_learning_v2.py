"""benchmarks/learning_v2.py: the pure rules (MDD, task/skills/lr choice) and every phase end to end on a
tiny random model."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "learning_v2.py"


lv2 = load_script("benchmarks/learning_v2.py", "learning_v2")


def test_mdd_by_hand():
    # z_0.975 + z_0.8 = 1.959964 + 0.841621 = 2.801585
    # p = 0.5, 544 samples, 3 seeds: var = 0.25 / 544 = 4.5956e-4; 2 var / 3 = 3.0637e-4; sqrt = 0.017504
    # -> 2.801585 * 0.017504 = 0.049038 -> 4.90 points
    assert lv2.minimum_detectable_difference(0.5, 544, 3) == pytest.approx(4.9038, abs=1e-3)
    # with a between-seed sd of 2 points: var = 4.5956e-4 + 4e-4 = 8.5956e-4; 2 var / 3 = 5.7304e-4;
    # sqrt = 0.023938 -> 2.801585 * 0.023938 = 0.067065 -> 6.71 points
    assert lv2.minimum_detectable_difference(0.5, 544, 3, seed_sd=0.02) == pytest.approx(6.7065, abs=1e-3)
    # more seeds or samples shrink it; p = 0 or 1 has no binomial variance
    assert lv2.minimum_detectable_difference(0.5, 544, 6) < lv2.minimum_detectable_difference(0.5, 544, 3)
    assert lv2.minimum_detectable_difference(1.0, 544, 3) == 0.0
    with pytest.raises(ValueError):
        lv2.minimum_detectable_difference(0.5, 0, 3)


def test_choose_lr_best_then_paper_then_smallest():
    assert lv2.choose_lr({5e-6: 30.0, 2e-5: 35.0, 1e-4: 33.0}) == 2e-5  # the best validation score
    assert lv2.choose_lr({5e-6: 35.0, 2e-5: 35.0, 1e-4: 20.0}) == 5e-6  # a tie: the paper's rate
    assert lv2.choose_lr({5e-6: 20.0, 2e-5: 35.0, 1e-4: 35.0}) == 2e-5  # a tie without it: the smaller
    assert lv2.choose_lr({5e-6: 34.0, 2e-5: 35.0}, tie=1.0) == 5e-6  # within 1 point counts as tied
    assert lv2.choose_lr({5e-6: math.nan, 1e-4: 10.0}) == 1e-4  # a run without a score is left out
    with pytest.raises(ValueError):
        lv2.choose_lr({5e-6: math.nan})


def test_choose_task_and_skills_rules():
    def cand(success, truncated, tokens):
        return {"success": success, "truncated_fraction": truncated, "max_new_tokens": tokens}

    results = [cand(0.2, 0.0, 224), cand(0.45, 0.05, 320), cand(0.55, 0.02, 224), cand(0.5, 0.3, 224)]
    # 0.2: too hard; 0.5 at 30% truncated: cut off; 0.45 and 0.55 tie at 0.05 from 50% -> fewer tokens
    assert lv2.choose_task(results) is results[2]
    assert lv2.passing_tasks(results) == [results[2], results[1]]
    assert lv2.choose_task([cand(0.9, 0.0, 224)]) is None

    rows = [
        {"bank": "a", "gain": 5.0, "auc": 0.55, "auc_lo": 0.45},  # helps, does not separate
        {"bank": "b", "gain": 1.0, "auc": 0.60, "auc_lo": 0.52},  # both
        {"bank": "c", "gain": -2.0, "auc": 0.70, "auc_lo": 0.60},  # separates only
    ]
    assert lv2.choose_skills(rows)["bank"] == "b"
    assert lv2.choose_skills(rows[::2])["bank"] == "c"  # one condition each: the higher AUC
    assert lv2.choose_skills([]) is None


def test_variants_are_valid_configs():
    from sgsd.config import load_config

    vs = lv2.variants(group_size=8, estimator="expected")
    assert list(vs) == ["grpo", "opsd", "sgsd", "sgsd_expected", "sgsd_no_polarity"]
    cfgs = {name: load_config(lv2.DEFAULT_CONFIG, overrides) for name, (_, overrides) in vs.items()}
    assert cfgs["grpo"].rollout.num_generations == 8 and cfgs["grpo"].train.max_grad_norm == 1.0
    assert cfgs["opsd"].objective.opsd_clip == 0.05 and cfgs["opsd"].teachers.mode == "frozen"
    assert cfgs["sgsd_expected"].objective.support_estimator == "expected"
    assert cfgs["sgsd_no_polarity"].objective.use_polarity is False
    assert all(c.train.lr_scheduler == "linear" and c.data.validation_size for c in cfgs.values())
    assert cfgs["sgsd"].train.max_grad_norm == 0.1
    assert "sgsd_paper" not in lv2.variants(estimator="paper")  # that is the sgsd run itself


def test_task_overrides_quote_sources_with_options():
    from sgsd.config import load_config

    source = "reasoning_gym:chain_sum?min_terms=2&max_terms=3&max_digits=2"
    cfg = load_config(lv2.DEFAULT_CONFIG, lv2.task_overrides(source, 320))
    assert cfg.data.train_source == source and cfg.data.eval_sources == [source]
    assert cfg.rollout.max_new_tokens == cfg.eval.max_new_tokens == 320


# ---------------------------------------------------------------------------------------------------
# Every phase on a tiny random model


def _run(out: Path, tiny: Path, phase: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    common = ["--config", str(ROOT / "sgsd" / "configs" / "tiny.yaml"), "--set", f"model.name={tiny}",
              "--set", "data.validation_size=2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run([sys.executable, str(SCRIPT), phase, *common, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_every_phase_end_to_end(tmp_path, tiny_model_dir):
    out = tmp_path / "v2"
    task = "reasoning_gym:chain_sum?min_terms=2&max_terms=3"
    _run(out, tiny_model_dir, "task", "--task", task, "--max-new-tokens", "8", "--task-problems", "2",
         "--task-rollouts", "2", "--success", "0,1", "--max-truncated", "1")  # fmt: skip
    result = json.loads((out / "task" / "results.json").read_text())["results"][0]
    assert result["rollouts"] == 4 and {"success", "truncated_fraction", "mixed_problem_fraction"} <= set(
        result
    )
    assert json.loads((out / "task" / "choice.json").read_text()) == {"task": task, "max_new_tokens": 8}

    _run(out, tiny_model_dir, "skills", "--bank", "builtin:starter", "--probe-problems", "2",
         "--probe-rollouts", "2", "--set", "probe.bootstrap=10")  # fmt: skip
    skills = json.loads((out / "skills" / "results.json").read_text())
    assert {"base", "base_skill", "gain", "auc", "paper_auc"} <= set(skills["rows"][0])
    assert json.loads((out / "skills" / "choice.json").read_text())["bank"] == "builtin:starter"

    _run(out, tiny_model_dir, "lr", "--methods", "sgsd", "--lrs", "0.001", "--lr-budget-cpu-min", "0.001",
         "--calibration-steps", "2")  # fmt: skip
    assert json.loads((out / "lr" / "choice.json").read_text()) == {"sgsd": 0.001}
    lr_eval = next((out / "lr" / "runs" / "sgsd" / "lr-0.001" / "eval").glob("step-*/summary.json"))
    assert json.loads(lr_eval.read_text())["results"] == {}  # the lr search never looks at the test split

    grid = ["--methods", "sgsd", "--seeds", "0", "--budget-cpu-min", "0.002", "--eval-every-cpu-min", "0.001"]
    _run(out, tiny_model_dir, "grid", *grid)
    again = _run(out, tiny_model_dir, "grid", *grid)
    assert "[skip] sgsd seed 0" in again.stdout  # finished runs are kept and skipped
    done = json.loads((out / "runs" / "sgsd" / "seed-0" / "done.json").read_text())
    assert done["train_cpu_s"] > 0 and done["rollouts_total"] >= 2
    assert "train.lr=1.000000e-03" in done["command"] and any(
        c.startswith("train.cpu_budget_s=") for c in done["command"]
    )

    # a finished run leaves a committed record (the run folder is git-ignored), and the calibration a copy
    record = out / "grid" / "sgsd" / "seed-0"
    assert {p.relative_to(record).as_posix() for p in record.rglob("*") if p.is_file()} == {
        "config.yaml", "metrics.jsonl", "done.json",
        *(f"eval/{d.name}/summary.json" for d in (out / "runs" / "sgsd" / "seed-0" / "eval").glob("step-*")),
    }  # fmt: skip
    assert (out / "lr" / "measured" / "sgsd.calibration.cpu_per_step.json").is_file()
    shutil.rmtree(out / "runs")  # a later session's checkout: only the records are left
    shutil.rmtree(out / "lr" / "calibration")
    stop_by = time.strftime("%H:%M", time.localtime(time.time() + 300))
    later = _run(out, tiny_model_dir, "grid", *grid[:2], "--seeds", "0,1", "--stop-by", stop_by,
                 "--base-eval-wall-min", "30")  # fmt: skip
    assert "[skip] sgsd seed 0: finished" in later.stdout
    # seed 1: the seed-0 record's wall time less the step-0 evaluation it made (about 0 here), plus seed 1's
    # own step-0 evaluation (30): more than the 5 minutes left
    needs = re.search(r"\[stop\] sgsd seed 1 needs ~(\d+) wall-min", later.stdout)
    assert needs and 30 <= int(needs[1]) <= 32, later.stdout
    assert not (out / "runs" / "sgsd").exists() and not (out / "lr" / "calibration").exists()

    _run(out, tiny_model_dir, "report")  # from the records
    table = json.loads((out / "table.json").read_text())
    run = table["variants"]["sgsd"]["runs"][0]
    assert {"base", "final", "best_val_step", "best_val_test", "steps", "rollouts", "completion_tokens",
            "cpu_min"} <= set(run)  # fmt: skip
    assert {"mdd_binomial", "samples", "seeds"} <= set(table["mdd"])
    assert "MDD = " in (out / "table.md").read_text()
    variant_row = next(
        line for line in (out / "table.md").read_text().splitlines() if line.startswith("| SGSD")
    )
    assert "±" not in variant_row  # one seed: a value, not "± 0.0"
    assert "Support by outcome" in (out / "diagnostics.md").read_text()
    assert (out / "learning.png").stat().st_size > 10_000


def test_stop_by_is_the_next_such_local_moment():
    now = time.mktime((2026, 12, 2, 11, 30, 0, 0, 0, -1))
    assert lv2.parse_stop_by("14:05", now) - now == (2 * 60 + 35) * 60
    assert lv2.parse_stop_by("11:00", now) - now == (23 * 60 + 30) * 60  # already past today: tomorrow
    assert lv2.parse_stop_by(None) is None
    with pytest.raises(SystemExit, match="HH:MM"):
        lv2.parse_stop_by("2pm")


def test_float_overrides_read_back_as_floats():
    from sgsd.config import load_config

    for lr in (5e-6, 2e-5, 1e-4):  # f"{5e-6:g}" = "5e-06", which YAML reads as text
        cfg = load_config(
            lv2.DEFAULT_CONFIG,
            [f"train.lr={lv2.yaml_float(lr)}", f"train.cpu_budget_s={lv2.yaml_float(6e-5)}"],
        )
        assert cfg.train.lr == pytest.approx(lr) and cfg.train.cpu_budget_s == pytest.approx(6e-5)


@pytest.mark.parametrize("user_value, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_runs_started_by_the_script_wait_passively(tmp_path, user_value, expected):
    """Loading the script sets OMP_WAIT_POLICY=PASSIVE for itself and every run it starts (so that a run
    sharing the cores does not burn its CPU budget spin-waiting); a value the user set stays."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_value:
        env["OMP_WAIT_POLICY"] = user_value
    show_policy = tmp_path / "show_policy.py"
    show_policy.write_text("import os\nprint('policy', os.environ['OMP_WAIT_POLICY'])\n")
    parent = tmp_path / "parent.py"  # loads the script, then starts a run through it
    parent.write_text(
        "import importlib.util, sys, pathlib\n"
        f"spec = importlib.util.spec_from_file_location('lv2', {str(Path(lv2.__file__))!r})\n"
        "lv2 = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(lv2)\n"
        f"ok = lv2.run_cli([sys.executable, {str(show_policy)!r}], pathlib.Path({str(tmp_path / 'child.log')!r}), 'x')\n"
        "sys.exit(0 if ok else 1)\n"
    )
    result = subprocess.run([sys.executable, str(parent)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"policy {expected}" in (tmp_path / "child.log").read_text()


def test_sgsd_ablations_take_sgsds_learning_rate(tmp_path):
    assert [lv2.lr_owner(v) for v in lv2.variants()] == ["grpo", "opsd", "sgsd", "sgsd", "sgsd"]
    (tmp_path / "lr").mkdir()
    (tmp_path / "lr" / "choice.json").write_text(json.dumps({"grpo": 5e-6, "sgsd": 2e-5}))
    cli = lv2.parse_args(["grid", "--out", str(tmp_path), "--use-lr", "sgsd_no_polarity=1e-4"])
    assert lv2.chosen_lr(cli, "sgsd_null_relative") == 2e-5  # SGSD's search
    assert lv2.chosen_lr(cli, "sgsd_no_polarity") == 1e-4  # its own flag wins
    assert lv2.chosen_lr(cli, "grpo") == 5e-6
    with pytest.raises(SystemExit, match="no learning rate chosen for opsd"):
        lv2.chosen_lr(cli, "opsd")


def test_table_gain_is_final_less_the_same_seeds_base(tmp_path):
    from types import SimpleNamespace

    def summary(test, val=None):  # avg@k fractions as sgsd eval writes them
        return {
            "results": {"t": {"avg@k": test, "n_problems": 10, "k": 4}},
            **({"validation": {"v": {"avg@k": val}}} if val else {}),
        }

    def run(seed, base, mid, final):
        evals = {0: summary(base), 5: summary(mid, 0.5), 10: summary(final, 0.4)}
        return SimpleNamespace(seed=seed, label="GRPO", evals=evals, done=True, metrics=[{"step": 10}])

    groups = {"grpo": [run(0, 0.40, 0.45, 0.50), run(1, 0.30, 0.20, 0.36)]}
    lv2.write_table_v2(groups, tmp_path)
    runs = json.loads((tmp_path / "table.json").read_text())["variants"]["grpo"]["runs"]
    assert [r["gain"] for r in runs] == pytest.approx([10.0, 6.0])  # 50 − 40, 36 − 30 (points)
    assert [r["best_val_test"] for r in runs] == pytest.approx([45.0, 20.0])  # step 5 has the best validation
    row = next(
        line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| GRPO | 2")
    )
    # base 35.0 ± 7.1, final 43.0 ± 9.9, gain 8.0 ± 2.8 (stdev of 10 and 6 = 2.83)
    assert "| 35.0 ± 7.1 | 43.0 ± 9.9 | 8.0 ± 2.8 | 32.5 ± 17.7 |" in row, row


def test_gain_interval_is_the_t_interval_over_seeds():
    # gains 1, 3, 5: mean 3, stdev 2, standard error 2/√3 = 1.1547; t_0.975 at df 2 = 4.3027 → 4.968
    mean, half = lv2.gain_interval([1.0, 3.0, 5.0])
    assert mean == pytest.approx(3.0)
    assert half == pytest.approx(4.3027 * 2 / math.sqrt(3), rel=1e-4)
    assert math.isnan(lv2.gain_interval([2.0])[1])  # one seed: no interval
    assert all(math.isnan(x) for x in lv2.gain_interval([]))


def test_gain_lines_pool_variants_per_seed():
    summaries = {
        "grpo": [{"seed": 0, "gain": 0.0}, {"seed": 1, "gain": 6.0}],
        "sgsd": [{"seed": 0, "gain": 2.0}, {"seed": 1, "gain": 2.0}],
    }
    lines, data = lv2.gain_lines(summaries, {"grpo": "GRPO", "sgsd": "SGSD"})
    # seed means: (0 + 2) / 2 = 1 and (6 + 2) / 2 = 4 → mean 2.5, stdev 2.1213, se 1.5, t_0.975 at df 1 = 12.706
    assert data["all_variants"]["seed_means"] == pytest.approx([1.0, 4.0])
    assert data["all_variants"]["ci95_half"] == pytest.approx(12.706 * 1.5, rel=1e-4)
    assert data["sgsd"]["ci95_half"] == pytest.approx(0.0)  # equal gains: no spread
    assert "| SGSD | 2 | +2.0 | [+2.0, +2.0] |" in lines
    assert any(line.startswith("| all variants (seed means) | 2 | +2.5 | [-16.6, +21.6] |") for line in lines)
