"""Test-only stand-ins for parts that other branches provide (generator, prompts, verifier).

The prompt functions here are private test copies keyed by a marker on the first line, so a
scripted generator can answer each kind of call; the package uses sgsd.prompts.
"""

from __future__ import annotations

import json
from types import SimpleNamespace


def _prompt(marker):
    return lambda payload: f"{marker}\n{payload}"


TEST_PROMPTS = SimpleNamespace(
    memory_generation_prompt=_prompt("SOLVE"),
    skill_extraction_prompt=_prompt("EXTRACT_SKILLS"),
    mistake_extraction_prompt=_prompt("EXTRACT_MISTAKES"),
    skill_merge_prompt=_prompt("MERGE_SKILLS"),
    mistake_merge_prompt=_prompt("MERGE_MISTAKES"),
)


class FakeGenerator:
    """Same shape as sgsd.generation generators: generate(conversations, params, enable_thinking)
    -> one list of completions (with .text) per conversation. `respond(prompt) -> text`."""

    def __init__(self, respond):
        self.respond = respond
        self.prompts: list[str] = []

    def generate(self, conversations, params, enable_thinking=False):
        out = []
        for conv in conversations:
            prompt = conv if isinstance(conv, str) else conv[-1]["content"]
            self.prompts.append(prompt)
            out.append([SimpleNamespace(text=self.respond(prompt), token_ids=[], finish_reason="stop")])
        return out

    def calls(self, marker):
        return [p for p in self.prompts if p.startswith(marker)]


def fake_grade(pairs):
    """Correct when the completion's last token equals the gold answer."""
    results = []
    for text, gold in pairs:
        last = text.split()[-1] if text.split() else None
        results.append(SimpleNamespace(correct=last == gold, extracted=last, reason="test"))
    return results


def skill(title):
    return {"title": title, "principle": f"{title} principle", "when_to_apply": f"{title} when"}


def mistake(desc):
    return {"description": desc, "why_it_happens": f"{desc} why", "how_to_avoid": f"{desc} avoid"}


def payload_items(prompt, key):
    """The items a merge prompt carries (its JSON payload after the marker line)."""
    return json.loads(prompt.split("\n", 1)[1])[key]
