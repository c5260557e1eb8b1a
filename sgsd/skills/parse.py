"""Turning a model's extraction or merge output into validated items.

Model output is untrusted text. `parse_items(text, key, fields)`:

1. strips reasoning: every `<think>...</think>` block, everything before a closing `</think>`
   whose opener was in the prompt, and an unfinished `<think>` to the end of the text;
2. finds the first JSON object (at any nesting depth) that carries `key`, trying every `{`
   with a real JSON decoder, so prose, code fences and stray braces around it do not matter
   (the reference took the first `{` to the last `}` and lost 69 of 256 extractions);
   a bare JSON list of objects is accepted too;
3. if strict JSON fails, or decodes LaTeX such as `\\frac` into control characters, retries once
   with repairs: backslashes that are not JSON escapes are doubled, trailing commas removed;
4. validates items: each must be an object whose `fields` are non-empty strings; extra keys are
   dropped; invalid items are dropped and counted; at most `max_items` are kept.

Text is never evaluated as code. `ParseStats` counts outcomes by reason for reports.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

# failure reasons, in the order they are checked
EMPTY_OUTPUT = "empty_output"
UNFINISHED_THINKING = "unfinished_thinking"
NO_JSON = "no_json"
MISSING_KEY = "missing_key"
NOT_A_LIST = "not_a_list"
NO_VALID_ITEMS = "no_valid_items"

_TRAILING_COMMA = re.compile(r",\s*([}\]])")
# a JSON escape or LaTeX command after a backslash: \\ , \uXXXX, a run of letters, or one character
_BACKSLASH = re.compile(r"\\(\\|u[0-9a-fA-F]{4}|[A-Za-z]+|.)", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# where a JSON object or list can start: `{` before a key or `}`, `[` before a value or `]` (LaTeX
# braces such as `\\frac{1}` are skipped without a decode attempt)
_OPENERS = re.compile(r'\{(?=\s*["}])|\[(?=\s*[-\d"\[\]{tfn])')  # lookaheads: nested openers match too
# decode attempts per scan: each failed attempt costs O(position) inside json's error message, so a
# hostile output full of openers would otherwise take quadratic time
MAX_DECODE_ATTEMPTS = 1000


@dataclass
class ParseResult:
    items: list[dict[str, str]]
    failure: str | None = None  # one of the reasons above, None on success
    dropped: int = 0  # items discarded as invalid
    truncated: int = 0  # valid items beyond max_items

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass
class ParseStats:
    """Outcome counts over many calls: ok, failures by reason, items dropped and truncated."""

    calls: int = 0
    ok: int = 0
    failures: Counter = field(default_factory=Counter)
    items: int = 0
    dropped: int = 0
    truncated: int = 0

    def add(self, result: ParseResult) -> ParseResult:
        self.calls += 1
        self.items += len(result.items)
        self.dropped += result.dropped
        self.truncated += result.truncated
        if result.ok:
            self.ok += 1
        else:
            self.failures[result.failure] += 1
        return result

    def to_dict(self) -> dict:
        return {
            "calls": self.calls,
            "ok": self.ok,
            "failed": sum(self.failures.values()),
            "failures": dict(sorted(self.failures.items())),
            "items": self.items,
            "items_dropped": self.dropped,
            "items_truncated": self.truncated,
        }

    def summary(self) -> str:
        failed = sum(self.failures.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items()))
        return f"{self.ok}/{self.calls} parsed, {failed} unusable" + (f" ({reasons})" if reasons else "")


def strip_reasoning(text: str) -> tuple[str, bool]:
    """Remove thinking; returns (visible text, whether an unfinished `<think>` was cut off)."""
    text = _remove_think_blocks(text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    unfinished = "<think>" in text
    if unfinished:
        text = text.split("<think>", 1)[0]
    return text, unfinished


def _remove_think_blocks(text: str) -> str:
    """Drop each `<think>` ... nearest `</think>` block, in one linear pass (a non-greedy regex
    rescans to the end for every unclosed `<think>`: quadratic on hostile output)."""
    kept, pos = [], 0
    while (start := text.find("<think>", pos)) >= 0:
        end = text.find("</think>", start + len("<think>"))
        if end < 0:
            break
        kept.append(text[pos:start])
        pos = end + len("</think>")
    kept.append(text[pos:])
    return "".join(kept)


def _repair(text: str) -> str:
    def fix(m: re.Match) -> str:
        body = m.group(1)
        if body == "\\" or body.startswith("u") and len(body) == 5 and body[1:].isalnum():
            return m.group(0)
        if body in ('"', "/") or (len(body) == 1 and body in "bfnrt"):
            return m.group(0)
        return "\\\\" + body  # LaTeX (\frac, \times) or an invalid escape: keep the backslash literally

    return _TRAILING_COMMA.sub(r"\1", _BACKSLASH.sub(fix, text))


def _find_keyed(value, key: str):
    """Depth-first search for a dict holding `key`."""
    if isinstance(value, dict):
        if key in value:
            return value
        children = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return None
    for child in children:
        found = _find_keyed(child, key)
        if found is not None:
            return found
    return None


def _has_control_chars(value) -> bool:
    if isinstance(value, str):
        return bool(_CONTROL.search(value))
    if isinstance(value, dict):
        return any(_has_control_chars(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_control_chars(v) for v in value)
    return False


def _scan(text: str, key: str):
    """Return (object with key | None, first list of objects | None, any JSON decoded)."""
    decoder = json.JSONDecoder()
    first_list, decoded_any = None, False
    end = attempts = 0
    for opener in _OPENERS.finditer(text):  # one pass over the openers (no re-scan per candidate)
        i = opener.start()
        if i < end:
            continue
        attempts += 1
        if attempts > MAX_DECODE_ATTEMPTS:
            break
        try:
            value, end = decoder.raw_decode(text, i)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            continue
        decoded_any = True
        found = _find_keyed(value, key)
        if found is not None:
            return found, first_list, True
        if (
            first_list is None
            and isinstance(value, list)
            and value
            and all(isinstance(v, dict) for v in value)
        ):
            first_list = value
    return None, first_list, decoded_any


def _locate(text: str, key: str):
    found, first_list, decoded = _scan(text, key)
    if found is None or _has_control_chars(found):
        repaired = _scan(_repair(text), key)
        if repaired[0] is not None:
            return repaired
        if found is None:
            return repaired[0], first_list or repaired[1], decoded or repaired[2]
    return found, first_list, decoded


def parse_items(
    text: str | None, key: str, fields: tuple[str, ...], max_items: int | None = 3
) -> ParseResult:
    """Validated items under `key` in a model's output (see the module docstring)."""
    if not text or not text.strip():
        return ParseResult([], EMPTY_OUTPUT)
    visible, unfinished = strip_reasoning(text)
    if not visible.strip():
        return ParseResult([], UNFINISHED_THINKING if unfinished else EMPTY_OUTPUT)
    try:
        found, bare_list, decoded = _locate(visible, key)
    except RecursionError:  # JSON nested deeper than Python can walk: not an answer
        return ParseResult([], NO_JSON)
    if found is not None:
        raw = found[key]
    elif bare_list is not None:
        raw = bare_list
    else:
        return ParseResult([], MISSING_KEY if decoded else NO_JSON)
    if not isinstance(raw, list):
        return ParseResult([], NOT_A_LIST)
    items, dropped = [], 0
    for entry in raw:
        if isinstance(entry, dict) and all(
            isinstance(entry.get(f), str) and entry[f].strip() for f in fields
        ):
            items.append({f: " ".join(entry[f].split()) for f in fields})
        else:
            dropped += 1
    truncated = 0
    if max_items is not None and len(items) > max_items:
        truncated = len(items) - max_items
        items = items[:max_items]
    if not items:
        return ParseResult([], NO_VALID_ITEMS, dropped=dropped)
    return ParseResult(items, None, dropped=dropped, truncated=truncated)
