"""The support estimators of sgsd.objectives (`estimate_support`, `sgsd_loss(support_baseline=...)`),
against values worked out by hand.

The running example: one problem, K = 2 teachers, T = 3 tokens, the last token masked (it holds NaN,
which must not leak), clip c = 3:

    Delta   teacher 0: [1.0, -4.0, NaN]      teacher 1: [0.2, 0.4, NaN]
    b       teacher 0: [0.5, -2.0, NaN]      teacher 1: [1.0, -3.0, NaN]
    null gaps:         [0.6, -0.2, NaN]

  paper:           a0 = (1 + clip(-4)) / 2 = (1 - 3) / 2 = -1.0;   a1 = (0.2 + 0.4) / 2 = 0.3
  expected:        a0 = (0.5 + (-2.0)) / 2 = -0.75;                 a1 = (-0.8 + clip(3.4)) / 2 = (-0.8 + 3) / 2 = 1.1
                   (clipping before centring would give a0 = (0.5 + (-3 + 2)) / 2 = -0.25, a1 = 1.3)
  null_relative:   a_null = (0.6 - 0.2) / 2 = 0.2 -> a0 = -1.2, a1 = 0.1
  teacher_centred: mean = (-1.0 + 0.3) / 2 = -0.35 -> a0 = -0.65, a1 = 0.65
"""

from __future__ import annotations

import math

import pytest
import torch

from sgsd.objectives import SUPPORT_ESTIMATORS, estimate_support, sgsd_loss

NAN = float("nan")
DELTA = [[1.0, -4.0, NAN], [0.2, 0.4, NAN]]
BASELINE = [[0.5, -2.0, NAN], [1.0, -3.0, NAN]]
NULL = [0.6, -0.2, NAN]
MASK = [1.0, 1.0, 0.0]
HAND = {
    "paper": [-1.0, 0.3],
    "expected": [-0.75, 1.1],
    "null_relative": [-1.2, 0.1],
    "teacher_centred": [-0.65, 0.65],
}


def _close(actual, expected):
    torch.testing.assert_close(
        actual.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )


def _estimate(name, **kw):
    args = dict(
        delta=torch.tensor([DELTA]),  # [1, 2, 3]
        mask=torch.tensor([MASK]),  # [1, 3]
        teacher_mask=torch.tensor([[True, True]]),
        estimator=name,
        clip=3.0,
        eps=1e-8,
        baseline=torch.tensor([BASELINE]),
        null_delta=torch.tensor([NULL]),
    )
    args.update(kw)
    return estimate_support(**args)


@pytest.mark.parametrize("name", SUPPORT_ESTIMATORS)
def test_each_estimator_by_hand(name):
    kw = {} if name == "expected" else {"baseline": None}
    _close(_estimate(name, **kw), [HAND[name]])


def test_expected_clips_after_centring_and_broadcasts_a_shared_baseline():
    # one baseline for both teachers, [B, 1, T] = [0.5, -2.0, NaN]:
    # a0 = (0.5 + clip(-2)) / 2 = -0.75; a1 = (-0.3 + 2.4) / 2 = 1.05
    shared = torch.tensor([[BASELINE[0]]])  # [1, 1, 3]
    _close(_estimate("expected", baseline=shared), [[-0.75, 1.05]])
    # a baseline that moves a gap past the clip: Delta 2.5, b -1.5 -> clip(4.0) = 3, not 2.5 + 1.5 = 4
    one = estimate_support(
        torch.tensor([[[2.5]]]), torch.tensor([[1.0]]), torch.tensor([[True]]), "expected", 3.0, 0.0,
        baseline=torch.tensor([[[-1.5]]]),
    )  # fmt: skip
    _close(one, [[3.0]])


def test_null_relative_and_centred_clip_before_subtracting():
    # teacher 0 has a gap of -4 (clipped to -3 inside its own support) and the null a gap of -5
    # (clipped to -3 inside the null's support): a0 - a_null = (1 - 3) / 2 - (0.6 - 3) / 2 = -1 + 1.2 = 0.2
    null = torch.tensor([[0.6, -5.0, NAN]])
    _close(_estimate("null_relative", baseline=None, null_delta=null)[:, :1], [[0.2]])


def test_empty_mask_rows_and_invalid_teachers_get_zero():
    delta = torch.tensor([DELTA + [[NAN, NAN, NAN]], [[5.0, 5.0, 5.0]] * 3])  # [2, 3, 3]
    mask = torch.tensor([MASK, [0.0, 0.0, 0.0]])  # problem 1 keeps no token
    teacher_mask = torch.tensor([[True, True, False], [True, True, True]])
    baseline = torch.tensor([BASELINE + [[NAN] * 3], [[1.0] * 3] * 3])
    null = torch.tensor([NULL, [9.0, 9.0, 9.0]])
    for name in SUPPORT_ESTIMATORS:
        base = baseline if name == "expected" else None
        got = estimate_support(delta, mask, teacher_mask, name, 3.0, 1e-8, baseline=base, null_delta=null)
        assert torch.isfinite(got).all(), name
        _close(got[0], HAND[name] + [0.0])  # the invalid third slot is 0 and not in the teachers' mean
        _close(got[1], [0.0, 0.0, 0.0])  # no kept token: every support 0, the null's too


def test_a_baseline_given_with_a_centring_estimator_is_applied_first():
    # teacher_centred over the centred supports [-0.75, 1.1]: mean 0.175 -> [-0.925, 0.925]
    _close(_estimate("teacher_centred"), [[-0.925, 0.925]])


def test_teacher_centred_with_one_valid_teacher_is_zero_and_refuses_k1():
    got = _estimate("teacher_centred", baseline=None, teacher_mask=torch.tensor([[True, False]]))
    _close(got, [[0.0, 0.0]])
    with pytest.raises(ValueError, match="K >= 2"):
        _estimate("teacher_centred", baseline=None, delta=torch.tensor([DELTA[:1]]))


def test_estimators_refuse_missing_inputs_and_unknown_names():
    with pytest.raises(ValueError, match="baseline"):
        _estimate("expected", baseline=None)
    with pytest.raises(ValueError, match="null"):
        _estimate("null_relative", baseline=None, null_delta=None)
    with pytest.raises(ValueError, match="support estimator"):
        _estimate("median", baseline=None)
    with pytest.raises(ValueError, match="baseline must be"):
        _estimate("expected", baseline=torch.zeros(1, 2, 5))


# ----------------------------------------------------------------------------
# sgsd_loss with a support estimator: only support and polarity change


def _loss(**kw):
    student = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)  # [1, 3]
    delta = torch.tensor([[[1.0, -4.0, 0.0], [0.2, 0.4, 0.0]]])  # [1, 2, 3]
    teacher = (student.detach().unsqueeze(1) + delta).requires_grad_(False)  # [1, 2, 3]
    args = dict(
        mask=torch.tensor([MASK]),
        reward=torch.tensor([1.0]),
        retrieval_scores=torch.tensor([[0.0, 0.0]]),  # alpha = [0.5, 0.5]
        teacher_mask=torch.tensor([[True, True]]),
        tau=1.0,
        clip=3.0,
        threshold=0.05,
    )
    args.update(kw)
    return sgsd_loss(student, teacher, **args)


def _gate(d):
    return math.log(2.0) - math.log1p(math.exp(-d * d / 2.0))


def test_sgsd_loss_with_support_baseline_by_hand():
    # unclipped gate losses: l0 = (l(1) + l(4)) / 2, l1 = (l(0.2) + l(0.4)) / 2, the same for every estimator
    l0 = (_gate(1.0) + _gate(4.0)) / 2
    l1 = (_gate(0.2) + _gate(0.4)) / 2
    baseline = torch.tensor([[[0.5, -2.0, 0.0], [1.0, -3.0, 0.0]]])
    loss, m = _loss(support_baseline=baseline, support_estimator="expected")
    _close(m["support"], [[-0.75, 1.1]])
    assert m["rho"].tolist() == [[-1.0, 1.0]]  # success: over-suppressive, helpful
    _close(m["teacher_loss"], [[l0, l1]])
    assert loss.item() == pytest.approx(0.5 * (-l0) + 0.5 * l1, rel=1e-5)
    # the [B, 1, T] form of a shared baseline, and a baseline that flips a sign: b = 0.5 on both tokens
    # of teacher 1 -> a1 = (-0.3 - 0.1) / 2 = -0.2 -> rho -1
    _, m = _loss(support_baseline=torch.full((1, 1, 3), 0.5), support_estimator="expected")
    _close(m["support"], [[(0.5 - 3.0) / 2, -0.2]])
    assert m["rho"].tolist() == [[-1.0, -1.0]]
    assert m["over_suppressive_fraction"].item() == 1.0
    _close(m["teacher_loss"], [[l0, l1]])


def test_sgsd_loss_centring_estimators_by_hand():
    _, m = _loss(support_estimator="teacher_centred")
    _close(m["support"], [HAND["teacher_centred"]])
    assert m["rho"].tolist() == [[-1.0, 1.0]]
    _, m = _loss(support_estimator="null_relative", null_delta=torch.tensor([[0.6, -0.2, 0.0]]))
    _close(m["support"], [HAND["null_relative"]])
    assert m["rho"].tolist() == [[-1.0, 1.0]]
    assert m["mean_support"].item() == pytest.approx((-1.2 + 0.1) / 2, rel=1e-5)
    # default: the paper's support, unchanged
    _, m = _loss()
    _close(m["support"], [HAND["paper"]])


def test_sgsd_loss_refuses_expected_without_a_baseline_and_bad_shapes():
    with pytest.raises(ValueError, match="support_baseline"):
        _loss(support_estimator="expected")
    with pytest.raises(ValueError, match="support_baseline"):
        _loss(support_baseline=torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="null_delta"):
        _loss(support_estimator="null_relative", null_delta=torch.zeros(1, 4))


def test_support_baseline_carries_no_gradient_and_leaves_the_gradient_direction_to_polarity():
    baseline = torch.zeros(1, 2, 3, requires_grad=True)
    loss, _ = _loss(support_baseline=baseline, support_estimator="expected")
    loss.backward()
    assert baseline.grad is None
