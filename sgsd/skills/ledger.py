"""The skill ledger: per bank entry, how its teachers behaved during training (beyond the paper).

Each retrieved pair (g_k, e_k) is one teacher. After scoring, the trainer hands the ledger the
pairs with each teacher's robust support a~_k (Eq. 12), its polarity rho_k (Eq. 13) and the
rollout reward r. Both entries of pair k are credited with teacher k's outcome, classified by
Table 2 with the confidence threshold eps_a:

    |a~| <= eps_a              -> neutral
    r > 0 and a~ >  eps_a      -> helpful           (distilled)
    r < 0 and a~ < -eps_a      -> warning           (distilled)
    r > 0 and a~ < -eps_a      -> over_suppressive  (reversed)
    r < 0 and a~ >  eps_a      -> misleading        (reversed)

The category comes from (r, a~, eps_a), not from rho, so it stays meaningful in ablations that
switch polarity off; rho is tallied separately as the direction actually applied
(distilled rho > 0, reversed rho < 0, ignored rho = 0).

Entries are keyed `skill:<id>` / `mistake:<id>` (a dynamic skill and a dynamic mistake may share
an id). `evidence(key)` = (helpful + warning - misleading - over_suppressive) / retrieved is the
score online evolution can prune by. The ledger is saved as atomic JSON beside the bank.

Only methods with one pair per teacher (SGSD) keep a ledger. A teacher that carries several pairs at
once (OPSD+Skill: one teacher whose prompt holds every retrieved pair) has one support and one
polarity for all of them, which says nothing about any single pair, so nothing is recorded for it;
GRPO+Skill has no teachers. Only steps whose update was applied are recorded (a step skipped for a
non-finite loss leaves the ledger unchanged).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sgsd.errors import DataError
from sgsd.fileio import atomic_write_json
from sgsd.skills.bank import entry_key

CATEGORIES = ("helpful", "warning", "over_suppressive", "misleading", "neutral")
DIRECTIONS = ("distilled", "reversed", "ignored")
LEDGER_FILENAME = "skill_ledger.json"


def classify(reward: float, support: float, threshold: float) -> str:
    """Table 2 category of one teacher (see the module docstring)."""
    if abs(support) <= threshold or reward == 0:
        return "neutral"
    if reward > 0:
        return "helpful" if support > 0 else "over_suppressive"
    return "warning" if support < 0 else "misleading"


@dataclass
class LedgerEntry:
    kind: str
    entry_id: str
    text: str = ""
    retrieved: int = 0
    support_sum: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    directions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))

    @property
    def mean_support(self) -> float:
        return self.support_sum / self.retrieved if self.retrieved else 0.0

    @property
    def evidence(self) -> float:
        if not self.retrieved:
            return 0.0
        c = self.counts
        return (c["helpful"] + c["warning"] - c["misleading"] - c["over_suppressive"]) / self.retrieved


def _to_floats(values) -> list[float]:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().float().cpu().tolist()
    elif hasattr(values, "tolist"):  # a numpy array
        values = values.tolist()
    return [float(v) for v in values]


class SkillLedger:
    def __init__(self, threshold: float = 0.05):
        self.threshold = threshold  # eps_a of Eq. 13
        self.entries: dict[str, LedgerEntry] = {}
        self.records = 0  # teacher outcomes recorded

    def _entry(self, item) -> LedgerEntry:
        key = entry_key(item.kind, item.entry_id)
        if key not in self.entries:
            self.entries[key] = LedgerEntry(item.kind, item.entry_id, item.text()[:200])
        return self.entries[key]

    def record(self, pairs, support, rho, reward: float) -> None:
        """Credit each pair's skill and mistake with its teacher's outcome.
        pairs: K RetrievedPair; support: [K] robust support a~_k; rho: [K] polarity; reward: r."""
        support, rho = _to_floats(support), _to_floats(rho)
        if not (len(pairs) == len(support) == len(rho)):
            raise ValueError(f"ledger.record: {len(pairs)} pairs, {len(support)} supports, {len(rho)} rho")
        for pair, a, p in zip(pairs, support, rho, strict=True):
            category = classify(float(reward), a, self.threshold)
            direction = "distilled" if p > 0 else "reversed" if p < 0 else "ignored"
            for item in (pair.skill, pair.mistake):
                entry = self._entry(item)
                entry.retrieved += 1
                entry.support_sum += a
                entry.counts[category] += 1
                entry.directions[direction] += 1
            self.records += 1

    def evidence(self, kind: str, entry_id: str) -> float | None:
        """Evidence score of an entry, None when it was never retrieved."""
        entry = self.entries.get(entry_key(kind, entry_id))
        return entry.evidence if entry and entry.retrieved else None

    # ---- files

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "records": self.records,
            "entries": {k: asdict(e) for k, e in self.entries.items()},
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SkillLedger:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"ledger not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read ledger {path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise DataError(f"{path}: not a skill ledger (expected an object with 'entries')")
        ledger = cls(float(data.get("threshold", 0.05)))
        ledger.records = int(data.get("records", 0))
        for key, raw in data["entries"].items():
            try:
                entry = LedgerEntry(**raw)
            except TypeError as exc:
                raise DataError(f"{path}: entry '{key}' is malformed ({exc})") from exc
            ledger.entries[key] = entry
        return ledger

    def table(self) -> list[dict]:
        """One row per entry, most retrieved first."""
        rows = []
        for key, e in sorted(self.entries.items(), key=lambda kv: (-kv[1].retrieved, kv[0])):
            rows.append(
                {"entry": key, "retrieved": e.retrieved, "mean_support": round(e.mean_support, 4)}
                | e.counts
                | {"evidence": round(e.evidence, 4), "text": e.text}
            )
        return rows
