"""Problem records, loaders (generators, CHAMP, hub presets on fixtures, local files), contamination guard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import FIXTURES

from sgsd import data
from sgsd.cli import main
from sgsd.data import (
    HF_PRESETS,
    Problem,
    decontaminate,
    gsm8k_final_answer,
    load_problems,
    normalise_text,
    strip_dapo_instruction,
    text_fingerprint,
)
from sgsd.errors import DataError
from sgsd.fileio import atomic_write_jsonl

DATASETS = FIXTURES / "datasets"
DAPO_Q1 = "Let $x$ satisfy $2x+3=11$. Find $x$."


def test_problem_round_trip_and_missing_keys():
    p = Problem("p1", "What is {x}?", "3", "file:x.jsonl", solution="x=3", metadata={"level": [1, 2]})
    assert Problem.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(DataError, match="lacks answer, source"):
        Problem.from_dict({"id": "a", "question": "q"})


# ---------------------------------------------------------------------------------------------------
# reasoning_gym


def test_reasoning_gym_is_seeded_sized_and_takes_options():
    a = load_problems("reasoning_gym:chain_sum?min_terms=2&max_terms=2", size=20, seed=3)
    b = load_problems("reasoning_gym:chain_sum?min_terms=2&max_terms=2", size=20, seed=3)
    c = load_problems("reasoning_gym:chain_sum?min_terms=2&max_terms=2", size=20, seed=4)
    assert a == b and len(a) == 20
    assert [p.question for p in a] != [p.question for p in c]
    assert all(p.metadata["num_terms"] == 2 for p in a)  # the generator option reached the generator
    assert all(isinstance(p.answer, str) and p.answer for p in a)
    assert len({p.id for p in a}) == 20 and a[0].id == "chain_sum-s3-0"
    assert a[0].source == "reasoning_gym:chain_sum"
    json.dumps([p.to_dict() for p in a])  # metadata is JSON-serialisable (tuples became lists)


def test_reasoning_gym_gsm_symbolic_keeps_its_worked_solution():
    (p,) = load_problems("reasoning_gym:gsm_symbolic", size=1, seed=0)
    assert p.solution and "answer_cot" not in p.metadata
    assert p.answer == str(p.metadata["answer_value"])


def test_reasoning_gym_errors_name_the_problem():
    with pytest.raises(DataError, match="unknown reasoning_gym task 'no_such_task'"):
        load_problems("reasoning_gym:no_such_task", size=1)
    with pytest.raises(DataError, match="bad generator options"):
        load_problems("reasoning_gym:chain_sum?bogus=1", size=1)


def test_reasoning_gym_train_and_eval_are_disjoint_after_the_guard():
    spec = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1"  # tiny space: overlaps
    train, held = load_problems(spec, size=100, seed=0), load_problems(spec, size=30, seed=1)
    kept, dropped = decontaminate(train, held)
    held_prints = {text_fingerprint(p.question) for p in held}
    assert dropped and len(kept) + len(dropped) == 100
    assert not any(text_fingerprint(p.question) in held_prints for p in kept)
    assert all(text_fingerprint(p.question) in held_prints for p in dropped)


def _split_config(source: str, eval_size: int, validation_size: int | None, train_size: int | None = None):
    from sgsd.config import DataConfig

    return DataConfig(train_source=source, train_size=train_size, eval_sources=[source], eval_size=eval_size,
                      validation_size=validation_size, seed=0)  # fmt: skip


@pytest.mark.parametrize("kind", ["generator", "file"])
def test_training_validation_and_test_sets_are_disjoint(tmp_path, kind):
    from sgsd.data import held_out_sets, training_problems, validation_sets

    if kind == "generator":  # a tiny space (81 sums of two digits): the seeded draws overlap by chance
        source = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1"
        cfg = _split_config(source, eval_size=20, validation_size=20, train_size=100)
    else:  # 60 distinct problems in a file; test and validation are samples of it
        source = str(tmp_path / "p.jsonl")
        atomic_write_jsonl(
            Path(source), [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(60)]
        )
        cfg = _split_config(source, eval_size=20, validation_size=20)
    test = held_out_sets(cfg)
    val = validation_sets(cfg, test)
    train = training_problems(cfg, test, val)
    prints = [{text_fingerprint(p.question) for p in probs} for probs in (test[source], val[source], train)]
    assert (
        prints[0].isdisjoint(prints[1])
        and prints[0].isdisjoint(prints[2])
        and prints[1].isdisjoint(prints[2])
    )
    if kind == "file":  # nothing needs dropping: exactly 20 + 20 held out, the other 20 train
        assert [len(test[source]), len(val[source]), len(train)] == [20, 20, 20]
    else:  # repeats of test problems are replaced by later draws; training just loses them
        assert len(val[source]) == 20 and len(train) < 100
    assert val == validation_sets(cfg, held_out_sets(cfg))  # seeded: the same split every time
    assert validation_sets(_split_config(source, 20, None), test) == {}


# ---------------------------------------------------------------------------------------------------
# CHAMP


def test_champ_loads_offline_with_concepts():
    problems = load_problems("champ")
    assert len(problems) == 270
    by_id = {p.id: p for p in problems}
    first = by_id["P_Combinatorics_1"]
    assert first.answer == "239" and first.source == "champ"
    assert first.metadata["category"] == "Combinatorics"
    assert first.metadata["concepts"] == ["C_comb_sum"] and len(first.metadata["concept_texts"]) == 1
    assert len(first.metadata["hints"]) == 3 and "239" in first.solution
    assert {p.metadata["category"] for p in problems} == {
        "Combinatorics",
        "Inequality",
        "Number-Theory",
        "Polynomial",
        "Sequence",
    }
    assert len(load_problems("champ", size=10, seed=1)) == 10


# ---------------------------------------------------------------------------------------------------
# Hugging Face presets, read from fixture files in each dataset's column format


@pytest.mark.parametrize(
    "preset, path, n, first_id, question, answer",
    [
        ("dapo_math", "dapo_math.jsonl", 2, "dapo_math-train-a1b2-0001", DAPO_Q1, "4"),
        (
            "dapo_math_processed",
            "dapo_math_processed.jsonl",
            2,
            "dapo_math_processed-train-c3d4-0001",
            DAPO_Q1,
            "4",
        ),
        (
            "aime24",
            "aime24.jsonl",
            2,
            "aime24-train-60",
            "Find the remainder when $7^{2024}$ is divided by $1000$.",
            "001",
        ),
        (
            "aime25",
            "aime25.jsonl",
            1,
            "aime25-train-I-1",
            "Find the sum of all integer bases $b>9$ for which $17_b$ divides $97_b$.",
            "70",
        ),  # fmt: skip
        (
            "hmmt25",
            "hmmt25.jsonl",
            2,
            "hmmt25-train-1",
            "Compute the number of ordered pairs $(a,b)$ of positive integers with $a+b=10$.",
            "9",
        ),  # fmt: skip
        (
            "math500",
            "math500.jsonl",
            1,
            "math500-test-test/prealgebra/1.json",
            "What is $\\frac{1}{2}+\\frac{1}{3}$?",
            "\\frac{5}{6}",
        ),  # fmt: skip
        (
            "gsm8k",
            "gsm8k",
            2,
            "gsm8k-test-0",
            "Tom has 3 boxes with 4 apples each. He eats 2 apples. How many apples are left?",
            "10",
        ),  # fmt: skip
        ("amc23", "amc23.jsonl", 2, "amc23-test-0", "What is the units digit of $3^{2023}$?", "7"),
    ],
)
def test_presets_on_fixture_files(preset, path, n, first_id, question, answer):
    problems = load_problems(f"hf:{preset}?data_files={DATASETS / path}")
    assert len(problems) == n
    first = problems[0]
    assert (first.id, first.question, first.answer, first.source) == (
        first_id,
        question,
        answer,
        f"hf:{preset}",
    )


def test_dapo_preset_strips_instruction_drops_chinese_and_duplicates():
    problems = load_problems(f"hf:dapo_math?data_files={DATASETS / 'dapo_math.jsonl'}")
    # 4 rows: one duplicate of the first and one Chinese problem are dropped
    assert [p.question for p in problems] == [
        DAPO_Q1,
        "How many positive divisors does $36$ have? (Answer in {braces} is fine.)",
    ]
    assert all("Answer:" not in p.question and "Remember" not in p.question for p in problems)
    assert problems[0].metadata == {"data_source": "math_dapo"}


def test_preset_optional_columns_and_metadata():
    (aime, _) = load_problems(f"hf:aime24?data_files={DATASETS / 'aime24.jsonl'}")
    assert aime.solution.startswith("By Euler") and aime.metadata == {
        "url": "https://example.org/aime/2024-I-1",
        "year": "2024",
    }
    hmmt = load_problems(f"hf:hmmt25?data_files={DATASETS / 'hmmt25.jsonl'}")
    assert hmmt[1].metadata == {"problem_type": ["Algebra", "Number Theory"]} and hmmt[1].solution is None
    (m,) = load_problems(f"hf:math500?data_files={DATASETS / 'math500.jsonl'}")
    assert m.metadata == {"subject": "Prealgebra", "level": 1} and "\\boxed" in m.solution


def test_gsm8k_folder_splits_answers_and_solutions():
    test = load_problems(f"hf:gsm8k?data_files={DATASETS / 'gsm8k'}")
    assert [p.answer for p in test] == ["10", "2000"]  # '#### 2,000' loses its thousands separator
    assert test[0].solution == "He had 3*4=<<3*4=12>>12 apples.\nAfter eating he has 12-2=<<12-2=10>>10."
    train = load_problems(f"hf:gsm8k?split=train&data_files={DATASETS / 'gsm8k'}")
    assert [(p.id, p.answer) for p in train] == [("gsm8k-train-0", "30")]
    assert load_problems(f"hf:gsm8k?data_files={DATASETS / 'gsm8k'}", split="train") == train
    with pytest.raises(DataError, match="no .* files for split 'validation'"):
        load_problems(f"hf:gsm8k?data_files={DATASETS / 'gsm8k'}", split="validation")


def test_preset_reads_parquet_with_nested_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DATASETS / "dapo_math.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    from_parquet = load_problems(f"hf:dapo_math?data_files={tmp_path}")
    from_jsonl = load_problems(f"hf:dapo_math?data_files={DATASETS / 'dapo_math.jsonl'}")
    assert from_parquet == from_jsonl


class FakeHub:
    """Stands in for datasets.load_dataset: records the call, returns rows."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, name, config=None, split=None):
        self.calls.append((name, config, split))
        return self.rows


@pytest.mark.parametrize(
    "source, split, call",
    [
        ("hf:gsm8k", None, ("openai/gsm8k", "main", "test")),
        ("hf:dapo_math_processed", None, ("open-r1/DAPO-Math-17k-Processed", "en", "train")),
        ("hf:dapo_math", None, ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train")),
        ("hf:aime24", None, ("HuggingFaceH4/aime_2024", None, "train")),
        ("hf:aime25", None, ("yentinglin/aime_2025", None, "train")),
        ("hf:hmmt25", None, ("MathArena/hmmt_feb_2025", None, "train")),
        ("hf:math500", None, ("HuggingFaceH4/MATH-500", None, "test")),
        ("hf:amc23", None, ("math-ai/amc23", None, "test")),
        ("hf:gsm8k?split=train", None, ("openai/gsm8k", "main", "train")),
        ("hf:gsm8k?config=socratic", "train", ("openai/gsm8k", "socratic", "train")),
    ],
)
def test_hub_calls_use_preset_names(monkeypatch, source, split, call):
    import datasets

    preset = HF_PRESETS[source[3:].partition("?")[0]]
    fixture = {
        "gsm8k": "gsm8k/test.jsonl",
        "dapo_math": "dapo_math.jsonl",
        "dapo_math_processed": "dapo_math_processed.jsonl",
    }.get(source[3:].partition("?")[0], "aime24.jsonl")
    rows = [json.loads(line) for line in (DATASETS / fixture).read_text().splitlines()]
    if preset.question == "question" and "question" not in rows[0]:  # amc23 shape
        rows = [{"id": r["id"], "question": r["problem"], "answer": float(r["answer"])} for r in rows]
    fake = FakeHub(rows)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    problems = load_problems(source, split=split)
    assert fake.calls == [call] and problems


def test_hub_owner_name_with_columns_and_unreachable_hub(monkeypatch):
    import datasets

    fake = FakeHub([{"prompt_text": "What is 6*7?", "final": 42}])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    (p,) = load_problems("hf:someone/math-set", columns={"q": "prompt_text", "a": "final"})
    assert (p.question, p.answer, p.source, p.id) == (
        "What is 6*7?",
        "42",
        "hf:someone/math-set",
        "someone_math-set-train-0",
    )

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load HuggingFaceH4/aime_2024 .*\?data_files=PATH"):
        load_problems("hf:aime24")


def test_unknown_preset_names_it_and_lists_presets():
    with pytest.raises(DataError) as err:
        load_problems("hf:aime_2024")
    message = str(err.value)
    assert "hf:aime_2024" in message and "aime24, aime25, amc23, dapo_math" in message and "\n" not in message
    with pytest.raises(DataError, match="unknown option"):
        load_problems("hf:aime24?spilt=test")


# ---------------------------------------------------------------------------------------------------
# Local files

ROWS = [{"problem": f"What is {i}+{i}?", "final": 2 * i, "level": i % 3} for i in range(10)]


def _write_all_formats(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "p.json").write_text(json.dumps({"data": ROWS}))
    with open(tmp_path / "p.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "p.csv", "p.parquet"])
def test_local_formats_with_column_mapping(tmp_path, name):
    _write_all_formats(tmp_path)
    path = tmp_path / name
    for source in (str(path), f"file:{path}"):
        problems = load_problems(source, columns={"question": "problem", "answer": "final"})
        assert [p.answer for p in problems] == [str(2 * i) for i in range(10)]
        assert problems[3].question == "What is 3+3?" and problems[3].id == "p-3"
        assert str(problems[3].metadata["level"]) == "0"  # unmapped columns are kept as metadata


def test_local_defaults_dotted_paths_and_sampling(tmp_path):
    path = tmp_path / "nested.jsonl"
    rows = [{"id": f"n{i}", "question": f"q{i}", "reward_model": {"ground_truth": i}} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_problems(str(path))  # question and answer found by their common names
    assert [(p.id, p.answer) for p in problems[:2]] == [("nested-n0", "0"), ("nested-n1", "1")]
    sample = load_problems(str(path), size=3, seed=5)
    assert sample == load_problems(str(path), size=3, seed=5) and len(sample) == 3
    assert [p.id for p in sample] == sorted(p.id for p in sample)  # original order kept
    assert load_problems(str(path), size=3, seed=6) != sample


def test_missing_file_and_missing_column_errors(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        load_problems(str(tmp_path / "nope.jsonl"))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "final": 2}) + "\n")
    with pytest.raises(DataError) as err:
        load_problems(str(path), columns={"q": "problem", "a": "solution_text"})
    assert "column 'solution_text' (for answer) not found; available columns: problem, final" in str(
        err.value
    )
    with pytest.raises(
        DataError, match=r"no answer column \(tried answer, .*available columns: problem, final"
    ):
        load_problems(str(path))
    with pytest.raises(DataError, match="unknown column mapping key 'level'"):
        load_problems(str(path), columns={"level": "x"})
    with pytest.raises(DataError, match="column 'sol' \\(for solution\\) not found"):
        load_problems(str(path), columns={"q": "problem", "a": "final", "s": "sol"})


def test_bad_rows_are_data_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": ""}) + "\n")
    with pytest.raises(DataError, match="row 0 has an empty answer"):
        load_problems(str(path))
    path.write_text('{"question": "1+1?", "answer": 2}\n{"question": \n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: not valid JSON"):
        load_problems(str(path))


# ---------------------------------------------------------------------------------------------------
# Answer and text helpers


def test_strip_dapo_instruction_removes_only_the_instruction():
    head = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    )
    tail = '\n\nRemember to put your answer on its own line after "Answer:".'
    # a question ending in letters of the instruction must keep them (a character-set strip would not)
    question = "Find the number of divisors of 12. Answer as a number. Show it in a rowA:"
    assert strip_dapo_instruction(head + question + tail) == question
    assert strip_dapo_instruction(question) == question


@pytest.mark.parametrize(
    "text, final",
    [
        ("3*4=12\n#### 12", "12"),
        ("#### 1,234", "1234"),
        ("so #### -5", "-5"),
        ("#### 3/4", "3/4"),
        ("#### 2.50", "2.50"),
    ],
)
def test_gsm8k_final_answer(text, final):
    assert gsm8k_final_answer(text) == final


def test_gsm8k_answer_without_marker_is_an_error():
    with pytest.raises(DataError, match="no '####'"):
        gsm8k_final_answer("the answer is 5")


@pytest.mark.parametrize(
    "text, normalised",
    [
        # lowercase; '$' and spaces dropped; \dfrac -> \frac; final '?' dropped
        ("What is $\\dfrac{1}{2}$ + 3?", "whatis\\frac{1}{2}+3"),
        # LaTeX thin spaces and braces around one character
        ("$x^{2}\\,+\\,1$", "x^2+1"),
        # decimal point kept, sentence period dropped
        ("Price is 2.50 dollars.", "priceis2.50dollars"),
        # sizing commands and \text{} unwrapped
        ("\\left( 3\\text{ cm} \\right)", "(3cm)"),
        # thousands separators and Unicode width (NFKC: full-width digits become ASCII)
        ("Sum of 1,000 and １２", "sumof1000and12"),
    ],
)
def test_normalise_text_table(text, normalised):
    assert normalise_text(text) == normalised


def test_normalise_text_keeps_operators_apart():
    assert normalise_text("4 - 1 =") != normalise_text("4 + 1 =")
    assert normalise_text("2.5") != normalise_text("25")


def test_decontaminate_drops_reformatted_copies_and_reports(caplog):
    a = Problem("t0", "Find $x$ if $2x = 6$.", "3", "train")
    b = Problem("t1", "Compute $\\dfrac{1}{2} + \\dfrac{1}{3}$.", "5/6", "train")
    c = Problem("t2", "What is 7*8?", "56", "train")
    held = [Problem("e0", "compute  $\\frac{1}{2}\\,+\\,\\frac{1}{3}$", "5/6", "eval")]
    with caplog.at_level(logging.INFO, logger="sgsd.data"):
        kept, dropped = decontaminate([a, b, c], held)
    assert kept == [a, c] and dropped == [b]
    assert caplog.messages == [
        "contamination guard: dropped 1 of 3 problems whose text matches one of 1 held-out problems (t1)"
    ]
    kept, dropped = decontaminate([a, c], held)
    assert (kept, dropped) == ([a, c], [])


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_data_show(capsys):
    assert main(["data", "show", "reasoning_gym:chain_sum", "--n", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    first = load_problems("reasoning_gym:chain_sum", size=2, seed=1)[0]
    assert out.startswith("reasoning_gym:chain_sum: 2 problems (showing 2)")
    assert (
        out.count("id:       ") == 2
        and f"question: {first.question}" in out
        and f"answer:   {first.answer}" in out
    )


def test_cli_data_show_columns_and_errors(tmp_path, capsys):
    path = tmp_path / "p.csv"
    path.write_text("problem,final\n1+1?,2\n")
    assert main(["data", "show", str(path), "--columns", "q=problem,a=final"]) == 0
    assert "answer:   2" in capsys.readouterr().out
    assert main(["data", "show", str(path), "--columns", "q=problem,a=missing"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0
        and "column 'missing' (for answer) not found; available columns: problem, final" in err
    )
    assert main(["data", "show", "hf:nope"]) == 2
    assert "unknown dataset preset hf:nope" in capsys.readouterr().err
    assert main(["data", "show", str(path), "--columns", "q:problem"]) == 2
    assert "expected FIELD=COLUMN" in capsys.readouterr().err


def test_module_docstring_lists_every_preset():
    for name in HF_PRESETS:
        assert name in data.__doc__


def test_step_problems_walks_seeded_epochs_and_splits_ranks():
    from sgsd.data import step_problems

    items = list(range(5))
    steps = [step_problems(items, s, 2, seed=3) for s in range(5)]  # 10 positions = 2 epochs of 5
    first, second = sum(steps[:2], []) + steps[2][:1], steps[2][1:] + sum(steps[3:], [])
    assert sorted(first) == items and sorted(second) == items  # each epoch is a permutation
    assert steps == [step_problems(items, s, 2, seed=3) for s in range(5)]  # a pure function
    whole = step_problems(items, 1, 4, seed=3)
    assert step_problems(items, 1, 4, seed=3, rank=0, world=2) == whole[0::2]
    assert step_problems(items, 1, 4, seed=3, rank=1, world=2) == whole[1::2]
