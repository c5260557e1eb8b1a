"""Prompt templates (paper Fig. 6, Tables 6-10) and chat rendering.

Every builder returns the plain text of one user message; `render_chat` is the one place where chat
templates are applied, so that the generator and the scorer see exactly the same prompt tokens.

Student and teacher (Fig. 6). The student sees only the problem. A teacher sees a guidance block,
a blank line, then the student's text unchanged:

    You may use the following retrieved math-reasoning guidance as soft guidance. Solve the current
    problem independently and do not quote it verbatim.

    ### General Principles
    - **{title}**: {principle}
      _Apply when: {when_to_apply}_

    ### Mistakes to Avoid
    - **Don't**: {description} **Instead**: {how_to_avoid}

    Problem: {problem}

    Please reason step by step, and put your final answer within \\boxed{}.

(The paper's figure loses its line breaks; the layout above is ours: one markdown list item per
entry, "_Apply when_" on an indented continuation line, sections separated by blank lines.) A
one-sided pair (skill or mistake None) keeps only its own section. With the reference answer (OPSD's
privileged information, and the Fig. 3(d) "skills + answer" ablation) the line
`The answer is \\boxed{X}.` sits between the guidance and the problem, separated by blank lines.

Untrusted text. Problem, skill and answer text are inserted by concatenation (or by one `replace`
of a fixed placeholder in a fixed template), never by `str.format`, so braces in them come through
verbatim. Jinja never evaluates message content, so `{{ }}` and `{% %}` in it are inert. Tokenizers,
however, DO parse special-token strings inside content: with transformers 5, a problem containing
`<|im_end|>` rendered by `apply_chat_template` and tokenized yields a real end-of-turn token. So
`render_chat` neutralises such strings in every message (see `neutralise_special_tokens`): a
zero-width space (U+200B) goes after the leading '<', which keeps the text readable and stops it
from matching a special token.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------------
# Student and teacher contexts (Fig. 6)

STUDENT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
GUIDANCE_HEADER = (
    "You may use the following retrieved math-reasoning guidance as soft guidance. "
    "Solve the current problem independently and do not quote it verbatim."
)
PRINCIPLES_HEADING = "### General Principles"
MISTAKES_HEADING = "### Mistakes to Avoid"


def student_prompt(question: str) -> str:
    """The student's user message (Fig. 6): the problem and the \\boxed{} instruction, nothing else."""
    return "Problem: " + question + "\n\n" + STUDENT_INSTRUCTION


def _skill_lines(skill: Any) -> str:
    return "- **" + skill.title + "**: " + skill.principle + "\n  _Apply when: " + skill.when_to_apply + "_"


def _mistake_line(mistake: Any) -> str:
    return "- **Don't**: " + mistake.description + " **Instead**: " + mistake.how_to_avoid


def guidance_text(skills: Sequence[Any], mistakes: Sequence[Any]) -> str:
    """The guidance block for any number of skills and mistakes (empty string when both are empty).
    Skills need title/principle/when_to_apply, mistakes description/how_to_avoid (duck typed)."""
    sections = []
    if skills:
        sections.append(PRINCIPLES_HEADING + "\n" + "\n".join(_skill_lines(s) for s in skills))
    if mistakes:
        sections.append(MISTAKES_HEADING + "\n" + "\n".join(_mistake_line(m) for m in mistakes))
    if not sections:
        return ""
    return GUIDANCE_HEADER + "\n\n" + "\n\n".join(sections)


def guidance_block(skill: Any | None, mistake: Any | None) -> str:
    """The guidance block of one retrieved (skill, mistake) pair; either may be None (one-sided)."""
    return guidance_text([skill] if skill is not None else [], [mistake] if mistake is not None else [])


def answer_hint(answer: str) -> str:
    """OPSD's privileged answer line."""
    return "The answer is \\boxed{" + answer + "}."


def teacher_prompt(
    question: str, skill: Any | None = None, mistake: Any | None = None, answer: str | None = None
) -> str:
    """A teacher's user message: guidance block, then (if given) the answer line, then the student's
    text, separated by blank lines. With no skill, mistake or answer it equals the student prompt.
    OPSD: answer only. SGSD: one pair, no answer. Fig. 3(d) ablation: pair and answer."""
    parts = [guidance_block(skill, mistake)]
    if answer is not None:
        parts.append(answer_hint(answer))
    parts.append(student_prompt(question))
    return "\n\n".join(p for p in parts if p)


@dataclass(frozen=True)
class PlainSkill:
    """A skill with just the fields the teacher template reads (planted and null pairs)."""

    title: str
    principle: str
    when_to_apply: str


@dataclass(frozen=True)
class PlainMistake:
    """A mistake with just the fields the teacher template reads (planted and null pairs)."""

    description: str
    how_to_avoid: str


# The null teacher's guidance: the same template and about the length of one starter-bank pair, but
# content-free, so its gaps measure what a context change alone does to the model (support estimator
# `null_relative`: a~_k - a~_null).
NULL_SKILL = PlainSkill(
    title="Solve the problem",
    principle="Work through the problem and then state the answer.",
    when_to_apply="Any problem.",
)
NULL_MISTAKE = PlainMistake(
    description="Stating an answer without working through the problem.",
    how_to_avoid="Work through the problem, then state the answer.",
)


def null_teacher_prompt(question: str, answer: str | None = None) -> str:
    """The null teacher's user message: `teacher_prompt` with the content-free pair."""
    return teacher_prompt(question, NULL_SKILL, NULL_MISTAKE, answer=answer)


def _pair_parts(pair: Any) -> tuple[Any | None, Any | None]:
    """A pair is a (skill, mistake) tuple or an object with .skill and .mistake (a retrieval result)."""
    if isinstance(pair, tuple):
        return pair
    return pair.skill, pair.mistake


def skills_in_prompt(question: str, pairs: Iterable[Any], answer: str | None = None) -> str:
    """One prompt holding several retrieved pairs in a single guidance block, for GRPO+Skill,
    OPSD+Skill and Base+Skill: all skills (in pair order) under General Principles, all mistakes
    under Mistakes to Avoid, an object listed twice kept once; then (OPSD+Skill teacher) the answer
    line, then the student text. Pairs are (skill, mistake) tuples or objects with .skill/.mistake."""
    skills: list[Any] = []
    mistakes: list[Any] = []
    for pair in pairs:
        skill, mistake = _pair_parts(pair)
        if skill is not None and not any(skill is s for s in skills):
            skills.append(skill)
        if mistake is not None and not any(mistake is m for m in mistakes):
            mistakes.append(mistake)
    parts = [
        guidance_text(skills, mistakes),
        answer_hint(answer) if answer is not None else "",
        student_prompt(question),
    ]
    return "\n\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------------
# The official code's reference-solution contexts (teachers.answer_template = official)
#
# The official OPSD teacher sees the problem, then a reference-solution block whose "solution" is the
# answer line, then a transition paragraph and the instruction (OPSD+Skill: the skill-augmented student
# message first, and "--" in the transition); its SGSD trainer, asked to add the answer (Fig. 3(d)),
# puts the same block without the transition after the guidance and the problem.

OPSD_TRANSITION = (
    "\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind "
    "each step - do not copy or paraphrase it. Now, using your own words and independent reasoning, derive "
    "the same final answer to the problem above. Think step by step, explore different approaches, and "
    "don't be afraid to backtrack or reconsider if something doesn't work out:\n"
)
OPSD_SKILL_TRANSITION = OPSD_TRANSITION.replace(" - ", " -- ")


def reference_solution(answer: str) -> str:
    """The official "solution" when only the answer is known: `The answer is \\boxed{X}.` (an answer
    that already holds \\boxed{ is kept whole)."""
    answer = answer.strip()
    return "The answer is " + (answer if "\\boxed{" in answer else "\\boxed{" + answer + "}") + "."


def _reference_block(context: str, answer: str, transition: str | None) -> str:
    text = (
        context
        + "\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n"
        + reference_solution(answer)
        + "\n=== Reference Solution End ===\n"
    )
    return text + (transition or "") + "\n" + STUDENT_INSTRUCTION


def official_opsd_teacher_prompt(question: str, answer: str) -> str:
    """The official OPSD teacher's user message: `Problem: ...`, the reference block, the transition."""
    return _reference_block("Problem: " + question, answer, OPSD_TRANSITION)


def official_opsd_skill_teacher_prompt(question: str, pairs: Iterable[Any], answer: str) -> str:
    """The official OPSD+Skill teacher: the student's skill-augmented message (`skills_in_prompt`), then
    the reference block and the (double-dash) transition."""
    return _reference_block(skills_in_prompt(question, pairs), answer, OPSD_SKILL_TRANSITION)


def official_skill_answer_teacher_prompt(
    question: str, skill: Any | None, mistake: Any | None, answer: str
) -> str:
    """The official SGSD teacher with the reference added (Fig. 3(d)): guidance, `Problem: ...`, then
    the reference block without a transition."""
    context = "\n\n".join(p for p in (guidance_block(skill, mistake), "Problem: " + question) if p)
    return _reference_block(context, answer, None)


# ---------------------------------------------------------------------------------------------------
# Cold start, extraction and merging (Tables 6-10), verbatim from the paper

MEMORY_GENERATION_TEMPLATE = (
    "You are a careful mathematical problem-solving agent. Solve the following problem step by step. "
    "Keep the reasoning coherent and self-contained, and end with a single final answer enclosed in "
    "\\boxed{}.\n\nProblem: {problem}"
)

SKILL_EXTRACTION_TEMPLATE = """You are an expert at distilling mathematical reasoning behavior into concise, reusable skills for a reinforcement-learning agent.

You will be given ONE successful math problem-solving memory. The memory contains the original problem, a compact reasoning trajectory, and a summarized raw attempt.

Your task:

1. Derive 1-3 GENERAL skills that likely contributed to the success.
2. Each skill must be broadly reusable across algebra, geometry, number theory, combinatorics, and olympiad-style reasoning.
3. Phrase each skill as an actionable principle; avoid task-specific constants, entity names, or one-off details unless they express a general method.
4. Merge overlapping ideas inside this response; do not output near-duplicate skills.
5. Use only evidence grounded in the provided memory.

Successful memory:

{memory_json}

Return ONLY valid JSON with key general_skills."""  # noqa: E501

MISTAKE_EXTRACTION_TEMPLATE = """You are an expert at analyzing failed mathematical reasoning and turning failures into concise, reusable cautionary skills for a reinforcement-learning agent.

You will be given ONE failed math problem-solving memory. The memory contains the original problem, summarized failure evidence, and the raw final attempt.

Your task:

1. Derive 1-3 COMMON mistakes that explain the failure.
2. Each item must describe a general failure mode, why it happens, and how to avoid it in future math reasoning.
3. Make every item broadly reusable across algebra, geometry, number theory, combinatorics, and olympiad-style reasoning.
4. Merge overlapping ideas inside this response; do not output near-duplicate mistakes.
5. Use only evidence grounded in the provided memory.

Failed memory:

{memory_json}

Return ONLY valid JSON with key common_mistakes."""  # noqa: E501

SKILL_MERGE_TEMPLATE = """You are an expert at consolidating independently-generated math skills into a compact, non-redundant skill bank.

You will be given up to 32 general skills extracted from different memories. Some are duplicates, some partially overlap, and some are unique.

Your task:

1. Merge semantically duplicate or strongly overlapping skills.
2. Preserve all unique insights.
3. Prefer the most general, transferable wording.
4. Treat recurrence as evidence that the pattern is systematic and synthesize one stronger skill.
5. Do not force a fixed final count.
6. Do not mention specific problems, source memories, or dataset names.

General skills to merge:

{items_json}

Return ONLY valid JSON with key general_skills."""  # noqa: E501

MISTAKE_MERGE_TEMPLATE = """You are an expert at consolidating independently-generated math failure lessons into a compact, non-redundant caution bank.

You will be given up to 32 common-mistake items extracted from different memories. Some are duplicates, some partially overlap, and some are unique.

Your task:

1. Merge semantically duplicate or strongly overlapping mistakes.
2. Preserve all unique insights.
3. Prefer the most general, transferable wording.
4. Treat recurrence as evidence that the failure pattern is systematic and synthesize one stronger mistake item.
5. Do not force a fixed final count.
6. Do not mention specific problems, source memories, or dataset names.

Common mistakes to merge:

{items_json}

Return ONLY valid JSON with key common_mistakes."""  # noqa: E501


def _fill(template: str, placeholder: str, value: str) -> str:
    """Put `value` in the template's one `placeholder`; the value itself is never scanned again."""
    head, sep, tail = template.partition(placeholder)
    assert sep, f"template lacks {placeholder}"
    return head + value + tail


def _as_json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)


def memory_generation_prompt(question: str) -> str:
    """Table 6: the cold-start memory-generation prompt for one problem."""
    return _fill(MEMORY_GENERATION_TEMPLATE, "{problem}", question)


def skill_extraction_prompt(memory: Any) -> str:
    """Table 7: extract 1-3 general skills from one successful memory (a JSON string or an object)."""
    return _fill(SKILL_EXTRACTION_TEMPLATE, "{memory_json}", _as_json(memory))


def mistake_extraction_prompt(memory: Any) -> str:
    """Table 8: extract 1-3 common mistakes from one failed memory (a JSON string or an object)."""
    return _fill(MISTAKE_EXTRACTION_TEMPLATE, "{memory_json}", _as_json(memory))


def skill_merge_prompt(items: Any) -> str:
    """Table 9: merge up to 32 general-skill candidates (a JSON string or a list of objects)."""
    return _fill(SKILL_MERGE_TEMPLATE, "{items_json}", _as_json(items))


def mistake_merge_prompt(items: Any) -> str:
    """Table 10: merge up to 32 common-mistake candidates (a JSON string or a list of objects)."""
    return _fill(MISTAKE_MERGE_TEMPLATE, "{items_json}", _as_json(items))


# ---------------------------------------------------------------------------------------------------
# Chat rendering

ZERO_WIDTH_SPACE = "\u200b"
# Special-token shapes neutralised even when the tokenizer does not know them: ChatML/Qwen/Llama-3
# style <|...|> and the thinking tags.
_GENERIC_SPECIAL = r"<\|[^<>|\s]{1,64}\|>|</?think>"


def neutralise_special_tokens(text: str, tokenizer=None) -> str:
    """Insert a zero-width space after the '<' of every special-token string in `text`, so that
    tokenizing the rendered prompt cannot produce a special token from problem or skill text.
    Covers <|...|> shapes, <think>/</think>, and every added token of `tokenizer` (if given) that
    starts with '<' or '['. Text without such strings comes back unchanged."""
    added = (
        ()
        if tokenizer is None
        else tuple(t for t in tokenizer.get_added_vocab() if len(t) > 1 and t[0] in "<[")
    )
    return _special_pattern(added).sub(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], text)


@functools.lru_cache(maxsize=16)
def _special_pattern(added_tokens: tuple[str, ...]) -> re.Pattern:
    longest_first = sorted(added_tokens, key=len, reverse=True)
    return re.compile("|".join([_GENERIC_SPECIAL] + [re.escape(t) for t in longest_first]))


def render_chat(tokenizer, messages, enable_thinking: bool = False) -> str:
    """Render chat `messages` (a user string or a list of {role, content}) with the tokenizer's
    chat template, ending with the assistant generation header.

    `enable_thinking` is passed to the template (Qwen3 reads it: off appends an empty
    `<think>\\n\\n</think>\\n\\n` after the assistant header). Templates that know no thinking mode
    (Qwen2.5, SmolLM2, Llama) ignore it and render the same text either way; see
    `supports_thinking`. Special-token strings inside message contents are neutralised first
    (`neutralise_special_tokens`) in every message but assistant ones, so untrusted problem or
    skill text cannot end the user turn; assistant content (model output) passes unchanged."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    safe = [
        {**m, "content": neutralise_special_tokens(m["content"], tokenizer)}
        if m.get("role") != "assistant" and isinstance(m.get("content"), str)
        else m
        for m in messages
    ]
    return tokenizer.apply_chat_template(
        safe, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )


def supports_thinking(tokenizer) -> bool:
    """Whether the tokenizer's chat template reacts to `enable_thinking` (renders a probe both ways)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = [{"role": "user", "content": "1+1?"}]
    return render_chat(tokenizer, probe, enable_thinking=True) != render_chat(
        tokenizer, probe, enable_thinking=False
    )
