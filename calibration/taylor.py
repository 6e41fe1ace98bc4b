"""TaylorSeer: forecast a site with a Taylor series around its newest anchor.

Derivatives come from TaylorSeer's backward-difference table, refreshed at each anchor:
Φ0 ← F, Φ(i+1) ← (Φi_new − Φi_old) / d with d the newest anchor gap, orders filled as anchors accumulate; the
forecast is Σ Φi · x^i / i! with x = t − t_newest. The table is tracked as weights over the stored anchors.
"""

from __future__ import annotations

import math

from .forecast import Forecaster


class TaylorForecaster(Forecaster):
    def __init__(self, order: int) -> None:
        super().__init__()
        self.order = order
        self.history = order + 1

    def weights(self, times: list[float], t: float) -> list[float]:
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
        return weights
