"""Malformed user input through the real CLI: one line naming the problem, exit 2, no traceback.

Most cases call `sgsd.cli.main([...])` in-process and read stderr; two run `python -m sgsd` in a
subprocess to prove that nothing but the one line reaches the terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgsd.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI, expect exit 2 and one stderr line holding every fragment; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err
    # library progress bars may precede it; the error itself is one line, the last one
    lines = [line for line in err.splitlines() if line.startswith("sgsd ")]
    assert len(lines) == 1 and err.endswith(lines[0]), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- configs and overrides


@pytest.mark.parametrize(
    "yaml_text, fragments",
    [
        ("train: [steps: 1\n", ["invalid YAML", "line"]),  # unclosed flow sequence
        ("train:\n  stepz: 3\n", ["unknown key 'train.stepz'", "did you mean 'steps'"]),
        ("trian:\n  steps: 3\n", ["unknown section 'trian'", "did you mean 'train'"]),
        ("train:\n  steps: three\n", ["train.steps", "expected int", "'three'"]),
        ("objective:\n  tau: -1\n", ["objective.tau must be > 0", "-1"]),
        ("rollout:\n  top_p: 1.5\n", ["rollout.top_p must be in (0, 1]"]),
        ("- just\n- a list\n", ["top level must be a mapping"]),
        ("train: 5\n", ["section 'train' must be a mapping"]),
    ],
)
def test_bad_config_file(tmp_path, capsys, yaml_text, fragments):
    path = _write(tmp_path / "bad.yaml", yaml_text)
    _fails(capsys, ["train", "-c", str(path), "-o", str(tmp_path / "run")], *fragments)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_missing_config_file(tmp_path, capsys):
    _fails(capsys, ["train", "-c", str(tmp_path / "nope.yaml")], "nope.yaml")


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("objective.tau", ["must look like section.key=value"]),
        ("tau=0.5", ["the key must be section.key"]),
        ("objective.tau=[1, 2", ["cannot parse the value"]),
        ("objective.tauu=0.5", ["unknown key 'objective.tauu'", "did you mean 'tau'"]),
        ("train.steps=1.5", ["train.steps", "expected int"]),
        ("train.batch_size=0", ["train.batch_size must be >= 1"]),
        ("train.method=ppo", ["train.method", "'ppo'"]),
    ],
)
def test_bad_override(tmp_path, capsys, override, fragments):
    _fails(capsys, ["train", "-c", "tiny", "-o", str(tmp_path / "run"), override], *fragments)


def test_unknown_packaged_config(capsys):
    _fails(capsys, ["train", "-c", "no-such-config"], "no-such-config")


# ---------------------------------------------------------------------------- bank files


@pytest.mark.parametrize(
    "text, fragments",
    [
        ('{"general_skills": [', ["not valid JSON at line 1"]),
        ("[1, 2]", ["top level must be a JSON object", "list"]),
        (
            json.dumps({"general_skills": [{"skill_id": "g1", "title": "t", "principle": "p"}]}),
            ["general_skills[0] (g1)", "'when_to_apply'"],
        ),
        (json.dumps({"general_skills": {"a": 1}}), ["'general_skills' must be a list"]),
        (json.dumps({"skills": []}), ["unknown top-level key 'skills'"]),
    ],
)
def test_bad_bank_file(tmp_path, capsys, text, fragments):
    bank = _write(tmp_path / "bank.json", text)
    _fails(capsys, ["bank", "show", str(bank)], str(bank), *fragments)


def test_missing_bank_file(tmp_path, capsys):
    _fails(capsys, ["bank", "show", str(tmp_path / "gone.json")], "skill bank not found", "gone.json")


def test_bad_bank_stops_training_before_any_work(tmp_path, capsys, tiny_model_dir):
    bank = _write(tmp_path / "bank.json", "{not json")
    argv = ["train", "-c", "tiny", "-o", str(tmp_path / "run"), f"model.name={tiny_model_dir}"]
    _fails(capsys, [*argv, f"skills.bank={bank}", "data.eval_sources=[]"], "bank.json", "not valid JSON")


# ---------------------------------------------------------------------------- dataset files


def test_missing_dataset_file(tmp_path, capsys):
    _fails(capsys, ["data", "show", str(tmp_path / "missing.jsonl")], "data file not found", "missing.jsonl")


def test_dataset_missing_column(tmp_path, capsys):
    data = _write(tmp_path / "set.jsonl", json.dumps({"problem": "1+1?", "final": "2"}) + "\n")
    line = _fails(capsys, ["data", "show", str(data)], "set.jsonl")
    assert "question" in line or "answer" in line


def test_dataset_mapped_column_absent(tmp_path, capsys):
    data = _write(tmp_path / "set.jsonl", json.dumps({"problem": "1+1?", "final": "2"}) + "\n")
    _fails(capsys, ["data", "show", str(data), "--columns", "q=problem,a=nothere"], "nothere")


def test_dataset_bad_json_line(tmp_path, capsys):
    data = _write(tmp_path / "set.jsonl", '{"question": "a", "answer": "1"}\n{oops\n{"question": "b"}\n')
    _fails(capsys, ["data", "show", str(data)], "set.jsonl:2", "not valid JSON")


def test_unknown_preset(capsys):
    _fails(capsys, ["data", "show", "hf:no_such_preset"], "no_such_preset")


def test_unknown_reasoning_gym_task(capsys):
    _fails(capsys, ["data", "show", "reasoning_gym:no_such_task"], "no_such_task")


def test_bad_columns_argument(capsys):
    _fails(capsys, ["data", "show", "champ", "--columns", "q"], "--columns", "FIELD=COLUMN")


# ---------------------------------------------------------------------------- train / eval / report


def test_resume_without_run_dir(capsys):
    _fails(capsys, ["train", "-c", "tiny", "--resume", "model.name=x"], "--resume", "--output-dir")


def test_resume_without_checkpoints(tmp_path, capsys, tiny_model_dir):
    argv = ["train", "-c", "tiny", "-o", str(tmp_path / "run"), "--resume", f"model.name={tiny_model_dir}"]
    _fails(capsys, [*argv, "data.eval_sources=[]"], "--resume", "no complete checkpoint")
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


def test_missing_model_folder(tmp_path, capsys):
    argv = ["train", "-c", "tiny", "-o", str(tmp_path / "run"), f"model.name={tmp_path / 'no-model'}"]
    _fails(capsys, [*argv, "data.eval_sources=[]"], "no-model")


def test_eval_with_bad_adapter_path(tmp_path, capsys, tiny_model_dir):
    argv = ["eval", "-c", "tiny", f"model.name={tiny_model_dir}", "--adapter", str(tmp_path / "no-adapter")]
    _fails(capsys, [*argv, "--out", str(tmp_path / "out")], "no-adapter")


def test_eval_run_folder_missing(tmp_path, capsys):
    _fails(capsys, ["eval", "--run", str(tmp_path / "nothing")], "run folder not found")


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notrun").mkdir()
    _write(tmp_path / "notrun" / "hello.txt", "hi")
    _fails(capsys, ["report", str(tmp_path / "notrun"), "--out", str(tmp_path / "rep")], "notrun")


def test_report_on_a_missing_folder(tmp_path, capsys):
    _fails(capsys, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "rep")], "not found")


def test_bad_argument_value_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "show", "champ", "--n", "many"])
    assert exc.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- real terminal


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "-c", "tiny", "objective.tau=-1"], "objective.tau must be > 0"),
        (["bank", "show", "/nonexistent/bank.json"], "skill bank not found"),
    ],
)
def test_no_traceback_reaches_the_terminal(args, fragment):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "sgsd", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert fragment in done.stderr
