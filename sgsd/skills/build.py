"""Cold-start skill-bank construction (paper Alg. 2, Tables 6-8).

    for each seed problem: memory prompt (Table 6) -> completion -> verifier reward r = +-1
        -> memory record (problem, completion, reward, answer, trajectory summary, feedback)
    successes -> skill-extraction prompt (Table 7) -> 1-3 general-skill candidates each
    failures  -> mistake-extraction prompt (Table 8) -> 1-3 common-mistake candidates each
    each collection -> hierarchical merge (Alg. 3) -> ids gen_### / err_###

Small models often return unusable JSON; such outputs are counted by reason in the report and
the build still finishes (a collection may end up empty).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sgsd.skills.bank import SkillBank
from sgsd.skills.llm import MISTAKE, SKILL, Kind, complete, prompt_set
from sgsd.skills.merge import assign_ids, hierarchical_merge
from sgsd.skills.parse import ParseStats, parse_items, strip_reasoning

TRAJECTORY_STEPS = 6  # at most this many steps in a trajectory summary (as the reference)
ATTEMPT_CHARS = 1200  # the tail of the completion kept as the raw attempt


def summarize_trajectory(completion: str, max_steps: int = TRAJECTORY_STEPS) -> list[str]:
    """Up to `max_steps` steps: the completion's non-empty lines (thinking removed), evenly spaced
    from first to last so the opening plan and the final answer are both kept; 300 chars each."""
    visible, _ = strip_reasoning(completion)
    lines = [" ".join(line.split()) for line in visible.splitlines() if line.strip()]
    if len(lines) > max_steps:
        step = (len(lines) - 1) / (max_steps - 1)
        lines = [lines[round(i * step)] for i in range(max_steps)]
    return [line[:300] for line in lines]


def build_memory(question: str, completion: str, reward: float, answer: str, predicted: str | None) -> dict:
    """A memory record as the extraction prompts see it."""
    success = reward > 0
    if success:
        feedback = f"Correct: the final answer {predicted} matches the reference."
    elif predicted is None:
        feedback = f"Incorrect: no final answer could be extracted (the reference answer is {answer})."
    else:
        feedback = f"Incorrect: the final answer {predicted} does not match the reference answer {answer}."
    return {
        "problem": question,
        "outcome": "success" if success else "failure",
        "reward": reward,
        "reference_answer": answer,
        "final_answer": predicted,
        "trajectory_summary": summarize_trajectory(completion),
        "feedback": feedback,
        "raw_attempt": completion[-ATTEMPT_CHARS:],
    }


def extract_candidates(
    memories: list[dict],
    kind: Kind,
    generator,
    params,
    stats: ParseStats,
    *,
    prompts=None,
    enable_thinking: bool = False,
    max_items: int = 3,
    batch_size: int = 8,
    progress: bool = False,
) -> list[dict]:
    """One extraction call per memory; the parsed items of every usable answer, in order."""
    if not memories:
        return []
    render = kind.extraction_prompt(prompt_set(prompts))
    texts = complete(
        generator,
        [render(json.dumps(m, indent=2, ensure_ascii=False)) for m in memories],
        params,
        enable_thinking,
        batch_size,
        f"extract {kind.key}" if progress else None,
    )
    out = []
    for text in texts:
        out.extend(stats.add(parse_items(text, kind.key, kind.fields, max_items)).items)
    return out


@dataclass
class BuildReport:
    problems: int = 0
    successes: int = 0
    failures: int = 0
    extraction_calls: int = 0
    parse: dict = field(default_factory=dict)  # ParseStats.to_dict() over extraction and merge calls
    skill_candidates: int = 0
    mistake_candidates: int = 0
    merged_skills: int = 0
    merged_mistakes: int = 0
    merge: dict = field(default_factory=dict)  # per collection: MergeResult.metadata()

    def summary(self) -> str:
        p = self.parse
        return (
            f"{self.problems} problems: {self.successes} solved, {self.failures} failed; "
            f"{self.extraction_calls} extraction calls, {p.get('ok', 0)}/{p.get('calls', 0)} model outputs "
            f"parsed (failures: {p.get('failures', {}) or 'none'}); candidates {self.skill_candidates} skills / "
            f"{self.mistake_candidates} mistakes -> merged {self.merged_skills} / {self.merged_mistakes}"
        )


def cold_start(
    problems,
    generator,
    grade,
    *,
    solve_params,
    extract_params,
    prompts=None,
    group_size: int = 32,
    patience: int = 3,
    max_items: int = 3,
    solve_thinking: bool = False,
    extract_thinking: bool = False,
    group_embedder=None,
    batch_size: int = 8,
    progress: bool = True,
    source: str = "",
) -> tuple[SkillBank, BuildReport]:
    """Alg. 2. `problems`: objects with .question and .answer (sgsd.data.Problem);
    `grade(pairs)`: [(completion, gold)] -> results with .correct and .extracted
    (e.g. functools.partial(sgsd.verifier.grade_many, timeout_s=5, workers=2))."""
    problems = list(problems)
    memory_generation_prompt = prompt_set(prompts).memory_generation_prompt
    completions = complete(
        generator,
        [memory_generation_prompt(p.question) for p in problems],
        solve_params,
        solve_thinking,
        batch_size,
        "cold start: solve" if progress else None,
    )
    grades = grade([(c, p.answer) for c, p in zip(completions, problems, strict=True)])
    memories = [
        build_memory(p.question, c, 1.0 if g.correct else -1.0, p.answer, g.extracted)
        for p, c, g in zip(problems, completions, grades, strict=True)
    ]
    successes = [m for m in memories if m["reward"] > 0]
    failures = [m for m in memories if m["reward"] <= 0]

    extract_stats, merge_stats = ParseStats(), ParseStats()
    common = dict(prompts=prompts, enable_thinking=extract_thinking, batch_size=batch_size, progress=progress)
    skills = extract_candidates(
        successes, SKILL, generator, extract_params, extract_stats, max_items=max_items, **common
    )
    mistakes = extract_candidates(
        failures, MISTAKE, generator, extract_params, extract_stats, max_items=max_items, **common
    )
    merged = {
        kind.name: hierarchical_merge(
            items,
            kind,
            generator,
            extract_params,
            group_size=group_size,
            patience=patience,
            stats=merge_stats,
            group_embedder=group_embedder,
            **common,
        )
        for kind, items in ((SKILL, skills), (MISTAKE, mistakes))
    }
    report = BuildReport(
        problems=len(problems),
        successes=len(successes),
        failures=len(failures),
        extraction_calls=extract_stats.calls,
        parse={
            "extraction": extract_stats.to_dict(),
            "merge": merge_stats.to_dict(),
            **_combined(extract_stats, merge_stats),
        },
        skill_candidates=len(skills),
        mistake_candidates=len(mistakes),
        merged_skills=len(merged["skill"].items),
        merged_mistakes=len(merged["mistake"].items),
        merge={name: m.metadata() for name, m in merged.items()},
    )
    bank = SkillBank(
        assign_ids(merged["skill"].items, SKILL, SKILL.static_prefix),
        assign_ids(merged["mistake"].items, MISTAKE, MISTAKE.static_prefix),
        {
            "source": f"cold start from {len(problems)} problems" + (f" ({source})" if source else ""),
            "merge_group_size": group_size,
            "merge_stagnation_patience": patience,
            "merge_layers": report.merge,
            "cold_start": _report_dict(report),
        },
    )
    return bank, report


def _combined(a: ParseStats, b: ParseStats) -> dict:
    both = ParseStats(a.calls + b.calls, a.ok + b.ok, a.failures + b.failures)
    d = both.to_dict()
    return {"calls": d["calls"], "ok": d["ok"], "failures": d["failures"]}


def _report_dict(report: BuildReport) -> dict:
    return {k: v for k, v in report.__dict__.items() if k != "merge"}
