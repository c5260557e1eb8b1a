"""Online skill evolution (paper Alg. 4, Appendix C.4).

The trainer adds one record per rollout (`add_records`); the evolver keeps those of the last F
steps (`window_mode="window"`) or of the update step only (`window_mode="step"`, as the reference,
which reads the update step's last micro-batch gathered across processes: about 4 records), and the
window is part of checkpoints (`state_dict`). `maybe_update(step, bank, generator, ledger)` at every step:

    skip unless step % F == 0 and the window is not empty
    skip when the window's success rate >= gamma
    W+ -> skill extraction, W- -> mistake extraction (same prompts as the cold start)
    merge the new candidates of each kind (Alg. 3), then merge them with the existing dynamic
        entries of that kind (skipped when there are none)
    keep at most min(C, |existing dynamic| + N) entries per collection (N net new, capacity C):
        default                 -> the first ones in the merged list (the paper / reference)
        prune_by_evidence=True  -> entries not in the old bank first (up to N, in list order),
                                   then old entries by ledger evidence, best first (never
                                   retrieved counts as 0)
    static entries are never touched; the caller saves the result (`bank.save_snapshot(dir, step)`
        writes bank-step######.json and bank-latest.json)

Ids stay stable for the ledger: a dynamic entry that survives with identical text keeps its
`dyn_###` id; new entries get numbers after the highest ever issued (`metadata.dynamic_id_counter`),
so an id is never reused for different text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sgsd.skills.bank import SkillBank, make_mistake, make_skill
from sgsd.skills.build import build_memory, extract_candidates
from sgsd.skills.llm import MISTAKE, SKILL, Kind, greedy_params
from sgsd.skills.merge import content_key, hierarchical_merge
from sgsd.skills.parse import ParseStats


@dataclass(frozen=True)
class RolloutRecord:
    """One rollout as the evolver sees it: (question, completion, reward, answer, step)."""

    question: str
    completion: str
    reward: float
    answer: str
    step: int
    predicted: str | None = None  # the verifier's extracted answer, when known

    @classmethod
    def from_dict(cls, row: dict, step: int | None = None) -> RolloutRecord:
        return cls(
            str(row["question"]),
            str(row["completion"]),
            float(row["reward"]),
            str(row["answer"]),
            int(row.get("step", step) if step is None else step),
            row.get("predicted"),
        )


class OnlineEvolver:
    """Alg. 4 with a window of the last `update_every` steps (or of the update step: `window_mode`). `params` are the sampling settings of
    extraction/merge calls (default: greedy with `max_new_tokens`); `prompts` overrides sgsd.prompts;
    `group_embedder` forms merge groups by similarity (see sgsd.skills.merge)."""

    def __init__(
        self,
        *,
        update_every: int = 25,
        success_threshold: float = 0.8,
        max_new: int = 5,
        capacity: int = 30,
        prune_by_evidence: bool = False,
        merge_group_size: int = 32,
        merge_patience: int = 3,
        max_new_tokens: int = 2048,
        enable_thinking: bool = False,
        max_items: int = 3,
        batch_size: int = 8,
        ledger=None,
        params=None,
        prompts=None,
        group_embedder=None,
        window_mode: str = "window",
    ):
        if window_mode not in ("step", "window"):
            raise ValueError(f"window_mode must be step or window, got {window_mode!r}")
        self.window_mode = window_mode
        self.update_every = update_every
        self.success_threshold = success_threshold
        self.max_new = max_new
        self.capacity = capacity
        self.prune_by_evidence = prune_by_evidence
        self.max_new_tokens = max_new_tokens
        self.ledger = ledger
        self.params = params
        self.merge_options = dict(
            group_size=merge_group_size,
            patience=merge_patience,
            group_embedder=group_embedder,
            prompts=prompts,
            enable_thinking=enable_thinking,
            batch_size=batch_size,
        )
        self.extract_options = dict(
            prompts=prompts, enable_thinking=enable_thinking, max_items=max_items, batch_size=batch_size
        )
        self.window: list[RolloutRecord] = []

    # ---- the window

    def add_records(self, records, step: int | None = None) -> None:
        """Add rollouts (RolloutRecord or dicts with question, completion, reward, answer[, step]);
        `step` overrides the records' own step. Records older than the last F steps (window_mode
        "window") or than `step` ("step") are dropped."""
        for r in records:
            self.window.append(r if isinstance(r, RolloutRecord) and step is None else _as_record(r, step))
        if step is not None:
            self._trim(step)

    def _trim(self, step: int) -> list[RolloutRecord]:
        span = self.update_every if self.window_mode == "window" else 1
        self.window = [r for r in self.window if step - span < r.step <= step]
        return self.window

    def state_dict(self) -> dict:
        return {"window": [asdict(r) for r in self.window]}

    def load_state_dict(self, state: dict) -> None:
        self.window = [RolloutRecord(**r) for r in state.get("window", [])]

    # ---- Alg. 4

    def maybe_update(self, step: int, bank: SkillBank, generator, ledger=None) -> tuple[SkillBank, dict]:
        """Alg. 4 at `step`. Returns (bank, report); report["updated"] says whether the bank changed
        (otherwise the same bank object comes back) and report["skipped"] why not."""
        ledger = ledger if ledger is not None else self.ledger
        report: dict = {"step": step, "updated": False}
        if step <= 0 or step % self.update_every:
            return bank, report | {"skipped": "not an update step"}
        window = self._trim(step)
        report["window"] = len(window)
        if not window:
            return bank, report | {"skipped": "empty window"}
        successes = [r for r in window if r.reward > 0]
        failures = [r for r in window if r.reward <= 0]
        rate = len(successes) / len(window)
        report["success_rate"] = rate
        if rate >= self.success_threshold:
            return bank, report | {"skipped": f"success rate {rate:.2f} >= {self.success_threshold}"}
        if self.prune_by_evidence and ledger is None:
            raise ValueError("prune_by_evidence needs a ledger")
        params = self.params if self.params is not None else greedy_params(self.max_new_tokens)
        stats = ParseStats()
        metadata = dict(bank.metadata)
        counters = dict(metadata.get("dynamic_id_counter", {}))
        job = dict(
            generator=generator, params=params, stats=stats, report=report, counters=counters, ledger=ledger
        )
        skills = self._collection(SKILL, successes, bank.dynamic_skills, **job)
        mistakes = self._collection(MISTAKE, failures, bank.dynamic_mistakes, **job)
        report["parse_calls"] = stats.calls
        report["parse_failures"] = sum(stats.failures.values())
        report["parse_failure_reasons"] = dict(stats.failures)
        metadata["dynamic_id_counter"] = counters
        metadata["online_updates"] = [*metadata.get("online_updates", []), dict(report, updated=True)]
        updated = bank.with_dynamic(skills, mistakes, metadata)
        report["updated"] = updated.fingerprint() != bank.fingerprint()
        return (updated if report["updated"] else bank), report

    def _collection(
        self, kind: Kind, records, existing, *, generator, params, stats, report, counters, ledger
    ):
        memories = [build_memory(r.question, r.completion, r.reward, r.answer, r.predicted) for r in records]
        candidates = extract_candidates(memories, kind, generator, params, stats, **self.extract_options)
        merged = hierarchical_merge(
            candidates, kind, generator, params, stats=stats, **self.merge_options
        ).items
        if existing and merged:
            old_items = [e.content() for e in existing]
            merged = hierarchical_merge(
                old_items + merged, kind, generator, params, stats=stats, **self.merge_options
            ).items
        elif existing:
            merged = [e.content() for e in existing]
        kept = self._prune(kind, merged, existing, counters, ledger)
        report[kind.name] = {"candidates": len(candidates), "existing": len(existing), "kept": len(kept)}
        return kept

    def _prune(self, kind: Kind, items: list[dict], existing, counters: dict, ledger) -> list:
        old_ids = {content_key(e.content(), kind.fields): e.entry_id for e in existing}
        limit = min(self.capacity, len(existing) + self.max_new)
        if not self.prune_by_evidence:
            chosen = items[:limit]
        else:
            new = [it for it in items if content_key(it, kind.fields) not in old_ids][
                : min(self.max_new, limit)
            ]
            old = [it for it in items if content_key(it, kind.fields) in old_ids]

            def evidence(item):
                value = ledger.evidence(kind.name, old_ids[content_key(item, kind.fields)])
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
            entry_id = old_ids.get(content_key(item, kind.fields))
            if entry_id is None:
                last += 1
                entry_id = f"dyn_{last:03d}"
            entries.append(make(entry_id, item))
        counters[kind.name] = last
        return entries


def _as_record(row, step: int | None) -> RolloutRecord:
    if isinstance(row, RolloutRecord):
        return RolloutRecord(row.question, row.completion, row.reward, row.answer, step, row.predicted)
    return RolloutRecord.from_dict(row, step)
