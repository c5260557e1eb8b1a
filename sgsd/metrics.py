"""Small helpers for aggregating per-micro-batch metrics into one row per step."""

from __future__ import annotations

# Bin edges of the logged histogram of per-token gaps Delta_t = log p_T(y_t) - log p_S(y_t) (nats).
# Bin i holds edges[i-1] <= Delta < edges[i]; bin 0 is everything below edges[0] and the last bin
# everything at or above edges[-1], so there are len(DELTA_EDGES) + 1 counts.
DELTA_EDGES = (-4.0, -2.0, -1.0, -0.5, -0.25, -0.1, -0.03, 0.0, 0.03, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


def delta_histogram(delta, keep) -> list[int]:
    """Counts of the kept entries of `delta` (any shape; `keep` a bool tensor of the same shape) in the
    bins of `DELTA_EDGES`."""
    import torch

    values = delta[keep].detach().float().cpu()
    edges = torch.tensor(DELTA_EDGES, dtype=torch.float32)
    bins = torch.bucketize(values, edges, right=True)  # [N] in 0..len(edges)
    return torch.bincount(bins, minlength=len(DELTA_EDGES) + 1).tolist()


class MetricMeter:
    """Weighted running means of scalar metrics (weights = micro-batch sizes)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: dict, weight: float = 1.0) -> None:
        for key, value in metrics.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            self._sums[key] = self._sums.get(key, 0.0) + weight * v
            self._weights[key] = self._weights.get(key, 0.0) + weight

    def mean(self) -> dict[str, float]:
        return {k: self._sums[k] / self._weights[k] for k in self._sums if self._weights[k] > 0}


def scalars(metrics: dict) -> dict[str, float]:
    """The loggable scalars of an objective's metrics (0-d tensors and numbers; per-teacher tensors
    are dropped)."""
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "dim"):
            if v.dim() == 0:
                out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def decision_evidence(rewards: list[float], metrics: dict, teacher_mask, ledger_pairs: list[list]) -> dict:
    """The evidence of one micro-batch of an SGSD-style objective (`sgsd.objectives.sgsd_loss`
    metrics): ledger entries (pairs, supports, rho, reward) for teachers of one pair each, one decision
    [robust support, rho, reward] per valid rollout-teacher pair, and the histogram of the gaps Delta_t
    over kept tokens of valid teachers (bins `DELTA_EDGES`)."""
    support, rho, valid = metrics["support"].cpu(), metrics["rho"].cpu(), teacher_mask.cpu()  # [B, K]
    ledger = [
        (pairs, support[b, : len(pairs)].tolist(), rho[b, : len(pairs)].tolist(), rewards[b])
        for b, pairs in enumerate(ledger_pairs)
        if pairs
    ]
    decisions = [
        [round(float(support[b, k]), 5), round(float(rho[b, k]), 4), rewards[b]]
        for b in range(valid.shape[0])
        for k in range(valid.shape[1])
        if valid[b, k]
    ]
    return {
        "ledger": ledger,
        "decisions": decisions,
        "delta_hist": delta_histogram(metrics["delta"], metrics["live"]),
    }


def step_evidence(parts: list[dict]) -> dict:
    """One step's logged evidence from its micro-batches': `decisions`, `delta_hist`, and the mean
    robust support of correct and of wrong rollouts (`support_correct`, `support_wrong`; absent when
    the step has none of that outcome), which shows whether the teachers' signal tracks the outcome."""
    if not parts:
        return {}
    decisions = [d for part in parts for d in part["decisions"]]
    out: dict = {
        "decisions": decisions,
        "delta_hist": [sum(c) for c in zip(*(p["delta_hist"] for p in parts))],
    }
    out.update(support_by_outcome(decisions))
    return out


def support_by_outcome(decisions: list) -> dict[str, float]:
    """Mean robust support of the decisions ([support, rho, reward] rows) on correct (reward > 0) and on
    wrong rollouts, and their difference: {"support_correct", "support_wrong", "support_gap"}, a key
    left out when its side has no decision (a logged row never holds NaN). An informative teacher
    signal keeps support_gap > 0."""
    out = {}
    for key, correct in (("support_correct", True), ("support_wrong", False)):
        values = [a for a, _, r in decisions if (r > 0) == correct]
        if values:
            out[key] = sum(values) / len(values)
    if len(out) == 2:
        out["support_gap"] = out["support_correct"] - out["support_wrong"]
    return out


def mixed_group_fraction(group_rewards: list[tuple[int, float]]) -> float:
    """Fraction of rollout groups (GRPO: the rollouts of one prompt) whose rewards are not all equal,
    from (group, reward) pairs. Only a mixed group has non-zero group-relative advantages, so this is the
    share of the batch that carries a GRPO gradient. 0 for no rollouts."""
    seen: dict[int, set[float]] = {}
    for group, reward in group_rewards:
        seen.setdefault(group, set()).add(float(reward))
    return sum(len(r) > 1 for r in seen.values()) / len(seen) if seen else 0.0
