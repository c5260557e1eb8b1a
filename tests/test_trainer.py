"""End-to-end CPU tests of the trainer on a tiny random model (tier 3: the real CLI, 2 steps)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from grading_stub import alternate_grades
from safetensors.torch import load_file

from sgsd.cli import main
from sgsd.fileio import read_jsonl

pytestmark = pytest.mark.slow


def _train(tmp_path, tiny_model_dir, *overrides, name="run"):
    out = tmp_path / name
    rc = main(["train", "-c", "tiny", "-o", str(out), f"model.name={tiny_model_dir}", *overrides])
    assert rc == 0
    return out


DEMO_RETRIEVAL = ["teachers.count=3"]  # the demo retrieves 3 pairs per problem (configs/demo.yaml)
# OPSD as the official code runs it (paper/qwen3-*/opsd.yaml, docs/FIDELITY.md)
OFFICIAL_OPSD = ["objective.loss=forward_kl", "objective.opsd_temperature=1.1", "objective.opsd_clip=0.05",
                 "objective.opsd_mask=completion", "objective.opsd_aggregation=token_mean",
                 "teachers.answer_template=official", "teachers.align_think_block=false", "teachers.mode=frozen"]  # fmt: skip


@pytest.mark.parametrize(
    "method, extra",
    [
        ("sgsd", []),
        ("opsd", ["teachers.mode=frozen", "objective.loss=forward_kl"]),
        ("opsd_skill", ["teachers.mode=frozen", "objective.loss=forward_kl"]),  # 3 pairs in one teacher
        ("grpo", ["rollout.num_generations=2"]),
        ("grpo_skill", ["rollout.num_generations=2"]),  # 3 pairs in the student's prompt
    ],
)
def test_every_method_trains_two_steps(tmp_path, tiny_model_dir, monkeypatch, method, extra):
    alternate_grades(monkeypatch)
    run = _train(tmp_path, tiny_model_dir, f"train.method={method}", *DEMO_RETRIEVAL, *extra)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["skipped_step"] == 0.0 for r in rows)
    # LoRA B starts at zero; after two steps the adapter has moved
    final = load_file(str(run / "checkpoints" / "step-000002" / "trainable.safetensors"))
    lora_b = [v for k, v in final.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)
    assert (run / "checkpoints" / "step-000002" / "adapter" / "adapter_config.json").exists()
    assert (run / "config.yaml").exists()
    for step in (0, 2):
        summary = json.loads((run / "eval" / f"step-{step:06d}" / "summary.json").read_text())
        assert summary["results"]


def test_sgsd_logs_the_polarity_mix(tmp_path, tiny_model_dir, monkeypatch):
    alternate_grades(monkeypatch)
    run = _train(tmp_path, tiny_model_dir, "train.method=sgsd")
    row = read_jsonl(run / "metrics.jsonl")[0]
    from sgsd.objectives import POLARITY_FRACTIONS

    fractions = [row[k] for k in POLARITY_FRACTIONS]
    assert sum(fractions) == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < row["kept_token_fraction"] <= 1.0


def test_sgsd_logs_each_decision_and_the_delta_histogram(tmp_path, tiny_model_dir, monkeypatch):
    """Per step: one [support, rho, reward] per (rollout, valid teacher), consistent with the logged
    polarity mix, and a Delta histogram over the kept tokens (bins of sgsd.metrics.DELTA_EDGES)."""
    from sgsd.metrics import DELTA_EDGES

    alternate_grades(monkeypatch)
    run = _train(tmp_path, tiny_model_dir, "train.method=sgsd")
    for row in read_jsonl(run / "metrics.jsonl"):
        decisions = row["decisions"]
        assert decisions and all(len(d) == 3 and d[2] in (-1.0, 1.0) for d in decisions)
        eps_a = 0.05  # objective.threshold default
        helpful = sum(a > eps_a and r > 0 for a, _, r in decisions) / len(decisions)
        neutral = sum(abs(a) <= eps_a for a, _, _ in decisions) / len(decisions)
        assert row["helpful_fraction"] == pytest.approx(helpful, abs=1e-6)
        assert row["neutral_fraction"] == pytest.approx(neutral, abs=1e-6)
        for a, rho, r in decisions:  # Eq. 13: rho = sgn_out(r) * sgn(a) outside the dead zone, else 0
            expected = 0.0 if abs(a) <= eps_a else (1.0 if r > 0 else -1.0) * math.copysign(1.0, a)
            assert rho == expected
        hist = row["delta_hist"]
        assert len(hist) == len(DELTA_EDGES) + 1 and sum(hist) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: adapters run under autocast
def test_resume_continues_exactly(tmp_path, tiny_model_dir, monkeypatch, dtype):
    alternate_grades(monkeypatch)
    common = ["train.method=sgsd", "train.save_every=2", "skills.update_every=2", f"model.dtype={dtype}"]
    straight = _train(tmp_path, tiny_model_dir, *common, "train.steps=4", name="straight")
    interrupted = _train(tmp_path, tiny_model_dir, *common, "train.steps=2", name="split")
    rc = main(
        [
            "train",
            "-c",
            "tiny",
            "-o",
            str(interrupted),
            "--resume",
            f"model.name={tiny_model_dir}",
            *common,
            "train.steps=4",
        ]
    )
    assert rc == 0
    a = load_file(str(straight / "checkpoints" / "step-000004" / "trainable.safetensors"))
    b = load_file(str(interrupted / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    la = [r["loss"] for r in read_jsonl(straight / "metrics.jsonl")]
    lb = [r["loss"] for r in read_jsonl(interrupted / "metrics.jsonl")]
    assert la == pytest.approx(lb, abs=1e-6)
    assert [r["step"] for r in read_jsonl(interrupted / "metrics.jsonl")] == [1, 2, 3, 4]


def test_non_finite_loss_skips_the_step(tmp_path, tiny_model_dir, monkeypatch):
    alternate_grades(monkeypatch)
    import sgsd.teaching as teaching

    real = teaching.sgsd_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        return (
            loss * float("nan") if calls["n"] == 1 else loss
        ), metrics  # step 1: its first micro-batch is non-finite, so the step is skipped

    monkeypatch.setattr(teaching, "sgsd_loss", poisoned)
    run = _train(tmp_path, tiny_model_dir, "train.method=sgsd")
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[0]["skipped_step"] == 1.0 and rows[1]["skipped_step"] == 0.0
    for name in ("step-000001", "step-000002"):
        tensors = load_file(str(run / "checkpoints" / name / "trainable.safetensors"))
        assert all(torch.isfinite(v).all() for v in tensors.values())
    first = load_file(str(run / "checkpoints" / "step-000001" / "trainable.safetensors"))
    assert all(v.abs().max() == 0 for k, v in first.items() if "lora_B" in k)  # nothing was applied
    # a skipped step leaves no evidence: no logged decisions, nothing in the skill ledger
    assert "decisions" not in rows[0] and rows[1]["decisions"]
    ledger = json.loads((run / "checkpoints" / "step-000001" / "ledger.json").read_text())
    assert ledger["records"] == 0
    later = json.loads((run / "checkpoints" / "step-000002" / "ledger.json").read_text())
    assert later["records"] == len(rows[1]["decisions"])


def test_a_second_run_in_the_same_folder_needs_resume_or_overwrite(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    alternate_grades(monkeypatch)
    run = _train(tmp_path, tiny_model_dir, "train.steps=1", "data.eval_sources=[]")
    args = [
        "train",
        "-c",
        "tiny",
        "-o",
        str(run),
        f"model.name={tiny_model_dir}",
        "train.steps=1",
        "data.eval_sources=[]",
    ]
    assert main(args) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert len(read_jsonl(run / "metrics.jsonl")) == 1  # nothing was touched
    assert main([*args, "--overwrite"]) == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]  # a fresh run, not appended


def test_vllm_backend_samples_with_the_adapter_of_each_step(tmp_path, tiny_model_dir, monkeypatch):
    """rollout.backend=vllm against the stand-in engine (tests/fake_vllm.py): one engine over the model
    folder; before each use after an optimizer step the trainable adapter is saved and registered
    under a new LoRA id, so rollouts and evaluations sample with the current weights."""
    from fake_vllm import FakeEngine
    from transformers import AutoTokenizer

    alternate_grades(monkeypatch)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reply = tokenizer("The sum is \\boxed{3}.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    engine = FakeEngine(reply, "The sum is \\boxed{3}.").install(monkeypatch)
    run = _train(tmp_path, tiny_model_dir, "rollout.backend=vllm", "skills.online_update=false")

    assert len(engine.init_kwargs) == 1
    assert engine.init_kwargs[0]["model"] == str(tiny_model_dir)
    assert engine.init_kwargs[0]["enable_lora"] and engine.init_kwargs[0]["max_lora_rank"] == 4
    # eval at step 0, rollouts of steps 1 and 2, eval at step 2
    ids = [c.lora.lora_int_id for c in engine.calls]
    assert ids == [1, 1, 2, 3]
    step0_b = [v for k, v in engine.calls[0].adapter.items() if "lora_B" in k]
    assert step0_b and all(float(v.abs().max()) == 0 for v in step0_b)  # step 0: lora_B still 0
    final = load_file(str(run / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors"))
    assert engine.calls[-1].adapter.keys() == final.keys()
    assert all(torch.equal(engine.calls[-1].adapter[k], final[k]) for k in final)
    assert any(not torch.equal(engine.calls[2].adapter[k], final[k]) for k in final)  # step 1 != step 2
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["completion_tokens"] == len(reply) for r in rows)


def test_vllm_backend_refuses_full_fine_tuning(tmp_path, tiny_model_dir, capsys):
    rc = main(["train", "-c", "tiny", "-o", str(tmp_path / "r"), f"model.name={tiny_model_dir}",
               "rollout.backend=vllm", "model.lora_rank=0"])  # fmt: skip
    assert rc == 2
    assert "model.lora_rank > 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method, extra",
    [
        ("sgsd", ["objective.loss=sampled_rkl"]),
        ("sgsd", ["objective.support=topk", "objective.support_top_k=5"]),
        ("sgsd", ["objective.loss=forward_kl"]),
        ("sgsd", ["objective.loss=reverse_kl", "teachers.mode=ema"]),
        ("sgsd", ["objective.loss=jsd", "teachers.mode=periodic"]),
        ("opsd", ["objective.loss=reverse_kl"]),
        ("opsd_skill", ["objective.loss=gated"]),
        ("grpo", ["rollout.num_generations=2", "objective.grpo_aggregation=sequence_mean"]),
        ("opsd", OFFICIAL_OPSD),
        ("opsd_skill", OFFICIAL_OPSD),
        ("sgsd", ["objective.support=topk", "objective.support_top_k=5", "objective.topk_gate=local_kl"]),
        ("sgsd", ["teachers.include_answer=true", "teachers.answer_template=official", "skills.top_k=4"]),
    ],
)
def test_every_objective_path_trains(tmp_path, tiny_model_dir, monkeypatch, method, extra):
    """Each scoring/objective path (sampled-token gated and RKL, top-K support, full-vocabulary forward
    and reverse KL and JSD, GRPO's two aggregations) takes a finite step that moves the adapter."""
    alternate_grades(monkeypatch)
    run = _train(tmp_path, tiny_model_dir, f"train.method={method}", "train.steps=1", "data.eval_sources=[]",
                 *DEMO_RETRIEVAL, *extra)  # fmt: skip
    [row] = read_jsonl(run / "metrics.jsonl")
    assert math.isfinite(row["loss"]) and row["skipped_step"] == 0.0 and row["grad_norm"] > 0
    if "objective.loss=forward_kl" in extra or "objective.loss=reverse_kl" in extra:
        assert row["divergence"] > 0
    final = load_file(str(run / "checkpoints" / "step-000001" / "trainable.safetensors"))
    assert any(v.abs().max() > 0 for k, v in final.items() if "lora_B" in k)


def _gradients(trainer, rollouts, micro_batch_size):
    trainer.cfg.train.micro_batch_size = micro_batch_size
    trainer.accumulate_gradients(rollouts)
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "method, extra",
    [
        ("sgsd", []),
        ("sgsd", ["objective.loss=sampled_rkl"]),
        ("sgsd", ["objective.support=topk", "objective.support_top_k=5"]),
        ("opsd", ["objective.loss=forward_kl"]),
        ("sgsd", ["objective.loss=jsd"]),
        ("grpo", ["rollout.num_generations=2"]),
        ("grpo", ["rollout.num_generations=2", "objective.grpo_aggregation=sequence_mean"]),
        ("grpo", ["rollout.num_generations=2", "objective.grpo_mask=completion"]),
        ("opsd", OFFICIAL_OPSD),
        ("sgsd", ["objective.support=topk", "objective.support_top_k=5", "objective.topk_gate=local_kl"]),
    ],
)
def test_micro_batches_accumulate_the_whole_batch_gradient(tmp_path, tiny_model_dir, method, extra):
    """Splitting a batch of 4 problems into micro-batches of 1 gives the gradient of one micro-batch
    of 4, for every objective (the objective divides by the whole batch's problems or tokens)."""
    from sgsd.config import load_config
    from sgsd.configs import resolve_config_path
    from sgsd.trainer import Trainer

    cfg = load_config(resolve_config_path("tiny"), [f"model.name={tiny_model_dir}", f"train.method={method}",
                      "train.batch_size=4", "rollout.max_new_tokens=12", "data.eval_sources=[]", *extra])  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run")
    rollouts = trainer._rollouts(trainer._sample_problems(0))
    for i, r in enumerate(rollouts):  # mixed outcomes: polarity and group advantages are non-zero
        r.reward = 1.0 if i % 2 == 0 else -1.0
    whole = _gradients(trainer, rollouts, 4)
    split = _gradients(trainer, rollouts, 1)
    assert whole.keys() == split.keys() and whole
    assert any(g.abs().max() > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-5, msg=name)


def test_eval_run_scores_the_runs_own_held_out_problems(tmp_path, tiny_model_dir, monkeypatch):
    """`sgsd eval --run` evaluates exactly the problems the run evaluated in its loop (same sources,
    seed, size), none of which is a training problem."""
    from sgsd.config import load_config
    from sgsd.data import held_out_sets, training_problems

    alternate_grades(monkeypatch)
    run = _train(tmp_path, tiny_model_dir, "train.steps=1", "data.eval_size=3", "skills.online_update=false")
    out = tmp_path / "sweep"
    assert main(["eval", "--run", str(run), "--checkpoints", "0", "--out", str(out)]) == 0

    def questions(folder):
        return sorted(r["question"] for f in folder.glob("*.jsonl") for r in read_jsonl(f))

    in_loop = questions(run / "eval" / "step-000000")
    assert len(in_loop) == 3 and questions(out / "step-000000") == in_loop
    cfg = load_config(run / "config.yaml")
    train_questions = {p.question for p in training_problems(cfg.data, held_out_sets(cfg.data))}
    assert not train_questions & set(in_loop)


def test_grpo_iterations_reuse_each_batch_with_a_real_ratio(tmp_path, tiny_model_dir, monkeypatch):
    """objective.grpo_iterations = 2: each batch of rollouts serves two optimizer steps; the old log-probs
    are the sampling weights', so the ratio is 1 on the first pass and moves on the second; train.steps
    counts optimizer steps (3 steps = a round of 2 and a round of 1)."""
    alternate_grades(monkeypatch)
    run = _train(tmp_path, tiny_model_dir, "train.method=grpo", "rollout.num_generations=2",
                 "objective.grpo_iterations=2", "train.steps=3", "train.save_every=2", "data.eval_sources=[]",
                 "train.lr=0.05")  # fmt: skip
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert ["rollout_s" in r for r in rows] == [True, False, True]  # new rollouts at steps 1 and 3 only
    assert rows[0]["mean_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert abs(rows[1]["mean_ratio"] - 1.0) > 1e-4  # the first update moved the policy
    assert rows[2]["mean_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["objective.support_estimator=expected"], "baseline"),
        (["objective.support_estimator=null_relative"], "null"),
        (["objective.support_estimator=teacher_centred"], "centred"),
        (["objective.support=topk", "objective.support_top_k=5", "objective.topk_gate=local_kl"], "local_kl"),
    ],
)
def test_support_estimators_and_the_topk_gate_reach_the_objective(
    tmp_path, tiny_model_dir, monkeypatch, extra, expect
):
    """Each support estimator and the official top-K gate trains, and the objective receives what the
    configuration asks for: the expected gaps [B, K, T], the null teacher's gaps [B, T], the estimator's
    name, or the local KL; the per-step support by outcome is logged."""
    import sgsd.teaching as teaching

    alternate_grades(monkeypatch)
    seen = []
    for name in ("sgsd_loss", "sgsd_local_kl_loss"):
        real = getattr(teaching, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(teaching, name, spy)
    run = _train(tmp_path, tiny_model_dir, "train.steps=1", "data.eval_sources=[]", *DEMO_RETRIEVAL, *extra)
    [row] = read_jsonl(run / "metrics.jsonl")
    assert math.isfinite(row["loss"]) and "support_correct" in row and "support_wrong" in row
    names = {name for name, _, _ in seen}
    if expect == "local_kl":
        assert names == {"sgsd_local_kl_loss"}
        return
    assert names == {"sgsd_loss"}
    for _, args, kwargs in seen:
        teacher = args[1]  # [B, K, T]: the K retrieved teachers (the null row is split off)
        assert teacher.shape[1] == 3
        if expect == "baseline":
            assert (
                kwargs["support_baseline"].shape == teacher.shape
                and kwargs["support_estimator"] == "expected"
            )
        elif expect == "null":
            assert kwargs["null_delta"].shape == (teacher.shape[0], teacher.shape[2])
        else:
            assert kwargs["support_estimator"] == "teacher_centred" and kwargs["null_delta"] is None


# ---------------------------------------------------------------------------------------------------
# Compute budgets in CPU-seconds, the counters, the validation split, GRPO's mixed groups


def test_cpu_budget_stops_the_run_and_rows_count_compute(tmp_path, tiny_model_dir, monkeypatch, capsys):
    alternate_grades(monkeypatch)
    run = _train(
        tmp_path, tiny_model_dir, "train.steps=50", "train.cpu_budget_s=0.000001", "train.eval_at_start=false"
    )
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1]  # any CPU time spent exceeds the budget after one step
    assert "CPU budget of 0 CPU-s reached at step 1" in capsys.readouterr().out
    assert rows[0]["train_cpu_s"] > 0
    assert rows[0]["rollouts_total"] == 2  # train.batch_size 2, one rollout each
    assert rows[0]["completion_tokens_total"] == pytest.approx(2 * rows[0]["completion_tokens"])
    summary = json.loads((run / "eval" / "step-000001" / "summary.json").read_text())
    assert summary["train_cpu_s"] == rows[0]["train_cpu_s"] and summary["rollouts_total"] == 2


def test_eval_every_cpu_s_evaluates_on_the_test_and_validation_splits(tmp_path, tiny_model_dir, monkeypatch):
    alternate_grades(monkeypatch)
    run = _train(
        tmp_path, tiny_model_dir, "train.steps=2", "train.eval_every_cpu_s=0.000001", "data.validation_size=2"
    )
    for step in (0, 1, 2):  # step 1 only because its CPU time is due; 0 and 2 start and end the run
        folder = run / "eval" / f"step-{step:06d}"
        summary = json.loads((folder / "summary.json").read_text())
        assert list(summary["results"]) == list(summary["validation"]) == ["reasoning_gym-chain_sum"]
        val = read_jsonl(folder / "validation" / "reasoning_gym-chain_sum.jsonl")
        test = read_jsonl(folder / "reasoning_gym-chain_sum.jsonl")
        assert len(val) == 2 and {r["question"] for r in val}.isdisjoint(r["question"] for r in test)
    no_cpu_eval = _train(tmp_path, tiny_model_dir, "train.steps=2", name="plain")
    assert not (no_cpu_eval / "eval" / "step-000001").exists()


def test_compute_counters_survive_a_resume(tmp_path, tiny_model_dir, monkeypatch):
    alternate_grades(monkeypatch)
    run = _train(tmp_path, tiny_model_dir, "train.steps=2", "train.save_every=2")
    before = read_jsonl(run / "metrics.jsonl")
    rc = main(
        ["train", "-c", "tiny", "-o", str(run), "--resume", f"model.name={tiny_model_dir}", "train.steps=4"]
    )
    assert rc == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[:2] == before
    assert [r["rollouts_total"] for r in rows] == [2, 4, 6, 8]
    cpu = [r["train_cpu_s"] for r in rows]
    assert cpu == sorted(cpu) and cpu[2] > cpu[1] > 0  # continues from step 2's total, not from 0
    tokens = [r["completion_tokens_total"] for r in rows]
    assert tokens[3] == pytest.approx(
        tokens[1] + 2 * (rows[2]["completion_tokens"] + rows[3]["completion_tokens"])
    )


def test_resume_times_the_next_evaluation_from_the_last_one(tmp_path):
    """A run evaluated at step 10 (930 CPU-s), checkpointed at 12, stopped during step 15's evaluation:
    resumed, the next evaluation is due 900 CPU-s after step 10's, as without the stop (it used to be
    timed from the resume point, which shifted every later evaluation)."""
    from types import SimpleNamespace

    from sgsd.fileio import atomic_write_json
    from sgsd.trainer import Trainer

    eval_dir = tmp_path / "eval"
    for step, cpu, wall in ((0, 0.0, 0.0), (10, 930.0, 500.0), (15, 1400.0, 800.0)):
        atomic_write_json(
            eval_dir / f"step-{step:06d}" / "summary.json", {"train_cpu_s": cpu, "train_time_s": wall}
        )
    (eval_dir / "step-000012" / "validation").mkdir(parents=True)  # an evaluation stopped before its summary
    trainer = SimpleNamespace(run_dir=tmp_path, step=12)
    Trainer._restore_eval_schedule(trainer)
    assert (trainer.last_eval_step, trainer.last_eval_cpu_s, trainer.last_eval_time_s) == (10, 930.0, 500.0)
    fresh = SimpleNamespace(run_dir=tmp_path / "no-evaluation-yet", step=5)
    Trainer._restore_eval_schedule(fresh)
    assert (fresh.last_eval_step, fresh.last_eval_cpu_s, fresh.last_eval_time_s) == (-1, 0.0, 0.0)


def test_resume_makes_up_the_evaluation_a_stop_cut_off(tmp_path, tiny_model_dir, monkeypatch):
    """Stopped after step 2's checkpoint but before its evaluation (train.eval_every=2): the resumed run
    evaluates step 2 first, then 4, as the uninterrupted run does; where step 2's evaluation had finished
    it is not repeated."""
    import sgsd.trainer

    alternate_grades(monkeypatch)
    opened, trackers = [], sgsd.trainer.RunTrackers  # the trackers continue their runs on resume
    monkeypatch.setattr(sgsd.trainer, "RunTrackers", lambda *a, **kw: opened.append(kw) or trackers(*a, **kw))
    every = ["train.eval_every=2", "train.save_every=2", "train.eval_at_start=false"]
    run = _train(tmp_path, tiny_model_dir, "train.steps=2", *every)
    shutil.rmtree(run / "eval" / "step-000002")  # the stop came between the checkpoint and the evaluation
    resume = [
        "train",
        "-c",
        "tiny",
        "-o",
        str(run),
        "--resume",
        f"model.name={tiny_model_dir}",
        "train.steps=4",
    ]
    assert main([*resume, *every]) == 0
    summaries = sorted(p.parent.name for p in (run / "eval").glob("step-*/summary.json"))
    assert summaries == ["step-000002", "step-000004"]
    written = (run / "eval" / "step-000004" / "summary.json").stat().st_mtime_ns
    assert (
        main([*resume[:-1], "train.steps=6", *every]) == 0
    )  # step 4 evaluated: resumes straight into step 5
    assert (run / "eval" / "step-000004" / "summary.json").stat().st_mtime_ns == written
    assert sorted(p.parent.name for p in (run / "eval").glob("step-*/summary.json"))[-1] == "step-000006"
    assert [kw["resume"] for kw in opened] == [False, True, True]


def test_grpo_logs_the_fraction_of_mixed_groups(tmp_path, tiny_model_dir, monkeypatch):
    alternate_grades(monkeypatch)  # rewards alternate within every group of 2: all groups mixed
    run = _train(tmp_path, tiny_model_dir, "train.method=grpo", "rollout.num_generations=2")
    assert [r["mixed_group_fraction"] for r in read_jsonl(run / "metrics.jsonl")] == [1.0, 1.0]
    sgsd = _train(tmp_path, tiny_model_dir, "train.method=sgsd", *DEMO_RETRIEVAL, name="sgsd")
    assert all("mixed_group_fraction" not in r for r in read_jsonl(sgsd / "metrics.jsonl"))


def test_mixed_group_fraction_by_hand():
    from sgsd.metrics import mixed_group_fraction

    # group 0: +1, -1 (mixed); group 1: -1, -1 (all wrong); group 2: +1, +1 (all right) -> 1 of 3
    pairs = [(0, 1.0), (0, -1.0), (1, -1.0), (1, -1.0), (2, 1.0), (2, 1.0)]
    assert mixed_group_fraction(pairs) == pytest.approx(1 / 3)
    assert mixed_group_fraction([]) == 0.0


def test_in_loop_evaluation_batches_rows_by_eval_batch_size(tmp_path, tiny_model_dir, monkeypatch):
    from sgsd.generation import HFGenerator

    alternate_grades(monkeypatch)
    rows_per_call, original = [], HFGenerator._generate_batch

    def recording(self, model, prompts, *args, **kwargs):
        rows_per_call.append(len(prompts))
        return original(self, model, prompts, *args, **kwargs)

    monkeypatch.setattr(HFGenerator, "_generate_batch", recording)
    _train(tmp_path, tiny_model_dir, "train.steps=1", "rollout.batch_size=1", "eval.k=2", "eval.batch_size=4")
    # evaluation before and after the step: 2 problems x k 2 = 4 rows in one batch of eval.batch_size;
    # the step's 2 rollouts one at a time (rollout.batch_size 1)
    assert rows_per_call == [4, 1, 1, 4]


def test_rows_per_batch_sets_and_restores_the_generators_batch_size():
    from sgsd.errors import ConfigError
    from sgsd.generation import rows_per_batch

    class Batched:
        batch_size = 16

    gen = Batched()
    with pytest.raises(RuntimeError), rows_per_batch(gen, 32):
        assert gen.batch_size == 32
        raise RuntimeError("restored even when the block fails")
    assert gen.batch_size == 16
    with pytest.raises(ConfigError, match="batch_size must be >= 1"), rows_per_batch(gen, 0):
        pass
    server = object()  # schedules its own batches: left alone
    with rows_per_batch(server, 32):
        assert not hasattr(server, "batch_size")
