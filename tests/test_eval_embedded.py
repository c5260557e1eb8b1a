"""`sgsd eval` end to end on CPU with the embedded model: 10 offline problems, k=4, a short token budget.

Needs `sgsd.models.load_policy`, `sgsd.generation.HFGenerator`, `sgsd.data` and `sgsd.verifier` (other
branches) and the embedded model packages; skipped until they are available.
"""

from __future__ import annotations

import json

import pytest

from sgsd.cli import main
from sgsd.fileio import read_jsonl

pytestmark = [pytest.mark.embedded, pytest.mark.slow]


def test_sgsd_eval_embedded_model_writes_jsonl_and_summary(tmp_path, capsys):
    for module in ("sgsd.models", "sgsd.generation", "sgsd.data", "sgsd.verifier", "reasoning_gym"):
        pytest.importorskip(module)
    out = tmp_path / "eval"
    overrides = [
        "model.name=embedded:qwen2.5-coder-0.5b",
        "model.dtype=float32",
        "data.eval_sources=[reasoning_gym:chain_sum]",
        "data.eval_size=10",
        "eval.max_new_tokens=32",
        "eval.enable_thinking=false",
        "eval.batch_size=40",
        "verifier.workers=0",
    ]
    assert main(["eval", *overrides, "--k", "4", "--out", str(out)]) == 0

    rows = read_jsonl(out / "reasoning_gym-chain_sum.jsonl")
    assert len(rows) == 10 and len({r["id"] for r in rows}) == 10
    for row in rows:
        assert len(row["samples"]) == 4
        for s in row["samples"]:
            assert 0 < s["num_tokens"] <= 32 and s["finish_reason"] in ("stop", "length")
            assert isinstance(s["correct"], bool)
    summary = json.loads((out / "summary.json").read_text())
    result = summary["results"]["reasoning_gym-chain_sum"]
    assert result["k"] == 4 and result["n_problems"] == 10
    correct = sum(s["correct"] for r in rows for s in r["samples"])
    assert result["avg@k"] == pytest.approx(correct / 40)
    assert result["pass@k"] >= result["avg@k"]
    assert "reasoning_gym-chain_sum" in capsys.readouterr().out
