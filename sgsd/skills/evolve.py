"""Online skill evolution (paper Alg. 4, Appendix C.4).

The trainer adds one `RolloutRecord` per rollout; the evolver keeps those of the last F steps
(the reference saw only the current micro-batch, about 4 records). `maybe_update(step, bank,
generator)` at every step:

    skip unless step % F == 0 and the window is not empty
    skip when the window's success rate >= gamma
    W+ -> skill extraction, W- -> mistake extraction (same prompts as the cold start)
    merge the new candidates of each kind (Alg. 3), then merge them with the existing dynamic
        entries of that kind (skipped when there are none)
    keep at most min(C, |existing dynamic| + N) entries per collection (N net new, capacity C):
        prune="order"    -> the first ones in the merged list (the paper / reference)
        prune="evidence" -> entries not in the old bank first (up to N, in list order), then old
                            entries by ledger evidence, best first (never retrieved counts as 0)
    static entries are never touched; save bank-latest.json and bank-step######.json

Ids stay stable for the ledger: a dynamic entry that survives with identical text keeps its
`dyn_###` id; new entries get numbers after the highest ever issued (`metadata.dynamic_id_counter`),
so an id is never reused for different text.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

from sgsd.skills.bank import SkillBank, make_mistake, make_skill
from sgsd.skills.build import build_memory, extract_candidates
from sgsd.skills.llm import MISTAKE, SKILL, Kind
from sgsd.skills.merge import _normal, hierarchical_merge
from sgsd.skills.parse import ParseStats


@dataclass(frozen=True)
class RolloutRecord:
    question: str
    completion: str
    reward: float
    answer: str
    step: int
    predicted: str | None = None


class OnlineEvolver:
    def __init__(
        self,
        params,
        *,
        every: int = 25,
        success_threshold: float = 0.8,
        max_new: int = 5,
        capacity: int = 30,
        prune: str = "order",
        ledger=None,
        out_dir: str | Path | None = None,
        group_size: int = 32,
        patience: int = 3,
        max_items: int = 3,
        prompts=None,
        enable_thinking: bool = False,
        batch_size: int = 8,
    ):
        if prune not in ("order", "evidence"):
            raise ValueError(f"prune must be 'order' or 'evidence', got {prune!r}")
        if prune == "evidence" and ledger is None:
            raise ValueError("prune='evidence' needs a ledger")
        self.params = params
        self.every = every
        self.success_threshold = success_threshold
        self.max_new = max_new
        self.capacity = capacity
        self.prune = prune
        self.ledger = ledger
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.merge_options = dict(
            group_size=group_size,
            patience=patience,
            prompts=prompts,
            enable_thinking=enable_thinking,
            batch_size=batch_size,
        )
        self.extract_options = dict(
            prompts=prompts, enable_thinking=enable_thinking, max_items=max_items, batch_size=batch_size
        )
        self.window: deque[RolloutRecord] = deque()
        self.history: list[dict] = []  # one report per triggered step

    def add(self, records) -> None:
        """Add rollout records (any order); records older than the last F steps are dropped on update."""
        self.window.extend(records)

    def _trim(self, step: int) -> list[RolloutRecord]:
        recent = [r for r in self.window if step - self.every < r.step <= step]
        self.window = deque(recent)
        return recent

    def maybe_update(self, step: int, bank: SkillBank, generator) -> tuple[SkillBank, dict | None]:
        """Alg. 4 at `step`; returns (bank, report) with report None when the step does not trigger."""
        if step <= 0 or step % self.every:
            return bank, None
        window = self._trim(step)
        report: dict = {"step": step, "window": len(window)}
        if not window:
            return bank, self._log(report | {"skipped": "empty window"})
        successes = [r for r in window if r.reward > 0]
        rate = len(successes) / len(window)
        report["success_rate"] = rate
        if rate >= self.success_threshold:
            return bank, self._log(
                report | {"skipped": f"success rate {rate:.2f} >= {self.success_threshold}"}
            )
        failures = [r for r in window if r.reward <= 0]
        stats = ParseStats()
        metadata = dict(bank.metadata)
        counters = dict(metadata.get("dynamic_id_counter", {}))
        new_skills = self._collection(
            SKILL, successes, bank.dynamic_skills, generator, stats, report, counters
        )
        new_mistakes = self._collection(
            MISTAKE, failures, bank.dynamic_mistakes, generator, stats, report, counters
        )
        report["parse"] = stats.to_dict()
        metadata["dynamic_id_counter"] = counters
        updates = list(metadata.get("online_updates", []))
        updates.append(
            {k: v for k, v in report.items() if k != "parse"}
            | {"parse_failures": stats.to_dict()["failures"]}
        )
        metadata["online_updates"] = updates
        updated = bank.with_dynamic(new_skills, new_mistakes, metadata)
        if self.out_dir is not None:
            report["snapshot"] = str(updated.save_snapshot(self.out_dir, step))
        return updated, self._log(report)

    def _log(self, report: dict) -> dict:
        self.history.append(report)
        return report

    def _collection(
        self, kind: Kind, records, existing, generator, stats: ParseStats, report: dict, counters: dict
    ):
        memories = [build_memory(r.question, r.completion, r.reward, r.answer, r.predicted) for r in records]
        candidates = extract_candidates(memories, kind, generator, self.params, stats, **self.extract_options)
        merged = hierarchical_merge(
            candidates, kind, generator, self.params, stats=stats, **self.merge_options
        ).items
        if existing and merged:
            old_items = [e.content() for e in existing]
            merged = hierarchical_merge(
                old_items + merged, kind, generator, self.params, stats=stats, **self.merge_options
            ).items
        elif existing:
            merged = [e.content() for e in existing]
        kept = self._prune(kind, merged, existing, counters)
        report[kind.name] = {"candidates": len(candidates), "existing": len(existing), "kept": len(kept)}
        return kept

    def _prune(self, kind: Kind, items: list[dict], existing, counters: dict) -> list:
        old_ids = {_normal(e.content(), kind.fields): e.entry_id for e in existing}
        limit = min(self.capacity, len(existing) + self.max_new)
        if self.prune == "order":
            chosen = items[:limit]
        else:
            new = [it for it in items if _normal(it, kind.fields) not in old_ids][: min(self.max_new, limit)]
            old = [it for it in items if _normal(it, kind.fields) in old_ids]

            def evidence(item):
                value = self.ledger.evidence(kind.name, old_ids[_normal(item, kind.fields)])
                return value if value is not None else 0.0

            old = sorted(old, key=evidence, reverse=True)  # stable: ties keep list order
            chosen = new + old[: limit - len(new)]
        # new ids continue after the highest dyn number ever issued, so a dropped entry's id (and
        # its ledger evidence) is never given to a different entry
        numbers = [int(i.rsplit("_", 1)[1]) for i in old_ids.values() if i.rsplit("_", 1)[1].isdigit()]
        last = max([counters.get(kind.name, 0), *numbers])
        make = make_skill if kind is SKILL else make_mistake
        entries = []
        for item in chosen:
            entry_id = old_ids.get(_normal(item, kind.fields))
            if entry_id is None:
                last += 1
                entry_id = f"dyn_{last:03d}"
            entries.append(make(entry_id, item))
        counters[kind.name] = last
        return entries
