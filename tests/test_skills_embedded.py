"""Cold start and merge end-to-end on CPU with the embedded model as generator (8 seed problems).

A 0.5B model's JSON is often unusable: the run must count that by reason and still finish with a
valid (possibly small or empty) bank. Needs sgsd.models, sgsd.generation, sgsd.verifier, sgsd.data
and the extraction/merge prompts in sgsd.prompts; skipped only without the embedded packages.
"""

from __future__ import annotations

import os
from functools import partial

import pytest

from sgsd.skills.bank import load_bank

pytestmark = [pytest.mark.embedded, pytest.mark.slow]


def test_cold_start_with_embedded_model(tmp_path):
    import torch

    torch.set_num_threads(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("reasoning_gym")  # the embedded extra; the sgsd modules below must import
    from sgsd import data, generation, models, verifier
    from sgsd.skills.build import cold_start

    model, tokenizer = models.load_policy("embedded:qwen2.5-coder-0.5b", dtype="float32")
    model.eval()
    generator = generation.HFGenerator(model, tokenizer, batch_size=8)
    problems = data.load_problems("reasoning_gym:chain_sum", size=8, seed=0)
    bank, report = cold_start(
        problems,
        generator,
        partial(verifier.grade_many, timeout_s=5.0, workers=0),
        solve_params=generation.SamplingParams(
            temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=64, seed=0
        ),
        extract_params=generation.SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=128),
        progress=False,
    )
    assert report.problems == 8 and report.successes + report.failures == 8
    assert report.extraction_calls == 8
    parse = report.parse
    assert parse["ok"] + sum(parse["failures"].values()) == parse["calls"]  # every call is accounted for
    print(report.summary())  # shown with -s: how much of the model's JSON was usable
    path = bank.save(tmp_path / "bank.json")
    assert load_bank(path) == bank  # whatever survived is a valid bank
    assert len(bank.general_skills) == report.merged_skills
