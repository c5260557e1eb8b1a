"""`sgsd model prepare | generate` through the real CLI entry point."""

from __future__ import annotations

from sgsd import models
from sgsd.cli import main


def test_model_generate_on_a_local_folder(tiny_model_dir, capsys):
    status = main(
        ["model", "generate", str(tiny_model_dir), "What is 2 + 2?", "--n", "2", "--max-new-tokens", "4"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert out.count("--- sample") == 2
    assert "(length, 4 tokens)" in out


def test_model_prepare_prints_cached_folder(monkeypatch, tmp_path, capsys):
    target = models.embedded_model_dir("embedded:smollm2-135m", tmp_path)
    target.mkdir(parents=True)
    (target / models.CONVERTED_MARKER).write_text("{}")
    assert main(["model", "prepare", "embedded:smollm2-135m", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(target)


def test_model_prepare_unknown_name_exits_2(tmp_path, capsys):
    assert main(["model", "prepare", "embedded:nope", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown embedded model" in capsys.readouterr().err
