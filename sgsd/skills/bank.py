"""The skill bank B = {G, E} (paper Section 2.1, Appendix B, Table 5, Fig. 5).

A bank is a JSON object with two lists and free-form metadata:

    {"general_skills":  [{"skill_id", "title", "principle", "when_to_apply"}, ...],
     "common_mistakes": [{"mistake_id", "description", "why_it_happens", "how_to_avoid"}, ...],
     "metadata": {...}}

Reference-repository files also carry an empty `task_specific_skills` object; it is accepted
when empty and never written. Unknown keys inside an entry are dropped.

Identifiers: static (cold-start) entries are `gen_###` (skills) and `err_###` (mistakes);
entries written by online evolution (Alg. 4) are `dyn_###` in *both* lists. A dynamic skill and
a dynamic mistake are told apart by the list they live in, never by the id alone: `dyn_001` may
exist in both. Anything keyed across lists (the ledger) uses `entry_key(kind, id)`, e.g.
`skill:dyn_001` and `mistake:dyn_001`.

Every validation problem raises `DataError` naming the file, the entry and the field. Writes are
atomic, so the previous good file survives any failure; `save_snapshot` keeps step-indexed copies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sgsd.errors import DataError
from sgsd.fileio import atomic_write_json

SKILL_FIELDS = ("title", "principle", "when_to_apply")
MISTAKE_FIELDS = ("description", "why_it_happens", "how_to_avoid")
DYNAMIC_PREFIX = "dyn"
BUILTIN_BANKS = {"starter": "starter_bank.json"}


def entry_key(kind: str, entry_id: str) -> str:
    """A key unique across both lists: `skill:gen_001`, `mistake:dyn_003`."""
    return f"{kind}:{entry_id}"


@dataclass(frozen=True)
class GeneralSkill:
    """Positive guidance: what to do and when."""

    skill_id: str
    title: str
    principle: str
    when_to_apply: str

    kind = "skill"

    @property
    def entry_id(self) -> str:
        return self.skill_id

    @property
    def dynamic(self) -> bool:
        return self.skill_id.startswith(DYNAMIC_PREFIX + "_")

    def text(self) -> str:
        """The text that is embedded for retrieval: `title. principle. when_to_apply`."""
        return f"{self.title}. {self.principle}. {self.when_to_apply}"

    def content(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in SKILL_FIELDS}


@dataclass(frozen=True)
class CommonMistake:
    """Negative guidance: an error pattern, its cause and its remedy."""

    mistake_id: str
    description: str
    why_it_happens: str
    how_to_avoid: str

    kind = "mistake"

    @property
    def entry_id(self) -> str:
        return self.mistake_id

    @property
    def dynamic(self) -> bool:
        return self.mistake_id.startswith(DYNAMIC_PREFIX + "_")

    def text(self) -> str:
        """The text that is embedded for retrieval: `description. why_it_happens. how_to_avoid`."""
        return f"{self.description}. {self.why_it_happens}. {self.how_to_avoid}"

    def content(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in MISTAKE_FIELDS}


def make_skill(skill_id: str, item: dict) -> GeneralSkill:
    return GeneralSkill(skill_id, *(item[f] for f in SKILL_FIELDS))


def make_mistake(mistake_id: str, item: dict) -> CommonMistake:
    return CommonMistake(mistake_id, *(item[f] for f in MISTAKE_FIELDS))


@dataclass
class SkillBank:
    general_skills: list[GeneralSkill] = field(default_factory=list)
    common_mistakes: list[CommonMistake] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    # ---- views

    @property
    def static_skills(self) -> list[GeneralSkill]:
        return [s for s in self.general_skills if not s.dynamic]

    @property
    def dynamic_skills(self) -> list[GeneralSkill]:
        return [s for s in self.general_skills if s.dynamic]

    @property
    def static_mistakes(self) -> list[CommonMistake]:
        return [m for m in self.common_mistakes if not m.dynamic]

    @property
    def dynamic_mistakes(self) -> list[CommonMistake]:
        return [m for m in self.common_mistakes if m.dynamic]

    def with_dynamic(
        self, skills: list[GeneralSkill], mistakes: list[CommonMistake], metadata: dict | None = None
    ) -> SkillBank:
        """A new bank: these static entries unchanged, followed by the given dynamic entries."""
        bank = SkillBank(
            self.static_skills + list(skills),
            self.static_mistakes + list(mistakes),
            dict(self.metadata if metadata is None else metadata),
        )
        bank.validate()
        return bank

    # ---- (de)serialisation

    def to_dict(self) -> dict:
        return {
            "general_skills": [asdict(s) for s in self.general_skills],
            "common_mistakes": [asdict(m) for m in self.common_mistakes],
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "bank") -> SkillBank:
        """Validate plain JSON data; raises DataError naming `source`, the entry and the field."""
        if not isinstance(data, dict):
            raise DataError(f"{source}: the top level must be a JSON object, got {type(data).__name__}")
        allowed = {"general_skills", "common_mistakes", "metadata", "task_specific_skills"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise DataError(f"{source}: unknown top-level key '{unknown[0]}' (expected {sorted(allowed)})")
        task_specific = data.get("task_specific_skills", {})
        if task_specific not in ({}, None, []):
            raise DataError(f"{source}: non-empty 'task_specific_skills' is not supported")
        metadata = data.get("metadata", {})
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise DataError(f"{source}: 'metadata' must be an object, got {type(metadata).__name__}")
        skills = _read_list(data, "general_skills", "skill_id", SKILL_FIELDS, source)
        mistakes = _read_list(data, "common_mistakes", "mistake_id", MISTAKE_FIELDS, source)
        return cls(
            [GeneralSkill(**s) for s in skills], [CommonMistake(**m) for m in mistakes], dict(metadata)
        )

    def validate(self) -> None:
        SkillBank.from_dict(self.to_dict())

    def save(self, path: str | Path) -> Path:
        """Validate, then write atomically (the previous file is kept if anything fails)."""
        self.validate()
        return atomic_write_json(path, self.to_dict())

    def save_snapshot(self, folder: str | Path, step: int) -> Path:
        """Write `folder/bank-step{step:06d}.json`, then `folder/bank-latest.json`; return the snapshot."""
        folder = Path(folder)
        snapshot = self.save(folder / f"bank-step{step:06d}.json")
        self.save(folder / "bank-latest.json")
        return snapshot

    def fingerprint(self) -> str:
        """A content hash of the entries (ids and texts, in order; metadata excluded): any change to
        what retrieval could return changes it, so it keys embedding caches."""
        payload = json.dumps(
            [self.to_dict()["general_skills"], self.to_dict()["common_mistakes"]],
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.general_skills) + len(self.common_mistakes)


def _read_list(data: dict, key: str, id_field: str, fields: tuple[str, ...], source: str) -> list[dict]:
    items = data.get(key, [])
    if not isinstance(items, list):
        raise DataError(f"{source}: '{key}' must be a list, got {type(items).__name__}")
    out, seen = [], set()
    for i, item in enumerate(items):
        where = f"{source}: {key}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{where}: must be an object, got {type(item).__name__}")
        entry_id = item.get(id_field)
        if not isinstance(entry_id, str) or not entry_id.strip():
            raise DataError(f"{where}: field '{id_field}' must be a non-empty string")
        where = f"{where} ({entry_id})"
        if entry_id in seen:
            raise DataError(f"{where}: duplicate {id_field} '{entry_id}'")
        seen.add(entry_id)
        row = {id_field: entry_id}
        for f in fields:
            value = item.get(f)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field '{f}' must be a non-empty string, got {value!r}")
            row[f] = value.strip()
        out.append(row)
    return out


def load_bank(spec: str | Path) -> SkillBank:
    """Load `builtin:NAME` (shipped in sgsd/assets) or a JSON file; DataError on any problem."""
    spec_text = str(spec)
    if spec_text.startswith("builtin:"):
        name = spec_text.split(":", 1)[1]
        if name not in BUILTIN_BANKS:
            raise DataError(f"unknown builtin bank '{name}'; available: {', '.join(sorted(BUILTIN_BANKS))}")
        text = resources.files("sgsd.assets").joinpath(BUILTIN_BANKS[name]).read_text(encoding="utf-8")
        return _parse_text(text, spec_text)
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"skill bank not found: {path}") from exc
    except IsADirectoryError as exc:
        raise DataError(f"skill bank {path} is a folder, expected a JSON file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read skill bank {path}: {exc}") from exc
    return _parse_text(text, str(path))


def _parse_text(text: str, source: str) -> SkillBank:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{source}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    return SkillBank.from_dict(data, source)
