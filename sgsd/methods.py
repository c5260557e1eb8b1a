"""The methods of Section 4.1 as data: what each one changes in the shared training loop.

A method decides three things: the student's prompt (plain, or with the retrieved skills), which
teachers score the student's rollout (none, one that sees the reference answer, one per retrieved
skill-mistake pair, or one that sees all retrieved pairs at once), and the objective (the
distillation loss named by `objective.loss`, or GRPO). Everything else — rollouts, verification,
scoring, the optimizer, evaluation — is the same code for every method, so comparisons are fair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sgsd.errors import ConfigError

TeacherKind = Literal["none", "answer", "per_pair", "joint"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    # the retrieved pairs are written into the student's prompt (GRPO+Skill, OPSD+Skill)
    student_sees_skills: bool
    # none: no teacher (GRPO); answer: one teacher that sees the reference answer (OPSD); per_pair: one
    # teacher per retrieved pair (SGSD); joint: one teacher that sees every retrieved pair (OPSD+Skill)
    teachers: TeacherKind
    # outcome-validated polarity (Eq. 13); without it every teacher is distilled
    polarity: bool
    # G rollouts per prompt with group-relative advantages; the objective is GRPO's
    grouped: bool
    # the online bank update of Alg. 4 runs for this method
    evolves_bank: bool

    @property
    def retrieves(self) -> bool:
        """Whether the method needs the skill bank and the retriever."""
        return self.student_sees_skills or self.teachers in ("per_pair", "joint")

    def objective_name(self, loss: str) -> str:
        """The objective this method trains with, given `objective.loss`."""
        return "grpo" if self.grouped else loss


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("sgsd", student_sees_skills=False, teachers="per_pair", polarity=True, grouped=False, evolves_bank=True),
        MethodSpec("opsd", student_sees_skills=False, teachers="answer", polarity=False, grouped=False, evolves_bank=False),
        MethodSpec("opsd_skill", student_sees_skills=True, teachers="joint", polarity=False, grouped=False, evolves_bank=False),
        MethodSpec("grpo", student_sees_skills=False, teachers="none", polarity=False, grouped=True, evolves_bank=False),
        MethodSpec("grpo_skill", student_sees_skills=True, teachers="none", polarity=False, grouped=True, evolves_bank=False),
    )
}  # fmt: skip


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]
