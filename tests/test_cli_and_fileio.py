import os
import subprocess
import sys

import pytest

from sgsd.cli import main
from sgsd.errors import UserError
from sgsd.fileio import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "config" in capsys.readouterr().out


def test_user_error_is_one_line_exit_2(capsys):
    assert main(["config", "objective.tau=-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "objective.tau must be > 0" in err
    assert "Traceback" not in err


def test_importing_objectives_and_cli_pulls_no_model_code():
    code = "import sys, sgsd.cli, sgsd.config; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_atomic_write_keeps_previous_file_on_failure(tmp_path):
    target = tmp_path / "bank.json"
    atomic_write_json(target, {"v": 1})

    def boom(fh):
        fh.write('{"v": 2, "half')
        raise RuntimeError("killed mid-write")

    from sgsd.fileio import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["bank.json"]  # no temp file left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_permission_error_is_a_user_error(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    atomic_write_text(d / "f.txt", "old")
    d.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot write"):
            atomic_write_text(d / "f.txt", "new")
        assert (d / "f.txt").read_text() == "old"
    finally:
        d.chmod(0o700)


def test_read_jsonl_skips_a_torn_last_line_only(tmp_path):
    f = tmp_path / "m.jsonl"
    append_jsonl(f, {"step": 1})
    append_jsonl(f, {"step": 2})
    with open(f, "a") as fh:
        fh.write('{"step": 3, "lo')  # a write cut by SIGKILL
    assert read_jsonl(f) == [{"step": 1}, {"step": 2}]
    f.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(UserError, match=r"m.jsonl:2: not valid JSON"):
        read_jsonl(f)
