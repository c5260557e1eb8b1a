"""Pure tests: bank schema and IO, output parsing, ledger categories."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sgsd.errors import DataError
from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank, entry_key, load_bank
from sgsd.skills.ledger import SkillLedger, classify
from sgsd.skills.parse import (
    MISSING_KEY,
    NO_JSON,
    NO_VALID_ITEMS,
    NOT_A_LIST,
    UNFINISHED_THINKING,
    ParseStats,
    parse_items,
    strip_reasoning,
)

SKILL_FIELDS = ("title", "principle", "when_to_apply")

FIG5 = {
    "general_skills": [
        {
            "skill_id": "gen_001",
            "title": "Translate Constraints to Algebra",
            "principle": "Convert stated constraints into algebraic relations.",
            "when_to_apply": "When variables are governed by explicit conditions.",
        }
    ],
    "task_specific_skills": {},
    "common_mistakes": [
        {
            "mistake_id": "err_001",
            "description": "Skipping the constraint model.",
            "why_it_happens": "The solver starts computing before formalizing conditions.",
            "how_to_avoid": "Restate the configuration before deriving equations.",
        }
    ],
    "metadata": {"source": "hierarchical merge from raw candidates", "merge_group_size": 32},
}


def test_reads_reference_format_and_round_trips(tmp_path):
    src = tmp_path / "ref.json"
    src.write_text(json.dumps(FIG5))
    bank = load_bank(src)
    assert bank.general_skills[0] == GeneralSkill(
        "gen_001",
        "Translate Constraints to Algebra",
        "Convert stated constraints into algebraic relations.",
        "When variables are governed by explicit conditions.",
    )
    assert bank.common_mistakes[0].mistake_id == "err_001"
    out = bank.save(tmp_path / "out.json")
    again = load_bank(out)
    assert again == bank
    assert "task_specific_skills" not in json.loads(out.read_text())


def _bank_with(skill_overrides=None):
    data = json.loads(json.dumps(FIG5))
    data["general_skills"][0].update(skill_overrides or {})
    return data


@pytest.mark.parametrize(
    "data, message",
    [
        (_bank_with({"title": ""}), "general_skills[0] (gen_001): field 'title' must be a non-empty string"),
        (_bank_with({"principle": 3}), "general_skills[0] (gen_001): field 'principle'"),
        ({"general_skills": {}}, "'general_skills' must be a list"),
        (
            {"general_skills": [FIG5["general_skills"][0]] * 2},
            "general_skills[1] (gen_001): duplicate skill_id",
        ),
        ({"common_mistakes": [{"description": "x"}]}, "common_mistakes[0]: field 'mistake_id'"),
        ({"skills": []}, "unknown top-level key 'skills'"),
        ({"task_specific_skills": {"algebra": []}}, "non-empty 'task_specific_skills'"),
        ([], "top level must be a JSON object"),
    ],
)
def test_validation_names_entry_and_field(data, message):
    with pytest.raises(DataError) as exc:
        SkillBank.from_dict(data, "b.json")
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_malformed_json_names_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"general_skills": [\n  {"skill_id": "gen_001",}\n]}')
    with pytest.raises(DataError, match=r"bad.json: not valid JSON at line 2"):
        load_bank(bad)
    with pytest.raises(DataError, match="skill bank not found"):
        load_bank(tmp_path / "missing.json")
    with pytest.raises(DataError, match="unknown builtin bank 'nope'; available: starter"):
        load_bank("builtin:nope")


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "bank.json"
    bank = SkillBank.from_dict(FIG5)
    bank.save(path)
    before = path.read_text()
    broken = SkillBank([GeneralSkill("gen_001", "", "p", "w")], [], {})
    with pytest.raises(DataError):
        broken.save(path)
    assert path.read_text() == before


def test_snapshots_and_fingerprint(tmp_path):
    bank = SkillBank.from_dict(FIG5)
    snap = bank.save_snapshot(tmp_path / "banks", 25)
    assert snap.name == "bank-step000025.json"
    assert load_bank(tmp_path / "banks" / "bank-latest.json") == bank
    fp = bank.fingerprint()
    assert fp == SkillBank.from_dict(FIG5).fingerprint()
    bank.metadata["note"] = "metadata does not change what retrieval sees"
    assert bank.fingerprint() == fp
    changed = _bank_with({"title": "Another title"})
    assert SkillBank.from_dict(changed).fingerprint() != fp


def test_static_and_dynamic_entries():
    bank = SkillBank(
        [GeneralSkill("gen_001", "a", "b", "c"), GeneralSkill("dyn_001", "d", "e", "f")],
        [CommonMistake("err_001", "g", "h", "i"), CommonMistake("dyn_001", "j", "k", "l")],
    )
    assert [s.skill_id for s in bank.dynamic_skills] == ["dyn_001"]
    assert [m.mistake_id for m in bank.static_mistakes] == ["err_001"]
    # a dynamic skill and a dynamic mistake share "dyn_001"; the kind tells them apart
    assert entry_key("skill", "dyn_001") != entry_key("mistake", "dyn_001")
    replaced = bank.with_dynamic([GeneralSkill("dyn_002", "x", "y", "z")], [])
    assert [s.skill_id for s in replaced.general_skills] == ["gen_001", "dyn_002"]
    assert [m.mistake_id for m in replaced.common_mistakes] == ["err_001"]
    assert bank.general_skills[0].text() == "a. b. c"
    assert bank.common_mistakes[0].text() == "g. h. i"


def test_starter_bank_ships():
    bank = load_bank("builtin:starter")
    assert 10 <= len(bank.general_skills) <= 16 and 10 <= len(bank.common_mistakes) <= 16
    assert not bank.dynamic_skills and not bank.dynamic_mistakes
    assert any("\\boxed{}" in s.principle for s in bank.general_skills)


# ---------------------------------------------------------------------------- parsing

GOOD = '{"general_skills": [{"title": "T", "principle": "P", "when_to_apply": "W"}]}'


@pytest.mark.parametrize(
    "text",
    [
        GOOD,
        f'<think>Maybe {{"general_skills": []}} or {{x}}?</think>\n{GOOD}',
        f"I should output {{general_skills}} ... fine.</think>{GOOD}",  # opener was in the prompt
        f"Here you go:\n```json\n{GOOD}\n```\nHope this helps {{:)}}",
        f'{{"note": "first object has no key"}} then {GOOD}',
        f'{{"result": {GOOD}}}',  # nested
        '{"general_skills": [{"title": "T", "principle": "P", "when_to_apply": "W",}],}',  # trailing commas
        '[{"title": "T", "principle": "P", "when_to_apply": "W"}]',  # bare list
    ],
)
def test_parse_finds_the_keyed_object(text):
    result = parse_items(text, "general_skills", SKILL_FIELDS)
    assert result.ok, result.failure
    assert result.items == [{"title": "T", "principle": "P", "when_to_apply": "W"}]


def test_parse_keeps_latex_backslashes():
    text = r'{"general_skills": [{"title": "Fractions", "principle": "Write \frac{a}{b} \times c", "when_to_apply": "\sqrt{x}"}]}'
    result = parse_items(text, "general_skills", SKILL_FIELDS)
    assert result.items[0]["principle"] == r"Write \frac{a}{b} \times c"
    assert result.items[0]["when_to_apply"] == r"\sqrt{x}"


def test_parse_validates_and_caps_items():
    items = [
        {"title": "A", "principle": "p", "when_to_apply": "w", "extra": "dropped"},
        {"title": "", "principle": "p", "when_to_apply": "w"},  # empty field: dropped
        {"title": "B", "principle": "p"},  # missing field: dropped
        "not an object",
        {"title": "C", "principle": "p", "when_to_apply": "w"},
        {"title": "D", "principle": "p", "when_to_apply": "w"},
        {"title": "E", "principle": "p", "when_to_apply": "w"},
    ]
    result = parse_items(json.dumps({"general_skills": items}), "general_skills", SKILL_FIELDS, max_items=3)
    assert [it["title"] for it in result.items] == ["A", "C", "D"]
    assert result.items[0] == {"title": "A", "principle": "p", "when_to_apply": "w"}
    assert (result.dropped, result.truncated) == (3, 1)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty_output"),
        ("<think>I will now think for a very long time and never", UNFINISHED_THINKING),
        ("Skills: be careful.", NO_JSON),
        ('{"common_mistakes": []}', MISSING_KEY),
        ('{"general_skills": "be careful"}', NOT_A_LIST),
        ('{"general_skills": [{"title": "only a title"}]}', NO_VALID_ITEMS),
        ("{'general_skills': [{'title': 'T', 'principle': 'P', 'when_to_apply': 'W'}]}", NO_JSON),  # no eval
    ],
)
def test_parse_failure_reasons(text, reason):
    assert parse_items(text, "general_skills", SKILL_FIELDS).failure == reason


def test_parse_stats_count_by_reason():
    stats = ParseStats()
    for text in (GOOD, "nothing", "", GOOD, "no json either"):
        stats.add(parse_items(text, "general_skills", SKILL_FIELDS))
    assert stats.to_dict()["failures"] == {"empty_output": 1, "no_json": 2}
    assert (stats.calls, stats.ok, stats.items) == (5, 2, 2)
    assert stats.summary() == "2/5 parsed, 3 unusable (empty_output 1, no_json 2)"


def test_strip_reasoning():
    assert strip_reasoning("<think>a</think>b<think>c</think>d") == ("bd", False)
    assert strip_reasoning("a</think>b") == ("b", False)
    assert strip_reasoning("x<think>never closed") == ("x", True)


# ---------------------------------------------------------------------------- ledger


@pytest.mark.parametrize(
    "reward, support, expected",
    [
        (1, 0.2, "helpful"),  # r > 0, a > eps
        (-1, -0.2, "warning"),  # r < 0, a < -eps
        (1, -0.2, "over_suppressive"),  # r > 0, a < -eps
        (-1, 0.2, "misleading"),  # r < 0, a > eps
        (1, 0.05, "neutral"),  # |a| <= eps (boundary included)
        (-1, -0.05, "neutral"),
    ],
)
def test_table2_categories(reward, support, expected):
    assert classify(reward, support, threshold=0.05) == expected


def _pair(i):
    return SimpleNamespace(
        skill=GeneralSkill(f"gen_00{i}", f"s{i}", "p", "w"),
        mistake=CommonMistake(f"err_00{i}", f"m{i}", "y", "h"),
    )


def test_ledger_records_and_round_trips(tmp_path):
    torch = pytest.importorskip("torch")
    ledger = SkillLedger(threshold=0.05)
    pairs = [_pair(1), _pair(2)]
    # rollout 1 succeeded: teacher 1 supports (helpful), teacher 2 suppresses (over-suppressive)
    ledger.record(pairs, torch.tensor([0.5, -0.3]), torch.tensor([1.0, -1.0]), reward=1.0)
    # rollout 2 failed: teacher 1 supports (misleading), teacher 2 is uncertain (neutral)
    ledger.record(pairs, [0.1, 0.01], [-1, 0], reward=-1.0)
    e1 = ledger.entries["skill:gen_001"]
    assert e1.retrieved == 2
    assert e1.counts["helpful"] == 1 and e1.counts["misleading"] == 1
    assert e1.mean_support == pytest.approx((0.5 + 0.1) / 2)  # 0.3
    assert e1.evidence == 0.0  # (1 helpful - 1 misleading) / 2
    e2 = ledger.entries["mistake:err_002"]
    assert e2.counts["over_suppressive"] == 1 and e2.counts["neutral"] == 1
    assert e2.evidence == pytest.approx(-0.5)  # (0 - 1) / 2
    assert e2.directions == {"distilled": 0, "reversed": 1, "ignored": 1}
    assert ledger.evidence("skill", "gen_009") is None
    path = ledger.save(tmp_path / "skill_ledger.json")
    again = SkillLedger.load(path)
    assert again.to_dict() == ledger.to_dict()
    # every entry was retrieved twice, so the table falls back to key order
    rows = again.table()
    assert [row["entry"] for row in rows] == [
        "mistake:err_001",
        "mistake:err_002",
        "skill:gen_001",
        "skill:gen_002",
    ]
    assert rows[2]["helpful"] == 1 and rows[2]["evidence"] == 0.0
    with pytest.raises(ValueError):
        ledger.record(pairs, [0.1], [1, 1], reward=1.0)
