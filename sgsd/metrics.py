"""Small helpers for aggregating per-micro-batch metrics into one row per step."""

from __future__ import annotations


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
