"""TaylorSeer: forecast a site with a Taylor series around its newest anchor.

Derivatives come from TaylorSeer's backward-difference table, refreshed at each anchor:
Φ0 ← F, Φ(i+1) ← (Φi_new − Φi_old) / d with d the newest anchor gap, orders filled as anchors accumulate; the
forecast is Σ Φi · x^i / i! with x = t − t_newest. The table is tracked as weights over the stored anchors.
"""

from __future__ import annotations

import math

from .forecast import WeightedForecaster


class TaylorForecaster(WeightedForecaster):
    def __init__(self, order: int, keep: int = 1) -> None:
        self.order = order
        self.history = order + 1
        super().__init__(keep)

    def weights(self, times: list[float], t: float) -> list[float]:
        kept, times = len(times), times[-self.history:]  # the table needs order + 1 anchors; older ones weigh 0
        n = len(times)
        table: list[list[float]] = []
        for k in range(n):
            row = [[1.0 if j == k else 0.0 for j in range(n)]]
            if k:
                d = times[k] - times[k - 1]
                for i in range(min(self.order, len(table))):
                    row.append([(a - b) / d for a, b in zip(row[i], table[i])])
            table = row
        x = t - times[-1]
        weights = [0.0] * n
        for i, phi in enumerate(table):
            scale = x**i / math.factorial(i)
            weights = [w + scale * p for w, p in zip(weights, phi)]
        return [0.0] * (kept - n) + weights
