"""`sgsd verify`: single and JSONL batch modes, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from sgsd.cli import main
from sgsd.fileio import read_jsonl


def test_single_completion_correct_and_incorrect(capsys):
    assert main(["verify", "--workers", "0", "--gold", "0.5", "so \\boxed{\\frac{1}{2}}"]) == 0
    out = capsys.readouterr().out
    assert "extracted: \\frac{1}{2}" in out and "verdict:   correct" in out and "symbolically" in out
    assert main(["verify", "--workers", "0", "--gold", "240", "\\boxed{239}"]) == 1
    out = capsys.readouterr().out
    assert "verdict:   incorrect" in out and "reason:    not equivalent" in out


def test_single_completion_from_a_file(tmp_path, capsys):
    path = tmp_path / "c.txt"
    path.write_text("Work...\n#### 72\n", encoding="utf-8")
    assert main(["verify", "--workers", "0", "--gold", "72", str(path)]) == 0
    assert "extracted: 72" in capsys.readouterr().out


def test_batch_mode_writes_verdicts_with_custom_fields(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [
        {"out": "\\boxed{4}", "answer": 4},
        {"out": "no idea", "answer": "4"},
        {"out": "\\boxed{5}", "answer": "4"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    dst = tmp_path / "verdicts.jsonl"
    args = ["verify", "--jsonl", str(src), "--completion-field", "out", "--gold-field", "answer"]
    assert main([*args, "--out", str(dst), "--workers", "0"]) == 0
    verdicts = read_jsonl(dst)
    assert [v["correct"] for v in verdicts] == [True, False, False]
    assert verdicts[1]["extracted"] is None and verdicts[2]["reason"] == "not equivalent"
    assert "graded 3: 1 correct (33.3%)" in capsys.readouterr().err
    assert main([*args, "--workers", "0"]) == 0  # to stdout
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [v["index"] for v in printed] == [0, 1, 2]


@pytest.mark.parametrize(
    "content, argv_extra, message",
    [
        (None, [], "give a completion"),
        ('{"completion": "x"}\n', [], "record 1 has no field 'gold'"),
        ('{"completion": 3, "gold": "3"}\n', [], "'completion' must be text"),
        ('{"completion": "x", "gold": null}\n', [], "'gold' must be text or a number"),
        ("[1, 2]\n", [], "record 1 is not a JSON object"),
        ('{"completion": "x",\n{"a": 1}\n', [], "not valid JSON"),
        ('{"completion": "x", "gold": "1"}\n', ["--gold", "1"], "do not also give"),
    ],
)
def test_bad_input_is_a_one_line_user_error(tmp_path, capsys, content, argv_extra, message):
    argv = ["verify", "--workers", "0", *argv_extra]
    if content is not None:
        src = tmp_path / "in.jsonl"
        src.write_text(content, encoding="utf-8")
        argv += ["--jsonl", str(src)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_and_undecodable_files_are_user_errors(tmp_path, capsys):
    assert main(["verify", "--jsonl", str(tmp_path / "absent.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe\x00garbage\n")
    assert main(["verify", "--jsonl", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_extraction_free_grades_bare_answers(tmp_path, capsys):
    completion = "The company's revenue was 7,425,000 dollars."
    assert main(["verify", "--workers", "0", "--gold", "7425000", completion]) == 1  # boxed: no answer
    assert "extracted: (none)" in capsys.readouterr().out
    assert main(["verify", "--workers", "0", "--extraction", "free", "--gold", "7425000", completion]) == 0
    assert "extracted: 7425000" in capsys.readouterr().out
    src = tmp_path / "in.jsonl"
    rows = [
        {"completion": "Answer $ 9 $", "gold": 9},
        {"completion": "\\boxed{2} and \\boxed{3}", "gold": "2, 3"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["verify", "--jsonl", str(src), "--workers", "0", "--extraction", "free"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [v["correct"] for v in printed] == [True, True]
    with pytest.raises(SystemExit) as exc:  # argparse's usage error
        main(["verify", "--extraction", "loose", "--gold", "1", "1"])
    assert exc.value.code == 2 and "invalid choice: 'loose'" in capsys.readouterr().err
