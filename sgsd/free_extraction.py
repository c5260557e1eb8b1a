"""Free-text answer extraction (`verifier.extraction: free`): for grading outputs that were not asked
to box their answer (other models' completions, GSM8K-style prose). Training rewards keep the strict
`boxed` mode: there a trailing number in a truncated rollout must not earn a reward.

The conventions follow math-verify's documentation (format-agnostic retrieval of the last LaTeX or
plain expression, several boxes read as one set, units in text and currency dropped, percentages
kept); the code is ours and keeps the boxed path's safety: pure text rewriting, every scan linear
or bounded, nothing evaluated. Applied to the text after the last `</think>` (an unclosed `<think>`
still has no answer), the first rule that yields an answer wins:

1. Boxes. The last non-empty `\\boxed{}`/`\\fbox{}`, together with the boxes right before it when
   only connectors separate them (spaces, `,` `;` `$`, "and", "or", `\\quad`, `\\text{ and }`, a
   `x =` label): `\\boxed{(2, 2)} and \\boxed{(6, 2)}` is the one answer `(2, 2), (6, 2)`. A
   malformed last box is no answer, as in boxed mode.
2. Anchors, last occurrence: "final answer is", "answer:", "####", and "answer" / "the answer is"
   directly followed by math ("Answer $ 9 $", "the answer is 12 apples").
3. The last LaTeX environment (`$..$`, `$$..$$`, `\\(..\\)`, `\\[..\\]`) whose content is not prose
   (paired from a paragraph break in the last `ENV_SCAN_CHARS` characters), or the last plain
   number, tuple or relation in the last `TAIL_CHARS` characters ("x = 5", "-3/4",
   "7,425,000", "12%", "x ≥ 3"), whichever ends later.

Every candidate is then cleaned (`clean_free_answer`): math delimiters and a leading ":", "is" or
"="; currency (`\\$`, a stray `$`, €, £, ¥, ₹, USD, EUR, Rs); units after a number (1-4 words
such as "cm", "square meters", "apples", or a `\\text{}`/`\\mathrm{}`/`\\mbox{}` group, with `^2`
or `²`); a trailing parenthetical remark; unicode math signs (− ≤ ≥ ≠ × · ÷ π ∞) to LaTeX; and
number separators, by these locale rules:
    thousands  7,425,000 / 1 000 / 1\\,000 / 1{,}000 / 1'000 (groups of exactly three digits after
               a first group of 1-3 digits not starting with 0)        -> 7425000, 1000
    European   1.234.567,89 (dots as thousands, then a decimal comma)   -> 1234567.89
    decimal    3,14 / 0,5 / 0,125 / 2,5% when the whole answer is that one number and the comma is
               not followed by exactly three digits after a 1-3 digit group -> 3.14, 0.5, 0.125
    so "1,234" stays one thousand two hundred thirty-four (English, as in boxed mode), while
    "(1,5)" or "1, 5" stay pairs or lists.
"""

from __future__ import annotations

import re
from collections import deque

# Plain expressions are looked for only in the completion's last characters (the answer is at the
# end; this also bounds the scan of hostile input).
TAIL_CHARS = 4_000
# Math environments are paired from a paragraph break within the last this many characters (a
# bounded scan; an environment never spans a blank line in practice).
ENV_SCAN_CHARS = 65_536
# At most this many boxes are joined into one set-valued answer.
MAX_JOINED_BOXES = 16

_ENV_TOKEN = re.compile(r"\\[()\[\]]|\\.|\$\$|\$", re.S)
_ENV_CLOSE = {"$": "$", "$$": "$$", "\\(": "\\)", "\\[": "\\]"}

# what may stand between two boxes of one answer
_BOX_GAP = re.compile(
    r"[\s,;.$]*(?:(?:and|or|&|\\quad|\\qquad|\\text\{\s*(?:and|or|,)?\s*\})[\s,;$]*)?"
    r"(?:[A-Za-z](?:_\{?\w{1,3}\}?)?\s*=\s*\$?\s*)?",
    re.I,
)

_NUM = (
    r"(?:[1-9]\d{0,2}(?:(?:,|[ \u00a0\u2009\u202f']|\\,|\{,\})\d{3})+(?!\d)(?:\.\d+)?"
    r"|[1-9]\d{0,2}(?:\.\d{3})+,\d+"
    r"|\d+(?:[.,]\d+)?|\.\d+)"
)
_GLUED_UNITS = r"(?:cm|mm|km|kg|mg|ml|mL|ft|mph|kph|lbs?|oz|hrs?|min|sec|m|g|s|h|L)\b"
_SIGNED = r"[-−+]?(?:\d+(?:\.\d+)?|\.\d+|\\infty|∞)"
_PLAIN = re.compile(
    r"(?<![\w\\])[(\[]\s*" + _SIGNED + r"(?:\s*,\s*" + _SIGNED + r")+\s*[)\]]"  # (1, 5), [2, 3)
    r"|(?:(?<![A-Za-z\\])[A-Za-z](?:_\{?\w{1,3}\}?)?\s*(?:=|<=|>=|<|>|≤|≥|≠|\\leq?|\\geq?|\\neq)\s*)?"
    r"(?<![\w.,^_{])[-−+]?" + _NUM + r"(?:\s*/\s*" + _NUM + r")?(?:\s*\\?%)?"
    r"(?:(?![A-Za-z\d])|(?=" + _GLUED_UNITS + r"))"
)
_MATH_START = r"(?=[$\d(\[{+\-−.]|\\[(\[]|\\(?:frac|dfrac|sqrt)\b)"
# "the answer is 12", "answer = 3", "Answer $ 9 $" (a bare "answer 3" is prose: "to answer 3 questions")
_ANSWER_THEN_MATH = re.compile(
    r"\banswer(?:\s+is\s*[:=]?|\s*[:=])\s*" + _MATH_START + r"|\banswer\s*(?=\$|\\[(\[])", re.I
)

_UNICODE = {
    "−": "-", "–": "-", "≤": "\\le ", "≥": "\\ge ", "≠": "\\ne ", "×": "\\times ", "·": "\\cdot ",
    "÷": "\\div ", "π": "\\pi ", "∞": "\\infty ", "√": "\\sqrt ", "²": "^2", "³": "^3",
}  # fmt: skip
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))
_CURRENCY_LEFT = re.compile(
    r"^(?:\\\$|\$|€|£|¥|₹|US\$|USD\s*|EUR\s*|Rs\.?\s*|\\euro\b\s*|\\pounds\b\s*|\\textdollar\b\s*)\s*(?=[-−+]?[\d.])"
)
_RELATION_LEFT = r"(?:[A-Za-z](?:_\{?\w{1,3}\}?)?\s*(?:=|\\approx|≈)\s*)?"
_CURRENCY_AFTER_REL = re.compile(r"^(" + _RELATION_LEFT + r")(?:\\\$|\$|€|£|¥|₹)\s*(?=[-−+]?[\d.])")
_CURRENCY_RIGHT = re.compile(r"(?<=\d)\s*(?:€|£|¥|₹|\\euro|USD|EUR)\s*$")
_NOT_UNITS = {"and", "or", "to", "pi", "i", "e", "x", "y", "z", "n", "k", "a", "b", "c", "is", "per"}
_UNIT_WORD = r"[A-Za-z][A-Za-z.]*(?:\s*/\s*[A-Za-z]+)?(?:\^\{?[23]\}?)?"
_UNIT_WORDS = re.compile(r"(?<=[\d%])\s*(" + _UNIT_WORD + r"(?:\s+" + _UNIT_WORD + r"){0,3})\s*$")
_UNIT_GROUP = re.compile(
    r"(?<=[\d%}])\s*(?:\\[,;:! ]|~|\s)*\\(?:text|mathrm|mbox|textrm|rm)\s*\{[^{}\d]*\}(?:\^\{?[23]\}?)?\s*$"
)
_DEGREES = re.compile(r"(?<=\d)\s*(?:°|\^\s*\{?\\circ\}?)\s*[CF]?\s*$")
_REMARK = re.compile(r"(?<=\S)\s*\([A-Za-z]{2,}[A-Za-z ,.'-]*\)\s*$")  # "4 (rounded)", not "(C)"
_THOUSANDS = re.compile(
    r"(?<![\d.,])[1-9]\d{0,2}(?:(?:,|[ \u00a0\u2009\u202f']|\\[,;:! ]|~|\{,\})\d{3})+(?![\d,])"
)
_EUROPEAN = re.compile(r"(?<![\d.,])([1-9]\d{0,2}(?:\.\d{3})+),(\d+)(?![\d.,])")
_DECIMAL_COMMA = re.compile(r"([-+]?)(\d+),(\d+)(\s*\\?%)?")
_PROSE = re.compile(r"[A-Za-z]{3,}")
_COMMAND_OR_TEXT = re.compile(
    r"\\(?:text|mathrm|mbox|textbf|textit|begin|end|operatorname)\s*\{[^{}]*\}|\\[A-Za-z]+"
)


def extract_free(text: str, verifier) -> tuple[str | None, str | None]:
    """(answer, None) or (None, why) for text already past the `</think>` check. `verifier` is the
    sgsd.verifier module (its box scanner and anchor finders are shared with boxed mode)."""
    answer, problem = _boxes(text, verifier)
    if answer is not None or problem is not None:
        return answer, problem
    span = None
    for finder in (verifier._after_final_answer_is, verifier._after_answer_colon, verifier._after_hashes):
        span = finder(text)
        if span is not None and span.strip():
            break
    if span is None or not span.strip():
        tail = text[-TAIL_CHARS:]
        last = None
        for last in _ANSWER_THEN_MATH.finditer(tail):  # noqa: B007  (the last match is wanted)
            pass
        if last is not None:
            span = verifier._cut_sentence(verifier._rest_of_line(tail, last.end()))
    if span is not None and span.strip():
        return _checked(_from_span(span, verifier), verifier)
    return _checked(_last_expression(text, verifier), verifier)


def _checked(answer: str | None, verifier) -> tuple[str | None, str | None]:
    if answer is None or not answer:
        return None, "no answer found (no box, answer marker, LaTeX or number)"
    if len(answer) > verifier.MAX_ANSWER_CHARS:
        return None, f"answer longer than {verifier.MAX_ANSWER_CHARS} characters"
    return answer, None


def _boxes(text: str, verifier) -> tuple[str | None, str | None]:
    """The last box joined with the boxes right before it that only connectors separate."""
    answer, problem, _ = verifier._last_box(text)  # boxed mode's verdict on the last box
    if answer is None:
        return None, problem
    parts: list[tuple[int, str]] = []  # (start, cleaned content), last box first
    end, empty = len(text), 0
    while len(parts) < MAX_JOINED_BOXES:
        start, command = max((text.rfind(c, 0, end), c) for c in verifier._BOX_COMMANDS)
        if start < 0:
            break
        end = start
        content, bad = verifier._box_content(text, start + len(command))
        if bad is not None or content is None:
            if parts:
                break
            continue
        box_end = _box_end(text, start + len(command), content)
        cleaned = clean_free_answer(verifier._clean_answer(content))
        if not cleaned:
            empty += 1
            if parts or empty > verifier.MAX_EMPTY_BOXES:
                break
            continue
        if parts and (box_end > parts[-1][0] or not _BOX_GAP.fullmatch(text, box_end, parts[-1][0])):
            break
        parts.append((start, cleaned))
    return (", ".join(p for _, p in reversed(parts)) if parts else answer), None


def _box_end(text: str, pos: int, content: str) -> int:
    """Where a box whose argument starts at `pos` ends."""
    if pos < len(text) and text[pos] == "{":
        return pos + len(content) + 2
    return text.find(content, pos) + len(content)


def _envs(text: str):
    """(start, end, content_start, content_end) of each complete math environment, in order (one
    linear scan)."""
    opener, open_at, content_at = None, 0, 0
    for m in _ENV_TOKEN.finditer(text):
        token = m.group()
        if opener is None:
            if token in _ENV_CLOSE:
                opener, open_at, content_at = token, m.start(), m.end()
        elif token == _ENV_CLOSE[opener]:
            yield open_at, m.end(), content_at, m.start()
            opener = None


def _is_prose(s: str) -> bool:
    return bool(_PROSE.search(_COMMAND_OR_TEXT.sub(" ", s)))


def _from_span(span: str, verifier) -> str | None:
    """The answer in the text after an anchor: a leading math environment, the whole span when it
    is not prose, else the first math environment or plain expression in it."""
    span = span[: 2 * verifier.MAX_ANSWER_CHARS].strip().lstrip(":=").strip()
    if span.lower().startswith("is "):
        span = span[3:]
    env = next(_envs(span), None)
    if env is not None and not span[: env[0]].strip():
        return clean_free_answer(span[env[2] : env[3]])
    cleaned = clean_free_answer(verifier._clean_answer(span))
    if not _is_prose(cleaned):
        return cleaned
    plain = _PLAIN.search(span)
    firsts = []
    if env is not None:
        firsts.append((env[0], span[env[2] : env[3]]))
    if plain is not None:
        firsts.append((plain.start(), plain.group()))
    return clean_free_answer(min(firsts)[1]) if firsts else cleaned


def _last_expression(text: str, verifier) -> str | None:
    """The last non-prose math environment or the last plain expression, whichever ends later."""
    env = None
    scan_from = 0
    if len(text) > ENV_SCAN_CHARS:
        scan_from = len(text) - ENV_SCAN_CHARS
        paragraph = text.find("\n\n", scan_from)
        scan_from = paragraph + 2 if paragraph >= 0 else scan_from
    recent = deque(_envs(text[scan_from:]), maxlen=8)  # the last few are enough
    for _, end, first, last in reversed(recent):
        content = text[scan_from + first : scan_from + last]
        end += scan_from
        if len(content) <= verifier.MAX_ANSWER_CHARS and content.strip() and not _is_prose(content):
            env = (end, content)
            break
    offset = max(0, len(text) - TAIL_CHARS)
    plain = None
    for m in _PLAIN.finditer(text, offset):
        plain = (m.end(), m.group())
    best = max((c for c in (env, plain) if c is not None), default=None, key=lambda c: c[0])
    return None if best is None else clean_free_answer(best[1])


def clean_free_answer(s: str) -> str:
    """Free mode's clean-up of an extracted answer (see the module docstring). Pure text rewriting."""
    from sgsd.verifier import MAX_ANSWER_CHARS, _clean_answer

    if len(s) > 2 * MAX_ANSWER_CHARS:
        return s  # too long to be an answer: refused by the caller
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group()], s)
    s = s.replace("\u00a0", " ").replace("\u2009", " ").replace("\u202f", " ")
    for _ in range(3):
        before = s
        s = _clean_answer(s).lstrip(":").strip()
        if s.lower().startswith("is "):
            s = s[3:]
        s = _REMARK.sub("", s)
        s = _CURRENCY_LEFT.sub("", s)
        s = _CURRENCY_AFTER_REL.sub(r"\1", s)
        s = _CURRENCY_RIGHT.sub("", s)
        s = _UNIT_GROUP.sub("", s)
        s = _DEGREES.sub("", s)
        m = _UNIT_WORDS.search(s)
        if m and not {w.lower() for w in re.findall(r"[A-Za-z]+", m.group(1))} & _NOT_UNITS:
            glued = not s[m.start() : m.start(1)].strip() and m.start() == m.start(1)
            if not glued or re.fullmatch(_GLUED_UNITS, m.group(1).strip()):
                s = s[: m.start()]
        if s == before:
            break
    s = _EUROPEAN.sub(lambda m: m.group(1).replace(".", "") + "." + m.group(2), s)
    s = _THOUSANDS.sub(lambda m: re.sub(r"\D", "", m.group()), s)
    m = _DECIMAL_COMMA.fullmatch(s.strip())
    if m and not (re.fullmatch(r"[1-9]\d{0,2}", m.group(2)) and len(m.group(3)) == 3):
        s = f"{m.group(1)}{m.group(2)}.{m.group(3)}{m.group(4) or ''}"
    return s.strip()
