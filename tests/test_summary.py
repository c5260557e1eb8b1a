"""The closing summary (sgsd/summary.py): on a synthetic run folder with hand-worked values
(tests/run_helpers.py), and end to end after `sgsd train` and `sgsd eval --run` on the tiny model."""

from __future__ import annotations

import pytest
from run_helpers import make_run

from sgsd.fileio import atomic_write_json
from sgsd.summary import duration, format_summary, run_summary, write_run_plots


def test_summary_of_a_run_folder(tmp_path):
    run = make_run(tmp_path / "run")
    s = run_summary(run, wall_s=512.3)
    assert (s["method"], s["steps_done"], s["steps_planned"]) == ("sgsd", 4, 4)
    assert s["train_time_s"] == 125.0  # 31.25 s x 4 steps, the last row's train_time_s
    assert s["sources"] == ["reasoning_gym-chain_sum", "gsm8k"] and s["k"] == [4]
    # before: step 0; after: the last evaluated step (4); mean over the two sources
    assert s["before"] == {"step": 0, "avg": {"reasoning_gym-chain_sum": 0.25, "gsm8k": 0.5}, "mean": 0.375}
    assert s["after"] == {"step": 4, "avg": {"reasoning_gym-chain_sum": 0.5, "gsm8k": 0.625}, "mean": 0.5625}
    # best trained step by mean avg@k: step 2 (0.75 + 0.5) / 2 = 0.625 > step 4's 0.5625
    assert s["best"]["step"] == 2 and s["best"]["score"] == 0.625
    assert s["best"]["checkpoint"] == str(run / "checkpoints" / "step-000002")
    assert s["validation"] is None
    # polarity: the mean of the four steps' fractions, e.g. helpful (0.5 + 0.25 + 0.75 + 0.5) / 4 = 0.5,
    # misleading (0.125 + 0.25 + 0.25 + 0) / 4 = 0.15625; they still sum to 1
    assert s["polarity"] == {
        "helpful": 0.5,
        "warning": 0.25,
        "misleading": 0.15625,
        "over-suppressive": 0.09375,
        "neutral": 0.0,
    }
    assert s["polarity_last"]["warning"] == 0.5 and s["polarity_steps"] == 4
    assert s["checkpoints"] == [2, 4] and s["plots"] == []
    assert s["trackers"] == ["tensorboard"]
    assert s["next"] == [f"sgsd report {run} --out {run / 'report'}", f"sgsd eval --run {run}"]

    text = format_summary(s, "sgsd train")
    lines = text.splitlines()
    assert lines[0].startswith("== sgsd train: summary")
    assert f"run         {run}  (sgsd, 4 of 4 steps)" in lines
    assert "time        2 min 05 s in training steps; 8 min 32 s wall time for this command" in lines
    assert "held-out    avg@4, step 0 -> step 4" in lines
    assert "              reasoning_gym-chain_sum  0.250 -> 0.500  (+0.250)" in lines
    assert "              gsm8k                    0.500 -> 0.625  (+0.125)" in lines
    assert "              mean                     0.375 -> 0.562  (+0.188)" in lines
    assert any(
        line.startswith("best        step 2 by mean avg@4 on the test sources: 0.625") for line in lines
    )
    assert any("helpful 0.50 · warning 0.25 · misleading 0.16" in line for line in lines)
    assert f"checkpoints {run / 'checkpoints'}: steps 2, 4" in lines
    assert "plots       not written yet (sgsd report, below)" in lines
    assert f"trackers    tensorboard: tensorboard --logdir {run / 'tensorboard'}" in lines
    assert f"next        sgsd report {run} --out {run / 'report'}" in lines


def test_summary_names_the_plots_once_written(tmp_path):
    run = make_run(tmp_path / "run")
    written = write_run_plots(run)
    assert [p.name for p in written] == ["accuracy.png", "polarity.png", "signals.png"]
    assert (run / "report" / "report.md").is_file()
    text = format_summary(run_summary(run))
    assert f"plots       {run / 'report'}: accuracy.png, polarity.png, signals.png" in text.splitlines()


def test_plots_without_evaluations_are_the_training_signals(tmp_path):
    run = make_run(tmp_path / "run", evals={})
    assert [p.name for p in write_run_plots(run)] == ["polarity.png", "signals.png"]


def test_validation_choice_from_selection_json(tmp_path):
    evals = {
        0: {"reasoning_gym-chain_sum": 0.25, "gsm8k": 0.5, "math500": 0.0},
        2: {"reasoning_gym-chain_sum": 0.75, "gsm8k": 0.5, "math500": 0.125},
        4: {"reasoning_gym-chain_sum": 0.5, "gsm8k": 0.625, "math500": 0.375},
    }
    run = make_run(tmp_path / "run", evals=evals)
    atomic_write_json(
        run / "eval" / "selection.json", {"validation": {"step": 4, "selected_by": ["math500"]}}
    )
    s = run_summary(run)
    assert s["sources"] == ["reasoning_gym-chain_sum", "gsm8k"]  # math500 only selects
    assert s["best"]["step"] == 2  # on the test sources
    # on validation: step 4 (0.375 > 0.125), test mean there (0.5 + 0.625) / 2 = 0.5625
    assert (s["validation"]["step"], s["validation"]["score"], s["validation"]["test_mean"]) == (
        4,
        0.375,
        0.5625,
    )
    line = [x for x in format_summary(s).splitlines() if x.startswith("validation")][0]
    assert line.startswith("validation  step 4 by mean avg@4 on math500: 0.375 (test mean 0.562);")


def test_one_trained_evaluation_has_no_separate_best(tmp_path):
    run = make_run(tmp_path / "run", evals={0: {"gsm8k": 0.5}, 3: {"gsm8k": 0.75}}, checkpoints=())
    s = run_summary(run)
    assert s["best"] is None and s["after"]["step"] == 3
    lines = format_summary(s).splitlines()
    assert lines[3:6] == [  # one source: no mean line; then the polarity mix
        "held-out    avg@4, step 0 -> step 3",
        "              gsm8k  0.500 -> 0.750  (+0.250)",
        lines[5],
    ] and lines[5].startswith("polarity")
    assert "checkpoints none" in lines


def test_a_best_step_without_a_checkpoint_is_said(tmp_path):
    run = make_run(tmp_path / "run", checkpoints=(4,))  # best is step 2, saved only at 4
    best = [x for x in format_summary(run_summary(run)).splitlines() if x.startswith("best")]
    assert best == [
        "best        step 2 by mean avg@4 on the test sources: 0.625; no checkpoint saved at that step"
    ]


def test_a_run_without_evaluations_or_metrics(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    s = run_summary(run)
    assert (s["steps_done"], s["train_time_s"], s["before"], s["after"], s["polarity"]) == (
        0,
        None,
        None,
        None,
        None,
    )
    text = format_summary(s, "sgsd eval")
    assert text.startswith("== sgsd eval: summary")
    assert "held-out    not evaluated" in text


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0 s"), (42.4, "42 s"), (252, "4 min 12 s"), (3600, "1 h 00 min"), (3720, "1 h 02 min")],
)
def test_duration(seconds, text):
    assert duration(seconds) == text


@pytest.mark.slow
def test_train_and_eval_end_with_the_summary(tmp_path, tiny_model_dir, capsys):
    from sgsd.cli import main

    run = tmp_path / "run"
    assert main(["train", "-c", "tiny", "-o", str(run), f"model.name={tiny_model_dir}"]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("== sgsd train: summary") :].splitlines()
    assert summary[1] == f"run         {run}  (sgsd, 2 of 2 steps)"
    assert summary[3] == "held-out    avg@1, step 0 -> step 2"
    assert summary[4].startswith("              reasoning_gym-chain_sum  ")
    assert f"checkpoints {run / 'checkpoints'}: steps 1, 2" in summary
    assert any(line.startswith("polarity    helpful ") for line in summary)
    assert summary[-2:] == [
        f"next        sgsd report {run} --out {run / 'report'}",
        f"            sgsd eval --run {run}",
    ]

    assert main(["eval", "--run", str(run), f"model.name={tiny_model_dir}"]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("== sgsd eval: summary") :].splitlines()
    assert summary[1] == f"run         {run}  (sgsd, 2 of 2 steps)"
    assert summary[3] == "held-out    avg@1, step 0 -> step 2"
