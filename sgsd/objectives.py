"""Pure tensor math for SGSD and the baselines' losses (no model, no config, no I/O).

SGSD, for one problem with a verified rollout y (reward r = +1 / -1) and K skill-conditioned
teachers that score the same tokens (paper Sections 2.3-2.5):

    Delta_t^(k) = log p_T^(k)(y_t) - log p_S(y_t)                       Eq. 7  (teacher stop-gradient)
    a~_k        = sum_t m_t clip(Delta_t^(k), +-c) / (sum_t m_t + eps)   Eqs. 11-12 (robust support)
    rho_k       = sgn_out(r) sgn(a~_k)  if |a~_k| > eps_a  else 0        Eq. 13 (polarity)
    l_gate(D)   = log 2 - log(1 + exp(-D^2 / (2 tau)))                   Eq. 14 (bounded gate)
    l_k         = sum_t m_t l_gate(Delta_t^(k)) / (sum_t m_t + eps)      Eq. 15 (unclipped gaps)
    L(x)        = sum_k alpha_k rho_k l_k,  alpha = softmax(scores)      Eqs. 6, 16

and the batch loss is the mean of L(x) over problems. Its gradient is the policy-gradient form of
Eq. 19/34 with the bounded coefficient g_tau(D) = D / (tau (1 + exp(D^2 / (2 tau)))).

Baselines: full-vocabulary divergences for OPSD (`forward_kl`, `reverse_kl`, `generalized_jsd`,
`divergence_loss`), the sampled-token reverse-KL policy gradient (`sampled_rkl_loss`), the top-K
local-support log-probs of Section 4.5 (`topk_support_logprobs`), and GRPO (`group_advantages`,
`grpo_loss`, `aggregate`).

Conventions
-----------
* Shapes: B problems, K teachers per problem, T completion tokens, V vocabulary, N rows.
* Math runs in fp32 (fp16/bf16 inputs are upcast; fp64 inputs stay fp64).
* Teacher-side tensors are always detached (stop-gradient); gradients flow to the student only.
* KL direction (standard distillation convention, as in TRL/OPSD):
  forward KL = KL(p_T || p_S), reverse KL = KL(p_S || p_T). The paper's Eq. 25/43 writes
  D_KL(p_T || p_S) and calls it "reverse KL"; the two agree to second order when p_T ~ p_S, and this
  module follows the standard names above.
* Rewards: r > 0 is a success and r <= 0 a failure (Eq. 9 defines sgn_out only for r = +-1; treating
  r = 0 as a failure also makes 0/1 rewards work).
* Masks are 0/1 (bool or float) over completion tokens. Positions with mask 0, and teacher slots with
  teacher_mask False, may hold any value (padding, even inf/NaN): they are excluded exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Keys of `sgsd_loss` metrics whose values are detached [B, K] tensors (all other keys are 0-d tensors).
SGSD_TENSOR_METRICS = ("support", "rho", "weights", "teacher_loss", "delta", "live")
# the Table 2 polarity mix logged by `sgsd_loss`, in the paper's order of cases
POLARITY_FRACTIONS = (
    "helpful_fraction",
    "warning_fraction",
    "misleading_fraction",
    "over_suppressive_fraction",
    "neutral_fraction",
)

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Aggregation = Literal["token_mean", "sequence_mean"]
TeacherTerm = Literal["gated", "sampled_rkl"]
TEACHER_TERMS = ("gated", "sampled_rkl")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Return `x` as a floating tensor for the math: fp64 stays fp64, everything else becomes fp32."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def _masked_token_mean(values: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """sum_t m_t v_t / (sum_t m_t + eps) over the last dim; masked positions never leak NaN/inf."""
    mask = mask.to(values.dtype)  # broadcastable to values
    kept = torch.where(mask > 0, values * mask, 0.0)  # [..., T]
    return kept.sum(-1) / (mask.sum(-1) + eps)


def _token_weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B, T] mask as [B, 1, T] (broadcast over teachers); a [B, K, T] mask as is."""
    if mask.dim() == 2:
        mask = mask.unsqueeze(1)  # [B, 1, T]
    if mask.dim() != 3:
        raise ValueError(f"mask must be [B, T] or [B, K, T], got shape {tuple(mask.shape)}")
    return mask.to(like.dtype)


# ----------------------------------------------------------------------------
# SGSD: gate, support, polarity, weights, loss


def gated_loss(delta: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 14, elementwise: log 2 - log(1 + exp(-delta^2 / (2 tau))).

    With z = -delta^2 / (2 tau) <= 0, two exact rewritings keep value and gradient precise: for
    z >= -1, -log1p(expm1(z) / 2) (since (1 + e^z) / 2 = 1 + expm1(z) / 2; no cancellation of log 2
    near delta = 0); for z < -1, log 2 - softplus(z), whose gradient sigmoid(z) stays accurate down to
    the underflow of exp (the expm1 form's gradient would round to 0 from z ~ -37 in fp64). The value
    tends to log 2 for huge |delta|; value and gradient are finite for every finite delta.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    delta = _as_float(delta)
    z = -delta.square() / (2.0 * tau)  # same shape as delta, <= 0
    near_zero = -torch.log1p(0.5 * torch.expm1(z))
    far = math.log(2.0) - F.softplus(z)
    return torch.where(z >= -1.0, near_zero, far)


def robust_support(delta: torch.Tensor, mask: torch.Tensor, clip: float | None, eps: float) -> torch.Tensor:
    """Eqs. 11-12: masked mean of the clipped gaps of each teacher -> [B, K].

    `delta` is [B, K, T]; `mask` is [B, T] (shared by the K teachers) or [B, K, T];
    `clip=None` disables clipping (Table 4 "w/o clipping").
    """
    delta = _as_float(delta)  # [B, K, T]
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        delta = delta.clamp(-clip, clip)  # [B, K, T]  Eq. 11
    return _masked_token_mean(delta, _token_weights(mask, delta), eps)  # [B, K]  Eq. 12


SUPPORT_ESTIMATORS = ("paper", "expected", "null_relative", "teacher_centred")


def estimate_support(
    delta: torch.Tensor,
    mask: torch.Tensor,
    teacher_mask: torch.Tensor,
    estimator: str = "paper",
    clip: float | None = 3.0,
    eps: float = 1e-8,
    baseline: torch.Tensor | None = None,
    null_delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """The robust support a~ [B, K] of each teacher under one of `SUPPORT_ESTIMATORS`.

    `delta` [B, K, T] gaps Delta_t; `mask` [B, T] (or [B, K, T]) token mask; `teacher_mask` [B, K].

    * paper:            a~_k = sum_t m_t clip(Delta_t) / (sum_t m_t + eps)                    (Eq. 12)
    * expected:         a~_k = sum_t m_t clip(Delta_t - b_t) / (sum_t m_t + eps), with `baseline` b
                        [B, K, T] or [B, 1, T] the gap's expectation under the rollout sampler
                        (`sgsd.scoring.score_teachers_expected`); centred before the clip.
    * null_relative:    a~_k - a~_null, a~_null the Eq. 12 support of `null_delta` [B, T] (or
                        [B, 1, T]), the gaps of a teacher with content-free guidance.
    * teacher_centred:  a~_k - mean of a~_j over the problem's valid teachers (needs K >= 2; a problem
                        with one valid teacher gets 0).
    A `baseline` given with another estimator is subtracted the same way (before the clip) from the K
    teachers' gaps; the null gaps are used as passed. Invalid teacher slots and masked positions may
    hold anything (excluded exactly); invalid slots get support 0, as do rows without kept tokens.
    """
    if estimator not in SUPPORT_ESTIMATORS:
        raise ValueError(
            f"support estimator must be one of {', '.join(SUPPORT_ESTIMATORS)}, got {estimator!r}"
        )
    if delta.dim() != 3:
        raise ValueError(f"delta must be [B, K, T], got shape {tuple(delta.shape)}")
    B, K, T = delta.shape
    token_w = _token_weights(mask, _as_float(delta))  # [B, 1|K, T]
    valid = teacher_mask.bool()  # [B, K]
    live = (token_w > 0) & valid.unsqueeze(-1)  # [B, K, T]
    gaps = _as_float(delta.detach())  # [B, K, T]
    if estimator == "expected" and baseline is None:
        raise ValueError("support estimator 'expected' needs the per-token baseline b [B, K, T]")
    if baseline is not None:
        if (
            baseline.dim() != 3
            or baseline.shape[0] != B
            or baseline.shape[1] not in (1, K)
            or baseline.shape[2] != T
        ):
            raise ValueError(
                f"baseline must be [B, K, T] or [B, 1, T] = {(B, K, T)}, got {tuple(baseline.shape)}"
            )
        gaps = gaps - _as_float(baseline.detach())  # [B, K, T]
    gaps = torch.where(live, gaps, 0.0)  # [B, K, T]  padding never leaks NaN
    support = robust_support(gaps, token_w, clip, eps)  # [B, K]
    if estimator == "null_relative":
        if null_delta is None:
            raise ValueError(
                "support estimator 'null_relative' needs the null teacher's gaps null_delta [B, T]"
            )
        null = _as_float(null_delta.detach())
        null = null.unsqueeze(1) if null.dim() == 2 else null  # [B, 1, T]
        if tuple(null.shape) != (B, 1, T):
            raise ValueError(f"null_delta must be [B, T] = {(B, T)}, got {tuple(null_delta.shape)}")
        null_w = token_w[:, :1] if token_w.shape[1] == 1 else token_w.amax(1, keepdim=True)  # [B, 1, T]
        null = torch.where(null_w > 0, null, 0.0)  # [B, 1, T]
        support = support - robust_support(null, null_w, clip, eps)  # [B, K]
    elif estimator == "teacher_centred":
        if K < 2:
            raise ValueError(
                "support estimator 'teacher_centred' needs K >= 2 teachers per problem, got K = 1"
            )
        w = valid.to(support.dtype)  # [B, K]
        mean = (support * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1.0)  # [B, 1]
        support = support - mean  # [B, K]
    return torch.where(valid, support, 0.0)  # [B, K]


def polarity(support: torch.Tensor, reward: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eqs. 9, 13: rho = sgn_out(r) * sgn(a~) where |a~| > threshold, else 0 -> [B, K] in {-1, 0, +1}.

    `support` is [B, K]; `reward` is [B], read as success when r > 0 and failure when r <= 0.
    sgn(0) = 0, so a zero support is neutral even with threshold 0.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    outcome = torch.where(reward > 0, 1.0, -1.0).to(support.dtype)  # [B]  Eq. 9
    stance = torch.sign(support) * (support.abs() > threshold)  # [B, K]
    return outcome.unsqueeze(-1) * stance  # [B, K]  Eq. 13


def teacher_weights(
    scores: torch.Tensor, teacher_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Eq. 6: softmax of scores / temperature over each problem's valid teachers -> [B, K].

    Invalid slots (teacher_mask False) get weight 0; a row without any valid teacher is all zeros.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = teacher_mask.bool()  # [B, K]
    logits = (_as_float(scores) / temperature).masked_fill(~valid, float("-inf"))  # [B, K]
    row_max = logits.amax(-1, keepdim=True)  # [B, 1]
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # [B, 1]  (empty rows)
    expd = torch.exp(logits - row_max)  # [B, K]  0 at invalid slots
    # A non-empty row sums to >= 1 (its max contributes exp(0) = 1), an empty row to 0.
    return expd / expd.sum(-1, keepdim=True).clamp_min(1.0)  # [B, K]


def sgsd_loss(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    reward: torch.Tensor,
    retrieval_scores: torch.Tensor,
    teacher_mask: torch.Tensor,
    tau: float = 1.0,
    clip: float | None = 3.0,
    threshold: float = 0.05,
    eps: float = 1e-8,
    use_polarity: bool = True,
    support_delta: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    teacher_term: TeacherTerm = "gated",
    normalizer: float | None = None,
    support_baseline: torch.Tensor | None = None,
    support_estimator: str = "paper",
    null_delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SGSD objective (Eqs. 6, 7, 11-16): mean over problems of sum_k alpha_k rho_k l_k.

    Inputs: `student_logp` [B, T] sampled-token log-probs (carries the gradient; the student is scored
    once and broadcast over the K teachers; [B, K, T] when each teacher renormalises the student on its
    own support, as in the top-K variant), `teacher_logp` [B, K, T] (detached here), `mask` [B, T]
    token mask m_t, `reward` [B] (+-1), `retrieval_scores` [B, K], `teacher_mask` [B, K] bool (a
    problem may have fewer than K teachers).

    Polarity uses the clipped gaps (Eqs. 11-13); the gate uses the unclipped gaps (Eq. 15).
    `support_delta` [B, K, T], when given, replaces the gaps used for support and polarity only
    (default None = the Eq. 7 gaps). For the top-K support variant (Section 4.5) the simplest use is to
    pass log-probs renormalised on the local support (`topk_support_logprobs`) as `student_logp` and
    `teacher_logp`, so gate and polarity both see local gaps; `support_delta` lets a caller use local
    gaps for polarity while gating full-vocabulary gaps, or the reverse.

    Support estimators (`estimate_support`): `support_baseline` [B, K, T] (or [B, 1, T]), when given,
    is subtracted from the support gaps before the clip, a~_k = sum_t m_t clip(Delta_t - b_t) /
    (sum_t m_t + eps) (the `expected` estimator; b from `sgsd.scoring.score_teachers_expected`);
    `support_estimator` "null_relative" subtracts the support of `null_delta` [B, T] (a content-free
    teacher's gaps), "teacher_centred" the mean support of the problem's valid teachers. Gate and loss
    never see them; support, polarity and the Table 2 fractions do.

    Ablations (Table 4, Fig. 4): no token mask = pass an all-ones mask; no clipping = `clip=None`;
    no threshold = `threshold=0`; no polarity = `use_polarity=False` (rho = +1 for every valid teacher);
    single teacher = pass K = 1.

    `weights` [B, K], when given, are the teacher weights alpha (already Eq. 6, e.g. computed once per
    batch with a temperature); `retrieval_scores` is then ignored and may be None. `teacher_term`
    picks l_k: "gated" (Eq. 15) or "sampled_rkl" (Fig. 3(c): the sampled-token reverse-KL policy
    gradient -masked mean_t stopgrad(Delta_t) log p_S(y_t), same polarity and weights).
    `normalizer` is the number of problems the batch objective averages over (default B); a
    micro-batch of a larger batch passes the whole batch's count, so accumulated gradients equal the
    full batch's.

    Returns `(loss, metrics)`. Metrics are detached; keys in `SGSD_TENSOR_METRICS` ("support", "rho",
    "weights", "teacher_loss") are [B, K] tensors for a skill ledger, every other key a 0-d tensor:
    the Table 2 fractions over valid teachers ("helpful_fraction": r > 0 and a~ > eps_a,
    "warning_fraction": r <= 0 and a~ < -eps_a, "over_suppressive_fraction": r > 0 and a~ < -eps_a,
    "misleading_fraction": r <= 0 and a~ > eps_a, "neutral_fraction": |a~| <= eps_a; they describe the
    teachers' stance even when polarity is off), "mean_abs_delta" (masked tokens of valid teachers),
    "clipped_token_fraction" (share of those tokens with |gap| > clip), "kept_token_fraction" (mask
    mean), "mean_support" and "mean_rho" (over valid teachers).
    """
    if teacher_logp.dim() != 3:
        raise ValueError(f"teacher_logp must be [B, K, T], got shape {tuple(teacher_logp.shape)}")
    B, K, T = teacher_logp.shape
    expected = {
        "student_logp": (student_logp, (B, K, T) if student_logp.dim() == 3 else (B, T)),
        "mask": (mask, (B, T)),
        "reward": (reward, (B,)),
        "teacher_mask": (teacher_mask, (B, K)),
    }
    if weights is None:
        expected["retrieval_scores"] = (retrieval_scores, (B, K))
    else:
        expected["weights"] = (weights, (B, K))
    if teacher_term not in TEACHER_TERMS:
        raise ValueError(f"teacher_term must be one of {', '.join(TEACHER_TERMS)}, got {teacher_term!r}")
    if support_delta is not None:
        expected["support_delta"] = (support_delta, (B, K, T))
    if support_estimator == "expected" and support_baseline is None:
        raise ValueError("support estimator 'expected' needs support_baseline [B, K, T]")
    if support_baseline is not None and support_baseline.dim() == 3 and support_baseline.shape[1] == 1:
        expected["support_baseline"] = (support_baseline, (B, 1, T))
    elif support_baseline is not None:
        expected["support_baseline"] = (support_baseline, (B, K, T))
    if null_delta is not None:
        expected["null_delta"] = (null_delta, (B, T))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")

    student = _as_float(student_logp)  # [B, T], or [B, K, T] when each teacher has its own support
    if student.dim() == 2:
        student = student.unsqueeze(1)  # [B, 1, T]  scored once, broadcast over the K teachers
    teacher = _as_float(teacher_logp).detach()  # [B, K, T]  stop-gradient
    token_w = _as_float(mask)  # [B, T]
    valid_teacher = teacher_mask.bool()  # [B, K]
    live = (token_w > 0).unsqueeze(1) & valid_teacher.unsqueeze(-1)  # [B, K, T]

    # Eq. 7; masked tokens and empty teacher slots are set to 0 so padding can never produce NaN.
    delta = torch.where(live, teacher - student, 0.0)  # [B, K, T]
    gaps_for_support = delta.detach() if support_delta is None else support_delta.detach()
    gaps_for_support = torch.where(live, _as_float(gaps_for_support), 0.0)  # [B, K, T]
    if support_baseline is not None:  # centred before the clip (estimator `expected`)
        baseline = torch.where(live, _as_float(support_baseline.detach()), 0.0)  # [B, K, T]
        gaps_for_support = gaps_for_support - baseline  # [B, K, T]

    centring = "paper" if support_estimator == "expected" else support_estimator  # b is already out
    support = estimate_support(  # [B, K]  Eqs. 11-12, or a centred estimator
        gaps_for_support, token_w, valid_teacher, centring, clip, eps, null_delta=null_delta
    )
    valid = valid_teacher.to(support.dtype)  # [B, K]
    if use_polarity:
        rho = polarity(support, reward, threshold) * valid  # [B, K]  Eq. 13
    else:
        rho = valid  # [B, K]  Fig. 4 "w/o polarity": distill every teacher
    if teacher_term == "gated":
        per_token = gated_loss(delta, tau)  # [B, K, T]  Eq. 14
    else:
        per_token = -delta.detach() * student  # [B, K, T]  sampled-token reverse KL
    teacher_loss = _masked_token_mean(per_token, token_w.unsqueeze(1), eps)  # [B, K]  Eq. 15
    if weights is None:
        weights = teacher_weights(retrieval_scores, valid_teacher)  # [B, K]  Eq. 6
    weights = _as_float(weights).detach() * valid  # [B, K]
    per_problem = (weights * rho * teacher_loss).sum(-1)  # [B]  Eq. 16
    loss = per_problem.sum() / (B if normalizer is None else normalizer)

    with torch.no_grad():
        n_valid = valid.sum().clamp_min(1.0)
        success = (reward > 0).unsqueeze(-1)  # [B, 1]
        supports, suppresses = support > threshold, support < -threshold  # [B, K]
        live_w = token_w.unsqueeze(1) * valid.unsqueeze(-1)  # [B, K, T]
        n_live = live_w.sum().clamp_min(1e-12)
        if clip is None:
            clipped = torch.zeros_like(live_w)
        else:
            clipped = (gaps_for_support.abs() > clip).to(live_w.dtype)  # [B, K, T]

        def share(case: torch.Tensor) -> torch.Tensor:
            return (case & valid_teacher).sum() / n_valid

        metrics = {
            "helpful_fraction": share(success & supports),
            "warning_fraction": share(~success & suppresses),
            "over_suppressive_fraction": share(success & suppresses),
            "misleading_fraction": share(~success & supports),
            "neutral_fraction": share(~supports & ~suppresses),
            "mean_abs_delta": (delta.abs() * live_w).sum() / n_live,
            "clipped_token_fraction": (clipped * live_w).sum() / n_live,
            "kept_token_fraction": token_w.mean(),
            "mean_support": (support * valid).sum() / n_valid,
            "mean_rho": (rho * valid).sum() / n_valid,
            "support": support.detach(),
            "rho": rho.detach(),
            "weights": weights.detach(),
            "teacher_loss": teacher_loss.detach(),
            "delta": delta.detach(),
            "live": live,
        }
    return loss, metrics


# ----------------------------------------------------------------------------
# Full-vocabulary divergences (OPSD baseline, Fig. 3(c))


def _kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dim; entries with p_v = 0 count 0."""
    diff = torch.where(logp > float("-inf"), logp - logq, 0.0)  # [..., V]
    return (logp.exp() * diff).sum(-1)  # [...]


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL, KL(p_T || p_S), per position: logits [..., V] -> [...]. Teacher is stop-gradient."""
    logp_s = torch.log_softmax(_as_float(student_logits), dim=-1)  # [..., V]
    logp_t = torch.log_softmax(_as_float(teacher_logits.detach()), dim=-1)  # [..., V]
    return _kl_from_logprobs(logp_t, logp_s)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Reverse KL, KL(p_S || p_T), per position: logits [..., V] -> [...]. Teacher is stop-gradient."""
    logp_s = torch.log_softmax(_as_float(student_logits), dim=-1)  # [..., V]
    logp_t = torch.log_softmax(_as_float(teacher_logits.detach()), dim=-1)  # [..., V]
    return _kl_from_logprobs(logp_s, logp_t)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD per position: beta KL(p_T || M) + (1 - beta) KL(p_S || M), M = beta p_T + (1-beta) p_S.

    For 0 < beta < 1 this is the mixture formula. The formula itself tends to 0 at both ends, but
    JSD / beta -> KL(p_T || p_S) as beta -> 0 and JSD / (1 - beta) -> KL(p_S || p_T) as beta -> 1, so,
    as in TRL/OPSD, beta = 0 returns `forward_kl` and beta = 1 returns `reverse_kl` exactly.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits)
    logp_s = torch.log_softmax(_as_float(student_logits), dim=-1)  # [..., V]
    logp_t = torch.log_softmax(_as_float(teacher_logits.detach()), dim=-1)  # [..., V]
    log_m = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))  # [..., V]
    return beta * _kl_from_logprobs(logp_t, log_m) + (1.0 - beta) * _kl_from_logprobs(logp_s, log_m)


def _divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, beta: float):
    if kind == "forward_kl":
        return forward_kl(student_logits, teacher_logits)
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits)
    return generalized_jsd(student_logits, teacher_logits, beta)


def divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: Divergence,
    beta: float = 0.5,
    chunk_size: int = 128,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Masked full-vocabulary divergence: per-row masked mean over positions, then mean over rows.

    `student_logits`, `teacher_logits` [N, T, V]; `mask` [N, T]; `kind` one of forward_kl, reverse_kl,
    jsd (with `beta`). Positions are processed `chunk_size` at a time and, when a gradient is needed,
    each chunk is recomputed in backward (activation checkpointing), so fp32 temporaries and saved
    activations stay at [N, chunk_size, V] instead of several [N, T, V]. The teacher is stop-gradient.
    """
    if kind not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"kind must be forward_kl, reverse_kl or jsd, got {kind!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise ValueError(
            f"logits must both be [N, T, V], got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(f"mask must be [N, T] = {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}")
    teacher_logits = teacher_logits.detach()
    recompute = torch.is_grad_enabled() and student_logits.requires_grad
    pieces = []
    for start in range(0, student_logits.shape[1], chunk_size):
        s = student_logits[:, start : start + chunk_size]  # [N, C, V]
        t = teacher_logits[:, start : start + chunk_size]  # [N, C, V]
        if recompute:
            pieces.append(checkpoint(_divergence, s, t, kind, beta, use_reentrant=False))  # [N, C]
        else:
            pieces.append(_divergence(s, t, kind, beta))  # [N, C]
    if not pieces:  # T == 0
        return student_logits.sum() * 0.0
    per_position = torch.cat(pieces, dim=1)  # [N, T]
    return aggregate(per_position, mask, "sequence_mean", eps=eps)


def divergence_objective(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    normalizer: float | None = None,
    eps: float = 1e-8,
    aggregation: Aggregation = "sequence_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """OPSD and Fig. 3(c): sum over problems of sum_k alpha_k D_k, divided by `normalizer` (default B
    problems), with D_k the masked token mean of teacher k's per-position divergence.
    With `aggregation="token_mean"` (the official OPSD), D_k is the masked token *sum* and the default
    normalizer is the number of kept tokens, so the loss is the mean over all kept tokens.

    `per_token` [B, K, T] (with grad; e.g. from `sgsd.scoring.score_divergence`), `mask` [B, T],
    `weights` [B, K] teacher weights alpha, 0 for missing teachers. A divergence has no sign to
    validate, so there is no polarity. Metrics: "divergence" (mean D_k over teachers with weight > 0)
    and "kept_token_fraction" (mask mean), both detached 0-d.
    """
    if per_token.dim() != 3 or tuple(mask.shape) != (per_token.shape[0], per_token.shape[2]):
        raise ValueError(f"per_token must be [B, K, T] and mask [B, T], got {tuple(per_token.shape)} "
                         f"and {tuple(mask.shape)}")  # fmt: skip
    per_teacher = _masked_token_mean(_as_float(per_token), mask.unsqueeze(1), eps)  # [B, K]
    weights = _as_float(weights).detach()  # [B, K]
    if aggregation == "token_mean":
        m = mask.to(per_teacher.dtype).unsqueeze(1)  # [B, 1, T]
        sums = torch.where(m > 0, _as_float(per_token) * m, 0.0).sum(-1)  # [B, K]
        total = (weights * sums).sum()
        loss = total / (m.sum() + eps if normalizer is None else normalizer)
    elif aggregation == "sequence_mean":
        per_problem = (weights * per_teacher).sum(-1)  # [B]
        loss = per_problem.sum() / (per_token.shape[0] if normalizer is None else normalizer)
    else:
        raise ValueError(f"aggregation must be token_mean or sequence_mean, got {aggregation!r}")
    with torch.no_grad():
        present = (weights > 0).to(per_teacher.dtype)  # [B, K]
        metrics = {
            "divergence": (per_teacher * present).sum() / present.sum().clamp_min(1.0),
            "kept_token_fraction": mask.to(per_teacher.dtype).mean(),
        }
    return loss, metrics


# ----------------------------------------------------------------------------
# Sampled-token objectives


def topk_support_logprobs(
    logits: torch.Tensor, support_idx: torch.Tensor, token: torch.Tensor
) -> torch.Tensor:
    """Log-prob of `token` renormalised on the local support top-k U {token} (Section 4.5) -> [n].

    `logits` [n, V]; `support_idx` [n, k] distinct vocabulary ids (the teacher's top-k); `token` [n]
    the sampled ids. The sampled token is counted once whether or not it is in the top-k. Call it with
    the same `support_idx` for teacher and student logits so both sides share one support.
    """
    logits = _as_float(logits)  # [n, V]
    top = logits.gather(-1, support_idx)  # [n, k]
    sampled = logits.gather(-1, token.unsqueeze(-1)).squeeze(-1)  # [n]
    in_top = (support_idx == token.unsqueeze(-1)).any(-1)  # [n]
    lse_top = torch.logsumexp(top, dim=-1)  # [n]
    lse_support = torch.where(in_top, lse_top, torch.logaddexp(lse_top, sampled))  # [n]
    return sampled - lse_support  # [n]


def sampled_rkl_loss(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Sampled-token reverse-KL policy gradient: -mean(stopgrad(logp_T - logp_S) * logp_S).

    `student_logp`, `teacher_logp`, `mask` are [B, T]; masked mean per row, then mean over rows.
    Its gradient equals that of the sampled estimate of KL(p_S || p_T) on the student's rollout.
    """
    student = _as_float(student_logp)  # [B, T]
    advantage = (_as_float(teacher_logp) - student).detach()  # [B, T]
    advantage = torch.where(mask.bool(), advantage, 0.0)  # [B, T]  padding cannot leak NaN
    return aggregate(-advantage * student, mask, "sequence_mean", eps=eps)


# ----------------------------------------------------------------------------
# GRPO


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: Aggregation,
    eps: float = 1e-8,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Reduce per-token `values` [B, T] under `mask` [B, T] to a scalar.

    token_mean: sum over all kept tokens / number of kept tokens in the batch (+ eps).
    sequence_mean: each row's masked token mean (sum / (row count + eps)), then the mean over rows
    (a row without kept tokens counts as 0).
    `normalizer` replaces the denominator of the outer mean (kept tokens for token_mean, rows for
    sequence_mean) with the count of a whole batch of which these rows are a micro-batch, so that
    gradients accumulated over micro-batches equal the whole batch's.
    """
    values = _as_float(values)
    if mode == "token_mean":
        weights = mask.to(values.dtype)  # [B, T]
        total = torch.where(weights > 0, values * weights, 0.0).sum()
        return total / (weights.sum() + eps if normalizer is None else normalizer)
    if mode == "sequence_mean":
        per_row = _masked_token_mean(values, mask, eps)  # [B]
        return per_row.sum() / (per_row.shape[0] if normalizer is None else normalizer)
    raise ValueError(f"aggregation mode must be token_mean or sequence_mean, got {mode!r}")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages: (r - mean_group) / (std_group + eps), or r - mean_group if not `scale`.

    `rewards` is [P, G] (one row per prompt) or flat [P * G] with each prompt's G rollouts contiguous;
    the result has the same shape. std is the unbiased sample std (Bessel, n - 1, as torch.std, TRL and
    verl use); a group of size 1 gets advantage 0.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"rewards [P, G] has G = {rewards.shape[1]} but group_size = {group_size}")
    if rewards.dim() not in (1, 2) or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be [P, G] or [P * G] with group_size {group_size}, got {tuple(rewards.shape)}"
        )
    grouped = _as_float(rewards).reshape(-1, group_size)  # [P, G]
    centred = grouped - grouped.mean(-1, keepdim=True)  # [P, G]
    if scale and group_size > 1:
        centred = centred / (grouped.std(-1, keepdim=True, correction=1) + eps)  # [P, G]
    return centred.reshape(rewards.shape)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    aggregation: Aggregation = "token_mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A), ratio = exp(logp - old_logp).

    `logp`, `old_logp` (detached), `mask` are [B, T]; `advantages` is [B]; `normalizer` as in
    `aggregate` (the whole batch's kept tokens or rows, for a micro-batch). Returns `(loss, metrics)`
    with detached 0-d "clip_fraction" (kept tokens where the clip is active: ratio > 1 + eps with A > 0
    or ratio < 1 - eps with A < 0, i.e. the gradient is cut) and "mean_ratio" (over kept tokens).
    """
    logp = _as_float(logp)  # [B, T]
    log_ratio = torch.where(mask.bool(), logp - _as_float(old_logp).detach(), 0.0)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = _as_float(advantages).detach().unsqueeze(-1)  # [B, 1]
    unclipped = ratio * adv  # [B, T]
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv  # [B, T]
    per_token = -torch.minimum(unclipped, clipped)  # [B, T]
    loss = aggregate(per_token, mask, aggregation, normalizer=normalizer)
    with torch.no_grad():
        cut = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))  # [B, T]
        metrics = {
            "clip_fraction": aggregate(cut.to(ratio.dtype), mask, "token_mean"),
            "mean_ratio": aggregate(ratio, mask, "token_mean"),
        }
    return loss, metrics


# ----------------------------------------------------------------------------
# The official code's OPSD divergence and top-K gate (docs/FIDELITY.md)

ClipScope = Literal["entry", "token"]


def opsd_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    clip: float | None = None,
    clip_scope: ClipScope = "entry",
) -> torch.Tensor:
    """OPSD's forward KL as the official code computes it, per position: logits [..., V] -> [...].

    With p = softmax(logits / temperature) on both sides (teacher stop-gradient), the terms
    d_v = p_T(v) (log p_T(v) - log p_S(v)) are summed over v. `clip` caps the divergence from above:
    clip_scope="entry" caps each term d_v before the sum (the official code: TRL's elementwise kl_div,
    clamp(max=clip), then the sum over v), "token" caps the per-position sum. A capped term passes no
    gradient; negative terms are never capped, so an entry-capped total can be below the uncapped one
    minus the excess. temperature=1 and clip=None give `forward_kl` exactly.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if clip_scope not in ("entry", "token"):
        raise ValueError(f"clip_scope must be entry or token, got {clip_scope!r}")
    logp_s = torch.log_softmax(_as_float(student_logits) / temperature, dim=-1)  # [..., V]
    logp_t = torch.log_softmax(_as_float(teacher_logits.detach()) / temperature, dim=-1)  # [..., V]
    terms = logp_t.exp() * torch.where(logp_t > float("-inf"), logp_t - logp_s, 0.0)  # [..., V]
    if clip is not None and clip_scope == "entry":
        terms = terms.clamp(max=clip)  # [..., V]
    per_position = terms.sum(-1)  # [...]
    if clip is not None and clip_scope == "token":
        per_position = per_position.clamp(max=clip)
    return per_position


def local_support_ids(support_idx: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The ids of the local support as `local_support_terms_from_gathered` expects them: [n, k + 1],
    the teacher's top-k `support_idx` [n, k] then the sampled `token` [n] (counted only when outside)."""
    return torch.cat([support_idx, token.unsqueeze(-1)], dim=-1)  # [n, k + 1]


def local_support_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, support_idx: torch.Tensor, token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K local support as the official code uses it (Section 4.5, Fig. 3(a)) -> three [n] tensors.

    Support S = `support_idx` [n, k] (the teacher's top-k ids) plus the sampled `token` [n] when it is
    not among them; both distributions are renormalised on S (logits [n, V]; teacher stop-gradient).
    Returns (log p_S,S(y) with grad, log p_T,S(y), KL_S(p_T || p_S) = sum_{v in S} p_T,S(v) (log p_T,S(v)
    - log p_S,S(v)) with grad through the student). The first two equal `topk_support_logprobs`.
    """
    teacher_gathered = teacher_logits.detach().gather(-1, local_support_ids(support_idx, token))  # [n, k+1]
    return local_support_terms_from_gathered(student_logits, teacher_gathered, support_idx, token)


def local_support_terms_from_gathered(
    student_logits: torch.Tensor,
    teacher_support_logits: torch.Tensor,
    support_idx: torch.Tensor,
    token: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`local_support_terms` with the teacher's logits already gathered at `local_support_ids` ([n, k + 1]),
    so a teacher pass can keep k + 1 values per position instead of the vocabulary."""
    ids = local_support_ids(support_idx, token)  # [n, k + 1]
    extra = ~(support_idx == token.unsqueeze(-1)).any(-1)  # [n]  the sampled token is outside the top-k
    keep = torch.ones_like(ids, dtype=torch.bool)  # [n, k + 1]
    keep[:, -1] = extra
    s = _as_float(student_logits).gather(-1, ids).masked_fill(~keep, float("-inf"))  # [n, k + 1]
    t = _as_float(teacher_support_logits.detach()).masked_fill(~keep, float("-inf"))  # [n, k + 1]
    logp_s = s - torch.logsumexp(s, dim=-1, keepdim=True)  # [n, k + 1]
    logp_t = t - torch.logsumexp(t, dim=-1, keepdim=True)  # [n, k + 1]
    local_kl = (logp_t.exp() * torch.where(keep, logp_t - logp_s, 0.0)).sum(-1)  # [n]
    # the sampled token sits in the last slot when outside the top-k, else at its top-k slot
    at = torch.where(extra, ids.shape[-1] - 1, (support_idx == token.unsqueeze(-1)).int().argmax(-1))  # [n]
    student_local = logp_s.gather(-1, at.unsqueeze(-1)).squeeze(-1)  # [n]
    teacher_local = logp_t.gather(-1, at.unsqueeze(-1)).squeeze(-1)  # [n]
    return student_local, teacher_local, local_kl


def sgsd_local_kl_loss(
    student_local_logp: torch.Tensor,
    teacher_local_logp: torch.Tensor,
    local_kl: torch.Tensor,
    mask: torch.Tensor,
    reward: torch.Tensor,
    retrieval_scores: torch.Tensor,
    teacher_mask: torch.Tensor,
    tau: float = 1.0,
    clip: float | None = 3.0,
    threshold: float = 0.05,
    eps: float = 1e-8,
    use_polarity: bool = True,
    weights: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The official top-K variant of SGSD: the gate reads the local forward KL, polarity the local gap.

    Inputs are [B, K, T] from `local_support_terms` (per teacher): `student_local_logp` and
    `teacher_local_logp` give the sampled-token gaps for robust support and polarity (Eqs. 11-13);
    `local_kl` (with grad) replaces Delta in the gate, l_k = masked mean of l_gate(KL_t) (Eq. 15).
    Other arguments and the return value are those of `sgsd_loss` (its "mean_abs_delta" is then the
    mean local KL).
    """
    if local_kl.dim() != 3:
        raise ValueError(f"local_kl must be [B, K, T], got shape {tuple(local_kl.shape)}")
    gaps = _as_float(teacher_local_logp).detach() - _as_float(student_local_logp).detach()  # [B, K, T]
    return sgsd_loss(
        -_as_float(local_kl),  # teacher 0 minus this = the local KL, the gate's input
        torch.zeros_like(_as_float(local_kl)),
        mask,
        reward,
        retrieval_scores,
        teacher_mask,
        tau=tau,
        clip=clip,
        threshold=threshold,
        eps=eps,
        use_polarity=use_polarity,
        support_delta=gaps,
        weights=weights,
        normalizer=normalizer,
    )


# ----------------------------------------------------------------------------
# Named objectives


@dataclass(frozen=True)
class ObjectiveSpec:
    """A named training objective and the scores it consumes: `sampled_tokens` (student and teacher
    log-probs of the sampled tokens -> `sgsd_loss`), `divergence` (per-position full-vocabulary
    divergences -> `divergence_objective`) or `policy` (the policy's own log-probs -> `grpo_loss`)."""

    name: str
    scores: Literal["sampled_tokens", "divergence", "policy"]
    description: str


OBJECTIVES: dict[str, ObjectiveSpec] = {
    spec.name: spec
    for spec in (
        ObjectiveSpec("gated", "sampled_tokens", "SGSD's bounded gate with outcome-validated polarity (Eqs. 7-16)"),
        ObjectiveSpec("sampled_rkl", "sampled_tokens", "sampled-token reverse KL with SGSD's polarity and weights"),
        ObjectiveSpec("forward_kl", "divergence", "full-vocabulary KL(p_T || p_S) (OPSD)"),
        ObjectiveSpec("reverse_kl", "divergence", "full-vocabulary KL(p_S || p_T)"),
        ObjectiveSpec("jsd", "divergence", "full-vocabulary generalized JSD(beta)"),
        ObjectiveSpec("grpo", "policy", "group-relative advantages, clipped surrogate"),
    )
}  # fmt: skip


def objective_spec(name: str) -> ObjectiveSpec:
    """The objective called `name`; an unknown name is a ValueError listing the valid ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


__all__ = [
    "OBJECTIVES",
    "ObjectiveSpec",
    "divergence_objective",
    "objective_spec",
    "SGSD_TENSOR_METRICS",
    "SUPPORT_ESTIMATORS",
    "estimate_support",
    "aggregate",
    "divergence_loss",
    "forward_kl",
    "gated_loss",
    "generalized_jsd",
    "group_advantages",
    "grpo_loss",
    "local_support_ids",
    "local_support_terms",
    "local_support_terms_from_gathered",
    "opsd_forward_kl",
    "polarity",
    "reverse_kl",
    "robust_support",
    "sampled_rkl_loss",
    "sgsd_local_kl_loss",
    "sgsd_loss",
    "teacher_weights",
    "topk_support_logprobs",
]
