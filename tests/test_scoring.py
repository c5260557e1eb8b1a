"""sgsd.scoring against a plain reference: each row scored alone, no padding, full-sequence logits and a
full-vocabulary log-softmax (what the reference implementation computes, minus its padding bugs)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from conftest import QWEN3_STYLE_TEMPLATE, build_tiny_model_dir

from sgsd import scoring
from sgsd.config import ALL_PROJECTIONS
from sgsd.errors import ConfigError, DataError

torch.set_num_threads(2)
TOL = 1e-5


# ---------------------------------------------------------------------------------------------------
# Fixtures and the plain reference.


def _load(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return _load(tiny_model_dir)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _load(build_tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen3"), seed=1, arch="qwen3"))


@pytest.fixture(scope="module")
def lora_llama(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # init_lora_weights=False draws lora_B at random (nonzero), so the adapter changes the outputs
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return get_peft_model(_load(tiny_model_dir), config)


@pytest.fixture(params=["llama", "qwen3", "lora"])
def model(request, llama, qwen3, lora_llama):
    return {"llama": llama, "qwen3": qwen3, "lora": lora_llama}[request.param]


def _ids(rng: random.Random, n: int, vocab: int = 49152) -> list[int]:
    return [rng.randrange(17, vocab) for _ in range(n)]


def reference_logp(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion_t) for one row alone: whole-sequence logits, full log-softmax, gather. [T]"""
    ids = torch.tensor([prompt + completion])  # [1, P + T]
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # [P + T, V]
    rows = logp[len(prompt) - 1 : len(prompt) - 1 + len(completion)]  # [T, V]
    return rows.gather(1, torch.tensor(completion)[:, None]).squeeze(1)  # [T]


def reference_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])  # [1, P + T]
    return model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(completion)]  # [T, V]


def _problems(seed: int, b: int = 3):
    rng = random.Random(seed)
    prompts = [_ids(rng, rng.randint(2, 20)) for _ in range(b)]
    completions = [_ids(rng, rng.randint(1, 14)) for _ in range(b)]
    return rng, prompts, completions


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_grads(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Same parameters, and per tensor a relative L2 difference below 1e-5 (fp32 sums in another order)."""
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name in ours:
        scale = theirs[name].norm().clamp(min=1e-12)
        assert (ours[name] - theirs[name]).norm() / scale < 1e-5, name


# ---------------------------------------------------------------------------------------------------
# Student.


def test_student_matches_reference_values_and_gradients(model):
    _, prompts, completions = _problems(seed=0)
    completions[1] = completions[1][:1]  # one very short completion: right padding inside the batch
    weights = torch.randn(
        len(prompts), max(map(len, completions)), generator=torch.Generator().manual_seed(0)
    )

    model.zero_grad()
    logp, valid = scoring.score_student(model, prompts, completions, pad_id=2, chunk_size=4)
    assert logp.dtype == torch.float32 and valid.shape == logp.shape
    (logp * weights).sum().backward()
    ours = _grads(model)

    model.zero_grad()
    total = 0.0
    for b, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        ref = reference_logp(model, prompt, completion)  # [T_b]
        assert valid[b].sum().item() == len(completion)
        torch.testing.assert_close(logp[b, : len(completion)], ref.detach(), atol=TOL, rtol=0)
        assert torch.all(logp[b, len(completion) :] == 0)
        total = total + (ref * weights[b, : len(completion)]).sum()
    total.backward()
    theirs = _grads(model)
    assert_same_grads(ours, theirs)
    model.zero_grad()


def test_student_chunk_size_does_not_change_results(llama):
    _, prompts, completions = _problems(seed=1)
    with torch.no_grad():
        one, _ = scoring.score_student(llama, prompts, completions, pad_id=2, chunk_size=1)
        big, _ = scoring.score_student(llama, prompts, completions, pad_id=2, chunk_size=1000)
    torch.testing.assert_close(one, big, atol=TOL, rtol=0)


def test_student_over_bf16_base_saves_no_fp32_adapter_inputs(tiny_model_dir, monkeypatch):
    """A bf16 policy with fp32 LoRA weights (peft's default): scoring runs the adapters in bf16
    (sgsd.models.adapters_in_base_precision), so the student forward saves for backward well under
    half the fp32 bytes that peft's own input casts would save, and the log-probs are still fp32."""
    import contextlib

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _load(tiny_model_dir).to(torch.bfloat16), LoraConfig(r=4, target_modules=ALL_PROJECTIONS)
    )
    _, prompts, completions = _problems(seed=2)

    def saved_fp32_bytes():
        sizes = {}

        def pack(t):
            if t.dtype == torch.float32 and not isinstance(t, torch.nn.Parameter):
                sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp, _ = scoring.score_student(model, prompts, completions, pad_id=2)
        assert logp.dtype == torch.float32 and logp.requires_grad
        return sum(sizes.values()), logp.detach()

    ours, ours_logp = saved_fp32_bytes()
    monkeypatch.setattr(scoring, "adapters_in_base_precision", lambda module: contextlib.nullcontext())
    peft_way, peft_logp = saved_fp32_bytes()
    assert ours < peft_way / 2
    torch.testing.assert_close(ours_logp, peft_logp, atol=0.1, rtol=0)  # bf16 hidden states either way


def test_bf16_student_with_gradient_checkpointing_matches_without(tiny_model_dir):
    """Checkpointed layers recompute in the backward, outside the scoring call and its adapter
    context; the recomputation must still match the forward (same gradients as without
    checkpointing, up to bf16 rounding of the order of operations)."""
    from sgsd.models import apply_lora, load_policy

    _, prompts, completions = _problems(seed=4)
    grads = {}
    for checkpointing in (False, True):
        base, _ = load_policy(str(tiny_model_dir), dtype="bfloat16", device="cpu")
        torch.manual_seed(0)  # the same lora_A draws both times
        model = apply_lora(base, 4, 8, 0.0, ALL_PROJECTIONS, gradient_checkpointing=checkpointing)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        model.train()
        logp, _ = scoring.score_student(model, prompts, completions, pad_id=2)
        logp.sum().backward()
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert grads[True].dtype == torch.float32
    assert float((grads[True] - grads[False]).norm() / grads[False].norm()) < 1e-2


def test_student_rejects_empty_prompt_and_mismatched_batch(llama):
    with pytest.raises(DataError, match="empty prompt"):
        scoring.score_student(llama, [[]], [[5, 6]], pad_id=2)
    with pytest.raises(DataError, match="prompt_ids has 2 problems"):
        scoring.score_student(llama, [[5], [6]], [[5, 6]], pad_id=2)


def test_padding_does_not_shift_positions(llama):
    """A short prompt scored beside a long one gives the same log-probs as scored alone."""
    rng = random.Random(7)
    short, long_, completion = _ids(rng, 2), _ids(rng, 40), _ids(rng, 6)
    with torch.no_grad():
        together, _ = scoring.score_student(llama, [short, long_], [completion, completion], pad_id=2)
        alone = reference_logp(llama, short, completion)
    torch.testing.assert_close(together[0], alone, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Teachers.


@pytest.mark.parametrize("counts", [(8, 1, 5), (2, 7, 3), (1, 1, 1)])
def test_teachers_match_reference_for_k_teachers_of_mixed_lengths(model, counts):
    """Problems with different numbers of teachers (1 to 8) and teacher prompts of 1 to 30 tokens."""
    rng, prompts, completions = _problems(seed=10 + sum(counts))
    num_teachers = max(counts)
    teacher_prompts = [[_ids(rng, rng.randint(1, 30)) for _ in range(c)] for c in counts]

    logp, mask = scoring.score_teachers(
        model, teacher_prompts, completions, pad_id=2, chunk_rows=3, chunk_size=5
    )
    assert logp.shape == (3, num_teachers, max(map(len, completions)))
    assert not logp.requires_grad
    assert mask.tolist() == [[k < c for k in range(num_teachers)] for c in counts]
    with torch.no_grad():
        for b, completion in enumerate(completions):
            for k in range(num_teachers):
                if k >= counts[b]:
                    assert torch.all(logp[b, k] == 0)
                    continue
                ref = reference_logp(model, teacher_prompts[b][k], completion)
                torch.testing.assert_close(logp[b, k, : len(completion)], ref, atol=TOL, rtol=0)
                assert torch.all(logp[b, k, len(completion) :] == 0)


@pytest.mark.parametrize("chunk_rows", [1, 4, 16])
def test_teacher_chunk_rows_do_not_change_results(llama, chunk_rows):
    rng, _, completions = _problems(seed=20)
    teacher_prompts = [[_ids(rng, rng.randint(1, 25)) for _ in range(4)] for _ in completions]
    base, _ = scoring.score_teachers(llama, teacher_prompts, completions, pad_id=2, chunk_rows=2)
    other, _ = scoring.score_teachers(llama, teacher_prompts, completions, pad_id=2, chunk_rows=chunk_rows)
    torch.testing.assert_close(base, other, atol=TOL, rtol=0)


def test_frozen_teacher_via_disable_adapter_matches_base_model(lora_llama):
    rng, _, completions = _problems(seed=21, b=2)
    teacher_prompts = [[_ids(rng, 9)], [_ids(rng, 4)]]
    with lora_llama.disable_adapter():
        frozen, _ = scoring.score_teachers(lora_llama, teacher_prompts, completions, pad_id=2)
        with torch.no_grad():
            ref = reference_logp(lora_llama, teacher_prompts[0][0], completions[0])
    live, _ = scoring.score_teachers(lora_llama, teacher_prompts, completions, pad_id=2)
    torch.testing.assert_close(frozen[0, 0, : len(completions[0])], ref, atol=TOL, rtol=0)
    assert (frozen - live).abs().max() > 1e-3  # the adapter does change the teacher


# ---------------------------------------------------------------------------------------------------
# The expected gap under the rollout sampler (support estimator `expected`).


def _q_dense(ids, q, vocab):
    dense = torch.zeros(ids.shape[0], vocab)
    return dense.scatter_add(1, ids, q)  # [n, V]


def test_sampler_distribution_hand_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    softmax_21 = [math.exp(2) / (math.exp(2) + math.exp(1)), math.exp(1) / (math.exp(2) + math.exp(1))]
    # top-k 2: the two largest, renormalised
    ids, q = scoring.sampler_distribution(logits, temperature=1.0, top_k=2)
    torch.testing.assert_close(_q_dense(ids, q, 4), torch.tensor([softmax_21 + [0.0, 0.0]]))
    # top-p 0.7: probabilities 0.644, 0.237, 0.087, 0.032; ascending cumulative 0.032, 0.119, 0.356:
    # the two smallest (cumulative <= 0.3) are cut
    ids, q = scoring.sampler_distribution(logits, temperature=1.0, top_p=0.7)
    torch.testing.assert_close(_q_dense(ids, q, 4), torch.tensor([softmax_21 + [0.0, 0.0]]))
    # top-p 0.5 cuts everything but the most likely token
    ids, q = scoring.sampler_distribution(logits, temperature=1.0, top_p=0.5)
    torch.testing.assert_close(_q_dense(ids, q, 4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # temperature 2 halves the logits before anything else
    ids, q = scoring.sampler_distribution(logits, temperature=2.0)
    torch.testing.assert_close(_q_dense(ids, q, 4), torch.softmax(logits / 2.0, -1))
    # greedy
    ids, q = scoring.sampler_distribution(logits, temperature=0.0, top_k=3)
    torch.testing.assert_close(_q_dense(ids, q, 4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # ties with the k-th value stay (as transformers' top-k keeps them)
    ids, q = scoring.sampler_distribution(torch.tensor([[3.0, 1.0, 1.0, 0.0]]), temperature=1.0, top_k=2)
    z = math.exp(3) + 2 * math.exp(1)
    torch.testing.assert_close(
        _q_dense(ids, q, 4), torch.tensor([[math.exp(3) / z, math.exp(1) / z, math.exp(1) / z, 0.0]])
    )
    with pytest.raises(ConfigError):
        scoring.sampler_distribution(logits, temperature=1.0, top_p=0.0)


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.1, 20, 0.95), (0.7, 0, 0.9), (1.0, 5, 1.0), (1.3, 0, 1.0)]
)
def test_sampler_distribution_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3.0  # [n, V]
    logits[0, :4] = 5.0  # a tie at the top
    warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1.0:
        warped = TopPLogitsWarper(top_p)(None, warped)
    ids, q = scoring.sampler_distribution(logits, temperature, top_k, top_p)
    torch.testing.assert_close(_q_dense(ids, q, 300), torch.softmax(warped, -1), atol=1e-6, rtol=0)


def test_nucleus_candidates_hand_values():
    # probabilities 0.644, 0.237, 0.087, 0.032
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(logits, -1)[0]
    # the two most likely hold 0.881 >= 0.7: the nucleus lies among them, 0.119 lies outside
    nucleus = scoring.nucleus_candidates(logits, top_p=0.7, width=2)
    assert nucleus.ids.tolist() == [[0, 1]] and nucleus.wide.tolist() == [False]
    torch.testing.assert_close(nucleus.values, torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(nucleus.log_total, torch.logsumexp(logits, -1, keepdim=True))
    torch.testing.assert_close(nucleus.outside, (p[2] + p[3]).reshape(1, 1))
    # ascending cumulative with the outside mass: 0.119 + 0.237 = 0.356 > 0.3, so both stay
    assert torch.isfinite(nucleus.cut(0.7)).all()
    # top-p 0.5: 0.356 <= 0.5 cuts the second
    assert torch.isinf(nucleus.cut(0.5)[0, 1]) and torch.isfinite(nucleus.cut(0.5)[0, 0])
    # 0.881 < 0.9: the nucleus may be wider than two tokens
    assert scoring.nucleus_candidates(logits, top_p=0.9, width=2).wide.tolist() == [True]
    # a batch with one wide row: sampler_distribution falls back to the whole sorted vocabulary
    two = torch.tensor([[2.0, 1.0, 0.0, -1.0], [9.0, 0.0, 0.0, 0.0]])
    assert scoring.nucleus_candidates(two, top_p=0.9, width=2).wide.tolist() == [True, False]


@pytest.mark.parametrize("width", [1, 3, 64, 20_000])
def test_top_p_alone_matches_transformers_on_a_large_vocabulary(width, monkeypatch):
    """Whether every nucleus lies among the candidates (peaked rows, wide enough) or some row needs the
    sorted vocabulary, the distribution is transformers' top-p over the whole vocabulary."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    monkeypatch.setattr(scoring, "NUCLEUS_CANDIDATES", width)
    torch.manual_seed(3)
    vocab = 20_000
    logits = torch.randn(5, vocab) * torch.tensor([[0.3], [1.0], [2.0], [4.0], [6.0]])  # flat to peaked
    logits[3:, :3] += 30.0  # three tokens hold almost everything
    for rows in (slice(0, 5), slice(3, 5)):  # with flat rows; peaked rows only
        for temperature, top_p in ((1.0, 0.95), (0.6, 0.8)):
            part = logits[rows]
            warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, part.clone()))
            ids, q = scoring.sampler_distribution(part, temperature, 0, top_p)
            if rows == slice(3, 5) and width >= 3:
                assert ids.shape[1] == width  # found among the candidates, no sort
            dense = _q_dense(ids, q, vocab)  # [n, V]
            torch.testing.assert_close(dense, torch.softmax(warped, -1), atol=1e-6, rtol=0)
            assert torch.equal(dense > 0, torch.isfinite(warped))  # the same support


def test_expected_gap_is_minus_reverse_kl_at_temperature_one_without_truncation():
    from sgsd.objectives import reverse_kl

    torch.manual_seed(1)
    student, teacher = torch.randn(5, 50), torch.randn(5, 50)
    b = scoring.expected_gap(student, teacher, temperature=1.0)
    torch.testing.assert_close(b, -reverse_kl(student, teacher), atol=1e-6, rtol=0)
    # hand case: p_S = (1/2, 1/2), p_T = (1/4, 3/4): b = 1/2 log(1/2) + 1/2 log(3/2)
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
    expected = 0.5 * math.log(0.5) + 0.5 * math.log(1.5)
    torch.testing.assert_close(scoring.expected_gap(s, t, 1.0), torch.tensor([expected]))
    # greedy: b is the gap at the student's argmax
    s = torch.tensor([[0.0, 1.0]])
    gap = torch.log_softmax(t, -1)[0, 1] - torch.log_softmax(s, -1)[0, 1]
    torch.testing.assert_close(scoring.expected_gap(s, t, 0.0), gap.reshape(1))


def test_expected_gap_under_truncation_is_the_mean_gap_over_the_sampler():
    torch.manual_seed(2)
    student, teacher = torch.randn(4, 40) * 2, torch.randn(4, 40) * 2
    ids, q = scoring.sampler_distribution(student, 1.1, top_k=5, top_p=0.9)
    q_dense = _q_dense(ids, q, 40)
    gaps = torch.log_softmax(teacher, -1) - torch.log_softmax(student, -1)  # [n, V]
    torch.testing.assert_close(
        scoring.expected_gap(student, teacher, 1.1, top_k=5, top_p=0.9), (q_dense * gaps).sum(-1)
    )


def _reference_baseline(model, student_prompt, teacher_prompt, completion, sampler):
    s_logits = reference_logits(model, student_prompt, completion).float()  # [T, V]
    t_logits = reference_logits(model, teacher_prompt, completion).float()  # [T, V]
    ids, q = scoring.sampler_distribution(s_logits, *sampler)
    q = _q_dense(ids, q, s_logits.shape[-1])  # [T, V] the sampler, written out
    return (q * (torch.log_softmax(t_logits, -1) - torch.log_softmax(s_logits, -1))).sum(-1)  # [T]


@pytest.mark.parametrize("sampler", [(1.1, 20, 0.95), (1.0, 0, 1.0)])
def test_teachers_expected_matches_a_direct_computation(llama, sampler):
    rng, prompts, completions = _problems(seed=40)
    counts = (3, 1, 2)
    teacher_prompts = [[_ids(rng, rng.randint(1, 25)) for _ in range(c)] for c in counts]
    logp, mask, baseline = scoring.score_teachers_expected(
        llama, prompts, teacher_prompts, completions, pad_id=2, temperature=sampler[0], top_k=sampler[1],
        top_p=sampler[2], chunk_rows=2, chunk_size=3,
    )  # fmt: skip
    plain, plain_mask = scoring.score_teachers(llama, teacher_prompts, completions, pad_id=2)
    torch.testing.assert_close(logp, plain, atol=TOL, rtol=0)
    assert mask.tolist() == plain_mask.tolist()
    assert baseline.shape == logp.shape and not baseline.requires_grad
    with torch.no_grad():
        for b, completion in enumerate(completions):
            for k in range(3):
                if k >= counts[b]:
                    assert torch.all(baseline[b, k] == 0)
                    continue
                ref = _reference_baseline(llama, prompts[b], teacher_prompts[b][k], completion, sampler)
                torch.testing.assert_close(baseline[b, k, : len(completion)], ref, atol=1e-4, rtol=0)
                assert torch.all(baseline[b, k, len(completion) :] == 0)
                if sampler == (1.0, 0, 1.0):  # temperature 1, no truncation: -KL(p_S || p_T)
                    from sgsd.objectives import reverse_kl

                    kl = reverse_kl(
                        reference_logits(llama, prompts[b], completion),
                        reference_logits(llama, teacher_prompts[b][k], completion),
                    )
                    torch.testing.assert_close(baseline[b, k, : len(completion)], -kl, atol=1e-4, rtol=0)


def test_teachers_expected_runs_teachers_in_their_context_and_the_student_outside(lora_llama):
    rng, prompts, completions = _problems(seed=41, b=2)
    teacher_prompts = [[_ids(rng, 9)], [_ids(rng, 4)]]
    sampler = (1.0, 0, 1.0)
    _, _, baseline = scoring.score_teachers_expected(
        lora_llama, prompts, teacher_prompts, completions, pad_id=2, temperature=1.0,
        teacher_context=lora_llama.disable_adapter,
    )  # fmt: skip
    with torch.no_grad():
        s_logits = reference_logits(lora_llama, prompts[0], completions[0]).float()  # adapter on
        with lora_llama.disable_adapter():
            t_logits = reference_logits(lora_llama, teacher_prompts[0][0], completions[0]).float()
    ids, q = scoring.sampler_distribution(s_logits, *sampler)
    ref = (_q_dense(ids, q, s_logits.shape[-1]) * (t_logits.log_softmax(-1) - s_logits.log_softmax(-1))).sum(
        -1
    )
    torch.testing.assert_close(baseline[0, 0, : len(completions[0])], ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Top-K support (Section 4.5).


def test_topk_support_matches_reference(model):
    rng, prompts, completions = _problems(seed=30, b=2)
    teacher_prompts = [[_ids(rng, 12), _ids(rng, 3), _ids(rng, 7)], [_ids(rng, 5)]]
    k = 5
    model.zero_grad()
    student, teacher, mask = scoring.score_topk_support(
        model, prompts, teacher_prompts, completions, pad_id=2, k=k, chunk_rows=2, chunk_size=3
    )
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert student.shape == teacher.shape == (2, 3, max(map(len, completions)))
    assert student.requires_grad and not teacher.requires_grad
    student.sum().backward()
    ours = _grads(model)

    model.zero_grad()
    total = 0.0
    for b, completion in enumerate(completions):
        tokens = torch.tensor(completion)  # [T]
        student_logits = reference_logits(model, prompts[b], completion)  # [T, V]
        for j, teacher_prompt in enumerate(teacher_prompts[b]):
            with torch.no_grad():
                teacher_logits = reference_logits(model, teacher_prompt, completion)  # [T, V]
            top = teacher_logits.topk(k, dim=1).indices  # [T, k]
            in_top = (top == tokens[:, None]).any(1)  # [T]
            ref_t, ref_s = [], []
            for t in range(len(completion)):
                idx = top[t] if in_top[t] else torch.cat([top[t], tokens[t : t + 1]])
                ref_t.append(teacher_logits[t, tokens[t]] - teacher_logits[t, idx].logsumexp(0))
                ref_s.append(student_logits[t, tokens[t]] - student_logits[t, idx].logsumexp(0))
            torch.testing.assert_close(teacher[b, j, : len(completion)], torch.stack(ref_t), atol=TOL, rtol=0)
            torch.testing.assert_close(
                student[b, j, : len(completion)], torch.stack(ref_s).detach(), atol=TOL, rtol=0
            )
            total = total + torch.stack(ref_s).sum()
        assert torch.all(student[b, len(teacher_prompts[b]) :] == 0)
        assert torch.all(teacher[b, len(teacher_prompts[b]) :] == 0)
    total.backward()
    theirs = _grads(model)
    assert_same_grads(ours, theirs)
    model.zero_grad()


def test_topk_support_local_kl_matches_reference(model):
    """local_kl=True: the local forward KL per teacher and position equals sum_{v in S} p_T,S (log p_T,S -
    log p_S,S) on the support S = teacher top-k + sampled token, computed from full logits; its gradient
    reaches the student; student and teacher local log-probs are those of the plain variant."""
    rng, prompts, completions = _problems(seed=31, b=2)
    teacher_prompts = [[_ids(rng, 9), _ids(rng, 4)], [_ids(rng, 6)]]
    k = 4
    plain = scoring.score_topk_support(model, prompts, teacher_prompts, completions, pad_id=2, k=k)
    model.zero_grad()
    student, teacher, mask, local_kl = scoring.score_topk_support(
        model, prompts, teacher_prompts, completions, pad_id=2, k=k, chunk_rows=2, chunk_size=3, local_kl=True
    )
    torch.testing.assert_close(student, plain[0], atol=TOL, rtol=0)
    torch.testing.assert_close(teacher, plain[1], atol=TOL, rtol=0)
    assert local_kl.requires_grad and local_kl.shape == student.shape
    local_kl.sum().backward()
    ours = _grads(model)
    model.zero_grad()
    total = 0.0
    for b, completion in enumerate(completions):
        tokens = torch.tensor(completion)  # [T]
        student_logits = reference_logits(model, prompts[b], completion)  # [T, V]
        for j, teacher_prompt in enumerate(teacher_prompts[b]):
            with torch.no_grad():
                teacher_logits = reference_logits(model, teacher_prompt, completion)  # [T, V]
            top = teacher_logits.topk(k, dim=1).indices  # [T, k]
            ref = []
            for t in range(len(completion)):
                idx = top[t] if (top[t] == tokens[t]).any() else torch.cat([top[t], tokens[t : t + 1]])
                lt = teacher_logits[t, idx].log_softmax(0)
                ls = student_logits[t, idx].log_softmax(0)
                ref.append((lt.exp() * (lt - ls)).sum())
            torch.testing.assert_close(
                local_kl[b, j, : len(completion)], torch.stack(ref).detach(), atol=TOL, rtol=0
            )
            total = total + torch.stack(ref).sum()
        assert torch.all(local_kl[b, len(teacher_prompts[b]) :] == 0)
    total.backward()
    assert_same_grads(ours, _grads(model))
    model.zero_grad()


def test_topk_support_over_whole_vocabulary_is_full_normalisation(llama):
    """With k >= V the local support is the whole vocabulary: the sampled-token log-probs come back."""
    rng, prompts, completions = _problems(seed=31, b=2)
    teacher_prompts = [[_ids(rng, 6), _ids(rng, 2)], [_ids(rng, 9), _ids(rng, 11)]]
    vocab = llama.config.vocab_size
    with torch.no_grad():
        student, teacher, _ = scoring.score_topk_support(
            llama,
            prompts,
            teacher_prompts,
            completions,
            2,
            k=vocab + 7,  # more than V: the whole vocabulary
        )
        full_s, valid = scoring.score_student(llama, prompts, completions, pad_id=2)
    full_t, _ = scoring.score_teachers(llama, teacher_prompts, completions, pad_id=2)
    torch.testing.assert_close(teacher, full_t, atol=TOL, rtol=0)
    torch.testing.assert_close(student, full_s[:, None].expand_as(student), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Full-distribution divergences.


@pytest.mark.parametrize(
    "model_name, kind",
    [
        ("llama", "forward_kl"),
        ("llama", "reverse_kl"),
        ("qwen3", "jsd"),
        ("lora", "jsd"),
        ("lora", "forward_kl"),
    ],
)
def test_divergence_matches_reference(request, model_name, kind):
    model = request.getfixturevalue({"lora": "lora_llama"}.get(model_name, model_name))
    divergence = scoring._DIVERGENCES[kind]
    rng, prompts, completions = _problems(seed=40)
    teacher_prompts = [_ids(rng, rng.randint(1, 25)) for _ in completions]
    model.zero_grad()
    per_token, valid = scoring.score_divergence(
        model,
        prompts,
        teacher_prompts,
        completions,
        pad_id=2,
        kind=kind,
        beta=0.3,
        chunk_size=4,
        chunk_rows=2,
    )
    per_token.sum().backward()
    ours = _grads(model)
    model.zero_grad()
    total = 0.0
    for b, completion in enumerate(completions):
        s = reference_logits(model, prompts[b], completion)  # [T, V]
        with torch.no_grad():
            t = reference_logits(model, teacher_prompts[b], completion)  # [T, V]
        ref = divergence(s, t, beta=0.3) if kind == "jsd" else divergence(s, t)  # [T]
        torch.testing.assert_close(per_token[b, : len(completion)], ref.detach(), atol=TOL, rtol=0)
        assert valid[b].sum().item() == len(completion)
        total = total + ref.sum()
    total.backward()
    theirs = _grads(model)
    assert_same_grads(ours, theirs)
    model.zero_grad()


def test_divergence_rejects_unknown_kind(llama):
    with pytest.raises(ConfigError, match="unknown divergence"):
        scoring.score_divergence(llama, [[5]], [[6]], [[7]], pad_id=2, kind="tv")


# ---------------------------------------------------------------------------------------------------
# Token mask m_t.


def _mask(tokenizer, ids: list[int]) -> list[bool]:
    valid = torch.ones((1, len(ids)), dtype=torch.bool)
    return scoring.completion_token_mask(tokenizer, [ids], valid)[0].tolist()


def test_mask_keeps_reasoning_tokens(smollm2_tokenizer):
    ids = smollm2_tokenizer("Adding seven gives nineteen, so x=19.", add_special_tokens=False)["input_ids"]
    assert _mask(smollm2_tokenizer, ids) == [True] * len(ids)
    # SmolLM2 splits " 12" into " ", "1", "2": the lone space is a whitespace-only token and is dropped
    ids = smollm2_tokenizer("is 12", add_special_tokens=False)["input_ids"]
    assert [smollm2_tokenizer.decode([i]) for i in ids] == ["is", " ", "1", "2"]
    assert _mask(smollm2_tokenizer, ids) == [True, False, True, True]


def test_mask_drops_padding(smollm2_tokenizer):
    ids = smollm2_tokenizer(" two plus", add_special_tokens=False)["input_ids"]
    valid = torch.tensor([[True] * len(ids) + [False]])
    padded = torch.tensor([ids + [ids[0]]])  # the padding column holds an ordinary token
    assert scoring.completion_token_mask(smollm2_tokenizer, padded, valid)[0].tolist() == [True] * len(
        ids
    ) + [False]


def test_mask_drops_special_and_chat_template_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = [
        tok.convert_tokens_to_ids(t) for t in ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>"]
    ]
    assert _mask(tok, ids) == [False, False, False, False]


def test_mask_drops_added_think_and_markup_tokens_not_marked_special(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.add_tokens(["<think>", "</think>", "<|tool|>", "plainword_added"])  # special=False
    ids = [tok.convert_tokens_to_ids(t) for t in ["<think>", "</think>", "<|tool|>"]]
    assert _mask(tok, ids) == [False, False, False]
    word = tok.convert_tokens_to_ids("plainword_added")
    assert _mask(tok, [word]) == [True]  # an added token that is neither special nor markup counts


def test_mask_drops_whitespace_only_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for text in ["\n", "\n\n", " ", "  ", "\t"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, text
        assert _mask(tok, ids) == [False], repr(text)
    ids = tok("a\n\nb", add_special_tokens=False)["input_ids"]  # a, "\n", "\n", b
    assert _mask(tok, ids) == [True, False, False, True]


def test_mask_drops_ids_outside_the_tokenizer(smollm2_tokenizer):
    assert _mask(smollm2_tokenizer, [len(smollm2_tokenizer) + 5, 28120]) == [False, True]


def test_mask_table_is_cached(smollm2_tokenizer):
    assert scoring._drop_table(smollm2_tokenizer) is scoring._drop_table(smollm2_tokenizer)


# ---------------------------------------------------------------------------------------------------
# Thinking boundary.


@pytest.fixture
def qwen3_style_tokenizer(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = QWEN3_STYLE_TEMPLATE
    return tok


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_aligned_teacher_prompt_ends_like_the_student_prompt(qwen3_style_tokenizer):
    tok = qwen3_style_tokenizer
    student = _encode(tok, scoring.render_chat(tok, "Problem: 2+2?", enable_thinking=False))
    teacher = scoring.teacher_prompt_ids(tok, ["Skill: count.\n\nProblem: 2+2?"])[0]
    tail = _encode(tok, "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert student[-len(tail) :] == tail
    assert teacher[-len(tail) :] == tail  # the completion follows the same empty think block
    assert tok.decode(teacher).startswith("<|im_start|>user\nSkill: count.")


def test_unaligned_teacher_prompt_is_the_thinking_render(qwen3_style_tokenizer):
    tok = qwen3_style_tokenizer
    teacher = scoring.teacher_prompt_ids(tok, ["Problem: 2+2?"], align_think_block=False)[0]
    assert tok.decode(teacher) == "<|im_start|>user\nProblem: 2+2?<|im_end|>\n<|im_start|>assistant\n"
    aligned = scoring.teacher_prompt_ids(tok, ["Problem: 2+2?"])[0]
    assert tok.decode(aligned) == tok.decode(teacher) + "<think>\n\n</think>\n\n"
    # thinking teacher + aligned block = the student's own render of the same text
    assert aligned == _encode(tok, scoring.render_chat(tok, "Problem: 2+2?", enable_thinking=False))


def test_alignment_is_a_no_op_for_templates_without_thinking(smollm2_tokenizer):
    aligned = scoring.teacher_prompt_ids(smollm2_tokenizer, ["Problem: 1+1?"])[0]
    plain = scoring.teacher_prompt_ids(smollm2_tokenizer, ["Problem: 1+1?"], align_think_block=False)[0]
    assert aligned == plain


def test_alignment_refuses_templates_that_do_not_extend(qwen3_style_tokenizer):
    tok = qwen3_style_tokenizer
    tok.chat_template = QWEN3_STYLE_TEMPLATE.replace(
        "{%- endif %}{%- endif %}", "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"
    )
    # thinking on now adds "<think>\n", which is a prefix of the student's "<think>\n\n</think>\n\n"
    aligned = scoring.teacher_prompt_ids(tok, ["Q"])[0]
    assert tok.decode(aligned).endswith("assistant\n<think>\n\n</think>\n\n")
    tok.chat_template = QWEN3_STYLE_TEMPLATE.replace(
        "{%- endif %}{%- endif %}", "{%- else %}{{- 'THINK:' }}{%- endif %}{%- endif %}"
    )
    with pytest.raises(ConfigError, match="cannot align the thinking boundary"):
        scoring.teacher_prompt_ids(tok, ["Q"])
    assert tok.decode(scoring.teacher_prompt_ids(tok, ["Q"], align_think_block=False)[0]).endswith("THINK:")


def test_teacher_scores_student_completion_at_the_same_relative_position(qwen3_style_tokenizer, llama):
    """End to end: the aligned teacher with the student's own text is the student, token for token."""
    tok = qwen3_style_tokenizer
    student_prompt = _encode(tok, scoring.render_chat(tok, "Problem: 3+4?", enable_thinking=False))
    completion = _encode(tok, "3 + 4 = 7, so the answer is \\boxed{7}.<|im_end|>")
    teacher_prompt = scoring.teacher_prompt_ids(tok, ["Problem: 3+4?"])[0]
    with torch.no_grad():
        student, _ = scoring.score_student(llama, [student_prompt], [completion], pad_id=tok.pad_token_id)
    teacher, _ = scoring.score_teachers(llama, [[teacher_prompt]], [completion], pad_id=tok.pad_token_id)
    torch.testing.assert_close(teacher[:, 0], student, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scoring_on_cuda_matches_a_plain_reference(tiny_model_dir, dtype):
    """On a CUDA device, with the model in fp32 or bf16: student and teacher log-probs come back in fp32
    on the model's device and equal a per-row full log-softmax (in fp32, of the same model's logits),
    and the student gradient matches; mixed prompt lengths exercise the padding on the device."""
    from peft import LoraConfig, get_peft_model

    device = torch.device("cuda")
    torch.manual_seed(3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        _load(tiny_model_dir).to(device=device, dtype=dtype),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
    )
    rng, prompts, completions = _problems(seed=5)
    teacher_prompts = [[_ids(rng, rng.randint(1, 30)) for _ in range(3)] for _ in prompts]

    def ref(prompt, completion):  # [T] fp32, one row alone
        ids = torch.tensor([prompt + completion], device=device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # [P + T, V]
        rows = logp[len(prompt) - 1 : len(prompt) - 1 + len(completion)]
        return rows.gather(1, torch.tensor(completion, device=device)[:, None]).squeeze(1)

    # bf16 logits: padding and batching change the bf16 rounding of the hidden states a little
    tol = 1e-4 if dtype == torch.float32 else 0.1
    model.zero_grad()
    logp, _ = scoring.score_student(model, prompts, completions, pad_id=2, chunk_size=4)  # [B, T]
    assert logp.device.type == "cuda" and logp.dtype == torch.float32
    logp.sum().backward()
    ours = _grads(model)
    model.zero_grad()
    sum(ref(p, c).sum() for p, c in zip(prompts, completions, strict=True)).backward()
    theirs = _grads(model)
    for b, c in enumerate(completions):
        torch.testing.assert_close(logp[b, : len(c)].detach(), ref(prompts[b], c).detach(), atol=tol, rtol=0)
    if dtype == torch.float32:
        assert_same_grads(ours, theirs)
    model.zero_grad()

    teacher_logp, mask = scoring.score_teachers(
        model, teacher_prompts, completions, pad_id=2, chunk_rows=2, chunk_size=5
    )  # [B, K, T]
    assert teacher_logp.device.type == "cuda" and teacher_logp.dtype == torch.float32 and mask.all()
    with torch.no_grad():
        for b, c in enumerate(completions):
            for k, tp in enumerate(teacher_prompts[b]):
                torch.testing.assert_close(teacher_logp[b, k, : len(c)], ref(tp, c), atol=tol, rtol=0)
