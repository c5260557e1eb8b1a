"""Cold start (Alg. 2), hierarchical merge (Alg. 3) and online evolution (Alg. 4) with a scripted
generator returning fixed JSON, which pins the parsing and merge logic exactly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from skills_helpers import TEST_PROMPTS, FakeGenerator, fake_grade, mistake, payload_items, skill

from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank, load_bank
from sgsd.skills.build import build_memory, cold_start, summarize_trajectory
from sgsd.skills.evolve import OnlineEvolver, RolloutRecord
from sgsd.skills.ledger import SkillLedger
from sgsd.skills.llm import MISTAKE, SKILL
from sgsd.skills.merge import hierarchical_merge, partition

PARAMS = SimpleNamespace(max_new_tokens=64)  # the fake generator ignores sampling settings


def join_merge(prompt):
    """Merge a group into one skill whose title joins the titles; fail on groups containing 'C'."""
    items = payload_items(prompt, "general_skills")
    titles = [it["title"] for it in items]
    if "C" in titles:
        return "I cannot merge these."
    return json.dumps({"general_skills": [skill("+".join(titles))]})


def test_merge_layers_until_one_group():
    gen = FakeGenerator(join_merge)
    items = [skill(t) for t in "ABDEF"]
    result = hierarchical_merge(items, SKILL, gen, PARAMS, group_size=2, patience=3, prompts=TEST_PROMPTS)
    # layer 0: [A,B] [D,E] [F] -> [A+B, D+E, F]; layer 1: [A+B, D+E] [F] -> [A+B+D+E, F];
    # layer 2: one group -> [A+B+D+E+F], stop
    assert [it["title"] for it in result.items] == ["A+B+D+E+F"]
    assert [(lay["groups"], lay["items_in"], lay["items_out"]) for lay in result.layers] == [
        (3, 5, 3),
        (2, 3, 2),
        (1, 2, 1),
    ]
    assert len(gen.calls("MERGE_SKILLS")) == 2 + 1 + 1  # groups of one item are not sent


def test_merge_keeps_unparseable_groups_and_stops_on_stagnation():
    gen = FakeGenerator(join_merge)
    items = [skill(t) for t in "ABCDE"]
    result = hierarchical_merge(items, SKILL, gen, PARAMS, group_size=2, patience=3, prompts=TEST_PROMPTS)
    # layer 0: [A,B]->A+B, [C,D] kept, [E] -> 4; layer 1: [A+B,C] kept, [D,E]->D+E -> 3;
    # layers 2-4: [A+B,C] kept, [D+E] alone -> 3, 3, 3: three layers without shrinking -> stop
    assert [lay["items_out"] for lay in result.layers] == [4, 3, 3, 3, 3]
    assert [lay["kept_groups"] for lay in result.layers] == [1, 1, 1, 1, 1]
    assert [it["title"] for it in result.items] == ["A+B", "C", "D+E"]


def test_merge_removes_exact_duplicates():
    def echo_with_duplicate(prompt):
        items = payload_items(prompt, "common_mistakes")
        dup = dict(items[0], description=items[0]["description"].upper() + "  ")
        return json.dumps({"common_mistakes": items + [dup]})

    gen = FakeGenerator(echo_with_duplicate)
    result = hierarchical_merge([mistake("x"), mistake("y")], MISTAKE, gen, PARAMS, prompts=TEST_PROMPTS)
    assert [it["description"] for it in result.items] == ["x", "y"]
    assert result.duplicates_removed == 1


def test_similarity_partition_groups_near_items():
    class Emb:
        def encode_documents(self, texts):
            import numpy as np

            # "a*" items point one way, "b*" items the other
            return np.array([[1.0, 0.0] if t.startswith("a") else [0.0, 1.0] for t in texts])

    items = [skill(t) for t in ("a1", "b1", "a2", "b2", "a3")]
    groups = partition(items, 3, SKILL, Emb())
    assert [[it["title"] for it in g] for g in groups] == [["a1", "a2", "a3"], ["b1", "b2"]]
    assert [[it["title"] for it in g] for g in partition(items, 3, SKILL)] == [
        ["a1", "b1", "a2"],
        ["b2", "a3"],
    ]


# ---------------------------------------------------------------------------- cold start

PROBLEMS = [
    SimpleNamespace(id=str(i), question=f"Q{i}: what is {i} + {i}?", answer=str(2 * i)) for i in range(4)
]
FOUR_SKILLS = {"general_skills": [skill("S1"), skill("S2"), skill("S3"), skill("S4")]}


def scripted_cold_start(prompt):
    marker, payload = prompt.split("\n", 1)
    if marker == "SOLVE":
        i = int(payload[1])
        return f"Step 1: add.\nSo the answer is {2 * i if i < 2 else 99}"  # problems 0, 1 solved
    if marker == "EXTRACT_SKILLS":
        memory = json.loads(payload)
        if memory["problem"].startswith("Q0"):  # thinking, braces in it, 4 items (capped at 3)
            return "<think>use {braces} freely</think>\n```json\n" + json.dumps(FOUR_SKILLS) + "\n```"
        return "Sure! The skills are: be careful."  # unusable
    if marker == "EXTRACT_MISTAKES":
        memory = json.loads(payload)
        assert memory["outcome"] == "failure" and "99" in memory["feedback"]
        return "Here: " + json.dumps({"common_mistakes": [mistake("M1"), mistake(memory["problem"][:2])]})
    if marker in ("MERGE_SKILLS", "MERGE_MISTAKES"):
        key = "general_skills" if marker == "MERGE_SKILLS" else "common_mistakes"
        first = "title" if key == "general_skills" else "description"
        seen, out = set(), []
        for it in payload_items(prompt, key):  # the "model" merges items with equal first fields
            if it[first] not in seen:
                seen.add(it[first])
                out.append(it)
        return json.dumps({key: out})
    raise AssertionError(marker)


def test_cold_start_end_to_end_scripted(tmp_path):
    gen = FakeGenerator(scripted_cold_start)
    bank, report = cold_start(
        PROBLEMS,
        gen,
        fake_grade,
        solve_params=PARAMS,
        extract_params=PARAMS,
        prompts=TEST_PROMPTS,
        progress=False,
        source="test",
    )
    assert (report.problems, report.successes, report.failures) == (4, 2, 2)
    assert report.extraction_calls == 4
    assert report.parse["extraction"]["failures"] == {"no_json": 1}
    assert report.parse["extraction"]["items_truncated"] == 1
    assert (report.skill_candidates, report.mistake_candidates) == (3, 4)  # S1-S3; M1, Q2, M1, Q3
    assert (report.merged_skills, report.merged_mistakes) == (3, 3)
    assert [s.skill_id for s in bank.general_skills] == ["gen_001", "gen_002", "gen_003"]
    assert [s.title for s in bank.general_skills] == ["S1", "S2", "S3"]
    assert [(m.mistake_id, m.description) for m in bank.common_mistakes] == [
        ("err_001", "M1"),
        ("err_002", "Q2"),
        ("err_003", "Q3"),
    ]
    assert bank.metadata["merge_layers"]["mistake"]["layers"][0] == {
        "layer": 0,
        "groups": 1,
        "items_in": 4,
        "items_out": 3,
        "kept_groups": 0,
    }
    assert "2 solved, 2 failed" in report.summary()
    load_bank(bank.save(tmp_path / "bank.json"))  # the result is a valid bank file


def test_cold_start_finishes_when_nothing_parses():
    gen = FakeGenerator(lambda p: "The answer is 0" if p.startswith("SOLVE") else "no json at all")
    bank, report = cold_start(
        PROBLEMS,
        gen,
        fake_grade,
        solve_params=PARAMS,
        extract_params=PARAMS,
        prompts=TEST_PROMPTS,
        progress=False,
    )
    assert len(bank) == 0
    assert report.parse["failures"] == {"no_json": 4}  # 1 success + 3 failures, all unusable
    assert report.successes == 1  # problem 0: 0 + 0 = 0


def test_memory_record_and_trajectory_summary():
    completion = "<think>hidden</think>" + "\n".join(f"line {i}" for i in range(11))
    assert summarize_trajectory(completion) == ["line 0", "line 2", "line 4", "line 6", "line 8", "line 10"]
    memory = build_memory("Q", completion, -1.0, "7", None)
    assert memory["outcome"] == "failure"
    assert "no final answer" in memory["feedback"] and "7" in memory["feedback"]


# ---------------------------------------------------------------------------- online evolution


def base_bank():
    return SkillBank(
        [
            GeneralSkill("gen_001", "static", "p", "w"),
            GeneralSkill("dyn_001", "Old1", "Old1 principle", "Old1 when"),
            GeneralSkill("dyn_002", "Old2", "Old2 principle", "Old2 when"),
        ],
        [CommonMistake("err_001", "static", "y", "h")],
        {"source": "test"},
    )


def scripted_evolution(prompt):
    marker = prompt.split("\n", 1)[0]
    if marker == "EXTRACT_SKILLS":
        return json.dumps({"general_skills": [skill("N1"), skill("N2"), skill("N3")]})
    if marker == "EXTRACT_MISTAKES":
        return json.dumps({"common_mistakes": [mistake("M1")]})
    return scripted_cold_start(prompt)  # merges drop items with repeated titles


def records(step, rewards):
    return [RolloutRecord(f"q{step}-{i}", "answer 1", r, "1", step) for i, r in enumerate(rewards)]


def test_evolver_triggers_window_and_threshold():
    evo = OnlineEvolver(update_every=5, success_threshold=0.8, params=PARAMS, prompts=TEST_PROMPTS)
    gen = FakeGenerator(scripted_evolution)
    bank = base_bank()
    evo.add_records(records(0, [-1, -1]))  # outside the window of step 5
    evo.add_records([{"question": "q", "completion": "c", "reward": 1.0, "answer": "1"}] * 4, step=4)
    same, report = evo.maybe_update(3, bank, gen)
    assert same is bank and report == {"step": 3, "updated": False, "skipped": "not an update step"}
    same, report = evo.maybe_update(5, bank, gen)
    assert same is bank and report["window"] == 4 and report["success_rate"] == 1.0
    assert report["skipped"].startswith("success rate 1.00 >= 0.8") and not report["updated"]
    assert gen.prompts == []
    _, report = evo.maybe_update(10, bank, gen)
    assert report["skipped"] == "empty window"


def test_evolver_step_window_reads_only_the_update_steps_records():
    # window_mode=step (the official choice): at step 10 only step 10's records count; the failures of
    # steps 7-9 are dropped, so the success rate is 1.0 and no extraction call is made
    evo = OnlineEvolver(update_every=5, window_mode="step", params=PARAMS, prompts=TEST_PROMPTS)
    gen = FakeGenerator(scripted_evolution)
    for step in (7, 8, 9):
        evo.add_records(records(step, [-1, -1]), step=step)
    evo.add_records(records(10, [1, 1, 1]), step=10)
    same, report = evo.maybe_update(10, base_bank(), gen)
    assert report["window"] == 3 and report["success_rate"] == 1.0 and not report["updated"]
    assert gen.prompts == []
    # the same records with the default window (last F steps): 3 / 9 successes, an update runs
    evo = OnlineEvolver(update_every=5, params=PARAMS, prompts=TEST_PROMPTS)
    for step in (7, 8, 9):
        evo.add_records(records(step, [-1, -1]), step=step)
    evo.add_records(records(10, [1, 1, 1]), step=10)
    _, report = evo.maybe_update(10, base_bank(), gen)
    assert report["window"] == 9 and report["success_rate"] == pytest.approx(1 / 3) and report["updated"]
    with pytest.raises(ValueError, match="window_mode"):
        OnlineEvolver(window_mode="last")


def test_evolver_window_survives_a_checkpoint():
    evo = OnlineEvolver(update_every=5)
    evo.add_records(records(3, [1, -1]))
    again = OnlineEvolver(update_every=5)
    again.load_state_dict(json.loads(json.dumps(evo.state_dict())))
    assert again.window == evo.window and len(again.window) == 2


def test_evolver_prunes_by_order_and_keeps_static(tmp_path):
    evo = OnlineEvolver(update_every=5, max_new=2, capacity=3, params=PARAMS, prompts=TEST_PROMPTS)
    gen = FakeGenerator(scripted_evolution)
    evo.add_records(records(9, [1, -1]) + records(10, [-1]))
    bank, report = evo.maybe_update(10, base_bank(), gen)
    assert report["updated"]
    # skills: merge(Old1, Old2, N1, N2, N3) keeps all five; limit min(C=3, 2 + N=2) = 3 -> list order
    assert [(s.skill_id, s.title) for s in bank.general_skills] == [
        ("gen_001", "static"),
        ("dyn_001", "Old1"),
        ("dyn_002", "Old2"),
        ("dyn_003", "N1"),
    ]
    # mistakes: two failures -> M1 twice -> merged to one; no old dynamic ones; limit min(3, 0 + 2)
    assert [(m.mistake_id, m.description) for m in bank.common_mistakes] == [
        ("err_001", "static"),
        ("dyn_001", "M1"),
    ]
    assert report["skill"] == {"candidates": 3, "existing": 2, "kept": 3}
    assert report["success_rate"] == pytest.approx(1 / 3)
    # extraction: 1 success + 2 failures; merges: new skills, new + old skills, new mistakes (no old ones)
    assert (report["parse_calls"], report["parse_failures"]) == (3 + 3, 0)
    bank.save_snapshot(tmp_path, 10)
    assert load_bank(tmp_path / "bank-step000010.json") == bank
    assert load_bank(tmp_path / "bank-latest.json") == bank
    assert bank.metadata["dynamic_id_counter"] == {"skill": 3, "mistake": 1}


def test_evolver_prunes_by_evidence_and_never_reuses_ids():
    ledger = SkillLedger()
    ledger.entries.clear()
    old1, old2 = base_bank().general_skills[1:]
    pair1 = SimpleNamespace(skill=old1, mistake=CommonMistake("err_001", "static", "y", "h"))
    pair2 = SimpleNamespace(skill=old2, mistake=CommonMistake("err_001", "static", "y", "h"))
    ledger.record([pair1, pair2], [0.5, -0.5], [1, -1], reward=-1.0)  # Old1 misleading, Old2 warning
    evo = OnlineEvolver(
        update_every=5, max_new=2, capacity=3, prune_by_evidence=True, params=PARAMS, prompts=TEST_PROMPTS
    )
    gen = FakeGenerator(scripted_evolution)
    evo.add_records(records(5, [1, -1]))
    bank, _ = evo.maybe_update(5, base_bank(), gen, ledger=ledger)
    # limit 3: new entries first (N1, N2: at most N = 2), then old ones by evidence: Old2 (+1) before Old1 (-1)
    assert [(s.skill_id, s.title) for s in bank.dynamic_skills] == [
        ("dyn_003", "N1"),
        ("dyn_004", "N2"),
        ("dyn_002", "Old2"),
    ]
    # Old1 (dyn_001) was dropped; its id is not given to the next new entry
    evo.add_records(records(10, [1, -1]))
    bank2, _ = evo.maybe_update(
        10,
        bank,
        ledger=ledger,
        generator=FakeGenerator(
            lambda p: (
                json.dumps({"general_skills": [skill("N9")]})
                if p.startswith("EXTRACT_SKILLS")
                else scripted_evolution(p)
            )
        ),
    )
    ids = {s.title: s.skill_id for s in bank2.dynamic_skills}
    assert ids["N9"] == "dyn_005" and ids["N1"] == "dyn_003"


def test_cold_start_with_the_package_prompt_templates():
    """The real Tables 6-10 templates from sgsd.prompts (no test copies): dispatch on their wording."""

    def respond(prompt):
        if "Return ONLY valid JSON with key general_skills" in prompt:
            return json.dumps({"general_skills": [skill("S")]})
        if "Return ONLY valid JSON with key common_mistakes" in prompt:
            return json.dumps({"common_mistakes": [mistake("M")]})
        assert "Q0" in prompt or "Q1" in prompt, prompt  # Table 6 carries the problem text
        return "so the answer is 0" if "Q0" in prompt else "so the answer is 5"

    gen = FakeGenerator(respond)
    bank, report = cold_start(
        PROBLEMS[:2], gen, fake_grade, solve_params=PARAMS, extract_params=PARAMS, progress=False
    )
    assert (report.successes, report.failures, report.parse["failures"]) == (1, 1, {})
    assert [(s.skill_id, s.title) for s in bank.general_skills] == [("gen_001", "S")]
    assert [(m.mistake_id, m.description) for m in bank.common_mistakes] == [("err_001", "M")]
