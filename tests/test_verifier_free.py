"""Free-text extraction (`extraction="free"`), golds prepared once, and the batched grader pool."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from sgsd import verifier
from sgsd.errors import ConfigError
from sgsd.free_extraction import clean_free_answer
from sgsd.verifier import GraderPool, extract_answer, grade, grade_many

FIXTURE = Path(__file__).parent / "fixtures" / "free_text_answers.jsonl"
ROWS = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines() if line.strip()]
POSITIVES = [r for r in ROWS if not r["near_miss"]]
NEAR_MISSES = [r for r in ROWS if r["near_miss"]]

# Scores on the fixture (correct positives out of len(POSITIVES)), recorded in benchmarks/README.md.
BOXED_SCORE = 18  # boxed mode is today's rule: only the boxes and explicit markers in the table count
FREE_AT_LEAST = (
    145  # recorded 149 of 153; the misses are the "hard_prose" rows whose last number is not the answer
)


# ---------------------------------------------------------------------------------------------
# The free-text table
# ---------------------------------------------------------------------------------------------


def test_the_table_is_large_and_covers_every_kind():
    assert len(ROWS) >= 150
    assert len(NEAR_MISSES) >= 40
    kinds = {r["category"] for r in ROWS}
    assert {"numbers_units", "prose_latex", "several_boxes", "relations", "matrices", "near_miss"} <= kinds
    assert all(isinstance(r["completion"], str) and isinstance(r["gold"], str) for r in ROWS)


def _scores(extraction: str) -> tuple[int, list[str]]:
    results = grade_many([(r["completion"], r["gold"]) for r in ROWS], workers=0, extraction=extraction)
    by_row = list(zip(ROWS, results, strict=True))
    positives = sum(res.correct for row, res in by_row if not row["near_miss"])
    passed_near_misses = [row["completion"] for row, res in by_row if row["near_miss"] and res.correct]
    return positives, passed_near_misses


def test_both_modes_on_the_free_text_table():
    boxed, boxed_near = _scores("boxed")
    free, free_near = _scores("free")
    print(f"free-text table: boxed {boxed}/{len(POSITIVES)}, free {free}/{len(POSITIVES)}")
    assert boxed == BOXED_SCORE  # boxed mode unchanged
    assert free >= FREE_AT_LEAST
    assert boxed_near == [] and free_near == []  # every near miss fails in both modes


def test_the_pool_agrees_with_in_process_free_grading():
    pairs = [(r["completion"], r["gold"]) for r in ROWS]
    here = grade_many(pairs, workers=0, extraction="free")
    try:
        pooled = grade_many(pairs, timeout_s=10.0, workers=2, extraction="free")
    finally:
        verifier.shutdown_pool()
    assert [r.correct for r in pooled] == [r.correct for r in here]


# ---------------------------------------------------------------------------------------------
# Free extraction rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The total is 7,425,000.", "7425000"),  # thousands commas
        ("We need 1 000 bricks.", "1000"),  # thousands spaces
        ("About 1\u202f000\u202f000 people.", "1000000"),  # narrow no-break spaces
        ("$1\\,000$", "1000"),  # LaTeX thin space
        ("$1{,}000$", "1000"),
        ("It is 1'250 francs.", "1250"),
        ("The total is 1,234.", "1234"),  # one comma + three digits: English thousands
        ("The value is 3,14", "3.14"),  # decimal comma
        ("It is 0,125 of it.", "0.125"),  # a leading 0 group is never thousands
        ("Die Summe ist 1.234,56 Euro.", "1234.56"),  # European: dot thousands, decimal comma
        ("So the pair is (1,5).", "(1,5)"),  # a pair stays a pair
        ("Answer $ 9 $", "9"),
        ("The answer is 12 apples.", "12"),
        ("Answer: 3.5 cm.", "3.5"),
        ("The final answer is $42$ apples", "42"),
        ("It costs \\$12.50 each, \\$50 for four.", "50"),
        ("It costs €3,50.", "3.50"),
        ("The angle is 30°.", "30"),
        ("The area is $12 \\text{ cm}^2$.", "12"),
        ("The rope is 5cm long.", "5"),  # a known unit glued to the number
        ("The speed is 60 km/h.", "60"),
        ("We get 50%.", "50%"),
        ("So x ≥ −2.", "x \\ge  -2"),  # unicode signs to LaTeX
        ("Thus $x = 5$, done.", "x = 5"),
        ("Area: 24 cm^2.", "24"),  # the exponent of a unit is not a number
        ("We get 1/2 + 1/3 = 5/6.", "5/6"),
        ("\\boxed{(2, 2)} and \\boxed{(6, 2)}", "(2, 2), (6, 2)"),  # several boxes: one answer
        ("$x = \\boxed{2}$ or $x = \\boxed{-5}$", "2, -5"),
        ("\\boxed{25}. Wait, that is wrong; it is \\boxed{24}.", "24"),  # prose between: last box only
        ("\\boxed{\\boxed{3}}", "3"),
        ("\\boxed{3} then put it in \\boxed{}", "3"),
        (
            "$\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}$ is the vector.",
            "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        ),
        ("We have $3$ cases and $x$ is a nice variable, giving 7.", "7"),
        ("We need to answer 3 questions; in total 12 points.", "12"),  # "answer 3" is prose
        ("Answer \\[ \n 9 \n \\]", "9"),  # a display environment after an anchor may span lines
        ("\\frac{10}{9}", "\\frac{10}{9}"),  # one bare LaTeX expression
        ("Final Answer: The largest $n$ is 34.", "34"),  # prose after an anchor: its last math
        ("The answer is 5 (not 6).", "5"),  # a parenthetical remark is dropped
        ("\\boxed{(2, 12)} \\quad \\text{and} \\quad \\boxed{(6, 2)}", "(2, 12), (6, 2)"),
        ("\\( y_1 = \\boxed{3} \\) and \\( y_2 = \\boxed{4} \\)", "3, 4"),
        ("\\boxed{-2,1}", "-2,1"),  # in LaTeX a comma separates: no decimal comma
        ("$(2,12) \\cup (12,102)$", "(2,12) \\cup (12,102)"),  # nor thousands inside brackets
        ("So the answer is $odd$.", "odd"),  # one word in math is an answer, not prose
        ("It is 2,5 km.", "2.5"),
        ("The answer is (C).", "(C)"),  # a choice is not a parenthetical remark
        ("I could not finish.", None),
        ("<think>so 5</think>", None),  # only after </think>
        ("<think>the answer is 5", None),  # thinking never closed
        ("\\boxed{1} and \\boxed{2", None),  # malformed last box, as in boxed mode
        ("", None),
    ],
)
def test_free_extraction(text, expected):
    assert extract_answer(text, extraction="free") == expected


@pytest.mark.parametrize(
    "text",
    ["The total is 7,425,000.", "Answer $ 9 $", "So the answer is 12 apples.", "\\boxed{1} and \\boxed{2}"],
)
def test_boxed_mode_ignores_free_text(text):
    assert extract_answer(text) in (None, "2")  # boxed: only boxes and explicit markers


@pytest.mark.parametrize(
    "raw, plain, expected",
    [
        ("\\$1,250", False, "1250"),
        ("x = \\$5", False, "x = 5"),
        ("USD 30", False, "30"),
        ("12 dollars", False, "12"),
        ("5 square meters", False, "5"),
        ("2 and 3", False, "2 and 3"),  # a connector is not a unit
        ("2 \\pi", False, "2 \\pi"),
        ("4 (rounded)", False, "4"),
        ("−7", False, "-7"),
        ("2,5%", True, "2.5%"),
        ("10,000", False, "10000"),
        ("1,5, 2", False, "1,5, 2"),  # a list, not a decimal comma
        ("3,14", True, "3.14"),  # plain text: a decimal comma
        ("3,14", False, "3,14"),  # LaTeX (a box or $...$): a list
        ("0{,}25", False, "0.25"),  # LaTeX's decimal comma
        ("12,102", False, "12102"),  # a whole answer: thousands
        ("(2,12) \\cup (12,102)", False, "(2,12) \\cup (12,102)"),  # inside brackets: separators
    ],
)
def test_clean_free_answer(raw, plain, expected):
    assert clean_free_answer(raw, plain=plain) == expected


def test_extraction_mode_is_checked():
    with pytest.raises(ConfigError, match="extraction must be one of boxed, free"):
        grade("\\boxed{1}", "1", extraction="loose")
    with pytest.raises(ConfigError, match="extraction"):
        grade_many([("\\boxed{1}", "1")], workers=0, extraction="")
    with pytest.raises(ConfigError, match="extraction"):
        extract_answer("1", extraction="Free")
    assert grade("The answer is 1,000 dollars.", "1000", extraction="free") is True
    assert grade("The answer is 1,000 dollars.", "1000") is False
    assert verifier.reward("So 7.", 7, extraction="free") == 1.0


def test_free_mode_never_evaluates_text_as_code(tmp_path, monkeypatch):
    # A relative marker keeps digits out of the completion: free mode reads the last number, and a
    # temporary folder such as pytest-0 would otherwise supply the gold "0" (os.system's return value).
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    code = "__import__('os').system('touch pwned')"
    for completion in (f"The answer is {code}", f"${code}$", code, f"Answer $ {code} $ 5"):
        assert grade(completion, "0", extraction="free") is False
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Hostile input in free mode: bounded time, False, and the pool keeps working
# ---------------------------------------------------------------------------------------------


def _hostile_free() -> dict[str, str]:
    return {
        "million dollars": "$" * 999_999,
        "dollar pairs around digits": "$1$" * 300_000,
        "digits and spaces": "1 " * 499_999,
        "thousands groups": "1,000" * 190_000,
        "decimal commas": "1,5" * 300_000,
        "many answer words": "answer " * 140_000,
        "answer then huge span": "The answer is " + "1 " * 400_000,
        "joined boxes": "\\boxed{1} and " * 70_000,
        "boxes with labels": "x = \\boxed{1}, " * 60_000,
        "open parens": "\\(" * 400_000,
        "units forever": "5 " + "cm " * 300_000,
        "letters after a number": "Answer: 4 " + "a" * 900_000,
        "long number": "9" * 999_000,
        "unicode signs": "−≤≥×π" * 190_000,
        "think tags": "<think></think>" * 60_000,
        "deep fraction": "$" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "$",
        "power tower": "The answer is $10^{10^{10^{10}}}$",
        "huge power": "So we get $7^{123456789}$.",
    }


HOSTILE_FREE = _hostile_free()


@pytest.mark.parametrize("name", sorted(HOSTILE_FREE))
def test_hostile_free_extraction_is_fast(name):
    start = time.perf_counter()
    answer = extract_answer(HOSTILE_FREE[name], extraction="free")
    assert time.perf_counter() - start < 2.0, name
    assert answer is None or len(answer) <= verifier.MAX_ANSWER_CHARS


def test_hostile_free_completions_are_false_within_the_timeout():
    timeout_s = 2.0
    pairs = [(text, "5") for text in HOSTILE_FREE.values()] + [("The answer is 10/2.", "5")]
    try:
        start = time.monotonic()
        results = grade_many(pairs, timeout_s=timeout_s, workers=2, extraction="free")
        elapsed = time.monotonic() - start
    finally:
        verifier.shutdown_pool()
    assert [r.correct for r in results[:-1]] == [False] * len(HOSTILE_FREE), results
    assert results[-1].correct is True
    assert elapsed < 60, elapsed  # two slow items at most, each killed at its deadline


# ---------------------------------------------------------------------------------------------
# Golds are prepared once per problem
# ---------------------------------------------------------------------------------------------


def test_a_gold_is_parsed_once_for_all_completions_of_a_problem(monkeypatch):
    verifier._parse_gold_cached.cache_clear()
    verifier._gold_facts.cache_clear()
    unwrapped = []
    original = verifier.gold_answer
    monkeypatch.setattr(verifier, "gold_answer", lambda g, *a: unwrapped.append(g) or original(g, *a))
    gold = "\\frac{\\sqrt{12}}{3}"
    completions = [
        f"\\boxed{{{c}}}" for c in ("\\frac{2\\sqrt3}{3}", "\\frac{2}{\\sqrt3}", "1.1547", "2/\\sqrt{3}")
    ]
    results = grade_many([(c, gold) for c in completions * 2], workers=0)
    assert [r.correct for r in results] == [True, True, False, True] * 2
    assert unwrapped == [gold]  # one distinct gold, unwrapped once
    assert verifier._parse_gold_cached.cache_info().misses == 1  # and parsed once
    assert verifier._gold_facts.cache_info().misses == 1  # and normalised once


# ---------------------------------------------------------------------------------------------
# The batched pool
# ---------------------------------------------------------------------------------------------


def test_items_travel_in_batches_and_come_back_in_order(monkeypatch):
    sent = []
    original = verifier._Worker.send
    monkeypatch.setattr(
        verifier._Worker, "send", lambda self, jobs, msg: sent.append(len(jobs)) or original(self, jobs, msg)
    )
    items = [(f"\\frac{{{2 * i}}}{{2}}", str(i if i % 3 else i + 1)) for i in range(48)]
    with GraderPool(workers=2) as pool:
        verdicts = pool.judge(items, timeout_s=20)
    assert [v[0] for v in verdicts] == [i % 3 != 0 for i in range(48)]
    assert sum(sent) == 48 and max(sent) == 6  # ceil(48 / (4 * 2)) items in the first messages
    assert min(sent) == 1 and len(sent) < 48  # batches shrink towards the end of the queue


def test_a_hung_item_in_a_batch_is_killed_at_its_deadline_and_the_rest_resent():
    items = [
        ("\\frac{4}{2}", "2"),
        ("\\sqrt{9}", "3"),
        ("7^{123456789}", "5"),
        ("\\frac{10}{2}", "5"),
        ("2+2", "4"),
    ]
    with GraderPool(workers=1) as pool:
        pool.judge([("1", "1")], timeout_s=10)  # the worker is up
        start = time.monotonic()
        verdicts = pool.judge(items, timeout_s=0.5, batch_items=5)
        elapsed = time.monotonic() - start
        assert [v[0] for v in verdicts] == [True, True, False, True, True]
        assert "timed out after 0.5 s" in verdicts[2][1]
        assert pool.replaced == 1
    assert elapsed < 0.5 * 2 + 30, elapsed  # the deadline plus one worker start-up


def test_only_the_hung_workers_batch_is_affected():
    items = [("\\frac{6}{3}", "2")] * 6 + [("7^{123456789}", "5")] + [("\\frac{6}{3}", "2")] * 5
    with GraderPool(workers=2) as pool:
        verdicts = pool.judge(items, timeout_s=1.0, batch_items=3)
        assert [v[0] for v in verdicts] == [True] * 6 + [False] + [True] * 5
        assert pool.replaced == 1


def test_a_worker_killed_mid_batch_fails_only_its_current_item():
    with GraderPool(workers=1) as pool:
        pool.judge([("1", "1")], timeout_s=10)
        victim = pool._workers[0].process.pid
        # the first item is settled by string at once; the second runs for seconds when the kill comes
        killer = threading.Timer(1.0, lambda: os.kill(victim, signal.SIGKILL))
        killer.start()
        items = [("5", "5"), ("(10^{10})!", "5"), ("\\frac{9}{3}", "3"), ("\\sqrt{4}", "2")]
        verdicts = pool.judge(items, timeout_s=20, batch_items=4)
        killer.join()
        assert verdicts[0] == (True, "equal after normalisation")
        assert verdicts[1][0] is False and "grader process died" in verdicts[1][1]
        assert [v[0] for v in verdicts[2:]] == [True, True]
        assert pool.replaced == 1


def test_large_batches_never_block_the_parent():
    # ~64 KiB and more of JSON per worker: writes go through the non-blocking outbox
    big = "+".join(["1"] * 490)  # 979 characters, equal to 490
    items = [(big, "490"), (big, "491")] * 80
    with GraderPool(workers=2) as pool:
        verdicts = pool.judge(items, timeout_s=30, batch_items=32)
    assert [v[0] for v in verdicts] == [True, False] * 80
