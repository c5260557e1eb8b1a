"""Evaluation metrics (hand-computed), the per-problem JSONL, resume, and checkpoint selection.

Generators and graders here are small fakes with the shapes of `sgsd.generation` and `sgsd.verifier`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import pytest

from sgsd.errors import DataError, UserError
from sgsd.evaluate import (
    evaluate_problems,
    evaluate_run,
    majority_vote,
    normalize_answer,
    pass_at_k,
    select_checkpoints,
    source_slug,
    summarize_records,
)
from sgsd.fileio import read_jsonl

# ----------------------------------------------------------------------------
# Fakes with the contract shapes


@dataclass
class FakeParams:
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 64
    n: int = 1
    seed: int | None = None


@dataclass
class FakeCompletion:
    prompt_ids: list
    token_ids: list
    text: str
    finish_reason: str = "stop"


@dataclass
class FakeProblem:
    id: str
    question: str
    answer: str
    source: str = "fake"
    solution: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class FakeGrade:
    correct: bool
    reason: str
    extracted: str | None


def boxed(text: str) -> str | None:
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1] if found else None


def fake_grade(pairs):
    """Correct when the last \\boxed{} equals the gold after normalisation, or both parse as equal numbers."""
    out = []
    for text, gold in pairs:
        ans = boxed(text)
        same_number = ans is not None and _num(ans) is not None and _num(ans) == _num(gold)
        ok = ans is not None and (normalize_answer(ans) == normalize_answer(gold) or same_number)
        out.append(FakeGrade(ok, "match" if ok else "mismatch", ans))
    return out


def _num(s: str):
    try:
        if "/" in s:
            a, b = s.split("/")
            return float(a) / float(b)
        return float(s)
    except ValueError:
        return None


class ScriptGenerator:
    """Answers for question q come from `script[q]` (a list of k texts); records every call."""

    def __init__(self, script, fail_after_calls=None):
        self.script = script
        self.calls = []
        self.fail_after_calls = fail_after_calls

    def generate(self, conversations, params, enable_thinking=False):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt("killed")
        self.calls.append(([c[-1]["content"] for c in conversations], params, enable_thinking))
        out = []
        for conv in conversations:
            question = conv[-1]["content"].removeprefix("Q: ")
            texts = self.script[question][: params.n]
            out.append([FakeCompletion([1, 2], list(range(len(t.split()))), t) for t in texts])
        return out


def prompt(question):
    return f"Q: {question}"


# ----------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 1, 1, 0.25),  # pass@1 = c/n
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (4, 0, 3, 0.0),  # no correct sample
        (4, 2, 3, 1.0),  # n - c = 2 < 3: every 3-subset has a correct one
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (12, 3, 4, 1 - 126 / 495),  # 1 - C(9,4)/C(12,4) = 1 - 126/495
        (12, 12, 12, 1.0),
    ],
)
def test_pass_at_k_against_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_and_is_stable_for_large_n():
    for n in range(1, 15):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # C(2000, 1000) overflows a float; the product form does not: 1 - C(1999,1000)/C(2000,1000) = 1000/2000
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


# ----------------------------------------------------------------------------
# maj@k


def test_majority_vote_counts_groups_and_breaks_ties_by_first_appearance():
    # votes: 3 -> 2, 5 -> 2 (tie; 3 appeared first), None does not vote
    answers = ["3", "5", None, "3", "5"]
    correct = [False, True, False, False, True]
    assert majority_vote(answers, correct) == ("3", False)
    # one more 5 breaks the tie
    assert majority_vote(answers + ["5"], correct + [True]) == ("5", True)


def test_majority_vote_groups_normalised_strings_and_equivalent_answers():
    # "\\dfrac{1}{2}", "\\frac{1}{2}" and " \\frac{1}{2} ." share a key; with numeric equivalence "0.5" joins
    answers = ["7", "7", "\\dfrac{1}{2}", "0.5", "\\frac{1}{2}"]
    correct = [False, False, True, True, True]
    # keys only: 7 -> 2, \frac{1}{2} -> 2, 0.5 -> 1: tie 7 vs 1/2, 7 first
    assert majority_vote(answers, correct) == ("7", False)

    def numeric(a, b):
        return _num(a.replace("\\frac{1}{2}", "1/2")) == _num(b.replace("\\frac{1}{2}", "1/2"))

    # with equivalence: {1/2, 0.5} -> 3 beats 7 -> 2; the group's first sample is index 2
    assert majority_vote(answers, correct, numeric) == ("\\dfrac{1}{2}", True)


def test_majority_vote_without_answers_is_incorrect():
    assert majority_vote([None, "  ", None], [False, False, False]) == (None, False)


def test_normalize_answer():
    assert normalize_answer(" $\\left(1, 2\\right)$ ") == "(1,2)"
    assert normalize_answer("\\tfrac{3}{4}.") == "\\frac{3}{4}"
    assert normalize_answer("{12}") == "12"
    assert normalize_answer("{a}+{b}") == "{a}+{b}"  # outer braces are not one group


# ----------------------------------------------------------------------------
# evaluate_problems


SCRIPT = {
    # c=1 of 4; votes 5,5,4,\boxed{2} -> 5 wrong
    "one plus one": ["\\boxed{5}", "\\boxed{5}", "\\boxed{4}", "so \\boxed{2}"],
    # c=3 of 4 (0.5 equals 1/2 numerically); one sample unboxed
    "half": ["\\boxed{1/2}", "\\boxed{0.5}", "no answer", "\\boxed{ 1/2 }"],
    # c=0 of 4
    "seven": ["\\boxed{8}", "\\boxed{9}", "\\boxed{8}", "\\boxed{6}"],
    # c=4 of 4
    "ten": ["\\boxed{10}"] * 4,
}
PROBLEMS = [
    FakeProblem("p1", "one plus one", "2"),
    FakeProblem("p2", "half", "1/2"),
    FakeProblem("p3", "seven", "7"),
    FakeProblem("p4", "ten", "10"),
]


def test_evaluate_problems_metrics_and_records(tmp_path):
    gen = ScriptGenerator(SCRIPT)
    out = tmp_path / "eval" / "fake.jsonl"
    summary = evaluate_problems(
        gen, PROBLEMS, 4, FakeParams(), True, out, prompt_fn=prompt, grade_fn=fake_grade, seed=7, chunk_size=3
    )
    # avg@4 = mean(1/4, 3/4, 0, 1) = 2/4 = 0.5
    assert summary["avg@k"] == pytest.approx(0.5)
    # pass@4 per problem: 1, 1, 0, 1 -> 0.75;  pass@2: 1-C(3,2)/C(4,2)=0.5, 1-C(1,2)/C(4,2)=1, 0, 1 -> 0.625
    assert summary["pass@k"] == pytest.approx(0.75)
    assert summary["pass_curve"]["2"] == pytest.approx(0.625)
    assert summary["pass_curve"]["1"] == pytest.approx(summary["avg@k"])
    # maj@4: p1 -> 5 (wrong); p2 -> 1/2 group of 3 (verifier merges 0.5) right; p3 -> 8 wrong; p4 right
    assert summary["maj@k"] == pytest.approx(0.5)
    assert summary["k"] == 4 and summary["n_problems"] == 4
    # boxed: 4 + 3 + 4 + 4 = 15 of 16
    assert summary["boxed_rate"] == pytest.approx(15 / 16)
    # tokens = words per text: p1 1+1+1+2 = 5, p2 1+1+2+3 = 7 ("\boxed{ 1/2 }" is 3 words), p3 4, p4 4 -> 20/16
    assert summary["mean_tokens"] == pytest.approx(20 / 16)

    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["p1", "p2", "p3", "p4"]
    first = rows[0]
    assert (
        first["gold"] == "2" and first["question"] == "one plus one" and first["prompt"] == "Q: one plus one"
    )
    assert first["maj_answer"] == "5" and first["maj_correct"] is False
    assert [s["correct"] for s in first["samples"]] == [False, False, False, True]
    assert first["samples"][3] == {
        "text": "so \\boxed{2}",
        "extracted": "2",
        "correct": True,
        "finish_reason": "stop",
        "num_tokens": 2,
    }
    assert rows[1]["maj_answer"] == "1/2" and rows[1]["maj_correct"] is True
    # two chunks (3 + 1 problems), n = k, seeds = seed + index of the chunk's first problem, thinking passed on
    assert [len(c[0]) for c in gen.calls] == [3, 1]
    assert [(c[1].n, c[1].seed, c[2]) for c in gen.calls] == [(4, 7, True), (4, 10, True)]


def test_evaluate_resumes_after_a_kill_and_ignores_a_torn_line(tmp_path):
    out = tmp_path / "fake.jsonl"
    killed = ScriptGenerator(SCRIPT, fail_after_calls=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate_problems(killed, PROBLEMS, 4, FakeParams(), False, out, prompt, fake_grade, chunk_size=1)
    assert [r["id"] for r in read_jsonl(out)] == ["p1", "p2"]
    with open(out, "a", encoding="utf-8") as fh:
        fh.write('{"id": "p3", "samp')  # a write cut by the kill

    rerun = ScriptGenerator(SCRIPT)
    summary = evaluate_problems(
        rerun, PROBLEMS, 4, FakeParams(), False, out, prompt, fake_grade, chunk_size=1
    )
    assert [c[0] for c in rerun.calls] == [["Q: seven"], ["Q: ten"]]  # only the rest
    assert summary["n_problems"] == 4 and summary["avg@k"] == pytest.approx(0.5)
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == ["p1", "p2", "p3", "p4"]

    # a complete file: nothing is generated again
    again = ScriptGenerator(SCRIPT)
    assert evaluate_problems(again, PROBLEMS, 4, FakeParams(), False, out, prompt, fake_grade) == summary
    assert again.calls == []


def test_evaluate_rejects_mismatched_k_and_duplicate_ids(tmp_path):
    out = tmp_path / "fake.jsonl"
    evaluate_problems(ScriptGenerator(SCRIPT), PROBLEMS[:1], 4, FakeParams(), False, out, prompt, fake_grade)
    with pytest.raises(DataError, match="not k=2"):
        evaluate_problems(
            ScriptGenerator(SCRIPT), PROBLEMS[:1], 2, FakeParams(), False, out, prompt, fake_grade
        )
    with pytest.raises(DataError, match="unique"):
        evaluate_problems(
            ScriptGenerator(SCRIPT), [PROBLEMS[0], PROBLEMS[0]], 4, FakeParams(), False, tmp_path / "x.jsonl",
            prompt, fake_grade,
        )  # fmt: skip


def test_skill_prompt_mode_puts_retrieved_pairs_in_the_prompt(tmp_path):
    class Retriever:
        def retrieve(self, question):
            return [("add carefully", "dropping a carry")]

    def with_skills(question):  # the shape of skill_prompt_fn(retriever) with a stand-in template
        pairs = Retriever().retrieve(question)
        return "Skills: " + "; ".join(f"{s} / {m}" for s, m in pairs) + f"\nQ: {question}"

    class SkillGen(ScriptGenerator):
        def generate(self, conversations, params, enable_thinking=False):
            stripped = [
                [{"role": "user", "content": c[-1]["content"].split("\n", 1)[1]}] for c in conversations
            ]
            self.seen = [c[-1]["content"] for c in conversations]
            return super().generate(stripped, params, enable_thinking)

    gen = SkillGen(SCRIPT)
    evaluate_problems(
        gen, PROBLEMS[:1], 4, FakeParams(), False, tmp_path / "s.jsonl", with_skills, fake_grade
    )
    assert gen.seen == ["Skills: add carefully / dropping a carry\nQ: one plus one"]
    assert read_jsonl(tmp_path / "s.jsonl")[0]["prompt"].startswith("Skills: add carefully")


def test_summarize_records_rejects_short_records():
    with pytest.raises(DataError, match="2 samples but k=4"):
        sample = {"correct": True, "text": "", "num_tokens": 1}
        summarize_records([{"id": "a", "maj_correct": False, "samples": [sample, sample]}], 4)


# ----------------------------------------------------------------------------
# Run sweeps and checkpoint selection


def test_source_slug():
    assert source_slug("hf:aime24") == "aime24"
    assert source_slug("reasoning_gym:chain_sum") == "reasoning_gym-chain_sum"
    assert source_slug("/data/my set.jsonl") == "my_set"


def _summary(step, **avg):
    return {"step": step, "results": {s: {"avg@k": v} for s, v in avg.items()}}


def test_select_checkpoints_test_protocol_and_validation_side_by_side():
    summaries = {
        0: _summary(0, a=0.9, b=0.9, val=0.9),  # the base is excluded by default
        25: _summary(25, a=0.5, b=0.3, val=0.7),  # test mean 0.4, val 0.7
        50: _summary(50, a=0.6, b=0.4, val=0.2),  # test mean 0.5 (best on test), val 0.2
        75: _summary(75, a=0.4, b=0.2, val=0.7),  # test mean 0.3, val 0.7 (tie with 25 -> earliest)
    }
    sel = select_checkpoints(summaries, ["a", "b"], ["val"])
    assert sel["best_on_test"]["step"] == 50
    assert sel["best_on_test"]["test_mean"] == pytest.approx(0.5)
    assert sel["validation"]["step"] == 25
    assert sel["validation"]["test"] == {"a": 0.5, "b": 0.3}
    assert sel["validation"]["test_mean"] == pytest.approx(0.4)
    assert select_checkpoints(summaries, ["a", "b"], include_base=True)["best_on_test"]["step"] == 0
    assert select_checkpoints({0: summaries[0]}, ["a"])["best_on_test"]["step"] == 0
    assert select_checkpoints(summaries, ["a"])["validation"] is None


def test_evaluate_run_sweeps_base_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    for step in (25, 50):
        adapter = run / "checkpoints" / f"step-{step:06d}" / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")
    (run / "checkpoints" / "step-000075").mkdir()  # no adapter: not a checkpoint

    # each "model" answers 'ten' correctly on `right` of 4 samples
    quality = {None: 1, "step-000025": 3, "step-000050": 2}

    def factory(adapter):
        right = quality[adapter.parent.name if adapter else None]
        script = {"ten": ["\\boxed{10}"] * right + ["\\boxed{0}"] * (4 - right), "seven": ["\\boxed{7}"] * 4}
        return ScriptGenerator(script)

    sources = {"hf:ten": [FakeProblem("t", "ten", "10")], "hf:seven": [FakeProblem("s", "seven", "7")]}
    result = evaluate_run(
        run, sources, factory, 4, FakeParams(), False, validation_sources=["hf:seven"],
        prompt_fn=prompt, grade_fn=fake_grade, log=lambda _: None,
    )  # fmt: skip
    assert sorted(result["summaries"]) == [0, 25, 50]
    summary25 = json.loads((run / "eval" / "step-000025" / "summary.json").read_text())
    assert summary25["results"]["ten"]["avg@k"] == pytest.approx(0.75)
    assert summary25["checkpoint"].endswith("step-000025/adapter")
    assert (run / "eval" / "step-000000" / "seven.jsonl").is_file()
    sel = json.loads((run / "eval" / "selection.json").read_text())
    assert sel["best_on_test"]["step"] == 25 and sel["best_on_test"]["test"] == {"ten": 0.75}
    # validation is 1.0 everywhere: tie -> earliest trained step
    assert sel["validation"]["step"] == 25

    with pytest.raises(UserError, match="no checkpoint for step"):
        evaluate_run(run, sources, factory, 4, FakeParams(), False, steps=[75], log=lambda _: None)


# ----------------------------------------------------------------------------
# Glue: the trainer's evaluate_sources and the `sgsd eval` command (model, data and verifier faked)


def _patch_module(monkeypatch, name, **attrs):
    """Set attributes on module `name`, creating a stand-in module when it has not landed yet."""
    import importlib
    import sys
    import types

    try:
        module = importlib.import_module(name)
    except ImportError:
        module = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, module)
    for key, value in attrs.items():
        monkeypatch.setattr(module, key, value, raising=False)
    return module


def test_evaluate_sources_writes_layout_for_the_trainer(tmp_path, monkeypatch):
    import sgsd.evaluate as evaluate_mod
    from sgsd.evaluate import evaluate_sources

    monkeypatch.setattr(evaluate_mod, "_student_prompt", prompt)
    gen = ScriptGenerator({"ten": ["\\boxed{10}", "\\boxed{1}"]})
    out = tmp_path / "eval" / "step-000000"
    params = FakeParams(temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=16, n=2)
    summary = evaluate_sources(
        gen, {"reasoning_gym:chain_sum": [FakeProblem("a", "ten", "10")]}, out, params=params,
        enable_thinking=True, seed=3, step=0, grade_fn=fake_grade,
    )  # fmt: skip
    assert summary["step"] == 0 and summary["checkpoint"] == "base"
    assert summary["results"]["reasoning_gym-chain_sum"]["avg@k"] == pytest.approx(0.5)  # 1 of 2
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "reasoning_gym-chain_sum.jsonl").is_file()
    params = gen.calls[0][1]
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens, params.n, params.seed) == (
        1.0, 0.95, 0, 16, 2, 3,
    )  # fmt: skip


def _closable(factory):
    """A stand-in generator factory with the `close()` that `sgsd eval` calls when it is done."""
    factory.close = lambda: None
    return factory


def test_eval_command_on_a_run_writes_summaries_and_selection(tmp_path, monkeypatch, capsys):
    import sgsd.commands.eval as eval_cmd
    from sgsd.cli import main

    run = tmp_path / "run"
    (run / "checkpoints" / "step-000025" / "adapter").mkdir(parents=True)
    (run / "checkpoints" / "step-000025" / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("train:\n  method: sgsd\n  seed: 5\neval:\n  k: 3\n")
    problems = {"hf:ten": [FakeProblem("t", "ten", "10")], "hf:seven": [FakeProblem("s", "seven", "7")]}
    _patch_module(monkeypatch, "sgsd.generation", SamplingParams=FakeParams)
    _patch_module(monkeypatch, "sgsd.data", load_problems=lambda source, **kw: problems[source])
    _patch_module(monkeypatch, "sgsd.verifier", grade_many=lambda pairs, **kw: fake_grade(pairs))
    seen = []

    def factory_for(cfg):
        def factory(adapter):
            seen.append(adapter)
            right = 3 if adapter else 1  # the checkpoint gets 'ten' right 3 of 3 times, the base 1 of 3
            return ScriptGenerator({"ten": ["\\boxed{10}"] * right + ["\\boxed{0}"] * (3 - right),
                                    "seven": ["\\boxed{7}"] * 3})  # fmt: skip

        return _closable(factory)

    monkeypatch.setattr(eval_cmd, "_generator_factory", factory_for)
    from sgsd import evaluate as evaluate_mod

    monkeypatch.setattr(evaluate_mod, "_student_prompt", prompt)
    code = main(["eval", "--run", str(run), "--sources", "hf:ten", "--validation-sources", "hf:seven"])
    assert code == 0
    assert seen == [None, run / "checkpoints" / "step-000025" / "adapter"]
    s25 = json.loads((run / "eval" / "step-000025" / "summary.json").read_text())
    assert s25["results"]["ten"]["avg@k"] == pytest.approx(1.0) and s25["results"]["ten"]["k"] == 3
    s0 = json.loads((run / "eval" / "step-000000" / "summary.json").read_text())
    assert s0["results"]["ten"]["avg@k"] == pytest.approx(1 / 3)
    selection = json.loads((run / "eval" / "selection.json").read_text())
    assert selection["best_on_test"]["step"] == 25 and selection["validation"]["step"] == 25
    out = capsys.readouterr().out
    assert "best on the test sources: step 25" in out and "avg@k" in out

    # --checkpoints best re-evaluates only the step ranked first by the existing summaries
    seen.clear()
    assert main(["eval", "--run", str(run), "--sources", "hf:ten", "--checkpoints", "best"]) == 0
    assert seen == [run / "checkpoints" / "step-000025" / "adapter"]
    assert main(["eval", "--run", str(run), "--checkpoints", "1,x"]) == 2
    assert "comma-separated steps" in capsys.readouterr().err


def test_evaluate_sources_and_the_eval_command_pass_the_configured_extraction(tmp_path, monkeypatch, capsys):
    import sgsd.commands.eval as eval_cmd
    import sgsd.evaluate as evaluate_mod
    from sgsd.cli import main
    from sgsd.evaluate import evaluate_sources

    seen = []

    def recording_grade(pairs, **kwargs):
        seen.append(kwargs)
        return fake_grade(pairs)

    _patch_module(monkeypatch, "sgsd.generation", SamplingParams=FakeParams)
    _patch_module(monkeypatch, "sgsd.verifier", grade_many=recording_grade)
    monkeypatch.setattr(evaluate_mod, "_student_prompt", prompt)
    problems = [FakeProblem("a", "ten", "10")]
    gen = ScriptGenerator({"ten": ["\\boxed{10}", "\\boxed{1}"]})
    evaluate_sources(
        gen, {"hf:ten": problems}, tmp_path / "a", params=FakeParams(max_new_tokens=16, n=2),
        enable_thinking=False, verifier_workers=0, verifier_extraction="free", show_progress=False,
    )  # fmt: skip
    assert seen and all(kw["extraction"] == "free" and kw["workers"] == 0 for kw in seen)

    seen.clear()
    _patch_module(monkeypatch, "sgsd.data", load_problems=lambda source, **kw: problems)
    monkeypatch.setattr(eval_cmd, "_generator_factory", lambda cfg: _closable(lambda adapter: gen))
    out = tmp_path / "b"
    assert (
        main(["eval", "--sources", "hf:ten", "--k", "2", "--out", str(out), "verifier.extraction=free"]) == 0
    )
    assert seen and all(kw["extraction"] == "free" for kw in seen)
    seen.clear()
    assert main(["eval", "--sources", "hf:ten", "--k", "2", "--out", str(tmp_path / "c")]) == 0
    assert seen and all(kw["extraction"] == "boxed" for kw in seen)  # the default


@pytest.mark.parametrize("batch_size, conversations_per_call", [(4, [2, 2, 1]), (32, [5]), (1, [1] * 5)])
def test_eval_command_generates_eval_batch_size_sequences_at_once(
    tmp_path, monkeypatch, batch_size, conversations_per_call
):
    """`sgsd eval` hands the generator eval.batch_size // k problems (x k samples) per call, as the
    in-loop evaluation does (it used to send 8 problems whatever eval.batch_size said)."""
    import sgsd.commands.eval as eval_cmd
    import sgsd.evaluate as evaluate_mod
    from sgsd.cli import main

    problems = [FakeProblem(f"p{i}", f"q{i}", str(i)) for i in range(5)]
    gen = ScriptGenerator({f"q{i}": [f"\\boxed{{{i}}}"] * 2 for i in range(5)})
    _patch_module(monkeypatch, "sgsd.generation", SamplingParams=FakeParams)
    _patch_module(monkeypatch, "sgsd.verifier", grade_many=lambda pairs, **kw: fake_grade(pairs))
    _patch_module(monkeypatch, "sgsd.data", load_problems=lambda source, **kw: problems)
    monkeypatch.setattr(evaluate_mod, "_student_prompt", prompt)
    monkeypatch.setattr(eval_cmd, "_generator_factory", lambda cfg: _closable(lambda adapter: gen))
    args = ["eval", "--sources", "hf:q", "--k", "2", "--out", str(tmp_path), f"eval.batch_size={batch_size}"]
    assert main(args) == 0
    assert [len(call[0]) for call in gen.calls] == conversations_per_call
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["results"]["q"]["avg@k"] == pytest.approx(1.0)
