"""sgsd.decoding: the sampling loop that drops finished rows (tiny random model, CPU)."""

from __future__ import annotations

import pytest
import torch

from sgsd.decoding import decode, token_drawer
from sgsd.errors import ConfigError
from sgsd.generation import HFGenerator, SamplingParams
from sgsd.models import load_policy

torch.set_num_threads(2)
PROBLEMS = ["What is 12 + 7?", "Simplify 6/8 and explain every step please.", "Name a prime."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_policy(str(tiny_model_dir), dtype="float32", device="cpu")


def _tokens(results):
    return [[c.token_ids for c in samples] for samples in results]


class _RowsPerForward:
    """Records the batch rows of every forward of `model`."""

    def __init__(self, model):
        self.rows: list[int] = []
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows.append(int(ids.shape[0]))

    def remove(self):
        self._handle.remove()


@pytest.fixture
def early_eos(tiny):
    """Declare the 3rd greedy token of the first problem an end-of-sequence id, so that row ends
    early while the others run on (they must not contain it in their first 10 tokens)."""
    model, tokenizer = tiny
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    free = _tokens(HFGenerator(model, tokenizer, prune_finished=False).generate(PROBLEMS, greedy))
    third = free[0][0][2]
    assert third not in free[0][0][:2] and all(third not in row[0] for row in free[1:]), "pick another"
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, third]
    yield free, third
    model.generation_config.eos_token_id = saved


def test_pruned_greedy_equals_transformers_generate_and_drops_the_finished_row(tiny, early_eos):
    model, tokenizer = tiny
    free, third = early_eos
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    reference = HFGenerator(model, tokenizer, batch_size=3, prune_finished=False).generate(PROBLEMS, greedy)
    recorder = _RowsPerForward(model)
    try:
        pruned = HFGenerator(model, tokenizer, batch_size=3).generate(PROBLEMS, greedy)
    finally:
        recorder.remove()
    assert _tokens(pruned) == _tokens(reference)
    assert pruned[0][0].token_ids == free[0][0][:3] and pruned[0][0].finish_reason == "stop"
    assert [p[0].token_ids for p in pruned[1:]] == [row[0] for row in free[1:]]
    assert [p[0].text for p in pruned] == [p[0].text for p in reference]
    # prefill + steps 1-2 with 3 rows; row 0 ends at step 3, so steps 4..10 (7 forwards) have 2 rows
    assert recorder.rows == [3, 3, 3] + [2] * 7


def test_pruned_sampling_is_reproducible_and_ends_rows_at_their_eos(tiny, early_eos):
    model, tokenizer = tiny
    _, third = early_eos
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, n=4, seed=3)
    generator = HFGenerator(model, tokenizer, batch_size=12)
    first = generator.generate(PROBLEMS, params)
    assert _tokens(generator.generate(PROBLEMS, params)) == _tokens(first)
    for samples in first:
        for c in samples:
            eos_at = [k for k, t in enumerate(c.token_ids) if t == third]
            assert eos_at in ([], [len(c.token_ids) - 1])  # nothing after the EOS
            assert (c.finish_reason == "stop") == bool(eos_at)
            assert len(c.token_ids) == 10 or eos_at


def test_decode_pads_after_the_eos_and_stops_when_every_row_ended(tiny):
    """A drawer scripted per step: row 0 ends at step 1, row 1 at step 2; decoding stops after
    step 2 (not max_new_tokens) and pads row 0's second position; the streamer sees every row."""
    model, tokenizer = tiny
    eos, pad = 5, 0
    scripted = iter([torch.tensor([eos, 7]), torch.tensor([eos])])
    seen = []
    ids = torch.tensor([[1, 2, 3], [0, 2, 3]])
    out = decode(
        model,
        ids,
        (ids != 0).long(),
        lambda logits: next(scripted),
        max_new_tokens=6,
        eos_ids=[eos],
        pad_id=pad,
        on_step=lambda tokens: seen.append(tokens.tolist()),
    )
    assert out.tolist() == [[eos, pad], [7, eos]]
    assert seen == [[eos, 7], [eos, eos]]


def test_token_drawer_greedy_and_plain_sampling_frequencies():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    assert token_drawer(0.0, 0, 1.0)(logits).tolist() == [2, 0]
    torch.manual_seed(0)
    draw = token_drawer(2.0, 0, 1.0)
    draws = torch.stack([draw(logits[:1]) for _ in range(20000)])[:, 0]  # [20000]
    frequency = torch.bincount(draws, minlength=3).float() / draws.numel()
    # softmax([0, 0.5, 1]) = e^0, e^0.5, e^1 over 1 + 1.6487 + 2.7183 = 5.3670
    assert torch.allclose(frequency, torch.tensor([0.1863, 0.3072, 0.5065]), atol=0.012)


@pytest.mark.parametrize("candidate_sampling", [True, False])
def test_token_drawer_truncated_sampling_stays_in_the_nucleus(candidate_sampling):
    # probabilities at T = 1: 0.6, 0.3, 0.1 (log values); top_p 0.8 keeps the first two, renormalised
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log().repeat(20000, 1)  # [20000, 3]
    torch.manual_seed(1)
    draws = token_drawer(1.0, 0, 0.8, candidate_sampling)(logits)  # [20000]
    frequency = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(frequency, torch.tensor([2 / 3, 1 / 3, 0.0]), atol=0.012)
    assert token_drawer(1.0, 1, 1.0, candidate_sampling)(logits[:2]).tolist() == [0, 0]  # top-k 1


def test_token_drawer_refuses_a_negative_temperature():
    with pytest.raises(ConfigError, match="temperature"):
        token_drawer(-1.0, 0, 1.0)


@pytest.mark.parametrize("prune_finished, collective", [(False, False), (True, True)])
def test_finished_rows_stay_when_asked_or_when_forwards_are_collective(
    tiny, early_eos, monkeypatch, prune_finished, collective
):
    """prune_finished=False, or a model sharded over processes (every process must run the same
    forwards), decodes with transformers' generate: all three rows run in every forward."""
    import sgsd.decoding

    model, tokenizer = tiny
    monkeypatch.setattr(sgsd.decoding, "forwards_are_collective", lambda model: collective)
    recorder = _RowsPerForward(model)
    try:
        HFGenerator(model, tokenizer, prune_finished=prune_finished).generate(
            PROBLEMS, SamplingParams(temperature=0.0, max_new_tokens=10)
        )
    finally:
        recorder.remove()
    assert recorder.rows == [3] * 10


def test_forwards_are_not_collective_in_one_process(tiny):
    from sgsd.decoding import forwards_are_collective

    assert not forwards_are_collective(tiny[0])


def test_the_rollout_config_chooses_the_decoding(tiny_model_dir):
    from sgsd.components import build_policy
    from sgsd.config import load_config
    from sgsd.configs import resolve_config_path

    for value in (True, False):
        cfg = load_config(
            resolve_config_path("tiny"), [f"model.name={tiny_model_dir}", f"rollout.prune_finished={value}"]
        )
        assert build_policy(cfg, "cpu").generator.prune_finished is value


@pytest.mark.gpu
def test_pruned_greedy_equals_generate_on_cuda(tiny_model_dir):
    """On a CUDA device in fp32: the same greedy tokens as transformers' generate, rows ending early."""
    model, tokenizer = load_policy(str(tiny_model_dir), dtype="float32", device="cuda")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    free = _tokens(HFGenerator(model, tokenizer, prune_finished=False).generate(PROBLEMS, greedy))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, free[0][0][2]]
    reference = HFGenerator(model, tokenizer, prune_finished=False).generate(PROBLEMS, greedy)
    pruned = HFGenerator(model, tokenizer).generate(PROBLEMS, greedy)
    assert _tokens(pruned) == _tokens(reference)
    assert len(pruned[0][0].token_ids) <= 3  # row 0 ended early
