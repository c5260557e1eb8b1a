"""Free-text answer extraction (`verifier.extraction: free`): for grading outputs that were not asked
to box their answer (other models' completions, GSM8K-style prose). Training rewards keep the strict
`boxed` mode: there a trailing number in a truncated rollout must not earn a reward.

The conventions follow math-verify's documentation (format-agnostic retrieval of the last LaTeX or
plain expression, several boxes read as one set, units in text and currency dropped, percentages
kept); the code is ours and keeps the boxed path's safety: pure text rewriting, every scan linear
or bounded, nothing evaluated. Applied to the text after the last `</think>` (an unclosed `<think>`
still has no answer), the first rule that yields an answer wins:

1. An anchor (see 3) that comes after the last box: "\\boxed{255} ... The final answer is $10,455$".
2. Boxes. The last non-empty `\\boxed{}`/`\\fbox{}`, joined with the boxes right before it when only
   connectors separate them (spaces, `,` `;` `$`, "and", "or", `\\quad`, `\\text{ and }`, math
   delimiters, `x =` labels): `\\boxed{(2, 2)} and \\boxed{(6, 2)}` is the one answer
   `(2, 2), (6, 2)`; prose between boxes ("Wait, ...") keeps only the last. A malformed last box is
   no answer, as in boxed mode.
3. Anchors, last occurrence, ranked as in boxed mode: "final answer is", "answer:", "####", then
   "the answer is" / "answer =" / "Answer $" followed by math. A math environment right after the
   anchor is the answer (a display one may span lines); otherwise the rest of the sentence, or
   when that is prose, its last math environment or plain expression ("The largest $n$ is 34.").
4. A completion that is one short LaTeX expression without delimiters ("\\frac{10}{9}").
5. The last LaTeX environment (`$..$`, `$$..$$`, `\\(..\\)`, `\\[..\\]`; inline ones never span
   lines) whose content is not prose (two or more words), paired from a paragraph break in the
   last `ENV_SCAN_CHARS` characters, or the last plain number, tuple or relation in the last
   `TAIL_CHARS` characters ("x = 5", "-3/4", "(1, 5)", "7,425,000", "12%", "x ≥ 3"), whichever
   ends later.

Every candidate is then cleaned (`clean_free_answer`): math delimiters and a leading ":", "is" or
"="; currency (`\\$`, a stray `$`, €, £, ¥, ₹, USD, EUR, Rs); units after a number (1-4 words such
as "cm", "square meters", "apples", a known unit glued to it as in "5cm", or a
`\\text{}`/`\\mathrm{}`/`\\mbox{}` group, with `^2` or `²`); degrees; a trailing parenthetical
remark ("4 (rounded)"); unicode math signs (− ≤ ≥ ≠ × · ÷ π ∞ √) to LaTeX; and number separators,
by these locale rules:
    thousands  1 000 / 1\\,000 / 1{,}000 / 1'000 (groups of exactly three digits after a first
               group of 1-3 digits not starting with 0) anywhere; 7,425,000 when the whole answer
               is that number ("(12,102)" is a pair)                      -> 1000, 7425000
    decimal    in plain text only, when the whole answer is that number: 3,14 / 0,5 / 2,5% /
               1.234,56 (dots as thousands, then a decimal comma)         -> 3.14, 0.5, 2.5%, 1234.56
               "1,234" stays one thousand two hundred thirty-four (English, as in boxed mode)
    LaTeX      a comma separates list items ("\\boxed{-2,1}" is two roots); `0{,}25` is 0.25
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

# what may stand between two boxes of one answer: a run of connectors and labels ("x =")
_BOX_GAP = re.compile(
    r"(?:[\s,;.$&]|\\(?:quad|qquad|[,;:! ()\[\]])|\\text\{\s*(?:and|or|,|;)?\s*\}|\b(?:and|or)\b"
    r"|[A-Za-z](?:_\{?\w{1,3}\}?)?\s*=)*",
    re.I,
)

_NUM = (
    r"(?:[1-9]\d{0,2}(?:(?:,|[ \u00a0\u2009\u202f']|\\,|\{,\})\d{3})+(?!\d)(?:\.\d+)?"
    r"|[1-9]\d{0,2}(?:\.\d{3})+,\d+"
    r"|\d+(?:[.,]\d+)?|\.\d+)"
)
_GLUED_UNITS = r"(?:cm|mm|km|kg|mg|ml|mL|ft|mph|kph|lbs?|oz|hrs?|min|sec|m|g|s|h|L)(?![A-Za-z])"
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
_REMARK = re.compile(r"(?<=\S)\s*\([A-Za-z]{2,}[^()]*\)\s*$")  # "4 (rounded)", "5 (not 6)"; not "(C)"
_THOUSANDS = re.compile(
    r"(?<![\d.,])[1-9]\d{0,2}(?:(?:[ \u00a0\u2009\u202f']|\\[,;:! ]|~|\{,\})\d{3})+(?![\d,])"
)
# comma thousands only when the whole answer is that number: in "(12,102)" the comma separates
_COMMA_THOUSANDS = re.compile(
    r"(" + _RELATION_LEFT + r"[-+]?)([1-9]\d{0,2}(?:,\d{3})+)((?:\.\d+)?(?:\s*\\?%)?)"
)
_LATEX_DECIMAL_COMMA = re.compile(r"(?<=\d)\{,\}(?=\d)")  # 0{,}25 (after thousands were taken)
_EUROPEAN = re.compile(r"(?<![\d.,])([1-9]\d{0,2}(?:\.\d{3})+),(\d+)(?![\d.,])")
_DECIMAL_COMMA = re.compile(r"([-+]?)(\d+),(\d+)(\s*\\?%)?")
_WORD = re.compile(r"[A-Za-z]{3,}")
_COMMAND_OR_TEXT = re.compile(
    r"\\(?:text|mathrm|mbox|textbf|textit|begin|end|operatorname)\s*\{[^{}]*\}|\\[A-Za-z]+"
)


def extract_free(text: str, verifier) -> tuple[str | None, str | None]:
    """(answer, None) or (None, why) for text already past the `</think>` check. `verifier` is the
    sgsd.verifier module (its box scanner and helpers are shared with boxed mode)."""
    start = _anchor_end(text, verifier)
    last_box = max(text.rfind(c) for c in verifier._BOX_COMMANDS)
    if start is not None and start > last_box >= 0:  # "\\boxed{255} ... The final answer is $10,455$"
        answer = _after_anchor(text, start, verifier)
        if answer:
            return _checked(answer, verifier)
    answer, problem = _boxes(text, verifier)
    if answer is not None or problem is not None:
        return answer, problem
    if start is not None:
        answer = _after_anchor(text, start, verifier)
        if answer:
            return _checked(answer, verifier)
    return _checked(_bare_latex(text) or _last_expression(text, verifier), verifier)


def _anchor_end(text: str, verifier) -> int | None:
    """Where the answer after the best anchor starts: "final answer is", then "answer:", then "####"
    (boxed mode's ranking), then "the answer is" / "Answer $" followed by math; the last occurrence
    of each. None without an anchor followed by text."""
    lower = text.lower()
    candidates = []
    pos = lower.rfind("final answer is")
    candidates.append(pos + len("final answer is") if pos >= 0 else -1)
    pos = max(lower.rfind("answer:"), lower.rfind("answer**:"))
    candidates.append(lower.find(":", pos) + 1 if pos >= 0 else -1)
    pos = text.rfind("####")
    candidates.append(pos + 4 if pos >= 0 else -1)
    offset = max(0, len(text) - TAIL_CHARS)
    last = None
    for last in _ANSWER_THEN_MATH.finditer(text, offset):  # noqa: B007  (the last match is wanted)
        pass
    candidates.append(last.end() if last is not None else -1)
    for start in candidates:
        if start >= 0 and verifier._rest_of_line(text, start).strip(" *:"):
            return start
    return None


def _after_anchor(text: str, start: int, verifier) -> str | None:
    """A math environment right after the anchor (it may span lines), else the rest of the line."""
    rest = text[start : start + 2 * verifier.MAX_ANSWER_CHARS].lstrip(" \t*:=\n")
    env = next(_envs(rest), None)
    if env is not None and env[0] == 0:
        return clean_free_answer(rest[env[2] : env[3]])
    span = verifier._rest_of_line(text, start).lstrip(" :*")
    return _from_span(verifier._cut_sentence(span), verifier)


def _bare_latex(text: str) -> str | None:
    """A completion that is one short LaTeX expression without delimiters: "\\frac{10}{9}"."""
    s = text.strip()
    if len(s) > 200 or "\\" not in s or any(d in s for d in ("$", "\\(", "\\[")) or _is_prose(s):
        return None
    return clean_free_answer(s)


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
            inline_on_lines = opener in ("$", "\\(") and "\n" in text[content_at : m.start()]
            if not inline_on_lines:  # inline math never spans lines; display math may
                yield open_at, m.end(), content_at, m.start()
            opener = None


def _is_prose(s: str) -> bool:
    """Two or more words of 3+ letters outside LaTeX commands and \\text{} ("$odd$" is an answer)."""
    words = _WORD.finditer(_COMMAND_OR_TEXT.sub(" ", s))
    return next(words, None) is not None and next(words, None) is not None


def _from_span(span: str, verifier) -> str | None:
    """The answer in one line of text after an anchor: a leading math environment, the whole span
    when it is not prose, else the last math environment or plain expression in it ("Final
    Answer: The largest $n$ is 34." -> 34)."""
    span = span[: 2 * verifier.MAX_ANSWER_CHARS].strip().lstrip(":=").strip()
    if span.lower().startswith("is "):
        span = span[3:]
    span = _REMARK.sub("", span)
    envs = list(_envs(span))
    if envs and not span[: envs[0][0]].strip():
        return clean_free_answer(span[envs[0][2] : envs[0][3]])
    cleaned = clean_free_answer(verifier._clean_answer(span), plain=not _has_latex(span))
    if not _is_prose(cleaned):
        return cleaned
    lasts = [(e[1], span[e[2] : e[3]], False) for e in envs if not _is_prose(span[e[2] : e[3]])]
    lasts += [(m.end(), m.group(), True) for m in _PLAIN.finditer(span)]
    if not lasts:
        return cleaned
    _, answer, plain = max(lasts, key=lambda c: c[0])
    return clean_free_answer(answer, plain=plain)


def _has_latex(s: str) -> bool:
    return "\\" in s or "$" in s


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
            env = (end, content, False)
            break
    offset = max(0, len(text) - TAIL_CHARS)
    plain = None
    for m in _PLAIN.finditer(text, offset):
        plain = (m.end(), m.group(), True)
    best = max((c for c in (env, plain) if c is not None), default=None, key=lambda c: c[0])
    return None if best is None else clean_free_answer(best[1], plain=best[2])


def clean_free_answer(s: str, plain: bool = False) -> str:
    """Free mode's clean-up of an extracted answer (see the module docstring). Pure text rewriting.
    `plain`: the answer came from plain text, where a comma may be a decimal comma; in LaTeX (boxes,
    math environments) a comma separates list items and a decimal comma is written `{,}`."""
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
    s = _THOUSANDS.sub(lambda m: re.sub(r"\D", "", m.group()), s).strip()
    s = _LATEX_DECIMAL_COMMA.sub(".", s)
    m = _COMMA_THOUSANDS.fullmatch(s)
    if m:
        return m.group(1) + m.group(2).replace(",", "") + m.group(3)
    if plain:
        s = _EUROPEAN.sub(lambda m: m.group(1).replace(".", "") + "." + m.group(2), s)
        m = _DECIMAL_COMMA.fullmatch(s)
        if m:
            s = f"{m.group(1)}{m.group(2)}.{m.group(3)}{m.group(4) or ''}"
    return s
