"""Pure tests of sgsd.objectives: hand-computed values, Proposition 3.1, ablation switches, baselines.

Reference numbers used below (tau = 1 unless stated), l(D) = log 2 - log(1 + exp(-D^2 / 2)):
  l(0.5)  = 0.6931472 - log(1 + e^-0.125)  = 0.6931472 - 0.6325990 = 0.0605481
  l(1)    = 0.6931472 - log(1 + e^-0.5)    = 0.6931472 - 0.4740770 = 0.2190702
  l(2)    = 0.6931472 - log(1 + e^-2)      = 0.6931472 - 0.1269280 = 0.5662192
  l(3)    = 0.6931472 - log(1 + e^-4.5)    = 0.6931472 - 0.0110477 = 0.6820994
  l(4)    = 0.6931472 - log(1 + e^-8)      = 0.6931472 - 0.0003354 = 0.6928118
  l(10)   = 0.6931472 - log(1 + e^-50)     = 0.6931472 (to 7 digits)
  l(0.03) = 0.69314718 - log(1 + e^-0.00045) = 0.69314718 - 0.69292221 = 0.00022497 (~ 0.03^2 / 4, Eq. 40)
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sgsd.objectives import (
    SGSD_TENSOR_METRICS,
    aggregate,
    divergence_loss,
    divergence_objective,
    forward_kl,
    gated_loss,
    generalized_jsd,
    group_advantages,
    grpo_loss,
    local_support_ids,
    local_support_terms,
    local_support_terms_from_gathered,
    objective_spec,
    opsd_forward_kl,
    polarity,
    reverse_kl,
    robust_support,
    sampled_rkl_loss,
    sgsd_local_kl_loss,
    sgsd_loss,
    teacher_weights,
    topk_support_logprobs,
)

L05, L1, L2, L3, L4, L10, L003 = 0.0605481, 0.2190702, 0.5662192, 0.6820994, 0.6928118, 0.6931472, 0.00022497
APPROX = dict(rel=1e-5, abs=1e-6)


def assert_close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(
        actual.detach().double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )


def g_formula(delta: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 17 written out independently of the module: D / (tau (1 + exp(D^2 / (2 tau))))."""
    return delta / (tau * (1.0 + torch.exp(delta**2 / (2.0 * tau))))


def autograd_g(delta: float, tau: float) -> float:
    d = torch.tensor(delta, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(gated_loss(d, tau), d)
    return grad.item()


def one_problem(deltas, reward=1.0, mask=None, **kwargs):
    """sgsd_loss for B = 1 with K teachers whose gaps are `deltas` [K][T] (student logp = -1 everywhere)."""
    teacher_gaps = torch.tensor([deltas], dtype=torch.float64)  # [1, K, T]
    _, K, T = teacher_gaps.shape
    student = torch.full((1, T), -1.0, dtype=torch.float64, requires_grad=True)  # [1, T]
    teacher = student.detach().unsqueeze(1) + teacher_gaps  # [1, K, T]
    mask = torch.ones(1, T) if mask is None else torch.tensor([mask], dtype=torch.float64)
    loss, metrics = sgsd_loss(
        student,
        teacher,
        mask,
        torch.tensor([reward]),
        torch.zeros(1, K),
        torch.ones(1, K, dtype=torch.bool),
        **kwargs,
    )
    return loss, metrics, student


# ----------------------------------------------------------------------------
# Import contract


def test_import_pulls_in_torch_only():
    code = "import sys, sgsd.objectives; print('transformers' in sys.modules, 'torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


# ----------------------------------------------------------------------------
# Eq. 14 gate


@pytest.mark.parametrize(
    "delta, tau, expected",
    [
        (0.0, 1.0, 0.0),  # log 2 - log(1 + 1) = 0
        (1.0, 1.0, L1),
        (-1.0, 1.0, L1),  # symmetric in D
        (2.0, 1.0, L2),
        (2.0, 4.0, L1),  # D^2 / (2 tau) = 4 / 8 = 0.5, same as D = 1, tau = 1
        (10.0, 1.0, L10),  # saturates at log 2
    ],
)
def test_gated_loss_values(delta, tau, expected):
    assert gated_loss(torch.tensor(delta), tau).item() == pytest.approx(expected, **APPROX)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_loss_is_finite_with_finite_gradient_at_huge_gaps(dtype):
    delta = torch.tensor([-1e4, 1e4, 1e20], dtype=dtype, requires_grad=True)
    value = gated_loss(delta, 1.0)
    value.sum().backward()
    assert value.dtype == torch.float32  # upcast
    assert torch.allclose(value, torch.full((3,), math.log(2.0)))
    assert torch.isfinite(delta.grad).all() and (delta.grad == 0).all()  # exp(-5e7) underflows to 0


def test_gated_loss_keeps_precision_near_zero():
    # l(1e-4) = (1e-4)^2 / 4 - ... = 2.5e-9 (Eq. 40); the naive log 2 - log(1 + e^z) in fp32 returns 0.
    assert gated_loss(torch.tensor(1e-4), 1.0).item() == pytest.approx(2.5e-9, rel=1e-4)


def test_gated_loss_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        gated_loss(torch.tensor(1.0), 0.0)


# ----------------------------------------------------------------------------
# Proposition 3.1 (Appendix D) through autograd

taus = st.floats(min_value=0.01, max_value=100.0)


@settings(max_examples=200, deadline=None)
@given(delta=st.floats(min_value=-200.0, max_value=200.0), tau=taus)
def test_gradient_matches_eq17_and_has_sign_of_delta(delta, tau):
    # outside these bounds g underflows to 0 in fp64: huge gaps (exp(-600)) and subnormal gaps (delta/2tau)
    assume(abs(delta) > 1e-150 and delta * delta / (2 * tau) < 600)
    g = autograd_g(delta, tau)
    assert g == pytest.approx(g_formula(torch.tensor(delta, dtype=torch.float64), tau).item(), rel=1e-9)
    assert math.copysign(1.0, g) == math.copysign(1.0, delta) and g != 0.0  # Eq. 21 / 35


@settings(max_examples=200, deadline=None)
@given(delta=st.floats(min_value=-1e4, max_value=1e4), tau=taus)
def test_gradient_bound_is_one_over_sqrt_e_tau(delta, tau):
    # Appendix D.4, Eq. 38: |g| <= 1 / sqrt(e * tau). (Eq. 22 as printed, 1 / (sqrt(e) * tau), is a
    # different bound when tau != 1 and is wrong for tau > 1: see the next test.)
    assert abs(autograd_g(delta, tau)) <= 1.0 / math.sqrt(math.e * tau) + 1e-12


def test_printed_eq22_bound_fails_for_tau_above_one():
    # tau = 4, D = 2: g = 2 / (4 (1 + e^0.5)) = 2 / (4 * 2.6487213) = 0.1887705,
    # above Eq. 22's 1 / (sqrt(e) * 4) = 0.1516327 but below Eq. 38's 1 / sqrt(4e) = 0.3032653.
    g = autograd_g(2.0, 4.0)
    assert g == pytest.approx(0.1887705, rel=1e-6)
    assert 1.0 / (math.sqrt(math.e) * 4.0) < g < 1.0 / math.sqrt(4.0 * math.e)


@settings(max_examples=200, deadline=None)
@given(delta=st.floats(min_value=-0.5, max_value=0.5), tau=st.floats(min_value=0.25, max_value=100.0))
def test_slope_near_zero_is_one_over_two_tau(delta, tau):
    # Eq. 23 / 39. Exactly g = (D / 2 tau)(1 - tanh(u / 2)) with u = D^2 / 2 tau, and tanh(x) <= x, so
    # |g - D / (2 tau)| <= |D| u / (4 tau) = |D|^3 / (8 tau^2).
    g = autograd_g(delta, tau)
    assert abs(g - delta / (2 * tau)) <= abs(delta) ** 3 / (8 * tau**2) + 1e-15


@settings(max_examples=200, deadline=None)
@given(u=st.floats(min_value=10.0, max_value=600.0), tau=taus, sign=st.sampled_from([-1.0, 1.0]))
def test_large_gaps_are_exponentially_damped(u, tau, sign):
    # Eq. 24 / 41: g / ((D / tau) exp(-D^2 / 2 tau)) = e^u / (1 + e^u) -> 1; here u = D^2 / 2 tau >= 10,
    # so the ratio is within e^-10 of 1 and |g| <= (|D| / tau) e^-u (Eq. 37).
    delta = sign * math.sqrt(2 * tau * u)
    envelope = (delta / tau) * math.exp(-(delta**2) / (2 * tau))
    g = autograd_g(delta, tau)
    # 1e-12 slack: exp amplifies the rounding of u (up to 600) in the two evaluations
    assert 1 - math.exp(-10) <= g / envelope <= 1.0 + 1e-12
    assert abs(g) <= abs(envelope) * (1.0 + 1e-12)


# ----------------------------------------------------------------------------
# Eqs. 11-12 robust support


def test_robust_support_by_hand():
    deltas = torch.tensor([[[0.5, -4.0, 1.0], [-0.2, 0.1, 5.0]]])  # [1, 2, 3]
    shared = torch.tensor([[1.0, 1.0, 0.0]])  # [1, 3]
    # clip 3: teacher 0 -> (0.5 - 3) / 2 = -1.25; teacher 1 -> (-0.2 + 0.1) / 2 = -0.05
    assert_close(robust_support(deltas, shared, 3.0, 1e-8), [[-1.25, -0.05]])
    # no clipping: teacher 0 -> (0.5 - 4) / 2 = -1.75
    assert_close(robust_support(deltas, shared, None, 1e-8), [[-1.75, -0.05]])
    # per-teacher mask: teacher 0 keeps all -> (0.5 - 3 + 1) / 3 = -0.5; teacher 1 keeps 5 -> clipped 3
    per_teacher = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]])
    assert_close(robust_support(deltas, per_teacher, 3.0, 1e-8), [[-0.5, 3.0]])
    # empty mask: 0 / (0 + eps) = 0
    assert robust_support(deltas, torch.zeros(1, 3), 3.0, 1e-8).tolist() == [[0.0, 0.0]]


def test_support_of_on_policy_samples_estimates_minus_kl():
    """Without clipping, the robust support of tokens sampled from the student itself is a Monte Carlo
    estimate of E_{y~p_S}[log p_T(y) - log p_S(y)] = -KL(p_S || p_T) <= 0: on the student's own samples
    any teacher that differs from the student has negative support on average (the learning
    benchmark's diagnosis leans on this). Here p_S, p_T over 5 tokens, KL worked out by hand:
    p_S = (.5, .2, .1, .1, .1), p_T = (.2, .2, .2, .2, .2): KL = .5 ln 2.5 + .2 ln 1 + 3 * .1 ln .5
    = 0.458145 - 0.207944 = 0.250201."""
    p_s = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)
    p_t = torch.full((5,), 0.2, dtype=torch.float64)
    kl = 0.5 * math.log(2.5) + 3 * 0.1 * math.log(0.5)
    assert kl == pytest.approx(0.250201, abs=1e-6)
    n = 200_000
    tokens = torch.multinomial(p_s, n, replacement=True, generator=torch.Generator().manual_seed(0))
    delta = (p_t.log() - p_s.log())[tokens].view(1, 1, n)  # [B=1, K=1, T=n]
    support = robust_support(delta, torch.ones(1, n), None, 1e-12)  # [1, 1]
    # per-sample delta: ln .4 (p .5), 0 (p .2), ln 2 (p .3); E[d^2] = .5 * .8396 + .3 * .4805 = .5639,
    # var = .5639 - .2502^2 = .5013, std 0.708; tolerance 5 sigma / sqrt(n)
    assert float(support) == pytest.approx(-kl, abs=5 * 0.708 / math.sqrt(n))


# ----------------------------------------------------------------------------
# Eqs. 9, 13 polarity: the Table 2 decision rule case by case


@pytest.mark.parametrize(
    "reward, support, expected, case",
    [
        (1.0, 0.4, 1.0, "helpful: r > 0, a > 0 -> distill"),
        (-1.0, -0.4, 1.0, "warning: r < 0, a < 0 -> distill"),
        (1.0, -0.4, -1.0, "over-suppressive: r > 0, a < 0 -> reverse"),
        (-1.0, 0.4, -1.0, "misleading: r < 0, a > 0 -> reverse"),
        (1.0, 0.05, 0.0, "neutral: |a| <= eps_a (boundary included)"),
        (-1.0, -0.03, 0.0, "neutral on a failure"),
        (0.0, 0.4, -1.0, "r = 0 (0/1 rewards) counts as failure"),
    ],
)
def test_polarity_table2(reward, support, expected, case):
    rho = polarity(torch.tensor([[support]]), torch.tensor([reward]), threshold=0.05)
    assert rho.item() == expected, case


def test_polarity_sign_of_zero_is_zero_even_without_threshold():
    rho = polarity(torch.tensor([[0.0, 1e-9]]), torch.tensor([1.0]), threshold=0.0)
    assert rho.tolist() == [[0.0, 1.0]]


# ----------------------------------------------------------------------------
# Eq. 6 teacher weights


def test_teacher_weights_softmax_over_valid_teachers_only():
    scores = torch.tensor([[0.0, math.log(3.0), 5.0], [1.0, 2.0, 3.0]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    # row 0: exp(0) : exp(ln 3) = 1 : 3 -> [0.25, 0.75], the invalid slot's large score is ignored;
    # row 1: no valid teacher -> zeros, not NaN
    assert_close(teacher_weights(scores, valid), [[0.25, 0.75, 0.0], [0.0, 0.0, 0.0]])


def test_teacher_weights_temperature():
    # scores [0, ln 9] / 2 = [0, ln 3] -> [0.25, 0.75]
    weights = teacher_weights(torch.tensor([[0.0, math.log(9.0)]]), torch.ones(1, 2, dtype=torch.bool), 2.0)
    assert_close(weights, [[0.25, 0.75]])


# ----------------------------------------------------------------------------
# Eqs. 7, 15, 16: the SGSD loss


def hand_example(reward=1.0):
    """B = 1, K = 2, T = 2: teacher 0 gaps [1, 1], teacher 1 gaps [-2, 0]; scores [0, ln 3]."""
    student = torch.tensor([[-1.0, -2.0]], requires_grad=True)  # [1, 2]
    teacher = torch.tensor([[[0.0, -1.0], [-3.0, -2.0]]], requires_grad=True)  # [1, 2, 2]
    scores = torch.tensor([[0.0, math.log(3.0)]])
    loss, metrics = sgsd_loss(
        student, teacher, torch.ones(1, 2), torch.tensor([reward]), scores, torch.ones(1, 2, dtype=torch.bool)
    )
    return loss, metrics, student, teacher


def test_sgsd_loss_by_hand():
    loss, metrics, _, _ = hand_example()
    # alpha = [0.25, 0.75]; support: teacher 0 = 1 -> rho +1 (helpful), teacher 1 = (-2 + 0) / 2 = -1 ->
    # rho -1 (over-suppressive); l_0 = (l(1) + l(1)) / 2 = 0.2190702, l_1 = (l(2) + l(0)) / 2 = 0.2831096;
    # L = 0.25 * 0.2190702 - 0.75 * 0.2831096 = 0.0547676 - 0.2123322 = -0.1575646
    assert loss.item() == pytest.approx(-0.1575646, **APPROX)
    assert_close(metrics["support"], [[1.0, -1.0]])
    assert metrics["rho"].tolist() == [[1.0, -1.0]]
    assert_close(metrics["weights"], [[0.25, 0.75]])
    assert_close(metrics["teacher_loss"], [[L1, (L2 + 0.0) / 2]])
    assert metrics["helpful_fraction"].item() == 0.5
    assert metrics["over_suppressive_fraction"].item() == 0.5
    for key in ("warning_fraction", "misleading_fraction", "neutral_fraction", "clipped_token_fraction"):
        assert metrics[key].item() == 0.0, key
    assert metrics["mean_abs_delta"].item() == pytest.approx(1.0)  # (1 + 1 + 2 + 0) / 4
    assert metrics["kept_token_fraction"].item() == 1.0
    assert metrics["mean_support"].item() == pytest.approx(0.0, abs=1e-6)  # (1 - 1) / 2
    assert metrics["mean_rho"].item() == 0.0  # (1 - 1) / 2
    for key, value in metrics.items():
        assert not value.requires_grad, key
        per_token = key in ("delta", "live")  # [B, K, T]; other tensor metrics are [B, K]
        assert value.dim() == (3 if per_token else 2 if key in SGSD_TENSOR_METRICS else 0), key


def test_failed_rollout_table2_metrics():
    # r = -1: teacher 0 supports (a = 1) -> misleading, rho -1; teacher 1 suppresses (a = -1) -> warning, +1
    loss, metrics, _, _ = hand_example(reward=-1.0)
    assert metrics["rho"].tolist() == [[-1.0, 1.0]]
    assert metrics["misleading_fraction"].item() == 0.5 and metrics["warning_fraction"].item() == 0.5
    assert loss.item() == pytest.approx(0.1575646, **APPROX)  # every rho flips, so L flips


def test_teacher_is_stop_gradient():
    loss, _, student, teacher = hand_example()
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_negative_polarity_reverses_the_update():
    loss_pos, _, student_pos, _ = hand_example(reward=1.0)
    loss_neg, _, student_neg, _ = hand_example(reward=-1.0)
    loss_pos.backward()
    loss_neg.backward()
    assert torch.allclose(student_neg.grad, -student_pos.grad)
    assert student_pos.grad.abs().min() > 0


def test_gradient_matches_eq34():
    # -dL/ds_{b,t} = (1/B) sum_k alpha_k rho_k (m_t / Z_b) g(Delta_{b,k,t})  (Eq. 34 with the mean over B)
    gen = torch.Generator().manual_seed(0)
    B, K, T, tau, eps = 2, 3, 4, 0.7, 1e-8
    student = (-torch.rand(B, T, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    teacher = -torch.rand(B, K, T, generator=gen, dtype=torch.float64) * 3
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    reward = torch.tensor([1.0, -1.0])
    scores = torch.rand(B, K, generator=gen, dtype=torch.float64)
    valid = torch.tensor([[True, True, True], [True, False, True]])
    loss, metrics = sgsd_loss(student, teacher, mask, reward, scores, valid, tau=tau, threshold=0.0, eps=eps)
    loss.backward()

    delta = teacher - student.detach().unsqueeze(1)  # [B, K, T]
    coef = metrics["weights"] * metrics["rho"]  # [B, K]
    z = mask.sum(-1, keepdim=True) + eps  # [B, 1]
    expected = -(coef.unsqueeze(-1) * g_formula(delta, tau) * (mask / z).unsqueeze(1)).sum(1) / B  # [B, T]
    assert torch.allclose(student.grad, expected, atol=1e-12)
    assert metrics["rho"][1, 1] == 0 and metrics["weights"][1, 1] == 0  # the empty slot


def test_padding_and_empty_teacher_slots_cannot_leak_nan():
    student = torch.tensor([[-1.0, -1.0, float("nan")]], requires_grad=True)  # token 2 is padding
    teacher = torch.tensor([[[0.0, 0.0, float("-inf")], [float("nan")] * 3]])  # teacher 1 is an empty slot
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    valid = torch.tensor([[True, False]])
    loss, metrics = sgsd_loss(student, teacher, mask, torch.tensor([1.0]), torch.zeros(1, 2), valid)
    loss.backward()
    # only teacher 0, gaps [1, 1] -> rho +1, weight 1 -> L = l(1)
    assert loss.item() == pytest.approx(L1, **APPROX)
    assert torch.isfinite(student.grad).all() and student.grad[0, 2] == 0
    assert metrics["kept_token_fraction"].item() == pytest.approx(2 / 3)
    assert metrics["mean_abs_delta"].item() == pytest.approx(1.0)


def test_no_valid_teacher_gives_zero_loss():
    student = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    loss, metrics = sgsd_loss(
        student,
        torch.zeros(1, 2, 2),
        torch.ones(1, 2),
        torch.tensor([1.0]),
        torch.zeros(1, 2),
        torch.zeros(1, 2, dtype=torch.bool),
    )
    assert loss.item() == 0.0 and metrics["helpful_fraction"].item() == 0.0


def test_sgsd_loss_checks_shapes():
    with pytest.raises(ValueError, match="reward"):
        sgsd_loss(
            torch.zeros(1, 2),
            torch.zeros(1, 1, 2),
            torch.ones(1, 2),
            torch.ones(2),
            torch.zeros(1, 1),
            torch.ones(1, 1, dtype=torch.bool),
        )


def test_support_delta_drives_polarity_but_not_the_gate():
    # gaps [1, 1] on a success -> rho +1, L = l(1). Supplying support gaps [-1, -1] flips rho only.
    loss, _, _ = one_problem([[1.0, 1.0]])
    flipped, metrics, _ = one_problem([[1.0, 1.0]], support_delta=torch.full((1, 1, 2), -1.0))
    assert loss.item() == pytest.approx(L1, **APPROX)
    assert flipped.item() == pytest.approx(-L1, **APPROX)
    assert metrics["support"].item() == pytest.approx(-1.0)


# ----------------------------------------------------------------------------
# Ablation switches (Table 4, Fig. 4), one hand example each


def test_ablation_without_token_mask():
    # gaps [0.5, 0.5, -3]; token 2 is a formatting token (mask 0). With the mask: a = 0.5 -> rho +1,
    # L = (l(0.5) + l(0.5)) / 2 = 0.0605481. All-ones mask: a = (0.5 + 0.5 - 3) / 3 = -2/3 -> rho -1,
    # L = -(2 l(0.5) + l(3)) / 3 = -(0.1210963 + 0.6820994) / 3 = -0.2677319.
    masked, _, _ = one_problem([[0.5, 0.5, -3.0]], mask=[1, 1, 0])
    unmasked, metrics, _ = one_problem([[0.5, 0.5, -3.0]], mask=[1, 1, 1])
    assert masked.item() == pytest.approx(L05, **APPROX)
    assert unmasked.item() == pytest.approx(-0.2677319, **APPROX)
    assert metrics["kept_token_fraction"].item() == 1.0


def test_ablation_without_clipping():
    # gaps [2, 2, -10]. clip 3: a = (2 + 2 - 3) / 3 = 1/3 -> rho +1; no clip: a = -6 / 3 = -2 -> rho -1.
    # The gate uses unclipped gaps either way: |L| = (2 l(2) + l(10)) / 3 = 0.6085285.
    clipped, m_clip, _ = one_problem([[2.0, 2.0, -10.0]], clip=3.0)
    unclipped, m_none, _ = one_problem([[2.0, 2.0, -10.0]], clip=None)
    assert m_clip["support"].item() == pytest.approx(1 / 3) and m_none["support"].item() == pytest.approx(
        -2.0
    )
    assert clipped.item() == pytest.approx(0.6085285, **APPROX)
    assert unclipped.item() == pytest.approx(-0.6085285, **APPROX)
    assert m_clip["clipped_token_fraction"].item() == pytest.approx(1 / 3)
    assert m_none["clipped_token_fraction"].item() == 0.0


def test_ablation_without_threshold():
    # gaps [0.03, 0.03]: a = 0.03 <= 0.05 -> neutral, L = 0; threshold 0 -> rho +1, L = l(0.03) = 0.00022497
    neutral, metrics, _ = one_problem([[0.03, 0.03]], threshold=0.05)
    kept, _, _ = one_problem([[0.03, 0.03]], threshold=0.0)
    assert neutral.item() == 0.0 and metrics["neutral_fraction"].item() == 1.0
    assert kept.item() == pytest.approx(L003, rel=1e-4)


def test_ablation_without_all_three_is_the_plain_rule():
    # gaps [-4, 1, 2, 10], mask [1, 1, 1, 0]. Robust: clip -> [-3, 1, 2] mean 0 -> rho 0, L = 0.
    # All three off: plain a = (-4 + 1 + 2 + 10) / 4 = 2.25 (Eq. 8) -> rho +1 (Eq. 10),
    # L = (l(4) + l(1) + l(2) + l(10)) / 4 = (0.6928118 + 0.2190702 + 0.5662192 + 0.6931472) / 4 = 0.5428121.
    robust, _, _ = one_problem([[-4.0, 1.0, 2.0, 10.0]], mask=[1, 1, 1, 0])
    plain, metrics, _ = one_problem([[-4.0, 1.0, 2.0, 10.0]], mask=[1, 1, 1, 1], clip=None, threshold=0.0)
    assert robust.item() == 0.0
    assert metrics["support"].item() == pytest.approx(2.25)
    assert plain.item() == pytest.approx(0.5428121, **APPROX)


def test_ablation_without_polarity():
    # failed rollout, supporting teacher (gaps [1, 1]) -> misleading, rho -1, L = -l(1);
    # use_polarity=False distills it anyway: L = +l(1). A neutral teacher is distilled too.
    with_polarity, _, _ = one_problem([[1.0, 1.0]], reward=-1.0)
    without, metrics, _ = one_problem([[1.0, 1.0], [0.01, 0.01]], reward=-1.0, use_polarity=False)
    assert with_polarity.item() == pytest.approx(-L1, **APPROX)
    # two teachers, equal scores -> alpha 1/2 each: L = (l(1) + l(0.01)) / 2, l(0.01) = 0.0000250
    assert without.item() == pytest.approx((L1 + 0.0000250) / 2, **APPROX)
    assert metrics["rho"].tolist() == [[1.0, 1.0]]
    assert metrics["misleading_fraction"].item() == 0.5 and metrics["neutral_fraction"].item() == 0.5


def test_ablation_single_teacher():
    # K = 1 (teacher 0 of the hand example alone): alpha = 1, L = rho l_0 = l(1), versus the pool's -0.1575646
    single, metrics, _ = one_problem([[1.0, 1.0]])
    assert single.item() == pytest.approx(L1, **APPROX)
    assert metrics["weights"].tolist() == [[1.0]]


# ----------------------------------------------------------------------------
# Full-vocabulary divergences

P_S_LOGITS = torch.tensor([0.0, 0.0])  # p_S = [0.5, 0.5]
P_T_LOGITS = torch.tensor([math.log(3.0), 0.0])  # p_T = [0.75, 0.25]


def test_kl_and_jsd_by_hand():
    # forward KL(p_T || p_S) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.3040988 - 0.1732868 = 0.1308120
    assert forward_kl(P_S_LOGITS, P_T_LOGITS).item() == pytest.approx(0.1308120, **APPROX)
    # reverse KL(p_S || p_T) = 0.5 ln(0.5 / 0.75) + 0.5 ln(0.5 / 0.25) = -0.2027326 + 0.3465736 = 0.1438410
    assert reverse_kl(P_S_LOGITS, P_T_LOGITS).item() == pytest.approx(0.1438410, **APPROX)
    # beta 0.5: M = [0.625, 0.375]; KL(p_T || M) = 0.75 ln 1.2 + 0.25 ln(2/3) = 0.0353749,
    # KL(p_S || M) = 0.5 ln 0.8 + 0.5 ln(4/3) = 0.0322693; JSD = 0.5 (0.0353749 + 0.0322693) = 0.0338221
    assert generalized_jsd(P_S_LOGITS, P_T_LOGITS, 0.5).item() == pytest.approx(0.0338221, **APPROX)


def plain_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p / q).log()).sum(-1)


def test_divergences_match_a_plain_full_computation():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    assert torch.allclose(forward_kl(student, teacher), plain_kl(p_t, p_s))
    assert torch.allclose(reverse_kl(student, teacher), plain_kl(p_s, p_t))
    for beta in (0.1, 0.5, 0.9):
        m = beta * p_t + (1 - beta) * p_s
        expected = beta * plain_kl(p_t, m) + (1 - beta) * plain_kl(p_s, m)
        assert torch.allclose(generalized_jsd(student, teacher, beta), expected)


def test_jsd_limits():
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    teacher = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    fwd, rev = forward_kl(student, teacher), reverse_kl(student, teacher)
    # the formula vanishes at both ends; JSD / beta -> forward KL, JSD / (1 - beta) -> reverse KL
    small = 1e-6
    assert torch.allclose(generalized_jsd(student, teacher, small) / small, fwd, rtol=1e-4)
    assert torch.allclose(generalized_jsd(student, teacher, 1 - small) / small, rev, rtol=1e-4)
    # the endpoints are defined as those KLs (TRL/OPSD convention)
    assert torch.equal(generalized_jsd(student, teacher, 0.0), fwd)
    assert torch.equal(generalized_jsd(student, teacher, 1.0), rev)


def test_kl_handles_zero_probability_entries():
    student = torch.tensor([0.0, 0.0, float("-inf")])  # p_S = [0.5, 0.5, 0]
    teacher = torch.tensor([math.log(3.0), 0.0, float("-inf")])
    assert reverse_kl(student, teacher).item() == pytest.approx(0.1438410, **APPROX)
    assert forward_kl(student, teacher).item() == pytest.approx(0.1308120, **APPROX)


def test_divergence_loss_by_hand():
    # position 0: the hand pair; position 1: identical distributions (KL 0)
    student = torch.stack([P_S_LOGITS, P_S_LOGITS]).unsqueeze(0)  # [1, 2, 2]
    teacher = torch.stack([P_T_LOGITS, P_S_LOGITS]).unsqueeze(0)  # [1, 2, 2]
    assert divergence_loss(student, teacher, torch.ones(1, 2), "forward_kl").item() == pytest.approx(
        0.1308120 / 2, **APPROX
    )
    assert divergence_loss(
        student, teacher, torch.tensor([[1.0, 0.0]]), "reverse_kl"
    ).item() == pytest.approx(0.1438410, **APPROX)
    with pytest.raises(ValueError, match="kind"):
        divergence_loss(student, teacher, torch.ones(1, 2), "kl")


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_loss_chunked_equals_unchunked(kind):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    teacher = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.float64)
    results = []
    for chunk in (1, 2, 3, 128):
        leaf = student.clone().requires_grad_(True)
        loss = divergence_loss(leaf, teacher, mask, kind, beta=0.3, chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    # reference: one unchunked pass, per-row masked mean then mean over rows
    per_position = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}.get(
        kind, lambda s, t: generalized_jsd(s, t, 0.3)
    )(student, teacher)
    expected = ((per_position * mask).sum(-1) / (mask.sum(-1) + 1e-8)).mean()
    for loss, grad in results:
        assert torch.allclose(loss, expected)
        assert torch.allclose(grad, results[-1][1])
    assert teacher.grad is None  # stop-gradient
    assert results[0][1][0, 3:].abs().max() == 0  # masked positions get no gradient


# ----------------------------------------------------------------------------
# Top-K local support (Section 4.5)


def test_topk_support_logprobs_by_hand():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 2))  # p proportional to [1, 2, 3, 4]
    support_idx = torch.tensor([[3, 2], [3, 2]])  # teacher top-2
    token = torch.tensor([0, 2])
    # row 0: token 0 outside the top-2 -> support {3, 2, 0}: 1 / (4 + 3 + 1) -> ln(1/8) = -2.0794415
    # row 1: token 2 inside the top-2, counted once -> support {3, 2}: 3 / 7 -> ln(3/7) = -0.8472979
    assert_close(topk_support_logprobs(logits, support_idx, token), [-2.0794415, -0.8472979])


def test_topk_support_is_shared_by_teacher_and_student():
    teacher = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    student = torch.log(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))
    support_idx = teacher.topk(2, dim=-1).indices  # [[3, 2]]
    token = torch.tensor([0])
    # student on {3, 2, 0}: 4 / (1 + 2 + 4) -> ln(4/7) = -0.5596158; teacher ln(1/8) = -2.0794415
    gap = topk_support_logprobs(teacher, support_idx, token) - topk_support_logprobs(
        student, support_idx, token
    )
    assert gap.item() == pytest.approx(-2.0794415 + 0.5596158, **APPROX)


# ----------------------------------------------------------------------------
# Sampled-token reverse KL


def test_sampled_rkl_loss_by_hand():
    student = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -3.0]], requires_grad=True)
    # advantage = [0.5, -1]; loss = -((0.5)(-1) + (-1)(-2)) / 2 = -(1.5) / 2 = -0.75; dL/ds = -adv / 2
    loss = sampled_rkl_loss(student, teacher, torch.ones(1, 2))
    loss.backward()
    assert loss.item() == pytest.approx(-0.75, **APPROX)
    assert_close(student.grad, [[-0.25, 0.5]])
    assert teacher.grad is None


# ----------------------------------------------------------------------------
# GRPO


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    # group 0: mean 0.5, deviations [0.5, -1.5, 0.5, 0.5], unbiased var = (0.25 + 2.25 + 0.25 + 0.25) / 3 = 1
    # group 1: all equal -> deviations 0 -> advantage 0
    expected = [0.5 / (1 + 1e-6), -1.5 / (1 + 1e-6), 0.5 / (1 + 1e-6), 0.5 / (1 + 1e-6), 0, 0, 0, 0]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, **APPROX)
    assert_close(group_advantages(rewards.view(2, 4), 4), [expected[:4], expected[4:]])
    assert_close(group_advantages(rewards, 4, scale=False), [0.5, -1.5, 0.5, 0.5, 0, 0, 0, 0])
    # group of 2, [1, -1]: unbiased std = sqrt((1 + 1) / 1) = 1.4142136 -> +-0.7071068 (biased would give +-1)
    assert group_advantages(torch.tensor([1.0, -1.0]), 2).tolist() == pytest.approx([0.7071068, -0.7071068])
    assert group_advantages(torch.tensor([1.0, -1.0]), 1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        group_advantages(torch.ones(6), 4)


def grpo_example(aggregation):
    # log ratios ln 1.5, ln 0.5, 0 -> ratios [1.5, 0.5, 1.0] in both rows; A = [+1, -1]
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]])).requires_grad_(True)
    old_logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, metrics = grpo_loss(logp, old_logp, torch.tensor([1.0, -1.0]), mask, 0.2, aggregation)
    loss.backward()
    return loss, metrics, logp.grad


def test_grpo_loss_by_hand_token_mean():
    # A = +1: min([1.5, 0.5, 1.0], clip -> [1.2, 0.8, 1.0]) = [1.2, 0.5, 1.0] -> loss [-1.2, -0.5, -1.0]
    #         (upper clip active on token 0; the low ratio 0.5 is not clipped for a positive A)
    # A = -1: min([-1.5, -0.5, -1.0], [-1.2, -0.8, -1.0]) = [-1.5, -0.8, -1.0] -> loss [1.5, 0.8, (1.0 masked)]
    #         (lower clip active on token 1; the high ratio 1.5 is not clipped for a negative A)
    # token_mean = (-1.2 - 0.5 - 1.0 + 1.5 + 0.8) / 5 = -0.4 / 5 = -0.08
    loss, metrics, grad = grpo_example("token_mean")
    assert loss.item() == pytest.approx(-0.08, **APPROX)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 5)
    assert metrics["mean_ratio"].item() == pytest.approx((1.5 + 0.5 + 1.0 + 1.5 + 0.5) / 5)
    # d/dlogp of -ratio*A / 5 = -ratio*A / 5 where unclipped; 0 where the clip is active or masked
    assert_close(grad, [[0.0, -0.1, -0.2], [0.3, 0.0, 0.0]])


def test_grpo_loss_by_hand_sequence_mean():
    # row 0 mean (-1.2 - 0.5 - 1.0) / 3 = -0.9; row 1 mean (1.5 + 0.8) / 2 = 1.15; mean 0.125
    loss, _, _ = grpo_example("sequence_mean")
    assert loss.item() == pytest.approx(0.125, **APPROX)


def test_aggregate_modes():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(10 / 4)  # (1 + 2 + 3 + 4) / 4
    assert aggregate(values, mask, "sequence_mean").item() == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(values, mask, "sum")


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_divergence_loss_saves_no_vocabulary_sized_activations(kind):
    # With chunked recomputation, every [.., V]-sized tensor kept for backward is a view of the input logits;
    # the plain unchunked computation keeps several fresh [N, T, V] fp32 tensors (log-softmaxes, probs).
    N, T, V = 2, 16, 50
    student = torch.randn(N, T, V, requires_grad=True)
    teacher = torch.randn(N, T, V)
    input_storages = {student.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
    fresh = []

    def pack(tensor):
        if tensor.numel() > N * T and tensor.untyped_storage().data_ptr() not in input_storages:
            fresh.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        divergence_loss(student, teacher, torch.ones(N, T), kind, chunk_size=4)
    assert fresh == []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        generalized_jsd(student, teacher, 0.5) if kind == "jsd" else reverse_kl(student, teacher)
    assert len(fresh) >= 2  # the check above can fail


def test_sgsd_loss_accepts_per_teacher_student_logprobs():
    # top-K support variant: each teacher renormalises the student on its own support -> student [B, K, T].
    # With identical rows it must equal the broadcast [B, T] form; the gradient reaches every row.
    student = torch.tensor([[-1.0, -2.0]])  # [1, 2]
    teacher = torch.tensor([[[-0.5, -1.0], [-1.5, -2.5]]])  # [1, 2, 2]
    common = dict(
        mask=torch.ones(1, 2),
        reward=torch.tensor([1.0]),
        retrieval_scores=torch.zeros(1, 2),
        teacher_mask=torch.ones(1, 2, dtype=torch.bool),
    )
    flat, _ = sgsd_loss(student, teacher, **common)
    per_teacher = student.unsqueeze(1).expand(1, 2, 2).clone().requires_grad_(True)
    local, _ = sgsd_loss(per_teacher, teacher, **common)
    assert local.item() == pytest.approx(flat.item(), rel=1e-6)
    local.backward()
    assert (per_teacher.grad.abs().sum(-1) > 0).all()


# ----------------------------------------------------------------------------
# Objective options used by the trainer: precomputed weights, sampled-token term, global normaliser


def test_sgsd_loss_reports_the_gaps_it_used():
    _, metrics, _, _ = hand_example()
    assert metrics["delta"].tolist() == [[[1.0, 1.0], [-2.0, 0.0]]]  # Eq. 7, teacher - student
    assert metrics["live"].tolist() == [[[True, True], [True, True]]]


def test_sgsd_loss_with_precomputed_weights_equals_scores():
    student = torch.tensor([[-1.0, -2.0]])
    teacher = torch.tensor([[[0.0, -1.0], [-3.0, -2.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    args = (student, teacher, torch.ones(1, 2), torch.tensor([1.0]))
    by_scores, _ = sgsd_loss(*args, torch.tensor([[0.0, math.log(3.0)]]), valid)
    by_weights, m = sgsd_loss(*args, None, valid, weights=torch.tensor([[0.25, 0.75]]))
    assert by_weights.item() == pytest.approx(by_scores.item(), **APPROX)
    assert_close(m["weights"], [[0.25, 0.75]])


def test_sgsd_loss_sampled_rkl_term_by_hand():
    # hand_example gaps: teacher 0 [1, 1] (rho +1, alpha 0.25), teacher 1 [-2, 0] (rho -1, alpha 0.75);
    # student log-probs [-1, -2]. Term per teacher: -mean_t Delta_t * log p_S(y_t):
    #   teacher 0: -(1 * -1 + 1 * -2) / 2 = 1.5;  teacher 1: -(-2 * -1 + 0 * -2) / 2 = -1.0
    # L = 0.25 * 1 * 1.5 + 0.75 * (-1) * (-1.0) = 0.375 + 0.75 = 1.125
    student = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[[0.0, -1.0], [-3.0, -2.0]]])
    loss, _ = sgsd_loss(student, teacher, torch.ones(1, 2), torch.tensor([1.0]),
                        torch.tensor([[0.0, math.log(3.0)]]), torch.ones(1, 2, dtype=torch.bool),
                        teacher_term="sampled_rkl")  # fmt: skip
    assert loss.item() == pytest.approx(1.125, **APPROX)
    loss.backward()
    # d/d log p_S(y_t) = -(sum_k alpha_k rho_k Delta_t^k) / 2 with Delta stop-gradient:
    # t0: -(0.25 * 1 + 0.75 * (-1) * (-2)) / 2 = -0.875;  t1: -(0.25 * 1 + 0) / 2 = -0.125
    assert_close(student.grad, [[-0.875, -0.125]])
    with pytest.raises(ValueError, match="teacher_term"):
        sgsd_loss(student, teacher, torch.ones(1, 2), torch.tensor([1.0]), torch.zeros(1, 2),
                  torch.ones(1, 2, dtype=torch.bool), teacher_term="kl")  # fmt: skip


def test_sgsd_loss_normalizer_divides_the_sum_over_problems():
    loss, _, _, _ = hand_example()  # B = 1: the mean equals the sum
    student = torch.tensor([[-1.0, -2.0]])
    teacher = torch.tensor([[[0.0, -1.0], [-3.0, -2.0]]])
    scaled, _ = sgsd_loss(student, teacher, torch.ones(1, 2), torch.tensor([1.0]),
                          torch.tensor([[0.0, math.log(3.0)]]), torch.ones(1, 2, dtype=torch.bool),
                          normalizer=4.0)  # fmt: skip
    assert scaled.item() == pytest.approx(loss.item() / 4.0, **APPROX)


def test_divergence_objective_by_hand():
    # B = 1, K = 2, T = 2; teacher 1 missing (weight 0). Teacher 0 per-token [0.2, 0.4], mask [1, 0]
    # -> D_0 = 0.2; alpha_0 = 1 -> loss 0.2; with normalizer 4 -> 0.05.
    per_token = torch.tensor([[[0.2, 0.4], [9.0, 9.0]]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0]])
    weights = torch.tensor([[1.0, 0.0]])
    loss, m = divergence_objective(per_token, mask, weights)
    assert loss.item() == pytest.approx(0.2, **APPROX)
    assert m["divergence"].item() == pytest.approx(0.2, **APPROX)  # the missing teacher is not counted
    assert m["kept_token_fraction"].item() == 0.5
    assert divergence_objective(per_token, mask, weights, normalizer=4.0)[0].item() == pytest.approx(0.05)
    loss.backward()
    assert_close(per_token.grad, [[[1.0, 0.0], [0.0, 0.0]]])
    with pytest.raises(ValueError, match="per_token"):
        divergence_objective(per_token[0], mask, weights)


def test_aggregate_with_a_whole_batch_normalizer():
    values = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # token_mean: (1 + 2 + 3) / 3 kept = 2; against a batch of 6 kept tokens: 6 / 6 = 1
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(2.0, abs=1e-6)
    assert aggregate(values, mask, "token_mean", normalizer=6.0).item() == pytest.approx(1.0)
    # sequence_mean: row means 1.5 and 3 -> mean 2.25; against a batch of 3 rows: 4.5 / 3 = 1.5
    assert aggregate(values, mask, "sequence_mean").item() == pytest.approx(2.25, abs=1e-6)
    assert aggregate(values, mask, "sequence_mean", normalizer=3.0).item() == pytest.approx(1.5, abs=1e-6)
    # two micro-batches with the batch normaliser add up to the whole batch's value
    for mode in ("token_mean", "sequence_mean"):
        n = 3.0 if mode == "token_mean" else 2.0
        parts = sum(aggregate(values[i : i + 1], mask[i : i + 1], mode, normalizer=n) for i in range(2))
        assert parts.item() == pytest.approx(aggregate(values, mask, mode).item(), abs=1e-6)


def test_objective_registry_names_the_valid_objectives():
    assert objective_spec("gated").scores == "sampled_tokens"
    assert objective_spec("forward_kl").scores == "divergence"
    assert objective_spec("grpo").scores == "policy"
    with pytest.raises(ValueError, match="valid objectives: gated, sampled_rkl, forward_kl"):
        objective_spec("kl")


# ---------------------------------------------------------------------------------------------------
# The official code's OPSD divergence, top-K gate and GRPO passes (docs/FIDELITY.md)

LOG3 = math.log(3.0)


def test_opsd_forward_kl_by_hand():
    # p_T = softmax([0, 0]) = [1/2, 1/2]; p_S = softmax([log 3, 0]) = [3/4, 1/4]
    # terms: 1/2 log((1/2)/(3/4)) = 1/2 log(2/3) = -0.2027326; 1/2 log((1/2)/(1/4)) = 1/2 log 2 = 0.3465736
    student = torch.tensor([[LOG3, 0.0]], requires_grad=True)
    teacher = torch.zeros(1, 2)
    t1, t2 = 0.5 * math.log(2 / 3), 0.5 * math.log(2.0)
    plain = opsd_forward_kl(student, teacher)
    assert plain.item() == pytest.approx(t1 + t2, **APPROX)  # 0.1438410
    assert plain.item() == pytest.approx(forward_kl(student, teacher).item(), **APPROX)
    # entry clamp at 0.05: the positive term is capped, the negative one is not: -0.2027326 + 0.05
    entry = opsd_forward_kl(student, teacher, clip=0.05, clip_scope="entry")
    assert entry.item() == pytest.approx(t1 + 0.05, **APPROX)  # -0.1527326
    # token clamp: min(0.1438410, 0.05)
    token = opsd_forward_kl(student, teacher, clip=0.05, clip_scope="token")
    assert token.item() == pytest.approx(0.05, **APPROX)


def test_opsd_forward_kl_divides_logits_by_the_temperature():
    # T = 2: p_S = softmax([log 3 / 2, 0]) = [sqrt 3, 1] / (sqrt 3 + 1); teacher still uniform
    student = torch.tensor([[LOG3, 0.0]])
    s0, s1 = math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)
    expected = 0.5 * math.log(0.5 / s0) + 0.5 * math.log(0.5 / s1)  # 0.0372630
    assert opsd_forward_kl(student, torch.zeros(1, 2), temperature=2.0).item() == pytest.approx(
        expected, **APPROX
    )
    # the teacher's logits are divided too: teacher [2, 0] at T = 2 is softmax([1, 0])
    teacher = torch.tensor([[2.0, 0.0]])
    p0 = math.e / (math.e + 1)
    expected = p0 * math.log(p0 / s0) + (1 - p0) * math.log((1 - p0) / s1)
    assert opsd_forward_kl(student, teacher, temperature=2.0).item() == pytest.approx(expected, **APPROX)


def test_opsd_forward_kl_gradients_skip_capped_terms():
    # unclipped: d/ds sum_v p_T (log p_T - log p_S) = p_S - p_T = [1/4, -1/4]
    # entry clamp: only the uncapped term 1/2 (log p_T0 - log p_S0) remains: -1/2 (e_0 - p_S) = [-1/8, 1/8]
    # token clamp active: the whole position is capped, gradient 0
    for clip, scope, expected in [(None, "entry", [0.25, -0.25]), (0.05, "entry", [-0.125, 0.125]),
                                  (0.05, "token", [0.0, 0.0])]:  # fmt: skip
        student = torch.tensor([[LOG3, 0.0]], requires_grad=True)
        opsd_forward_kl(student, torch.zeros(1, 2), clip=clip, clip_scope=scope).sum().backward()
        assert_close(student.grad, [expected])


def test_opsd_forward_kl_ignores_zero_probability_teacher_entries_and_checks_arguments():
    student = torch.tensor([[0.0, 0.0, 5.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0, float("-inf")]])
    value = opsd_forward_kl(student, teacher, temperature=1.1, clip=0.05)
    value.backward()
    assert torch.isfinite(value).all() and torch.isfinite(student.grad).all()
    for kwargs in (dict(temperature=0.0), dict(clip=0.0), dict(clip=1.0, clip_scope="row")):
        with pytest.raises(ValueError):
            opsd_forward_kl(student, teacher, **kwargs)


def test_local_support_terms_by_hand():
    # teacher logits [2, 1, 0, -1], uniform student; top-2 support {0, 1}
    teacher = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 2)
    student = torch.zeros(2, 4, requires_grad=True)
    support = torch.tensor([[0, 1], [0, 1]])
    token = torch.tensor([3, 1])  # row 0: outside the top-2 -> support {0, 1, 3}; row 1: inside -> {0, 1}
    s_local, t_local, kl = local_support_terms(student, teacher, support, token)
    z0, z1 = math.exp(2) + math.exp(1) + math.exp(-1), math.exp(2) + math.exp(1)
    p0 = [math.exp(2) / z0, math.exp(1) / z0, math.exp(-1) / z0]
    p1 = [math.exp(2) / z1, math.exp(1) / z1]
    assert_close(s_local, [-LOG3, -math.log(2)])
    assert_close(t_local, [-1 - math.log(z0), 1 - math.log(z1)])
    # KL(p_T,S || uniform on S) = log |S| - H(p_T,S)
    assert_close(
        kl, [LOG3 + sum(p * math.log(p) for p in p0), math.log(2) + sum(p * math.log(p) for p in p1)]
    )
    # the sampled-token values are those of topk_support_logprobs
    assert_close(s_local, topk_support_logprobs(student, support, token).tolist())
    assert_close(t_local, topk_support_logprobs(teacher, support, token).tolist())
    kl.sum().backward()  # grad of KL_S wrt student logits = p_S,S - p_T,S on S, 0 off S
    assert_close(student.grad, [[1 / 3 - p0[0], 1 / 3 - p0[1], 0.0, 1 / 3 - p0[2]],
                                [0.5 - p1[0], 0.5 - p1[1], 0.0, 0.0]])  # fmt: skip


def test_sgsd_local_kl_loss_gates_the_local_kl_and_takes_polarity_from_the_local_gap():
    # one problem, one teacher, two tokens: local KL [0.5, 1.0], local gaps teacher - student [0.2, 0.1]
    # support = 0.15 > 0.05 -> rho = +1 for a success, -1 for a failure
    # loss = (l(0.5) + l(1)) / 2 = (0.0605481 + 0.2190702) / 2 = 0.1398092
    # d loss / d KL_t = g(KL_t) / 2 with g(D) = D / (1 + exp(D^2 / 2)): g(0.5) = 0.4687813, g(1) = 0.3775407
    common = dict(
        mask=torch.ones(1, 2),
        retrieval_scores=torch.zeros(1, 1),
        teacher_mask=torch.ones(1, 1, dtype=torch.bool),
    )
    student_local = torch.tensor([[[-1.2, -2.1]]])
    teacher_local = torch.tensor([[[-1.0, -2.0]]])
    for reward, sign in ((1.0, 1.0), (-1.0, -1.0)):
        kl = torch.tensor([[[0.5, 1.0]]], requires_grad=True)
        loss, metrics = sgsd_local_kl_loss(
            student_local, teacher_local, kl, reward=torch.tensor([reward]), **common
        )
        assert loss.item() == pytest.approx(sign * 0.1398092, **APPROX)
        assert metrics["mean_support"].item() == pytest.approx(0.15, **APPROX)
        loss.backward()
        g = [d / (1 + math.exp(d * d / 2)) for d in (0.5, 1.0)]
        assert_close(kl.grad, [[[sign * g[0] / 2, sign * g[1] / 2]]])
    # a local gap below the threshold makes the teacher neutral: no loss, whatever the KL
    kl = torch.tensor([[[0.5, 1.0]]])
    loss, _ = sgsd_local_kl_loss(
        teacher_local - 0.01, teacher_local, kl, reward=torch.tensor([1.0]), **common
    )
    assert loss.item() == 0.0


def test_grpo_second_pass_is_clipped_with_old_logprobs_from_before_the_first():
    # mu = 2 passes over one batch. Old log-probs are taken once, before the first pass: there the ratio is 1
    # and the clip is inactive; after one update the second pass sees ratios != 1 and the clip cuts them.
    logits = torch.zeros(2, 3, 4, requires_grad=True)  # [B, T, V] a tiny tabular policy
    tokens = torch.tensor([[0, 1, 2], [3, 0, 1]])  # [B, T] the sampled completion tokens
    adv = torch.tensor([1.0, -1.0])  # [B]
    mask = torch.ones(2, 3)

    def logp():
        return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]

    old = logp().detach()  # before the first pass
    opt = torch.optim.SGD([logits], lr=5.0)
    loss1, m1 = grpo_loss(logp(), old, adv, mask, clip_eps=0.2, aggregation="sequence_mean")
    assert m1["mean_ratio"].item() == pytest.approx(1.0) and m1["clip_fraction"].item() == 0.0
    opt.zero_grad()
    loss1.backward()
    opt.step()
    opt.zero_grad()
    second = logp()
    loss2, m2 = grpo_loss(second, old, adv, mask, clip_eps=0.2, aggregation="sequence_mean")
    ratio = torch.exp(second.detach() - old)
    # A = +1 raised its tokens' probability, A = -1 lowered them, both beyond the 0.2 band
    assert (ratio[0] > 1.2).all() and (ratio[1] < 0.8).all()
    assert m2["clip_fraction"].item() == 1.0
    loss2.backward()
    assert logits.grad.abs().max().item() == 0.0  # every token clipped: no gradient from the second pass
    # the surrogate's value is the clipped one: -(1.2 * 1) for row 0 and -(0.8 * -1) for row 1, mean -0.2
    assert loss2.item() == pytest.approx(-0.2, **APPROX)


def test_grpo_second_pass_by_hand():
    # ratios after the first pass: row 0 [1.5, 0.9] with A = +1 (sequence_mean over 2 tokens)
    # per-token -min(r A, clip(r) A) = [-min(1.5, 1.2), -min(0.9, 0.9)] = [-1.2, -0.9]; loss -1.05
    # gradient: 0 on the clipped token, -r A / 2 = -0.45 on the other
    old = torch.tensor([[-1.0, -2.0]])
    new = (old + torch.log(torch.tensor([[1.5, 0.9]]))).requires_grad_(True)
    loss, metrics = grpo_loss(new, old, torch.tensor([1.0]), torch.ones(1, 2), 0.2, "sequence_mean")
    assert loss.item() == pytest.approx(-1.05, **APPROX)
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
    loss.backward()
    assert_close(new.grad, [[0.0, -0.45]])


def test_local_support_terms_from_gathered_teacher_logits_match_and_stay_finite():
    torch.manual_seed(0)
    n, V, k = 6, 11, 3
    student = torch.randn(n, V, requires_grad=True)
    teacher = torch.randn(n, V)
    support = teacher.topk(k, dim=-1).indices  # [n, k]
    token = torch.tensor([support[0, 0].item(), 10, support[2, 2].item(), 0, 5, support[5, 1].item()])
    full = local_support_terms(student, teacher, support, token)
    gathered = teacher.gather(-1, local_support_ids(support, token))  # [n, k + 1]
    again = local_support_terms_from_gathered(student, gathered, support, token)
    for a, b in zip(full, again):
        assert_close(a, b.tolist())
    assert_close(full[0], topk_support_logprobs(student, support, token).tolist())
    sum(t.sum() for t in (full[0], full[2])).backward()
    assert torch.isfinite(student.grad).all()


def test_divergence_objective_token_mean_by_hand():
    # B = 2, K = 1: row 0 per-token [0.2, 0.4] mask [1, 1]; row 1 [0.6, 9.0] mask [1, 0]
    # token mean over the 3 kept tokens: (0.2 + 0.4 + 0.6) / 3 = 0.4 (the sequence mean would be
    # ((0.2 + 0.4) / 2 + 0.6) / 2 = 0.45); against a batch of 6 kept tokens: 1.2 / 6 = 0.2
    per_token = torch.tensor([[[0.2, 0.4]], [[0.6, 9.0]]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    weights = torch.ones(2, 1)
    assert divergence_objective(per_token, mask, weights)[0].item() == pytest.approx(0.45, **APPROX)
    token_mean = divergence_objective(per_token, mask, weights, aggregation="token_mean")[0]
    assert token_mean.item() == pytest.approx(0.4, **APPROX)
    scaled = divergence_objective(per_token, mask, weights, normalizer=6.0, aggregation="token_mean")[0]
    assert scaled.item() == pytest.approx(0.2, **APPROX)
