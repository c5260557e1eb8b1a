"""sgsd.probe: the pure statistics on hand-made arrays, and `sgsd probe` on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from grading_stub import alternate_grades

from sgsd.errors import DataError
from sgsd.probe import analyse, auc, bootstrap_auc, load_planted, polarity_mix

# ---------------------------------------------------------------------------------------------------
# Statistics by hand


def test_auc_by_hand():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 0.35 beats 0.1 only, 0.8 beats both -> 3 / 4
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert auc([1.0, 1.0], [True, False]) == 0.5  # a tie counts 1/2
    # ties across classes: positives [1, 2, 2], negatives [2, 0]: 1 > 0 (1), 2 = 2 (1/2 each), 2 > 0 -> 4 / 6
    assert auc([1, 2, 2, 2, 0], [True, True, True, False, False]) == pytest.approx(4 / 6)
    assert np.isnan(auc([0.1, 0.2], [True, True]))


def test_bootstrap_resamples_whole_problems():
    # problem A: positive 1.0, negative 0.0 (AUC 1); problem B: positive 0.0, negative 1.0 (AUC 0).
    # Resamples {A, A} -> 1, {B, B} -> 0, {A, B} -> 1/2 (probabilities 1/4, 1/4, 1/2): the 95% CI is [0, 1]
    scores, labels, groups = [1.0, 0.0, 0.0, 1.0], [True, False, True, False], ["A", "A", "B", "B"]
    assert bootstrap_auc(scores, labels, groups, n=400, seed=0) == (0.0, 1.0)
    # perfect separation inside every problem: every resample gives 1
    assert bootstrap_auc([1.0, 0.0, 2.0, -1.0], labels, groups, n=50) == (1.0, 1.0)
    # one class only in every resample -> no interval
    lo, hi = bootstrap_auc([1.0, 2.0], [True, True], ["A", "B"], n=20)
    assert np.isnan(lo) and np.isnan(hi)


def test_spearman_by_hand():
    from sgsd.probe import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1, 2, 3; y: 1, 3, 2 -> d^2 = 0 + 1 + 1 = 2 -> 1 - 6 * 2 / (3 * 8) = 0.5
    assert spearman([1, 2, 3], [5, 9, 7]) == pytest.approx(0.5)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_polarity_mix_by_hand():
    mix = polarity_mix([0.3, -0.2, 0.1, -0.1, 0.0, 0.04], [True, False, False, True, False, True], 0.05)
    assert mix == {
        "helpful_fraction": 1 / 6,
        "warning_fraction": 1 / 6,
        "misleading_fraction": 1 / 6,
        "over_suppressive_fraction": 1 / 6,
        "neutral_fraction": 2 / 6,
    }


def _hand_arrays():
    """4 rollouts of 2 problems (correct, wrong, correct, wrong), 2 retrieved teachers and one planted
    column, T = 2 kept tokens with a constant gap per (rollout, teacher), so each paper support is
    that constant."""
    retrieved = [[0.375, 0.125], [-0.25, 0.0], [0.25, 0.5], [0.125, -0.125]]  # exact in binary
    planted = [0.5, -0.5, 0.5, -0.5]
    values = torch.tensor([[p] + r for p, r in zip(planted, retrieved)])  # [4, 3]
    delta = values.unsqueeze(-1).expand(4, 3, 2).clone()  # [R, J, T]
    return dict(
        delta=delta,
        baseline=torch.full_like(delta, 0.125),
        null_delta=torch.full((4, 2), 0.125),
        mask=torch.ones(4, 2, dtype=torch.bool),
        teacher_mask=torch.ones(4, 3, dtype=torch.bool),
        columns=["helper", "retrieved", "retrieved"],
        correct=[True, False, True, False],
        problem=[0, 0, 1, 1],
        length=[10, 20, 12, 30],
        student_mean_logp=[-1.0, -0.5, -0.8, -0.9],
        truncated=[False, False, False, True],
        planted_roles={"helper": "helpful"},
        n_boot=200,
    )


def test_analyse_by_hand():
    r = analyse(**_hand_arrays())
    assert (r["rollouts"], r["problems"], r["decisions"]) == (4, 2, 8)
    assert r["accuracy"] == 0.5 and r["truncated_fraction"] == 0.25
    paper = r["estimators"]["paper"]
    # correct decisions 0.375, 0.125, 0.25, 0.5; wrong -0.25, 0.0, 0.125, -0.125
    assert paper["mean_correct"] == 0.3125 and paper["mean_wrong"] == -0.0625
    assert paper["auc"] == 15.5 / 16  # only 0.125 vs 0.125 is not a win (a tie)
    # resamples {0,0} and {1,1} separate perfectly, {0,1} is the full set: CI within [15.5/16, 1]
    assert paper["auc_ci"][0] >= 15.5 / 16 - 1e-12 and paper["auc_ci"][1] == 1.0
    assert paper["helpful_fraction"] == 4 / 8 and paper["warning_fraction"] == 2 / 8
    assert paper["misleading_fraction"] == 1 / 8 and paper["neutral_fraction"] == 1 / 8
    assert paper["over_suppressive_fraction"] == 0.0
    assert paper["mean_abs_gap"] == 1.75 / 8
    # support ranks over the decisions 7, 4.5, 1, 3, 6, 8, 4.5, 2; length ranks 1.5, 1.5, 5.5, 5.5, 3.5,
    # 3.5, 7.5, 7.5; centred products sum to -25, squares to 41.5 and 40 -> r = -25 / sqrt(1660)
    assert paper["spearman_length"] == pytest.approx(-25 / 1660**0.5)
    # expected: every gap minus b = 0.125 -> supports shift by -0.125, ranks unchanged
    expected = r["estimators"]["expected"]
    assert expected["mean_correct"] == 0.1875 and expected["auc"] == 15.5 / 16
    assert expected["mean_abs_gap"] == (0.25 + 0 + 0.375 + 0.125 + 0.125 + 0.375 + 0 + 0.25) / 8
    # null_relative: minus the null's support 0.125
    assert r["estimators"]["null_relative"]["mean_wrong"] == -0.1875
    # teacher_centred: row means 0.25, -0.125, 0.375, 0.0 -> +-0.125 on both sides: no separation
    centred = r["estimators"]["teacher_centred"]
    assert centred["mean_correct"] == 0.0 and centred["auc"] == 0.5
    # confounds: shorter is correct every time; student log-prob: -0.8 > -0.9 is the one win of 4
    assert r["confounds"]["shortness"]["auc"] == 1.0
    assert r["confounds"]["student_mean_logp"]["auc"] == 0.25
    helper = r["planted"]["helper"]
    assert helper["role"] == "helpful" and helper["expected_side"] == "correct"
    for name in ("paper", "expected", "null_relative", "teacher_centred"):
        assert helper[name]["auc"] == 1.0 and helper[name]["auc_ci"] == [1.0, 1.0], name
        assert helper[name]["side"] == "correct" and helper[name]["as_expected"], name
    # the planted column, centred on the retrieved teachers' mean: 0.25, -0.375, 0.125, -0.5
    assert helper["teacher_centred"]["mean_correct"] == 0.1875


def test_analyse_without_two_retrieved_teachers_has_no_centred_estimator():
    arrays = _hand_arrays()
    arrays["teacher_mask"][:, 2] = False
    arrays["columns"] = ["helper", "retrieved", "absent"]
    r = analyse(**arrays)
    assert r["estimators"]["teacher_centred"] == {"available": False}
    assert r["estimators"]["paper"]["available"]


# ---------------------------------------------------------------------------------------------------
# Planted pairs file


def _pair(name, role="helpful"):
    return {
        "name": name,
        "role": role,
        "skill": {"title": "t", "principle": "p", "when_to_apply": "w"},
        "mistake": {"description": "d", "how_to_avoid": "h"},
    }


def test_load_planted(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"pairs": [_pair("a"), _pair("b", "misleading"), _pair("c", "null")]}))
    pairs = load_planted(path)
    assert [(p.name, p.role) for p in pairs] == [("a", "helpful"), ("b", "misleading"), ("c", "null")]
    assert pairs[0].skill.title == "t" and pairs[0].mistake.how_to_avoid == "h"
    for bad, message in [
        ([_pair("a", "useful")], "role"),
        ([_pair("a"), _pair("a")], "unique"),
        ([{"name": "a", "role": "null", "skill": {"title": "t"}}], "needs skill"),
        ([], "non-empty"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=message):
            load_planted(path)
    with pytest.raises(DataError, match="not found"):
        load_planted(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------------
# The driver on the tiny model


@pytest.mark.slow
def test_probe_command_on_the_tiny_model(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from sgsd.cli import main

    alternate_grades(monkeypatch)
    planted = tmp_path / "pairs.json"
    planted.write_text(json.dumps([_pair("good"), _pair("bad", "misleading")]))
    out = tmp_path / "probe"
    args = ["probe", "-c", "tiny", "-o", str(out), f"model.name={tiny_model_dir}", "probe.problems=4",
            "probe.rollouts=2", f"probe.planted={planted}", "probe.bootstrap=50", "probe.micro_batch=3",
            "probe.chunk_problems=3"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| paper |" in printed and "| teacher_centred |" in printed and "−length" in printed
    for name in (
        "probe.json",
        "probe.md",
        "probe.png",
        "rollouts.jsonl",
        "rounds/round-000.pt",
        "rounds/round-001.pt",
    ):
        assert (out / name).is_file(), name
    assert "round 2/2: sampling 2 rollouts for each of 1 problems" in printed
    result = json.loads((out / "probe.json").read_text())
    assert result["rollouts"] == 8 and result["problems"] == 4 and result["decisions"] == 16
    assert result["accuracy"] == 0.5
    for name in ("paper", "expected", "null_relative", "teacher_centred"):
        row = result["estimators"][name]
        assert row["available"] and 0.0 <= row["auc"] <= 1.0, name
        assert sum(row[k] for k in row if k.endswith("_fraction")) == pytest.approx(1.0)
    assert set(result["planted"]) == {"null", "good", "bad"}
    assert result["planted"]["null"]["null_relative"]["mean_correct"] == 0.0  # the null against itself
    assert result["rounds"] == "2 of 2"
    assert set(result["cost"]) == {"sampling", "scoring"} and "Cost: sampling" in printed
    assert all(c["cpu_s"] > 0 and c["wall_s"] > 0 for c in result["cost"].values())
    # a second run reuses both rounds and loads no model; --analyse-only reports on what is there
    assert main(args) == 0
    assert "reusing 2 scored round(s)" in capsys.readouterr().out
    assert json.loads((out / "probe.json").read_text()) == result
    (out / "rounds" / "round-001.pt").unlink()
    assert main([*args, "--analyse-only"]) == 0
    partial = json.loads((out / "probe.json").read_text())
    assert partial["rounds"] == "1 of 2" and partial["rollouts"] == 6
    assert main([*args[:4], str(tmp_path / "empty"), *args[5:], "--analyse-only"]) == 2
    assert "no scored rounds" in capsys.readouterr().err


@pytest.mark.slow
def test_probe_scores_retrieved_teachers_exactly_as_training_does(tmp_path, tiny_model_dir, monkeypatch):
    from sgsd.config import load_config
    from sgsd.configs import resolve_config_path
    from sgsd.probe import problem_order, sample_and_grade, score_rollouts
    from sgsd.trainer import Trainer

    alternate_grades(monkeypatch)
    overrides = [
        f"model.name={tiny_model_dir}",
        "probe.problems=2",
        "probe.rollouts=2",
        "data.eval_sources=[]",
    ]
    cfg = load_config(resolve_config_path("tiny"), overrides)
    cfg.rollout.num_generations = 2
    trainer = Trainer(cfg, tmp_path / "run")
    rollouts = sample_and_grade(trainer, problem_order(cfg, len(trainer.train_problems))[:2], 0)
    scored = score_rollouts(trainer, rollouts, [], show=lambda *_: None)
    assert scored["columns"] == ["null", "retrieved", "retrieved"]
    # the trainer's own way (sgsd.teaching, as MicroBatchLoss calls it): teachers, scores, token mask
    from sgsd.teaching import build_teacher_batch, completion_ids_of, score_sampled_tokens, token_mask

    completion_ids = completion_ids_of(rollouts, trainer.pad_id)
    batch = build_teacher_batch(trainer.spec, rollouts, trainer.tokenizer, cfg, "cpu")
    with torch.no_grad():
        scores = score_sampled_tokens(trainer.model, [r.prompt_ids for r in rollouts], batch, completion_ids,
                                      trainer.pad_id, cfg, trainer.teacher.scoring)  # fmt: skip
    t_logp, t_mask, s_logp = scores.teacher, batch.mask, scores.student
    mask = token_mask(trainer.tokenizer, completion_ids, scores.valid, cfg.objective.token_mask)
    width = t_logp.shape[-1]
    torch.testing.assert_close(
        scored["delta"][:, 1:, :width], (t_logp - s_logp.unsqueeze(1)) * t_mask[..., None]
    )
    assert scored["mask"][:, :width].tolist() == mask.tolist()
    assert scored["teacher_mask"][:, 1:].tolist() == t_mask.tolist()
    assert scored["teacher_mask"][:, 0].all()  # the null teacher scores every rollout
