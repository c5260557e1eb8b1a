"""Problems: one record type, one loader, one contamination guard.

A `Problem` is a question with a reference answer (always a string), where it
came from, an optional worked solution and free-form metadata. Every source is
read through `load_problems(source, ...)`; the source is a short spec string:

    reasoning_gym:TASK              seeded generator, any size (offline), e.g. reasoning_gym:chain_sum
    reasoning_gym:TASK?k=v&k2=v2    generator keyword arguments, e.g. reasoning_gym:chain_sum?min_terms=2&max_terms=3
                                    (values are read as JSON when they parse: 3, 0.5, true, [1, 2]; else as text)
    champ                           the 270 CHAMP competition problems (offline; concept labels in metadata)
    hf:PRESET                       a known Hugging Face dataset (see `HF_PRESETS`): dapo_math, dapo_math_processed,
                                    aime24, aime25, hmmt25, math500, gsm8k, amc23
    hf:owner/name                   any Hugging Face dataset; name its columns with `columns`
    file:PATH or PATH               a local .jsonl, .json, .parquet or .csv file, or a folder of them

Options after `?` for hf: sources: `split=test`, `config=main`, and `data_files=PATH` (a local copy of the
dataset: a file or a folder, e.g. a downloaded hub snapshot). With `data_files` a preset reads the local
copy instead of the hub but keeps the preset's column handling, so `hf:aime24?data_files=aime24.parquet`
loads a copy of HuggingFaceH4/aime_2024 offline. Without it, `datasets.load_dataset` is called (hub or
its cache; with HF_HUB_OFFLINE=1 only a cached copy loads).

`columns` maps Problem fields to source columns: {"question": "problem", "answer": "final"}. Keys are
question, answer, solution, id (short forms q, a, s); a value may be a dotted path into nested
columns, e.g. "reward_model.ground_truth" or "prompt.0.content". Unmapped fields of a local file or
hub dataset are found by common names (question: question, problem, prompt, ...; answer: answer,
final_answer, ground_truth, ...); a missing column is a `DataError` that names it and lists the
columns the file has.

`size` keeps a seeded random sample of that many problems (original order kept); generators make
exactly `size` problems (default `GENERATOR_DEFAULT_SIZE`).

Train/eval disjointness. Generators are seeded: build the training set and the evaluation set with
different seeds (convention: `seed` for training, `seed + 1` for evaluation; the trainer glue picks
them). Different seeds rarely but possibly yield the same question for small problem spaces, so
`decontaminate` also drops every training (and skill-bank seed) problem whose normalised text equals
a held-out problem. See `normalise_text` for what "normalised" means.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from sgsd.errors import DataError

log = logging.getLogger(__name__)

GENERATOR_DEFAULT_SIZE = 1000
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

# Common column names, tried in order when `columns` does not name a field.
QUESTION_COLUMNS = ("question", "problem", "prompt", "Problem", "Question", "query", "input")
ANSWER_COLUMNS = ("answer", "final_answer", "Answer", "ground_truth", "reward_model.ground_truth", "target")
SOLUTION_COLUMNS = ("solution", "Solution", "answer_cot")
ID_COLUMNS = ("id", "unique_id", "ID", "problem_idx", "idx")
FIELD_ALIASES = {"q": "question", "a": "answer", "s": "solution", "question": "question", "answer": "answer"}
FIELD_ALIASES.update({"solution": "solution", "id": "id"})


@dataclass
class Problem:
    """One problem: `answer` is the reference final answer as a string (never a full solution)."""

    id: str
    question: str
    answer: str
    source: str
    solution: str | None = None
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "source": self.source,
            "solution": self.solution,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, row: dict) -> Problem:
        missing = [k for k in ("id", "question", "answer", "source") if k not in row]
        if missing:
            raise DataError(f"problem record lacks {', '.join(missing)} (has {', '.join(sorted(row))})")
        return cls(
            id=str(row["id"]),
            question=str(row["question"]),
            answer=str(row["answer"]),
            source=str(row["source"]),
            solution=row.get("solution"),
            metadata=dict(row.get("metadata") or {}),
        )


# ---------------------------------------------------------------------------------------------------
# The entry point


def load_problems(
    source: str,
    size: int | None = None,
    seed: int = 0,
    columns: dict[str, str] | None = None,
    split: str | None = None,
) -> list[Problem]:
    """Load problems from a source spec (see the module docstring). Raises `DataError` for a
    missing file, a missing column, an unknown preset or generator, or a bad option."""
    if size is not None and size < 0:
        raise DataError(f"size must be >= 0, got {size}")
    kind, target, options = parse_source(source)
    if kind == "reasoning_gym":
        return _load_reasoning_gym(target, options, size, seed)
    if kind == "champ":
        return _take(_load_champ(), size, seed)
    if kind == "hf":
        return _take(_load_hf(target, options, columns, split), size, seed)
    return _take(_load_local(Path(target), columns, split, label=target), size, seed)


def parse_source(source: str) -> tuple[str, str, dict[str, Any]]:
    """Split a source spec into (kind, target, options): kind is reasoning_gym, champ, hf or file."""
    source = source.strip()
    if not source:
        raise DataError(
            "empty data source; use reasoning_gym:TASK, champ, hf:PRESET, hf:owner/name or a file"
        )
    for prefix in ("reasoning_gym:", "hf:"):
        if source.startswith(prefix):
            target, _, query = source[len(prefix) :].partition("?")
            if not target:
                raise DataError(f"data source {source!r} names nothing after {prefix!r}")
            return prefix[:-1], target, _parse_options(query, source)
    if source == "champ":
        return "champ", "champ", {}
    if source.startswith("file:"):
        return "file", source[len("file:") :], {}
    return "file", source, {}


def _parse_options(query: str, source: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if query and not options:
        raise DataError(
            f"cannot read the options {query!r} of data source {source!r} (use ?key=value&key2=value)"
        )
    return options


def _take(problems: list[Problem], size: int | None, seed: int) -> list[Problem]:
    """A seeded random sample of `size` problems in their original order (all when size is None)."""
    if size is None or size >= len(problems):
        return problems
    keep = sorted(random.Random(seed).sample(range(len(problems)), size))
    return [problems[i] for i in keep]


# ---------------------------------------------------------------------------------------------------
# reasoning_gym (offline generators)


def _load_reasoning_gym(task: str, kwargs: dict[str, Any], size: int | None, seed: int) -> list[Problem]:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise DataError(
            f"unknown reasoning_gym task {task!r}; math tasks include basic_arithmetic, chain_sum, "
            "decimal_arithmetic, fraction_simplification, gcd, gsm_symbolic, lcm, simple_equations "
            f"({len(DATASETS)} tasks in all)"
        )
    size = GENERATOR_DEFAULT_SIZE if size is None else size
    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise DataError(f"reasoning_gym:{task}: bad generator options {kwargs}: {exc}") from exc
    label = f"reasoning_gym:{task}"
    problems = []
    for i, item in enumerate(dataset):
        metadata = _jsonable(item.get("metadata") or {})
        solution = metadata.pop("answer_cot", None)
        problems.append(
            Problem(
                id=f"{task}-s{seed}-{i}",
                question=item["question"],
                answer=_answer_text(item["answer"]),
                source=label,
                solution=solution,
                metadata=metadata,
            )
        )
    return problems


def _jsonable(value: Any) -> Any:
    """Tuples to lists, non-JSON leaves to strings, so metadata survives a JSON round trip."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------------
# CHAMP (offline, 270 problems with concept labels)


def _load_champ() -> list[Problem]:
    try:
        import champ_dataset
    except ImportError as exc:
        raise DataError(
            "the champ source needs the champ-dataset package (pip install champ-dataset)"
        ) from exc
    dataset = champ_dataset.load("v0")
    problems = []
    for problem in dataset.problems.values():
        concepts = [cid for cid in problem.ch_list if cid in dataset.concepts]
        hints = [cid for cid in problem.ch_list if cid in dataset.hints]
        problems.append(
            Problem(
                id=problem.identifier,
                question=problem.text,
                answer=problem.answer,
                source="champ",
                solution="\n".join(step.text for step in problem.solution.steps),
                metadata={
                    "category": problem.category,
                    "concepts": concepts,
                    "concept_texts": [dataset.concepts[c].text for c in concepts],
                    "hints": [dataset.hints[h].text for h in hints],
                },
            )
        )
    return problems


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets: presets and plain names

DAPO_INSTRUCTION_HEAD = re.compile(
    r"^\s*Solve the following math problem step by step\.\s*The last line of your response should be of the "
    r"form Answer: \$Answer \(without quotes\) where \$Answer is the answer to the problem\.\s*"
)
DAPO_INSTRUCTION_TAIL = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


def strip_dapo_instruction(text: str) -> str:
    """Remove DAPO-Math's own answer-format instruction (head and tail) so the student sees one
    consistent instruction (ours: \\boxed{}). Text without it comes back unchanged (stripped)."""
    return DAPO_INSTRUCTION_TAIL.sub("", DAPO_INSTRUCTION_HEAD.sub("", text)).strip()


def gsm8k_final_answer(text: str) -> str:
    """GSM8K's answer column holds a worked solution ending in '#### 72': the final answer is after
    '####', with thousands separators removed from numbers (1,000 -> 1000)."""
    if "####" not in text:
        raise DataError(f"GSM8K answer has no '####' final answer: {text[-80:]!r}")
    final = text.rsplit("####", 1)[1].strip()
    return final.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", final) else final


@dataclass(frozen=True)
class HFPreset:
    """How to read one Hugging Face dataset: hub id, config, default split and column paths.
    Optional columns (solution, id, metadata) are used when the row has them."""

    hub_id: str
    split: str
    question: str
    answer: str
    config: str | None = None
    solution: str | None = None
    id: str | None = None
    metadata: tuple[str, ...] = ()
    clean_question: Callable[[str], str] | None = None
    clean_answer: Callable[[str], str] | None = None
    solution_from_answer: bool = False  # GSM8K: the answer column is the worked solution
    english_only: bool = False
    dedupe: bool = False
    description: str = ""
    user_columns: tuple[str, ...] = ()  # fields mapped by the caller: their columns must exist


HF_PRESETS: dict[str, HFPreset] = {
    # DAPO-Math-17k as published: the problem is the first chat message, wrapped in DAPO's own
    # format instruction; the raw set repeats each problem many times and mixes in Chinese problems.
    "dapo_math": HFPreset(
        "BytedTsinghua-SIA/DAPO-Math-17k",
        "train",
        "prompt.0.content",
        "reward_model.ground_truth",
        id="extra_info.index",
        metadata=("data_source",),
        clean_question=strip_dapo_instruction,
        english_only=True,
        dedupe=True,
        description="DAPO-Math-17k, English subset, deduplicated (paper's train set)",
    ),
    # open-r1's deduplicated copy; config "en" is the English subset; `solution` holds the final answer.
    "dapo_math_processed": HFPreset(
        "open-r1/DAPO-Math-17k-Processed",
        "train",
        "prompt",
        "solution",
        config="en",
        id="extra_info.index",
        metadata=("data_source",),
        clean_question=strip_dapo_instruction,
        description="open-r1/DAPO-Math-17k-Processed (en)",
    ),
    "aime24": HFPreset(
        "HuggingFaceH4/aime_2024",
        "train",
        "problem",
        "answer",
        solution="solution",
        id="id",
        metadata=("url", "year"),
        description="AIME 2024 (30)",
    ),
    "aime25": HFPreset(
        "yentinglin/aime_2025",
        "train",
        "problem",
        "answer",
        solution="solution",
        id="id",
        metadata=("url", "year"),
        description="AIME 2025 (30)",
    ),
    "hmmt25": HFPreset(
        "MathArena/hmmt_feb_2025",
        "train",
        "problem",
        "answer",
        id="problem_idx",
        metadata=("problem_type",),
        description="HMMT February 2025 (30)",
    ),
    "math500": HFPreset(
        "HuggingFaceH4/MATH-500",
        "test",
        "problem",
        "answer",
        solution="solution",
        id="unique_id",
        metadata=("subject", "level"),
        description="MATH-500",
    ),
    "gsm8k": HFPreset(
        "openai/gsm8k",
        "test",
        "question",
        "answer",
        config="main",
        clean_answer=gsm8k_final_answer,
        solution_from_answer=True,
        description="GSM8K (main)",
    ),
    "amc23": HFPreset(
        "math-ai/amc23",
        "test",
        "question",
        "answer",
        id="id",
        metadata=("url",),
        description="AMC 2023 (40)",
    ),
}


def _load_hf(target: str, options: dict[str, Any], columns: dict[str, str] | None, split: str | None):
    unknown = set(options) - {"split", "config", "data_files"}
    if unknown:
        raise DataError(
            f"hf:{target}: unknown option(s) {', '.join(sorted(unknown))} (use split, config, data_files)"
        )
    split = split or options.get("split")  # an explicit split; None = the preset's default
    data_files = options.get("data_files")
    if "/" not in target:
        if target not in HF_PRESETS:
            raise DataError(
                f"unknown dataset preset hf:{target}; presets: {', '.join(sorted(HF_PRESETS))} "
                "(or hf:owner/name with columns)"
            )
        preset = HF_PRESETS[target]
        label = f"hf:{target}"
        if columns:
            preset = _preset_with_columns(preset, columns)
    else:
        preset = _preset_with_columns(HFPreset(target, "train", "", ""), columns or {})
        label = f"hf:{target}"
    if (
        data_files is not None
    ):  # a folder is filtered by the split; the preset's default split only if present
        rows = _read_local(Path(str(data_files)), split or preset.split, split_required=split is not None)
    else:
        rows = _read_hub(preset.hub_id, options.get("config", preset.config), split or preset.split)
    return _rows_to_problems(
        rows, preset, label, id_prefix=f"{target.replace('/', '_')}-{split or preset.split}"
    )


def _preset_with_columns(preset: HFPreset, columns: dict[str, str]) -> HFPreset:
    mapped = _canonical_columns(columns)
    return HFPreset(**{**preset.__dict__, **mapped, "user_columns": tuple(mapped)})


def _read_hub(hub_id: str, config: str | None, split: str) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # network, missing dataset, missing split: all user-environment problems
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"cannot load {hub_id} (config {config}, split {split}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {first_line}; offline, pass a local copy with ?data_files=PATH"
        ) from exc
    return [dict(row) for row in dataset]


# ---------------------------------------------------------------------------------------------------
# Local files


def _load_local(path: Path, columns: dict[str, str] | None, split: str | None, label: str) -> list[Problem]:
    if not path.exists():
        raise DataError(
            f"data file not found: {path} (a source is reasoning_gym:TASK, champ, hf:PRESET, hf:owner/name, "
            "or a .jsonl/.json/.parquet/.csv file or folder)"
        )
    preset = _preset_with_columns(HFPreset(str(path), split or "", "", ""), columns or {})
    return _rows_to_problems(_read_local(path, split), preset, f"file:{label}", id_prefix=path.stem)


def _read_local(path: Path, split: str | None, split_required: bool = True) -> list[dict]:
    """Rows of a local file, or of every data file in a folder. In a folder, only the files of
    `split` (named split*, e.g. test-00000-of-00001.parquet, or inside a folder named split) are
    read; when no file matches and the split is not `split_required`, all files are read."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if split:
            of_split = [
                p for p in files if p.name.startswith(split) or split in p.relative_to(path).parts[:-1]
            ]
            files = of_split if (of_split or split_required) else files
        if not files:
            wanted = f" for split {split!r}" if split else ""
            raise DataError(f"no .jsonl/.json/.parquet/.csv files{wanted} in folder {path}")
        return [row for p in files for row in _read_file(p)]
    return _read_file(path)


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{i}: not valid JSON ({exc.msg})") from exc
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
            rows = _json_rows(data, path)
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            raise DataError(
                f"unsupported data file type {path.suffix!r} for {path} (use .jsonl, .json, .parquet, .csv)"
            )
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    if not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{path}: every record must be an object with named columns")
    return rows


def _json_rows(data: Any, path: Path) -> list:
    """A .json file holds a list of records, or an object with one list of records (e.g. {"data": [...]})."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
    raise DataError(f"{path}: expected a list of records or an object holding one list of records")


# ---------------------------------------------------------------------------------------------------
# Rows to problems


def _canonical_columns(columns: dict[str, str]) -> dict[str, str]:
    mapped = {}
    for key, column in columns.items():
        if key not in FIELD_ALIASES:
            raise DataError(
                f"unknown column mapping key {key!r}; use question (q), answer (a), solution (s) or id"
            )
        mapped[FIELD_ALIASES[key]] = column
    return mapped


def _lookup(row: dict, path: str) -> tuple[bool, Any]:
    """Follow a dotted column path (`reward_model.ground_truth`, `prompt.0.content`) into a row."""
    if path in row:
        return True, row[path]
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif (
            isinstance(value, list | tuple)
            and part.lstrip("-").isdigit()
            and -len(value) <= int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            return False, None
    return True, value


def _resolve_column(
    rows: list[dict], wanted: str, candidates: tuple[str, ...], field_name: str, label: str
) -> str:
    """The column for `field_name`: the mapped one (must exist) or the first common name present."""
    first = rows[0]
    if wanted:
        if not _lookup(first, wanted)[0]:
            raise DataError(
                f"{label}: column {wanted!r} (for {field_name}) not found; available columns: {', '.join(first)}"
            )
        return wanted
    for name in candidates:
        if _lookup(first, name)[0]:
            return name
    raise DataError(
        f"{label}: no {field_name} column (tried {', '.join(candidates)}); available columns: {', '.join(first)}; "
        f"map one with columns={{'{field_name}': NAME}} or --columns {field_name[0]}=NAME"
    )


def _answer_text(value: Any) -> str:
    """Answers as strings: integral floats lose their '.0' (27.0 -> '27'), lists join with ', '."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple):
        return ", ".join(_answer_text(v) for v in value)
    return str(value).strip()


def _rows_to_problems(rows: list[dict], preset: HFPreset, label: str, id_prefix: str) -> list[Problem]:
    if not rows:
        raise DataError(f"{label}: the dataset has no rows")
    q_col = _resolve_column(rows, preset.question, QUESTION_COLUMNS, "question", label)
    a_col = _resolve_column(rows, preset.answer, ANSWER_COLUMNS, "answer", label)
    s_col = _optional_column(rows, preset.solution, SOLUTION_COLUMNS, "solution", label, preset)
    id_col = _optional_column(rows, preset.id, ID_COLUMNS, "id", label, preset)
    used = {
        q_col.split(".")[0],
        a_col.split(".")[0],
        (s_col or "").split(".")[0],
        (id_col or "").split(".")[0],
    }
    problems, seen = [], set()
    for i, row in enumerate(rows):
        question = str(_lookup(row, q_col)[1] or "")
        if preset.clean_question:
            question = preset.clean_question(question)
        if preset.english_only and CJK.search(question):
            continue
        if preset.dedupe:
            if question in seen:
                continue
            seen.add(question)
        raw_answer = _lookup(row, a_col)[1]
        if not question.strip() or raw_answer is None or not str(raw_answer).strip():
            raise DataError(
                f"{label}: row {i} has an empty {'question' if not question.strip() else 'answer'}"
            )
        answer = preset.clean_answer(str(raw_answer)) if preset.clean_answer else _answer_text(raw_answer)
        solution = _lookup(row, s_col)[1] if s_col else None
        if preset.solution_from_answer:
            solution = str(raw_answer).rsplit("####", 1)[0].strip()
        row_id = _lookup(row, id_col)[1] if id_col else None
        if preset.metadata:
            metadata = {k: _jsonable(row[k]) for k in preset.metadata if k in row}
        else:
            metadata = {k: _jsonable(v) for k, v in row.items() if k not in used}
        problems.append(
            Problem(
                id=f"{id_prefix}-{row_id}" if row_id is not None else f"{id_prefix}-{i}",
                question=question,
                answer=answer,
                source=label,
                solution=None if solution is None else str(solution),
                metadata=metadata,
            )
        )
    return problems


def _optional_column(rows, wanted, candidates, field_name, label, preset) -> str | None:
    """Optional fields: a column the user mapped must exist; a preset's column or a common name is
    used when the rows have it."""
    if field_name in preset.user_columns:
        return _resolve_column(rows, wanted, candidates, field_name, label)
    if wanted:
        return wanted if _lookup(rows[0], wanted)[0] else None
    return next((name for name in candidates if _lookup(rows[0], name)[0]), None)


# ---------------------------------------------------------------------------------------------------
# Contamination guard

_LATEX_NOISE = re.compile(r"\\(?:left|right|displaystyle|textstyle|limits|qquad|quad|[,;:! ])")
_LATEX_TEXT = re.compile(r"\\(?:text|textrm|mathrm|textbf|mathbf|operatorname|mbox)\s*\{([^{}]*)\}")
_SINGLE_BRACED = re.compile(r"([\^_])\{(\w)\}")
_PUNCT_NOISE = re.compile(r"[\s$~,;:?'\"`]|(?<!\d)\.|\.(?!\d)")


def normalise_text(text: str) -> str:
    """The text the contamination guard compares. Steps, in order:
    Unicode NFKC and lowercase; drop LaTeX spacing and sizing commands (\\, \\; \\: \\! \\quad \\qquad
    \\left \\right \\displaystyle \\textstyle \\limits); \\dfrac and \\tfrac become \\frac; unwrap \\text{..},
    \\mathrm{..} and similar; x^{2} becomes x^2; then drop whitespace, $, ~, commas, semicolons, colons,
    question marks, quotes, backticks and every period that is not a decimal point. Digits, letters,
    operators, brackets and decimal points stay, so '4 - 1' and '4 + 1' remain different."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = _LATEX_NOISE.sub(" ", t)
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    t = _LATEX_TEXT.sub(r"\1", t)
    t = _SINGLE_BRACED.sub(r"\1\2", t)
    return _PUNCT_NOISE.sub("", t)


def text_fingerprint(text: str) -> str:
    """SHA-1 of `normalise_text(text)`: equal fingerprints mean the same problem up to formatting noise."""
    return hashlib.sha1(normalise_text(text).encode("utf-8")).hexdigest()


def decontaminate(train: list[Problem], held_out: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    """Split `train` into (kept, dropped): dropped are the problems whose normalised question text
    equals a held-out (evaluation) problem's. Use it on training problems and on skill-bank seed
    problems, so no evaluation problem is trained on or mined for skills. Logs a one-line summary
    (see `decontamination_summary`)."""
    held = {text_fingerprint(p.question): p for p in held_out}
    kept, dropped = [], []
    for problem in train:
        match = held.get(text_fingerprint(problem.question))
        if match is None:
            kept.append(problem)
        else:
            dropped.append(problem)
    summary = decontamination_summary(kept, dropped, held_out)
    (log.warning if dropped else log.info)(summary)
    return kept, dropped


def decontamination_summary(kept: list[Problem], dropped: list[Problem], held_out: list[Problem]) -> str:
    """One line: how many problems were dropped, out of how many, and the first few dropped ids."""
    total = len(kept) + len(dropped)
    line = (
        f"contamination guard: dropped {len(dropped)} of {total} problems whose text matches one of "
        f"{len(held_out)} held-out problems"
    )
    if dropped:
        shown = ", ".join(p.id for p in dropped[:5])
        line += f" ({shown}{', ...' if len(dropped) > 5 else ''})"
    return line


# ---------------------------------------------------------------------------------------------------
# The run's problem sets, built in one place for training, in-loop evaluation and `sgsd eval --run`

HELD_OUT_SEED_OFFSET = 1  # held-out sets use generator seed data.seed + 1, training data.seed
VALIDATION_SEED_OFFSET = 2  # the validation split: data.seed + 2


def held_out_sets(data_cfg, sources=None) -> dict[str, list[Problem]]:
    """The held-out problems of a run, per source: `data.eval_sources` (or `sources`), `data.eval_size`
    each, generator seed `data.seed + 1` so that generated held-out problems differ from the training
    draw, and each loader's own columns (`data.columns` maps the training file only). The trainer's
    in-loop evaluation, `sgsd eval` and the learning benchmark all call this, so they score the same
    problems."""
    names = data_cfg.eval_sources if sources is None else sources
    seed = data_cfg.seed + HELD_OUT_SEED_OFFSET
    return {src: load_problems(src, size=data_cfg.eval_size, seed=seed) for src in names}


def validation_sets(data_cfg, test_sets: dict[str, list[Problem]]) -> dict[str, list[Problem]]:
    """The run's validation split, per evaluation source: `data.validation_size` problems ({} when it is
    None) whose normalised text matches no test problem of `test_sets` (`held_out_sets`; the
    contamination guard's test). Generators draw with seed `data.seed + 2` and keep the first `size`
    problems that pass; files and hub datasets take a seeded sample of the rows that pass (all of them
    when fewer are left)."""
    size = data_cfg.validation_size
    if not size:
        return {}
    seed = data_cfg.seed + VALIDATION_SEED_OFFSET
    test = [p for probs in test_sets.values() for p in probs]
    out = {}
    for src in test_sets:
        if parse_source(src)[0] == "reasoning_gym":  # enough draws to replace every possible repeat
            kept, _dropped = decontaminate(load_problems(src, size=size + len(test), seed=seed), test)
            out[src] = kept[:size]
        else:
            kept, _dropped = decontaminate(load_problems(src, seed=seed), test)
            out[src] = _take(kept, size, seed)
        if not out[src]:
            raise DataError(f"no validation problems left from {src} after removing the test problems")
    return out


def training_problems(
    data_cfg, held_out: dict[str, list[Problem]], validation: dict[str, list[Problem]] | None = None
) -> list[Problem]:
    """The run's training problems (seed `data.seed`, `data.columns`), without any whose text matches
    a held-out (test) or validation problem when `data.contamination_guard` is on. Raises DataError if
    none are left."""
    problems = load_problems(
        data_cfg.train_source, size=data_cfg.train_size, seed=data_cfg.seed, columns=data_cfg.columns
    )
    guarded = [p for sets in (held_out, validation or {}) for probs in sets.values() for p in probs]
    if data_cfg.contamination_guard and guarded:
        problems, _dropped = decontaminate(problems, guarded)
    if not problems:
        raise DataError(f"no training problems left from {data_cfg.train_source}")
    return problems


def step_problems(
    problems: list, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
) -> list:
    """The problems of one training step: positions step*batch_size .. +batch_size of an endless sequence
    of seeded permutations (one per epoch), this rank's share (every `world`-th from `rank`). A pure
    function of its arguments, so a resumed run sees exactly the problems an uninterrupted one would."""
    n = len(problems)
    orders: dict[int, list[int]] = {}  # one seeded permutation per epoch this step touches
    picked = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
        picked.append(problems[orders[epoch][pos]])
    return picked[rank::world]
