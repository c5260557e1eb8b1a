"""Calling a generator for the skill pipeline: one user message per prompt, one text back.

The skill pipeline runs any `sgsd.generation` generator (the training policy, an HF model, an
OpenAI-compatible endpoint, or a scripted one in tests): `generator.generate(conversations,
params, enable_thinking=...)` returns one list of completions per conversation; the first
completion's `.text` is used. Prompt templates (Tables 6-10) come from `sgsd.prompts` (a
`PromptSet`) unless a caller passes another set with the same fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sgsd import prompts as _templates
from sgsd.skills.bank import MISTAKE_FIELDS, SKILL_FIELDS


@dataclass(frozen=True)
class PromptSet:
    """The templates the skill pipeline renders (Tables 6-10). The defaults are `sgsd.prompts`'; pass
    another set (any object with these attributes) as `prompts=` to swap them."""

    memory_generation_prompt: Callable[[str], str] = _templates.memory_generation_prompt
    skill_extraction_prompt: Callable[[Any], str] = _templates.skill_extraction_prompt
    mistake_extraction_prompt: Callable[[Any], str] = _templates.mistake_extraction_prompt
    skill_merge_prompt: Callable[[Any], str] = _templates.skill_merge_prompt
    mistake_merge_prompt: Callable[[Any], str] = _templates.mistake_merge_prompt


DEFAULT_PROMPTS = PromptSet()


def prompt_set(prompts=None):
    """`prompts`, or the default `PromptSet` when None."""
    return DEFAULT_PROMPTS if prompts is None else prompts


@dataclass(frozen=True)
class Kind:
    """Everything that differs between the two collections."""

    name: str  # skill | mistake
    key: str  # JSON key of the collection
    fields: tuple[str, ...]
    static_prefix: str  # gen | err
    extraction_prompt: Callable[[Any], Callable]  # prompt set -> this collection's extraction template
    merge_prompt: Callable[[Any], Callable]  # prompt set -> this collection's merge template


SKILL = Kind(
    "skill", "general_skills", SKILL_FIELDS, "gen",
    lambda p: p.skill_extraction_prompt, lambda p: p.skill_merge_prompt,
)  # fmt: skip
MISTAKE = Kind(
    "mistake", "common_mistakes", MISTAKE_FIELDS, "err",
    lambda p: p.mistake_extraction_prompt, lambda p: p.mistake_merge_prompt,
)  # fmt: skip


def greedy_params(max_new_tokens: int):
    """Near-deterministic sampling for extraction and merge calls (the reference used greedy)."""
    from sgsd.generation import SamplingParams

    return SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens)


def complete(
    generator,
    prompts: list[str],
    params,
    enable_thinking: bool = False,
    batch_size: int = 8,
    progress: str | None = None,
) -> list[str]:
    """Text of the first completion for each prompt, in `batch_size` calls (a tqdm bar when
    `progress` names the work)."""
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    if progress and len(batches) > 1:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=progress, unit="batch")
    texts: list[str] = []
    for batch in batches:
        conversations = [[{"role": "user", "content": p}] for p in batch]
        results = generator.generate(conversations, params, enable_thinking=enable_thinking)
        texts.extend(r[0].text if r else "" for r in results)
    return texts
