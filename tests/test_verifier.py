"""The verifier: extraction rules, the grading table, hostile input, and the process pool."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from sgsd import verifier
from sgsd.errors import ConfigError, DataError
from sgsd.verifier import (
    GradeResult,
    GraderPool,
    extract_answer,
    grade,
    grade_many,
    grade_one,
    normalize_answer,
    reward,
)

# ---------------------------------------------------------------------------------------------
# The grading table: (gold, completion, expected), from real answer formats
# ---------------------------------------------------------------------------------------------

AIME_HMMT = [
    ("204", "Thus $m+n = 197 + 7 = 204$.\n\n\\boxed{204}", True),
    ("033", "The answer is \\boxed{33}.", True),  # AIME golds are sometimes zero-padded
    ("33", "\\boxed{033}", True),
    ("70", "Thus the answer is \\boxed{070}", True),
    ("902", "**Final Answer**\n\\[\n\\boxed{902}\n\\]", True),
    ("239", "\\boxed{240}", False),  # near miss
    ("240", "\\boxed{239}", False),
    ("25", "So \\boxed{25}. Wait, I made an error; it is \\boxed{24}.", False),  # the last box counts
    ("24", "So \\boxed{25}. Wait, I made an error; it is \\boxed{24}.", True),
    ("73", "<think>maybe \\boxed{73}</think>\nThe answer is \\boxed{72}", False),  # after </think>
    ("72", "<think>maybe \\boxed{73}</think>\nThe answer is \\boxed{72}", True),
    ("72", "<think>long reasoning \\boxed{72} and then the budget ran out", False),  # unfinished
    ("-984", "\\boxed{-984}", True),
    ("984", "\\boxed{-984}", False),
    ("\\frac{9\\sqrt{3}}{2}", "\\boxed{\\frac{9}{2}\\sqrt{3}}", True),
    ("2\\sqrt{6}", "\\boxed{\\sqrt{24}}", True),
    ("\\frac{1}{576}", "\\boxed{1/576}", True),
    ("8\\pi", "\\boxed{8 \\pi}", True),
    ("8\\pi", "\\boxed{25.13}", False),  # 8*pi = 25.1327..., differs at 6 decimals
    ("\\frac{\\sqrt{5}-1}{2}", "\\boxed{\\frac{-1+\\sqrt{5}}{2}}", True),
    ("2^{25}", "\\boxed{33554432}", True),
    ("1-\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{2-\\sqrt{2}}{2}}", True),
    ("\\frac{448}{3}", "\\boxed{149.33}", False),
    ("\\frac{448}{3}", "$\\boxed{\\dfrac{448}{3}}$", True),
    ("3\\sqrt{3}", "\\boxed{5.196152}", True),  # equal after rounding both to 6 decimals (policy)
    ("\\sqrt{2}", "\\boxed{1.41}", False),
    ("2\\sqrt{2}", "\\boxed{2 \\sqrt 2}", True),
    ("336", "The final result: $\\boxed{336}$ ways.", True),
    ("336", "\\boxed{\\textbf{336}}", True),
    ("9", "\\boxed{\\text{9}}", True),
    ("\\frac{7}{2}", "\\boxed{3.5}", True),
    ("\\frac{7}{2}", "\\boxed{3.51}", False),
    ("1", "\\boxed{1.0}", True),
    ("\\frac{3}{8}", "\\boxed{\\tfrac{3}{8}}", True),
    ("60", "\\boxed{60^\\circ}", True),
    ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", True),
    ("2\\sqrt{3}", "\\boxed{3\\sqrt{2}}", False),
]

MATH_LATEX = [
    ("\\frac{1}{2}", "\\boxed{\\dfrac12}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{1}{2}\\sqrt{3}}", True),
    ("(3,-1)", "\\boxed{(3, -1)}", True),
    ("(3,-1)", "\\boxed{(-1, 3)}", False),
    ("(1,2)", "\\boxed{[1,2]}", False),  # open vs closed
    ("(1,2)", "\\boxed{(1, 2)}", True),  # tuple or interval: read the same way on both sides
    ("(2,1)", "\\boxed{(2,1)}", True),
    ("(2,1)", "\\boxed{(3,1)}", False),
    ("[-2,5)", "\\boxed{[-2, 5)}", True),
    ("(-\\infty,3]", "\\boxed{(-\\infty, 3]}", True),
    ("(-\\infty,3]", "\\boxed{(-\\infty, 3)}", False),
    ("(-\\infty,0)\\cup(1,\\infty)", "\\boxed{(-\\infty, 0) \\cup (1, \\infty)}", True),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", True),
    ("x^2+2x+1", "\\boxed{(x-1)^2}", False),
    ("\\text{(C)}", "\\boxed{C}", True),
    ("\\text{(C)}", "\\boxed{\\text{(D)}}", False),
    ("30^\\circ", "\\boxed{30}", True),
    ("30", "\\boxed{30^{\\circ}}", True),
    ("\\$18.90", "\\boxed{18.90}", True),
    ("18.90", "\\boxed{\\$18.9}", True),
    ("5\\text{ cm}", "\\boxed{5}", True),
    ("5", "\\boxed{5 \\text{ cm}}", True),
    ("10\\%", "\\boxed{10}", True),
    ("10", "\\boxed{10\\%}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}2\\\\1\\end{pmatrix}}", False),
    (
        "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
        "\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}",
        True,
    ),
    (
        "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
        "\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 4 & 3 \\end{pmatrix}}",
        False,
    ),
    ("1, 2", "\\boxed{2, 1}", True),  # an unbracketed list is unordered
    ("2, -3", "\\boxed{-3, 2}", True),
    ("2, -3", "\\boxed{-3, 3}", False),
    ("\\{1, 2\\}", "\\boxed{\\{2, 1\\}}", True),
    ("\\{1, 2\\}", "\\boxed{\\{1, 2, 3\\}}", False),
    ("y = 2x + 3", "\\boxed{y=2x+3}", True),
    ("y = 2x + 3", "\\boxed{y=3x+2}", False),
    ("\\pi", "\\boxed{\\pi}", True),
    ("2\\pi", "\\boxed{6.283185}", True),  # 2*pi = 6.2831853..., equal at 6 decimals (policy)
    ("2\\pi", "\\boxed{6.28}", False),
    ("1+i", "\\boxed{i+1}", True),
    ("1+i", "\\boxed{1-i}", False),
    ("\\infty", "\\boxed{\\infty}", True),
    ("0", "\\boxed{0}", True),
    ("-1", "\\boxed{1}", False),
    ("\\frac{5}{6}", "\\boxed{\\frac{10}{12}}", True),
    ("\\frac{3}{4}", "\\boxed{0.75}", True),
    ("\\frac{3}{4}", "\\boxed{0.76}", False),
    ("3", "\\boxed{x=3}", True),  # an assignment's right side is the answer
    ("3", "\\boxed{x=4}", False),
    ("6", "\\boxed{6 \\text{ inches}}", True),
    ("12", "The box: \\fbox{12}", True),
    ("5", "so the answer is $\\boxed 5$.", True),
    ("\\frac{1}{2}", "\\boxed{\\boxed{\\frac12}}", True),
    ("\\left(\\frac{1}{2}, 3\\right)", "\\boxed{\\left( \\frac12, 3 \\right)}", True),
    ("\\sqrt[3]{2}", "\\boxed{2^{1/3}}", True),
    ("\\log_2 8", "\\boxed{3}", True),
    ("e^{2}", "\\boxed{e^2}", True),
    ("e^{2}", "\\boxed{2e}", False),
    ("-\\frac{1}{3}", "\\boxed{-\\frac{1}{3}}", True),
    ("-\\frac{1}{3}", "\\boxed{\\frac{1}{3}}", False),
    ("\\{-1, 1\\}", "\\boxed{\\{1,-1\\}}", True),
    ("\\text{even}", "\\boxed{\\text{even}}", True),
    ("\\text{even}", "\\boxed{\\text{odd}}", False),
    ("11\\sqrt{5}", "\\boxed{11 \\sqrt{5}}", True),
    ("4", "\\boxed{4}\\quad\\text{(the last box)}", True),
    ("\\{1,2\\}", "the set is \\boxed{\\{1,2\\}} indeed", True),
]

GSM8K = [
    (
        "72",
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72",
        True,
    ),
    ("1000", "#### 1,000", True),
    ("18", "#### 18.00", True),
    ("5", "#### 6", False),
    ("-3", "#### -3", True),
    ("3000", "She earns \\$3,000 a month. \\boxed{\\$3,000}", True),
    ("0.5", "#### .5", True),
    ("42", "Answer: 42", True),
    ("42", "Some work.\nAnswer: $42$", True),
    ("42", "**Answer:** 42", True),
    ("42", "Answer:\n42", True),
    ("42", "The final answer is $42$. I hope it is correct.", True),
    ("42", "Final Answer: The final answer is 41. I hope it is correct.", False),
    ("42", "Final Answer: The final answer is 42. I hope it is correct.", True),
    ("8", "So she has 8 apples left.", False),  # no recognised answer: wrong by policy
    ("1,234", "\\boxed{1234}", True),
    ("1234", "\\boxed{1,234}", True),
    ("1234", "\\boxed{1,243}", False),
    ("12", "#### 12 dollars", True),
    ("20", "The answer: 20.", True),
    ("35", "Janet has 35 eggs, answer: 34", False),
    ("7", "\\boxed{07}", True),
    ("10", "\\boxed{010.0}", True),
    ("156", "Total = 156\n#### 156", True),
    ("156", "Total = 156\n#### 165", False),
    ("1.25", "\\boxed{\\$1.25}", True),
    ("2.5", "\\boxed{2\\frac{1}{2}}", True),  # a mixed number is read as 2 + 1/2 (math-verify)
    ("2.5", "\\boxed{\\frac{5}{2}}", True),
    ("60", "\\boxed{60\\text{ minutes}}", True),
    ("4", "#### 4\n\nSome trailing chatter.", True),
]

CHAMP = [
    ("2^(n-1)", "\\boxed{2^{n-1}}", True),
    ("2^{n-1}", "\\boxed{2^(n-1)}", True),
    ("2^{n-1}", "\\boxed{2^{n+1}}", False),
    ("[-1, 1]", "\\boxed{[-1,1]}", True),
    ("[-1, 1]", "\\boxed{(-1,1)}", False),
    ("n(n+1)/2", "\\boxed{\\frac{n(n+1)}{2}}", True),
    ("n(n+1)/2", "\\boxed{\\frac{n^2+n}{2}}", True),
    ("n(n+1)/2", "\\boxed{\\frac{n(n-1)}{2}}", False),
    ("n!", "\\boxed{n!}", True),
    ("\\binom{2n}{n}", "\\boxed{\\binom{2n}{n}}", True),
    ("3^n - 1", "\\boxed{3^n-2}", False),
    ("3^n - 1", "\\boxed{3^{n}-1}", True),
    ("1/4", "\\boxed{0.25}", True),
    ("k = 2", "\\boxed{2}", True),
    ("n^2", "\\boxed{n \\cdot n}", True),
    ("x \\in [1, 2]", "\\boxed{[1,2]}", True),
    ("0", "The minimum value is \\boxed{0}.", True),
    ("\\frac{1}{e}", "\\boxed{e^{-1}}", True),
    ("\\ln 2", "\\boxed{\\ln(2)}", True),
    ("2", "\\boxed{\\log_{10} 100}", True),
    ("1", "\\boxed{\\lim_{n\\to\\infty} 1}", True),
    ("4n", "\\boxed{4n}", True),
    ("4n", "\\boxed{4m}", False),  # variables matter
    ("(n+1)^2", "\\boxed{n^2+2n+1}", True),
    ("\\frac{n}{n+1}", "\\boxed{1-\\frac{1}{n+1}}", True),
    ("2", "There are \\boxed{2} solutions.", True),
    ("\\sqrt{n}", "\\boxed{n^{1/2}}", True),
    ("a=b=c", "\\boxed{a=b=c}", True),
]

REASONING_GYM = [
    ("17", "\\boxed{17}", True),  # chain_sum
    ("-4", "\\boxed{-4}", True),
    ("-4", "\\boxed{4}", False),
    ("-12.5", "\\boxed{-12.50}", True),  # basic_arithmetic
    ("3.14", "\\boxed{3.1400}", True),
    ("-1.5", "\\boxed{-3/2}", True),
    ("-1.5", "\\boxed{-1.6}", False),
    ("3/7", "\\boxed{\\frac{3}{7}}", True),  # fractions
    ("3/7", "\\boxed{6/14}", True),  # equal value counts, not only lowest terms (policy)
    ("3/7", "\\boxed{3/8}", False),
    ("3/7", "\\boxed{0.428571}", True),  # 3/7 = 0.4285714..., equal at 6 decimals (policy)
    ("3/7", "\\boxed{0.43}", False),
    ("5", "\\boxed{x = 5}", True),  # simple_equations
    ("-7", "\\boxed{p=-7}", True),
    ("5", "\\boxed{x = 6}", False),
    ("12", "\\boxed{12}", True),  # gcd
    ("12", "\\boxed{6}", False),
    ("360", "Answer: 360", True),  # lcm
    ("1000000", "\\boxed{1,000,000}", True),
    ("1000000", "\\boxed{10^6}", True),
    ("1000000", "\\boxed{10^7}", False),
    ("0", "\\boxed{-0}", True),
    ("2", "\\boxed{+2}", True),
    ("1.5", "\\boxed{1.50}", True),
    ("100", "\\boxed{1000}", False),
    ("2^{10}", "\\boxed{1023}", False),
    ("1/3", "\\boxed{0.333}", False),
    ("1/3", "\\boxed{0.333333}", True),  # equal at 6 decimals (policy)
]

NEAR_MISSES = [
    ("0.5", "\\boxed{0.50001}", False),
    ("0.5", "\\boxed{0.5000001}", True),  # below the 6-decimal rounding: equal (policy)
    ("\\sqrt{2}", "\\boxed{\\sqrt{3}}", False),
    ("x+1", "\\boxed{x-1}", False),
    ("\\frac{1}{2}", "\\boxed{\\frac{2}{1}}", False),
    ("12", "\\boxed{1.2}", False),
    ("-5", "\\boxed{5}", False),
    ("3\\pi", "\\boxed{3}", False),
    ("10\\%", "\\boxed{0.11}", False),
    ("999", "\\boxed{1000}", False),
    ("1000", "\\boxed{1000.1}", False),
    ("2", "\\boxed{}", False),  # an empty box is no answer
]

TABLE = AIME_HMMT + MATH_LATEX + GSM8K + CHAMP + REASONING_GYM + NEAR_MISSES


def test_the_table_is_large_and_mixed():
    assert len(TABLE) >= 150
    assert sum(expected for _, _, expected in TABLE) >= 60
    assert sum(not expected for _, _, expected in TABLE) >= 60


@pytest.mark.parametrize("gold, completion, expected", TABLE)
def test_grading_table(gold, completion, expected):
    result = grade_one(completion, gold)
    assert result.correct is expected, result


def test_the_pool_agrees_with_in_process_grading_on_the_table(pool_workers):
    pooled = grade_many([(c, g) for g, c, _ in TABLE], timeout_s=10.0, workers=pool_workers)
    assert [r.correct for r in pooled] == [expected for _, _, expected in TABLE]


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),  # nested braces
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not count
        ("\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),
        ("\\boxed 5.", "5"),
        ("a \\boxed{1} b \\fbox{2} c", "2"),  # last of either command
        ("a \\fbox{1} b \\boxed{2} c", "2"),
        ("\\boxed{3} then put it in \\boxed{}", "3"),  # an empty box is skipped
        ("\\boxed{ 4. }", "4"),
        ("x" * 5000 + "\\boxed{9}", "9"),  # the whole completion is searched, not the last 100 chars
        ("\\boxed{9}" + "y" * 5000, "9"),
        ("<think>\\boxed{1}</think>\\boxed{2}", "2"),
        ("<think>\\boxed{1}</think>no answer", None),  # only after </think>
        ("<think>\\boxed{1}", None),  # thinking never closed
        ("\\boxed{1} and \\boxed{2", None),  # the last box is malformed: no answer
        ("\\boxed{" + "1" * 2000 + "}", None),  # too long
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("Final Answer: The final answer is 7. I hope it is correct.", "7"),  # outranks "Answer:"
        ("Answer: 3.5 cm.", "3.5 cm"),
        ("answer: x = 2", "x = 2"),
        ("#### 1,000", "1,000"),
        ("Answer: 5\n#### 6", "5"),  # "Answer:" outranks "####"
        ("The result is 5.", None),
        ("", None),
        ("\\boxedfoo 3", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_refuses_non_text_and_absurd_lengths():
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert extract_answer(b"\\boxed{1}") is None  # type: ignore[arg-type]
    assert extract_answer("\\boxed{1}" + " " * verifier.MAX_COMPLETION_CHARS) is None


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$1,000$", "1000"),
        ("007", "7"),
        ("-0.500", "-0.5"),
        ("-0", "0"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\leftarrow", "\\leftarrow"),  # \left only as a whole command
        ("30^{\\circ}", "30"),
        ("5\\%", "5"),
        ("\\$4.50", "4.5"),
        ("5 \\text{ cm}", "5"),
        ("\\text{(A)}", "(A)"),
        ("x = 3.", "x=3"),
        ("\\{1, 2\\}", "{1,2}"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# ---------------------------------------------------------------------------------------------
# API contract
# ---------------------------------------------------------------------------------------------


def test_grade_and_reward_signs():
    assert grade("\\boxed{4}", "4") is True
    assert grade("\\boxed{5}", "4") is False
    assert reward("\\boxed{4}", 4) == 1.0
    assert reward("\\boxed{5}", 4) == -1.0
    assert reward("no answer", "4") == -1.0


def test_gold_forms():
    assert grade("\\boxed{4}", "\\boxed{4}")
    assert grade("\\boxed{4}", "#### 4")
    assert grade("\\boxed{4}", "$4$")
    assert grade("\\boxed{0.25}", 0.25)
    with pytest.raises(DataError, match="gold answer must be text or a number"):
        grade("\\boxed{4}", None)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="gold answer is empty"):
        grade("\\boxed{4}", "  ")


def test_grade_many_in_process_keeps_order_and_reasons():
    results = grade_many([("\\boxed{1}", "1"), ("nothing", "1"), ("\\boxed{2}", "1")], workers=0)
    assert [r.correct for r in results] == [True, False, False]
    assert results[0] == GradeResult(True, "equal after normalisation", "1")
    assert results[1].extracted is None and "no answer found" in results[1].reason
    assert results[2].reason == "not equivalent"
    assert grade_many([], workers=0) == []


def test_grade_many_rejects_bad_settings():
    with pytest.raises(ConfigError, match="timeout"):
        grade_many([("\\boxed{1}", "1")], timeout_s=0, workers=0)
    with pytest.raises(ConfigError, match="workers"):
        grade_many([("\\boxed{1}", "1")], workers=-1)


def test_in_process_grading_works_off_the_main_thread():
    # math-verify's signal.alarm timeouts raise in threads; the verifier switches them off there.
    out = []
    thread = threading.Thread(target=lambda: out.append(grade("\\boxed{\\frac{2}{4}}", "0.5")))
    thread.start()
    thread.join(timeout=30)
    assert out == [True]


def test_never_evaluates_text_as_code(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    for completion in (f"\\boxed{{{code}}}", f"Answer: {code}", code):
        assert grade(completion, "0") is False
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Hostile completions and the pool
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pool_workers():
    """Two pooled workers for the whole session; the shared pool is closed at the end."""
    yield 2
    verifier.shutdown_pool()


def _hostile_completions() -> dict[str, str]:
    deep_frac = "\\frac{1}{" * 500 + "2" + "}" * 500
    return {
        "million-char box": "\\boxed{" + "1" * 1_000_000 + "}",
        "long box under the length cap": "\\boxed{" + "9" * 900_000 + "}",
        "frac nested 500 deep": "\\boxed{" + deep_frac + "}",
        "power tower": "\\boxed{10^{10^{10^{10}}}}",
        "two-level tower": "\\boxed{9^{9^{9}}}",
        "huge power": "\\boxed{7^{123456789}}",
        "huge factorial": "\\boxed{(10^{10})!}",
        "unbalanced braces": "\\boxed{{{{{{" + "}" * 3,
        "NUL bytes": "\\boxed{5\x00\x00}",
        "NUL everywhere": "\x00" * 1000 + "\\boxed{\x00}",
        "lone surrogate": "\\boxed{\ud800}",
        "200,000 boxes": "\\boxed{}" * 200_000,
        "140,000 open boxes": "\\boxed{" * 140_000,
        "100,000 full boxes": "\\boxed{3}" * 100_000,
        "code": "\\boxed{__import__('os').system('x')}",
        "code answer line": "Answer: __import__('os').system('x')",
        "deep parentheses": "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
        "many think tags": "<think>" * 100_000,
    }


HOSTILE = _hostile_completions()
GOLD_FOR_HOSTILE = "5"  # no hostile completion may ever grade as 5 (the NUL box is "5" + U+FFFD)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_extraction_is_fast(name):
    start = time.perf_counter()
    extract_answer(HOSTILE[name])
    assert time.perf_counter() - start < 1.0


def test_hostile_completions_are_false_within_the_timeout_and_the_pool_keeps_working(pool_workers):
    timeout_s = 2.0
    for name, completion in HOSTILE.items():
        start = time.monotonic()
        hostile, normal = grade_many(
            [(completion, GOLD_FOR_HOSTILE), ("\\boxed{\\frac{10}{2}}", "5")],
            timeout_s=timeout_s,
            workers=pool_workers,
        )
        elapsed = time.monotonic() - start
        assert hostile.correct is False, (name, hostile)
        assert hostile.reason, name
        assert normal.correct is True, (name, normal)
        # two items on two workers run side by side; allow for spawning a replacement worker
        assert elapsed < timeout_s + 15, (name, elapsed)


def test_a_hung_item_is_killed_and_the_worker_replaced():
    with GraderPool(workers=1) as pool:
        # A 0.5 s deadline is shorter than math-verify's own 1 s alarm, so the parent must kill.
        verdicts = pool.judge([("7^{123456789}", "5"), ("5", "5")], timeout_s=0.5)
        assert verdicts[0][0] is False and "timed out after 0.5 s" in verdicts[0][1]
        assert verdicts[1] == (True, "equal after normalisation")
        assert pool.replaced == 1


def test_a_crashed_worker_is_reported_and_replaced():
    with GraderPool(workers=1) as pool:
        pool.judge([("1", "1")], timeout_s=10)  # the worker is up
        victim = pool._workers[0].process.pid
        killer = threading.Timer(0.3, lambda: os.kill(victim, signal.SIGKILL))
        killer.start()
        verdicts = pool.judge([("(10^{10})!", "5"), ("\\frac{4}{2}", "2")], timeout_s=20)
        killer.join()
        assert verdicts[0][0] is False and "grader process died" in verdicts[0][1]
        assert verdicts[1] == (True, "symbolically equivalent")
        assert pool.replaced == 1


def test_the_shared_pool_is_reused_across_calls(pool_workers):
    grade_many([("\\boxed{1}", "1")], workers=pool_workers)
    first = verifier._pool
    grade_many([("\\boxed{2}", "2")], workers=pool_workers)
    assert verifier._pool is first and first.size == pool_workers
