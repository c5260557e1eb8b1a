"""Answer extraction and grading: the only grader, for rewards and for evaluation.

The verifier turns a completion and a reference ("gold") answer into r = +1 / -1. That sign decides
every teacher's polarity during training and every evaluation number, so it is strict, bounded and
documented rather than clever.

Extraction (`extract_answer`)
    1. Refuse absurd input early: a completion longer than `MAX_COMPLETION_CHARS` has no answer.
       Lone surrogates and control characters (NUL ...) are replaced by U+FFFD first.
    2. Only the text after the last `</think>` counts. A `<think>` that is never closed means the
       model did not finish: no answer.
    3. The last `\\boxed{...}` / `\\fbox{...}` (nested braces, `\\{` escapes) or `\\boxed 5` wins.
       Empty boxes are skipped (a prompt echo such as "put it in \\boxed{}"). If the last box is
       malformed (unbalanced, or longer than `MAX_ANSWER_CHARS`) there is no answer: an earlier box
       is an intermediate result, not the final one.
    4. Without a box, ranked fallbacks on the last occurrence of: "final answer is ...",
       "Answer: ...", GSM8K's "#### ...". Nothing found: `None`.
    Every step is a linear scan (str.rfind, bounded brace matching, regexes without nested
    quantifiers), so hostile input costs at most O(len(text)).

Grading (`grade`, `reward`, `grade_many`)
    1. No extracted answer: False.
    2. Equal after pure string normalisation (`normalize_answer`: spacing, `$`, `\\left`/`\\right`,
       `\\dfrac`, `^\\circ`, `\\%`, `\\$`, `\\text{unit}` after a number, thousands separators,
       leading zeros, trailing decimal zeros): True. This is also the fallback when symbolic parsing
       fails, and the only check for answers refused as too complex (see 3).
    3. Answers too complex to parse safely (longer than `MAX_ANSWER_CHARS`, braces/parentheses
       nested deeper than `MAX_NESTING`, numeric power towers such as `10^{10^{10}}`, U+FFFD) are not
       given to sympy: they can only match by string.
    4. Otherwise symbolic equivalence with math-verify: both sides are parsed as LaTeX only
       (`LatexExtractionConfig`; never `ExprExtractionConfig`, whose `parse_expr` evaluates Python),
       then `math_verify.verify(gold, pred)`. Nothing is ever `eval`-ed or `sympify`-ed from raw text.

Policy for hard cases (math-verify's conventions, pinned by tests/test_verifier.py):
    - Near misses are wrong: 239 vs 240, 0.5 vs 0.50001. Numbers are compared after rounding to 6
      decimal places, so 0.5 vs 0.5000001 counts as equal; 1/3 vs 0.333333 is equal.
    - Percentages: `50\\%` equals both `50` and `0.5` (graders cannot know which the problem meant).
    - `(a, b)` with a < b is read as an open interval on both sides, otherwise as a tuple; since
      both sides are read the same way, a point `(1, 2)` still matches `(1, 2)`, while `[1, 2]`
      (closed) does not match `(1, 2)` and `(2, 1)` does not match `(1, 2)`.
    - An unbracketed list `1, 2` is an unordered set (so `2, 1` matches); `1,000` is one thousand.
    - `x = 3` matches gold `3` (an assignment's right side is the answer); `\\text{(A)}` matches `A`.

Timeouts
    math-verify's own timeouts use `signal.alarm`: they work only on a process's main thread, and
    cannot interrupt a long C-level computation. So `grade_many(..., workers=N)` grades in a pool of
    N worker processes (plain `python -c` subprocesses speaking JSON lines, so the caller's __main__
    is never re-imported; each under an address-space limit). Extraction and the string check
    (grading steps 1-3) run in the calling process (linear time; each distinct gold is unwrapped
    and normalised once per call and process); only pairs that need sympy travel to a worker.
    They travel in batches (`MAX_BATCH_ITEMS` items, about `MAX_BATCH_BYTES` of JSON per message,
    `BATCHES_IN_FLIGHT` messages queued per worker so a worker never waits for the parent; writes
    never block), and a worker replies after each item, so every item keeps its own deadline: an
    item not answered within `timeout_s` of the previous reply (or of reaching an idle worker) is
    False with the reason, its worker is killed and replaced, and the unanswered rest of that
    worker's batches is sent again; a worker that dies is handled the same way. A gold's sympy
    parse is cached apart from the predictions' in every process, so it is parsed once per problem
    (consecutive completions of a problem share a batch). The pool is shared by the whole process:
    it starts on the first pooled call, is reused by every later call (the trainer grades every
    step), is restarted if a call asks for a different number of workers, and is closed by
    `shutdown_pool()` or at interpreter exit. `workers=0` grades in this process (math-verify's
    alarm timeouts on the main thread, none elsewhere): for tests, debugging and trusted inputs.

Extraction modes (`extraction=`, config `verifier.extraction`)
    "boxed" (default, training rewards): the rules above. "free": sgsd/free_extraction.py, for
    grading outputs that were not asked for a box: also the last LaTeX or plain expression, several
    boxes as one set-valued answer, units and currency stripped, thousands separators and decimal
    commas by documented locale rules. Grading is the same in both modes.
"""

from __future__ import annotations

import atexit
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import wait as wait_for_connections

from sgsd.errors import ConfigError, DataError

# A completion longer than this is refused without scanning (about 6x the longest rollouts we make).
MAX_COMPLETION_CHARS = 1_000_000
# An extracted answer longer than this is not an answer (long matrices fit easily).
MAX_ANSWER_CHARS = 1_000
# Brace/bracket/parenthesis nesting above this is never parsed symbolically (sympy cost is
# exponential in nesting: a 16-deep \frac chain takes over 3 s to verify).
MAX_NESTING = 10
# At most this many empty boxes are skipped when looking for the last non-empty one.
MAX_EMPTY_BOXES = 16
# Worker processes may use at most this much address space (a MemoryError is a wrong answer).
WORKER_MEMORY_LIMIT_MB = 3072
# How long a freshly spawned worker may take to import math-verify before the pool gives up.
WORKER_START_TIMEOUT_S = 180.0

_REPLACEMENT = "\ufffd"
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_BOX_COMMANDS = ("\\boxed", "\\fbox")
# verifier.extraction: "boxed" (a box or an explicit answer marker; training rewards) or "free"
EXTRACTION_MODES = ("boxed", "free")


@dataclass(frozen=True)
class GradeResult:
    """The verdict on one completion: `reason` says why (match kind, mismatch, timeout, crash)."""

    correct: bool
    reason: str | None
    extracted: str | None


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def extract_answer(text: str, extraction: str = "boxed") -> str | None:
    """The final answer in a completion, or None: by the rules above (`extraction="boxed"`), or by
    sgsd.free_extraction's (`"free"`: the last LaTeX or plain expression, several boxes as one set,
    units, currency and number separators stripped)."""
    _check_extraction(extraction)
    return _extract(text, extraction)[0]


def _extract(text: str, extraction: str = "boxed") -> tuple[str | None, str | None]:
    """(answer, None) or (None, why there is no answer)."""
    if not isinstance(text, str):
        return None, f"completion is {type(text).__name__}, not text"
    if len(text) > MAX_COMPLETION_CHARS:
        return None, f"completion longer than {MAX_COMPLETION_CHARS:,} characters"
    text = _BAD_CHARS.sub(_REPLACEMENT, text)
    end_think = text.rfind("</think>")
    if end_think >= 0:
        text = text[end_think + len("</think>") :]
    elif "<think>" in text:
        return None, "thinking never closed (no </think>)"
    if extraction == "free":
        from sgsd import free_extraction, verifier

        return free_extraction.extract_free(text, verifier)

    answer, problem, found_box = _last_box(text)
    if answer is not None or problem is not None:
        return answer, problem
    for finder in (_after_final_answer_is, _after_answer_colon, _after_hashes):
        span = finder(text)
        if span is not None:
            cleaned = _clean_answer(span)
            if len(cleaned) > MAX_ANSWER_CHARS:
                return None, f"answer longer than {MAX_ANSWER_CHARS} characters"
            if cleaned:
                return cleaned, None
    if found_box:
        return None, "only empty \\boxed{}"
    return None, "no answer found (no \\boxed{}, 'Answer:', 'final answer is' or '####')"


def _last_box(text: str) -> tuple[str | None, str | None, bool]:
    """The last non-empty box: (answer, None, True), (None, problem, True) when the last box is
    malformed, or (None, None, found_any) when there is no usable box."""
    end = len(text)
    found = False
    for _ in range(MAX_EMPTY_BOXES + 1):
        start, command = max((text.rfind(c, 0, end), c) for c in _BOX_COMMANDS)
        if start < 0:
            return None, None, found
        end = start
        content, problem = _box_content(text, start + len(command))
        if problem is not None:
            return None, problem, True
        if content is None:  # e.g. "\boxedfoo": not a box
            continue
        found = True
        content = _clean_answer(content)
        if content:
            return content, None, True
    return None, f"more than {MAX_EMPTY_BOXES} empty boxes", True


def _box_content(text: str, pos: int) -> tuple[str | None, str | None]:
    """The argument of a box command whose name ends at `pos`: `{...}` or `\\boxed 5`."""
    if pos < len(text) and text[pos] == "{":
        return _braced(text, pos)
    if pos < len(text) and text[pos] == " ":
        m = re.compile(r" +([^\s$]+)").match(text, pos, min(len(text), pos + MAX_ANSWER_CHARS + 64))
        return (m.group(1), None) if m else (None, None)
    return None, None


def _braced(text: str, open_pos: int) -> tuple[str | None, str | None]:
    """Contents of the brace group opening at `open_pos`; scans at most MAX_ANSWER_CHARS + 2."""
    depth = 0
    i = open_pos
    limit = min(len(text), open_pos + MAX_ANSWER_CHARS + 2)
    while i < limit:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i], None
        i += 1
    if limit < len(text):
        return None, f"last \\boxed answer longer than {MAX_ANSWER_CHARS} characters"
    return None, "unbalanced braces in the last \\boxed"


def _rest_of_line(text: str, pos: int) -> str:
    newline = text.find("\n", pos)
    line = text[pos : newline if newline >= 0 else len(text)]
    if not line.strip() and newline >= 0:  # "Answer:\n42"
        following = text.find("\n", newline + 1)
        line = text[newline + 1 : following if following >= 0 else len(text)]
    return line


def _after_final_answer_is(text: str) -> str | None:
    pos = text.lower().rfind("final answer is")
    if pos < 0:
        return None
    span = _rest_of_line(text, pos + len("final answer is"))
    span = span.lstrip(" :*")
    return _cut_sentence(span)


def _after_answer_colon(text: str) -> str | None:
    lower = text.lower()
    pos = max(lower.rfind("answer:"), lower.rfind("answer**:"))
    if pos < 0:
        return None
    colon = lower.find(":", pos)
    return _cut_sentence(_rest_of_line(text, colon + 1).lstrip(" *"))


def _after_hashes(text: str) -> str | None:
    pos = text.rfind("####")
    return None if pos < 0 else _rest_of_line(text, pos + 4)


_SENTENCE_END = re.compile(r"\.(?:\s|$)|\s+I hope it is correct")


def _cut_sentence(span: str) -> str:
    """Cut "5. I hope it is correct." to "5" (a period followed by a space ends the answer)."""
    m = _SENTENCE_END.search(span)
    return span[: m.start()] if m else span


_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))


def _clean_answer(s: str) -> str:
    """Trim the text around an answer: spaces, trailing period, math delimiters, nested boxes."""
    for _ in range(4):
        before = s
        s = s.strip().rstrip(".").strip()
        for left, right in _WRAPPERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
        for command in _BOX_COMMANDS:
            if s.startswith(command + "{") and s.endswith("}"):
                inner, _ = _braced(s, len(command))
                if inner is not None and len(inner) == len(s) - len(command) - 2:
                    s = inner
        if s == before:
            break
    return s


# ---------------------------------------------------------------------------------------------
# String normalisation (pure; also the fallback when symbolic parsing fails)
# ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")
_UNIT_TEXT = re.compile(r"^([-+]?[\d.,]+)\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ./^]*\}$")
_PLAIN_UNIT = re.compile(r"^([-+]?[\d.,]+)\s+[A-Za-z]{2,}(?:\s+[A-Za-z]+)*$")  # "12 dollars"
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|textit)\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\(?:left|right)(?![A-Za-z])|~")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|\\degree|°")


def normalize_answer(s: str) -> str:
    """A canonical string for an answer, by pure text rewriting (never evaluation)."""
    s = _clean_answer(s)
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = s.replace("\\{", "{").replace("\\}", "}")
    s = _UNIT_TEXT.sub(r"\1", s.strip())
    s = _PLAIN_UNIT.sub(r"\1", s)
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = "".join(s.split()).rstrip(".")
    if _NUMBER.fullmatch(s):
        s = _canonical_number(s)
    return s


def _canonical_number(s: str) -> str:
    """'-0,012.500' style numbers to '-12.5': drop thousands commas, leading and trailing zeros."""
    sign = "-" if s.startswith("-") else ""
    s = s.lstrip("+-").replace(",", "")
    whole, _, frac = s.partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    if whole == "0" and not frac:
        sign = ""
    return sign + whole + ("." + frac if frac else "")


# ---------------------------------------------------------------------------------------------
# Judging one (answer, gold) pair
# ---------------------------------------------------------------------------------------------


def gold_answer(gold: str | int | float, extraction: str = "boxed") -> str:
    """The reference answer as text: numbers formatted, a `\\boxed{}` or `#### x` unwrapped (in free
    mode several boxes form one answer, as in completions)."""
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        raise DataError(f"gold answer must be text or a number, got {type(gold).__name__}")
    text = _BAD_CHARS.sub(_REPLACEMENT, gold) if isinstance(gold, str) else repr(gold)
    if any(c in text for c in _BOX_COMMANDS) or "####" in text:
        extracted, _ = _extract(text, extraction)
        text = extracted if extracted is not None else text
    text = _clean_answer(text)
    if not text:
        raise DataError("gold answer is empty")
    return text


def too_complex(answer: str) -> str | None:
    """Why an answer must not reach sympy (see MAX_* constants), or None when it may."""
    if len(answer) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    if _REPLACEMENT in answer:
        return "contains invalid characters"
    depth = deepest = 0
    exponent_depths: list[int] = []  # brace depths at which an exponent group opened
    tower = False
    for i, c in enumerate(answer):
        if c in "{([":
            depth += 1
            deepest = max(deepest, depth)
            if c == "{" and i > 0 and answer[i - 1] == "^":
                exponent_depths.append(depth)
        elif c in "})]":
            if exponent_depths and exponent_depths[-1] == depth:
                exponent_depths.pop()
            depth -= 1
        elif c == "^" and exponent_depths:
            tower = True
    if deepest > MAX_NESTING:
        return f"nested deeper than {MAX_NESTING}"
    letters = re.sub(r"\\[A-Za-z]+", "", answer)
    if (tower or re.search(r"\^\s*\d+\s*\^", answer)) and not re.search(r"[A-Za-z]", letters):
        return "numeric power tower"
    return None


def _judge(answer: str | None, gold: str, seconds: int | None) -> tuple[bool, str]:
    """Grade an extracted answer against a gold answer in this process.

    `seconds` is math-verify's alarm timeout for each parse/verify call (None: no alarm; required
    off the main thread)."""
    if answer is None:
        return False, "no answer"
    decided = _judge_by_string(answer, gold)
    return decided if decided is not None else _judge_symbolically(answer, gold, seconds)


def _judge_by_string(answer: str, gold: str) -> tuple[bool, str] | None:
    """The verdict when string normalisation settles it (equal, or a side too complex for sympy);
    None when the pair needs the symbolic check. Pure and linear-time: the pool's parent runs it."""
    if normalize_answer(answer) == _gold_facts(gold)[0]:
        return True, "equal after normalisation"
    for side, why in (("answer", too_complex(answer)), ("gold", _gold_facts(gold)[1])):
        if why is not None:
            return False, f"strings differ; {side} {why}, not parsed symbolically"
    return None


@lru_cache(maxsize=1024)
def _gold_facts(gold: str) -> tuple[str, str | None]:
    """(normalised gold, why it is too complex or None): computed once per gold per process."""
    return normalize_answer(gold), too_complex(gold)


def _judge_symbolically(answer: str, gold: str, seconds: int | None) -> tuple[bool, str]:
    """math-verify's parse + verify (LaTeX only); the gold's parse is cached once per process."""
    gold_parsed = list(_parse_gold_cached(gold, seconds))
    pred_parsed = list(_parse_latex_cached(answer, seconds))
    if not gold_parsed or not pred_parsed:
        side = "gold" if not gold_parsed else "answer"
        return False, f"strings differ; {side} could not be parsed"
    from math_verify import verify
    from math_verify.errors import TimeoutException

    try:
        same = verify(gold_parsed, pred_parsed, timeout_seconds=seconds, raise_on_error=True)
    except TimeoutException:
        return False, "symbolic comparison timed out"
    except Exception as exc:  # sympy raises many kinds on odd input; any of them is "not equal"
        return False, f"symbolic comparison failed ({type(exc).__name__})"
    return (True, "symbolically equivalent") if same else (False, "not equivalent")


def _parse_latex(answer: str, seconds: int | None) -> tuple:
    from math_verify import LatexExtractionConfig, parse

    config = LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)
    parsed = parse(
        "\\boxed{" + answer + "}",
        extraction_config=[config],
        fallback_mode="no_fallback",
        parsing_timeout=seconds,
    )
    return tuple(parsed)


# Predictions and golds are cached apart, so a flood of distinct predictions never evicts a gold:
# a problem's gold is parsed once per process however many completions of it are graded.
_parse_latex_cached = lru_cache(maxsize=4096)(_parse_latex)
_parse_gold_cached = lru_cache(maxsize=1024)(_parse_latex)


def _alarm_seconds(timeout_s: float) -> int | None:
    """math-verify's per-call alarm (whole seconds, main thread only); parse + verify share the budget."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return max(1, int(timeout_s // 2))


# ---------------------------------------------------------------------------------------------
# Public grading API
# ---------------------------------------------------------------------------------------------


def grade(pred_text: str, gold: str | int | float, timeout_s: float = 5.0, extraction: str = "boxed") -> bool:
    """Whether a completion's final answer equals the gold answer (in this process)."""
    return grade_one(pred_text, gold, timeout_s, extraction).correct


def reward(
    pred_text: str, gold: str | int | float, timeout_s: float = 5.0, extraction: str = "boxed"
) -> float:
    """+1.0 for a correct completion, -1.0 otherwise (the paper's r)."""
    return 1.0 if grade(pred_text, gold, timeout_s, extraction) else -1.0


def grade_one(
    pred_text: str, gold: str | int | float, timeout_s: float = 5.0, extraction: str = "boxed"
) -> GradeResult:
    """Grade one completion in this process, with the reason and the extracted answer."""
    _check_extraction(extraction)
    gold_text = gold_answer(gold, extraction)
    answer, problem = _extract(pred_text, extraction)
    if answer is None:
        return GradeResult(False, problem, None)
    try:
        correct, reason = _judge(answer, gold_text, _alarm_seconds(timeout_s))
    except Exception as exc:
        correct, reason = False, f"grader error ({type(exc).__name__})"
    return GradeResult(correct, reason, answer)


def grade_many(
    pairs: Iterable[tuple[str, str | int | float]],
    timeout_s: float = 5.0,
    workers: int = 2,
    extraction: str = "boxed",
) -> list[GradeResult]:
    """Grade (completion, gold) pairs; each item is bounded by `timeout_s` when `workers` > 0.

    Extraction and the string check run here (linear time; each distinct gold is prepared once);
    only pairs that need sympy go to the shared process pool (see the module docstring), where a
    hung or crashing item is False with its reason and the rest go on. `workers=0` grades in this
    process. `extraction` is "boxed" (training rewards) or "free" (see `extract_answer`). Results
    are in input order."""
    if not timeout_s > 0:
        raise ConfigError(f"verifier timeout must be positive, got {timeout_s}")
    if workers < 0:
        raise ConfigError(f"verifier workers must be >= 0, got {workers}")
    _check_extraction(extraction)
    pairs = list(pairs)
    gold_texts: dict = {}  # each distinct gold is unwrapped once, not once per completion
    results: list[GradeResult | None] = [None] * len(pairs)
    jobs = []  # (index, answer, gold) pairs that need the symbolic check
    for i, (pred, gold) in enumerate(pairs):
        key = (type(gold), gold)
        if key not in gold_texts:
            gold_texts[key] = gold_answer(gold, extraction)
        answer, problem = _extract(pred, extraction)
        if answer is None:
            results[i] = GradeResult(False, problem, None)
            continue
        try:
            decided = _judge_by_string(answer, gold_texts[key])
        except Exception as exc:  # pure string code; kept as defensive as the symbolic path
            decided = (False, f"grader error ({type(exc).__name__})")
        if decided is not None:
            results[i] = GradeResult(*decided, answer)
        else:
            jobs.append((i, answer, gold_texts[key]))
    if workers == 0:
        seconds = _alarm_seconds(timeout_s)
        for i, answer, gold in jobs:
            try:
                correct, reason = _judge_symbolically(answer, gold, seconds)
            except Exception as exc:
                correct, reason = False, f"grader error ({type(exc).__name__})"
            results[i] = GradeResult(correct, reason, answer)
    elif jobs:
        with _pool_lock:
            verdicts = _shared_pool(workers).judge([(a, g) for _, a, g in jobs], timeout_s)
        for (i, answer, _), (correct, reason) in zip(jobs, verdicts, strict=True):
            results[i] = GradeResult(correct, reason, answer)
    return results  # type: ignore[return-value]


def _check_extraction(extraction: str) -> None:
    if extraction not in EXTRACTION_MODES:
        raise ConfigError(
            f"verifier extraction must be one of {', '.join(EXTRACTION_MODES)}, got {extraction!r}"
        )


# ---------------------------------------------------------------------------------------------
# The process pool
# ---------------------------------------------------------------------------------------------

_WORKER_COMMAND = "from sgsd.verifier import _worker_main; _worker_main()"
# A batch message holds at most this many items and about this many bytes of JSON (or one item).
MAX_BATCH_ITEMS = 32
MAX_BATCH_BYTES = 8192
# Batch messages sent to a worker and not yet fully answered (the next one waits in its pipe).
BATCHES_IN_FLIGHT = 2


def _worker_main() -> None:
    """Worker loop over stdin/stdout JSON lines. The first line out is "ready". Each line in is a
    batch [timeout_s, [[answer, gold], ...]]; each item's verdict [correct, reason] is written and
    flushed as soon as it is judged, in order (the parent times every item from the previous
    reply). Exits when stdin closes."""
    import json
    import os
    import sys

    try:
        import resource

        limit = int(os.environ.get("SGSD_GRADER_MEMORY_MB", WORKER_MEMORY_LIMIT_MB)) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass  # not enforceable on this platform; the parent's deadline still bounds the item
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (imported before "ready", so deadlines exclude it)

    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        timeout_s, items = json.loads(line)
        seconds = max(1, int(timeout_s // 2))
        for answer, gold in items:
            try:
                verdict = _judge(answer, gold, seconds)
            except Exception as exc:
                verdict = (False, f"grader error ({type(exc).__name__})")
            out.write(json.dumps(list(verdict)) + "\n")
            out.flush()


class _Worker:
    """One grading subprocess (a plain `python -c`, so the caller's __main__ is never re-imported).

    `outstanding` holds the job indices sent (or queued in `outbox`) and not yet answered, in the
    order the worker judges them; `batches` the item count of each message among them; the first
    outstanding item is the one being judged, timed from `started`. Writes never block: bytes the
    pipe does not take wait in `outbox`."""

    def __init__(self, memory_limit_mb: int):
        import os
        import subprocess
        import sys
        from pathlib import Path

        env = dict(os.environ, SGSD_GRADER_MEMORY_MB=str(memory_limit_mb))
        package_root = str(Path(__file__).resolve().parent.parent)  # so `import sgsd` finds this copy
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_COMMAND],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        os.set_blocking(self.process.stdin.fileno(), False)
        self.spawned = time.monotonic()
        self.ready = False
        self.outstanding: deque[int] = deque()
        self.batches: deque[int] = deque()
        self.started = math.inf
        self.outbox = bytearray()
        self.inbox = bytearray()
        self.eof = False

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def send(self, jobs: list[int], message) -> None:
        import json

        if not self.outstanding:
            self.started = time.monotonic()
        self.outstanding.extend(jobs)
        self.batches.append(len(jobs))
        self.outbox += (json.dumps(message) + "\n").encode()
        self.flush()

    def flush(self) -> None:
        """Write what the pipe takes now; a dead worker is noticed by its EOF on stdout."""
        import os

        if self.outbox:
            try:
                written = os.write(self.process.stdin.fileno(), self.outbox)
            except BlockingIOError:
                return
            except OSError:  # broken pipe: the worker died
                self.outbox.clear()
                return
            del self.outbox[:written]

    def receive(self) -> list:
        """The complete messages available now (call when readable); sets `eof` when it is gone."""
        import json
        import os

        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            self.eof = True
        self.inbox += chunk
        *lines, rest = self.inbox.split(b"\n")
        self.inbox = bytearray(rest)
        return [json.loads(line) for line in lines if line.strip()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        self.process.stdin.close()
        self.process.stdout.close()


class GraderPool:
    """Worker processes that judge (answer, gold) pairs, sent in batches (a few messages in flight
    per worker, so a worker never waits for the parent) while every item keeps its own hard
    deadline: an item not answered within `timeout_s` of the previous reply (or of its batch
    reaching an idle worker) is False, its worker is killed and replaced, and the unanswered rest
    of that worker's batches is sent again. A worker that dies is handled the same way. Not
    thread-safe."""

    def __init__(self, workers: int = 2, memory_limit_mb: int = WORKER_MEMORY_LIMIT_MB):
        if workers < 1:
            raise ConfigError(f"a grader pool needs at least 1 worker, got {workers}")
        self._memory_limit_mb = memory_limit_mb
        self._workers = [_Worker(memory_limit_mb) for _ in range(workers)]
        self.replaced = 0  # workers killed or lost and replaced so far

    @property
    def size(self) -> int:
        return len(self._workers)

    def judge(
        self, items: Sequence[tuple[str, str]], timeout_s: float, batch_items: int | None = None
    ) -> list[tuple[bool, str]]:
        """Verdicts (correct, reason) for extracted (answer, gold) pairs, in order.

        Items are batched in order, so consecutive completions of one problem usually share a
        worker and their gold is parsed there once. A batch holds `batch_items` items, or by default
        a quarter of the remaining queue's share per worker (at most MAX_BATCH_ITEMS): batches
        shrink towards the end, so the workers finish together."""
        import json

        results: list[tuple[bool, str] | None] = [None] * len(items)
        queue = deque(range(len(items)))
        while queue or any(w.outstanding for w in self._workers):
            for w in self._workers:
                while w.ready and queue and len(w.batches) < BATCHES_IN_FLIGHT:
                    jobs, size = [], 0
                    limit = batch_items or max(1, min(MAX_BATCH_ITEMS, -(-len(queue) // (4 * self.size))))
                    while queue and len(jobs) < limit and (not jobs or size < MAX_BATCH_BYTES):
                        jobs.append(queue.popleft())
                        size += len(json.dumps(items[jobs[-1]]))
                    w.send(jobs, [timeout_s, [list(items[j]) for j in jobs]])
                w.flush()
            now = time.monotonic()
            wake = min([w.started + timeout_s for w in self._workers if w.outstanding] + [now + 1.0])
            if any(w.outbox for w in self._workers):
                wake = min(wake, now + 0.01)  # a full pipe: try again soon
            readable = wait_for_connections(self._workers, timeout=max(0.0, wake - now))
            for w in list(self._workers):
                self._service(w, w in readable, results, queue, timeout_s)
        return results  # type: ignore[return-value]

    def _service(self, w: _Worker, readable: bool, results: list, queue: deque, timeout_s: float) -> None:
        """Collect a worker's replies, or enforce its deadline / start-up limit."""
        for message in w.receive() if readable else []:
            if message == "ready":
                w.ready = True
                continue
            job = w.outstanding.popleft()
            results[job] = (bool(message[0]), str(message[1]))
            w.batches[0] -= 1
            if not w.batches[0]:
                w.batches.popleft()
            w.started = time.monotonic()
        if w.eof:
            code = w.process.wait(timeout=5)
            if not w.ready:
                raise RuntimeError(f"grader worker exited while starting (exit code {code})")
            self._replace(w, f"grader process died (exit code {code})", results, queue)
        elif w.outstanding and time.monotonic() >= w.started + timeout_s:
            self._replace(w, f"timed out after {timeout_s:g} s (grader process replaced)", results, queue)
        elif not w.ready and time.monotonic() - w.spawned > WORKER_START_TIMEOUT_S:
            raise RuntimeError(f"grader worker did not start within {WORKER_START_TIMEOUT_S:g} s")

    def _replace(self, w: _Worker, reason: str, results: list, queue: deque) -> None:
        """The item being judged fails with `reason`; the rest of the worker's items go back to the
        front of the queue, in order; a fresh worker takes its place."""
        if w.outstanding:
            results[w.outstanding.popleft()] = (False, reason)
            queue.extendleft(reversed(w.outstanding))
        w.stop()
        self._workers[self._workers.index(w)] = _Worker(self._memory_limit_mb)
        self.replaced += 1

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        for w in self._workers:
            w.stop()
        self._workers = []

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_pool: GraderPool | None = None
_pool_lock = threading.Lock()


def _shared_pool(workers: int) -> GraderPool:
    """The process-wide pool with `workers` processes (started, or restarted at a new size)."""
    global _pool
    if _pool is not None and _pool.size != workers:
        _pool.close()
        _pool = None
    if _pool is None:
        _pool = GraderPool(workers)
    return _pool


def shutdown_pool() -> None:
    """Close the shared pool; the next pooled `grade_many` starts a new one. Runs at exit."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


atexit.register(shutdown_pool)
