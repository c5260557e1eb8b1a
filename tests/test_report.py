"""`sgsd report` over synthetic run folders: the Table-3-style table (values worked out by hand) and the plots."""

from __future__ import annotations

import math

import pytest
import yaml

from sgsd.cli import main
from sgsd.errors import UserError
from sgsd.fileio import atomic_write_json, atomic_write_jsonl
from sgsd.report import load_run, markdown_table, table_rows, write_report

# step -> (aime24, aime25, math500) avg@k per run
RUNS = {
    "sgsd-s1": ("sgsd", 1, {0: (0.40, 0.30, 0.5), 25: (0.50, 0.40, 0.7), 50: (0.60, 0.35, 0.6)}),
    "sgsd-s2": ("sgsd", 2, {0: (0.40, 0.30, 0.5), 25: (0.55, 0.45, 0.5), 50: (0.50, 0.40, 0.6)}),
    "opsd-s1": ("opsd", 1, {0: (0.40, 0.30, 0.5), 25: (0.60, 0.50, 0.4), 50: (0.45, 0.30, 0.8)}),
}


def _result(avg):
    return {"avg@k": avg, "pass@k": min(1.0, 2 * avg), "maj@k": avg, "k": 12, "n_problems": 30,
            "boxed_rate": 0.9, "mean_tokens": 800.0}  # fmt: skip


def write_run(root, name, method, seed, evals, steps=50):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"method": method, "seed": seed}}))
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 1.0 / step, "reward_mean": -0.5 + step / steps + 0.05 * seed}
        if method == "sgsd":
            helpful = 0.2 + 0.3 * step / steps
            misleading = 0.15 - 0.1 * step / steps
            rest = 1 - helpful - misleading
            row |= {
                "helpful_fraction": helpful,
                "warning_fraction": 0.35 * rest,
                "misleading_fraction": misleading,
                "over_suppressive_fraction": 0.15 * rest,
                "neutral_fraction": 0.5 * rest,
                "mean_support": 0.1 * math.sin(step / 5) + 0.02 * seed,
            }
        rows.append(row)
    atomic_write_jsonl(run / "metrics.jsonl", rows)
    for step, (a24, a25, m500) in evals.items():
        results = {"aime24": _result(a24), "aime25": _result(a25), "math500": _result(m500)}
        atomic_write_json(
            run / "eval" / f"step-{step:06d}" / "summary.json", {"step": step, "results": results}
        )
    return run


@pytest.fixture
def runs(tmp_path):
    return [write_run(tmp_path, name, *spec) for name, spec in RUNS.items()]


def test_table_rows_use_the_best_checkpoint_and_seed_statistics(runs):
    loaded = [load_run(r) for r in runs]
    assert [r.label for r in loaded] == ["SGSD", "SGSD", "OPSD"] and loaded[1].seed == 2
    rows = table_rows(loaded, ["aime24", "aime25"])
    assert list(rows) == ["Base", "OPSD", "SGSD"]
    # best test mean: s1 step 50 (0.475 > 0.45 > base excluded), s2 step 25 (0.50 > 0.45), opsd step 25 (0.55)
    assert rows["SGSD"]["step"] == [50, 25]
    assert rows["SGSD"]["aime24"] == pytest.approx([60.0, 55.0])
    assert rows["SGSD"]["Avg."] == pytest.approx([47.5, 50.0])
    assert rows["Base"]["step"] == [0, 0, 0]
    # validation selection (math500): s1 step 25 (0.7), s2 step 50 (0.6), opsd step 50 (0.8)
    val = table_rows(loaded, ["aime24", "aime25"], ["math500"])
    assert val["SGSD"]["step"] == [25, 50] and val["SGSD"]["aime24"] == pytest.approx([50.0, 50.0])
    assert val["OPSD"]["Avg."] == pytest.approx([37.5])  # (45 + 30) / 2


def test_markdown_table_marks_best_and_second_best(runs):
    table = markdown_table(
        table_rows([load_run(r) for r in runs], ["aime24", "aime25"]), ["aime24", "aime25", "Avg."]
    )
    lines = table.splitlines()
    assert lines[0] == "| Method | aime24 | aime25 | Avg. | Step | Runs |"
    # Base: 40, 30 in all three runs -> std 0; avg (40 + 30) / 2 = 35
    assert lines[2] == "| Base | 40.0 ± 0.0 | 30.0 ± 0.0 | 35.0 ± 0.0 | 0, 0, 0 | 3 |"
    # OPSD (one run, step 25): 60, 50, avg 55 -> best everywhere
    assert lines[3] == "| OPSD | **60.0** | **50.0** | **55.0** | 25 | 1 |"
    # SGSD: aime24 mean(60, 55) = 57.5, std sqrt(((2.5)^2 * 2) / 1) = 3.54; aime25 mean(35, 45) = 40, std 7.07;
    # Avg. mean(47.5, 50) = 48.75 -> 48.8, std 1.77 -> second best everywhere
    assert lines[4] == "| SGSD | <u>57.5 ± 3.5</u> | <u>40.0 ± 7.1</u> | <u>48.8 ± 1.8</u> | 50, 25 | 2 |"


def test_markdown_table_ties_share_the_mark():
    rows = {
        "A": {"x": [75.3], "step": [25]},
        "B": {"x": [75.3], "step": [50]},
        "C": {"x": [70.0], "step": [75]},
        "D": {"x": [69.0], "step": [100]},
    }
    lines = markdown_table(rows, ["x"]).splitlines()
    assert lines[2:] == [
        "| A | **75.3** | 25 | 1 |",
        "| B | **75.3** | 50 | 1 |",
        "| C | <u>70.0</u> | 75 | 1 |",
        "| D | 69.0 | 100 | 1 |",
    ]


def test_report_cli_writes_table_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["report", *map(str, runs), "--out", str(out), "--sources", "hf:aime24", "hf:aime25",
                 "--validation-sources", "hf:math500"])  # fmt: skip
    assert code == 0
    text = (out / "report.md").read_text()
    assert "| OPSD | **60.0** | **50.0** | **55.0** | 25 | 1 |" in text
    assert "## Checkpoint chosen on held-out validation (math500)" in text
    # validation table: SGSD 50/40 in both seeds (std 0); OPSD step 50: 45, 30, avg 37.5
    assert "| SGSD | **50.0 ± 0.0** | **40.0 ± 0.0** | **45.0 ± 0.0** | 25, 50 | 2 |" in text
    for png in ("accuracy.png", "polarity.png", "signals.png"):
        assert f"]({png})" in text
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_report_errors_name_the_problem(tmp_path, runs):
    with pytest.raises(UserError, match="run folder not found"):
        write_report([tmp_path / "missing"], tmp_path / "out")
    with pytest.raises(UserError, match="1 labels for 3 runs"):
        write_report(runs, tmp_path / "out", labels=["x"])
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UserError, match="no config.yaml with train.method"):
        write_report([bare], tmp_path / "out")
    with pytest.raises(UserError, match="none of the runs has evaluation results"):
        write_report([bare], tmp_path / "out", labels=["GRPO"])


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")


def test_signals_plot_adds_the_support_by_outcome_panel_when_runs_log_it(runs, tmp_path):
    from sgsd.fileio import read_jsonl
    from sgsd.report import plot_signals

    two = plot_signals([load_run(r) for r in runs], tmp_path / "two.png")
    rows = read_jsonl(runs[0] / "metrics.jsonl")
    for row in rows[::2]:  # a step without wrong (or correct) rollouts simply lacks the key
        row |= {"support_correct": 0.01, "support_wrong": -0.02}
    atomic_write_jsonl(runs[0] / "metrics.jsonl", rows)
    three = plot_signals([load_run(r) for r in runs], tmp_path / "three.png")
    # panels are 6 inches wide each: a third panel makes the figure 1.5 times as wide
    assert _png_width(three) == pytest.approx(1.5 * _png_width(two), abs=2)


def test_support_by_outcome_by_hand():
    from sgsd.metrics import support_by_outcome

    # a success with teachers 0.2 and -0.4, a failure with 0.1 and 0.3 ([support, rho, reward] rows)
    decisions = [[0.2, 1.0, 1.0], [-0.4, -1.0, 1.0], [0.1, -1.0, -1.0], [0.3, -1.0, -1.0]]
    assert support_by_outcome(decisions) == pytest.approx(
        {"support_correct": -0.1, "support_wrong": 0.2, "support_gap": -0.3}
    )
    # one more success at 0.5: correct mean (0.2 - 0.4 + 0.5) / 3 = 0.1
    assert support_by_outcome([*decisions, [0.5, 1.0, 1.0]])["support_correct"] == pytest.approx(0.1)
    assert support_by_outcome([[0.1, 0.0, -1.0]]) == {"support_wrong": pytest.approx(0.1)}
