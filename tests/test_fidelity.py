"""docs/FIDELITY.md is the contract of the paper configs: every value in its two tables must be what the
packaged configs resolve to, and every setting a paper config changes must have a row."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from sgsd.config import Config, load_config
from sgsd.configs import CONFIG_DIR, resolve_config_path

DOC = Path(__file__).resolve().parents[1] / "docs" / "FIDELITY.md"
METHODS = ("sgsd", "opsd", "opsd_skill", "grpo", "grpo_skill", "base_skill")
SIZES = {"1.7b": "1.7B", "4b": "4B", "8b": "8B"}
NOT_APPLICABLE = "–"


def _table(heading: str, columns: int) -> list[list[str]]:
    """The rows of the table under `heading`: the first `columns` cells of each (the last, free-text
    column may hold '|' inside code spans, so it is never split)."""
    lines = DOC.read_text(encoding="utf-8").split(heading, 1)[1].splitlines()
    rows = []
    for line in lines[1:]:
        if not line.strip():
            if rows:
                break
            continue
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line[1:].split("|", columns)[:columns]])
    header, rule, *body = rows
    assert set(rule[0]) <= {"-", ":"}, f"{heading}: not a table"
    return [header, *body]


def _value(cell: str, size: str = ""):
    match = re.fullmatch(r"`(.*)`", cell)
    assert match, f"cell {cell!r} must be a `yaml value` or {NOT_APPLICABLE}"
    return yaml.safe_load(match.group(1).replace("{size}", size))


def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _flat(cfg: Config) -> dict[str, object]:
    return {f"{s}.{k}": v for s, values in dataclasses.asdict(cfg).items() for k, v in values.items()}


MAIN = _table("## Main experiments", 3 + len(METHODS))
ABLATIONS = _table("## Ablations", 4)


def test_the_tables_parse():
    assert MAIN[0][3:] == list(METHODS)
    assert ABLATIONS[0][:3] == ["Config", "Source", "Key"]
    assert len(MAIN) > 60 and len(ABLATIONS) > 15


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_paper_config_matches_the_fidelity_table(size, method):
    cfg = load_config(resolve_config_path(f"paper/qwen3-{size}/{method}"))
    column = 3 + METHODS.index(method)
    checked = set()
    for row in MAIN[1:]:
        key, cell = _value(row[2]), row[column]
        checked.add(key)
        if cell != NOT_APPLICABLE:
            assert _get(cfg, key) == _value(cell, SIZES[size]), f"{method} {size}: {key} ({row[0]})"
    # every setting the config changes from the defaults has a row (model.name and the bank aside)
    changed = {k for k, v in _flat(cfg).items() if v != _flat(Config())[k]} - {"skills.bank"}
    assert changed <= checked, f"settings without a row in docs/FIDELITY.md: {sorted(changed - checked)}"


def test_every_paper_method_config_is_in_the_table():
    found = {p.stem for size in SIZES for p in (CONFIG_DIR / "paper" / f"qwen3-{size}").glob("*.yaml")}
    assert found == set(METHODS)


def test_ablation_configs_match_the_fidelity_table():
    base = _flat(load_config(resolve_config_path("paper/qwen3-1.7b/sgsd")))
    rows: dict[str, dict[str, object]] = {}
    for name_cell, _, key_cell, value_cell in ABLATIONS[1:]:
        rows.setdefault(_value(name_cell), {})[_value(key_cell)] = _value(value_cell)
    names = {p.stem for p in (CONFIG_DIR / "paper" / "ablations").glob("*.yaml")}
    assert set(rows) == names, "every ablation config has rows, every row names an ablation config"
    for name, expected in rows.items():
        flat = _flat(load_config(resolve_config_path(f"paper/ablations/{name}")))
        assert {k: flat[k] for k in expected} == expected, name
        # and nothing else differs from the SGSD row it is compared with
        changed = {k for k in flat if flat[k] != base[k]}
        assert changed <= set(expected), f"{name}: {sorted(changed - set(expected))} change without a row"
