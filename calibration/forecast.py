"""The one interface every forecaster implements: keep a site's newest anchors, forecast as their weighted sum.

Writing each method as scalar weights over stored anchors keeps memory at (history × one tensor), makes a second
evaluation at the same time (Heun) a plain replacement, and puts all tensor work in one fused weighted sum.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


class Forecaster(ABC):
    """Anchors (time, value) of one site for one branch; `predict(t)` estimates the value at time t."""

    history: int = 1

    def __init__(self) -> None:
        self.times: list[float] = []
        self.values: list[Tensor] = []

    def update(self, t: float, value: Tensor) -> None:
        """Add a computed value. The caller must not modify `value` in place afterwards."""
        if self.times and math.isclose(t, self.times[-1], rel_tol=1e-9, abs_tol=1e-12):
            self.values[-1] = value
            return
        self.times.append(t)
        self.values.append(value)
        if len(self.times) > self.history:
            del self.times[0], self.values[0]

    def predict(self, t: float, values: list[Tensor] | None = None) -> Tensor:
        """Forecast at t; `values` may replace the stored anchors by others at the same times (batched branches)."""
        weights = self.weights(self.times, t)
        active = [(w, v) for w, v in zip(weights, self.values if values is None else values) if w != 0.0]
        if len(active) == 1 and active[0][0] == 1.0:
            return active[0][1]
        (w0, v0), rest = active[0], active[1:]
        out = torch.mul(v0, w0)
        for w, v in rest:
            out.add_(v, alpha=w)
        return out

    def predict_flops(self, t: float) -> float:
        """Elementwise work of one forecast, so that compute accounting stays honest."""
        used = sum(1 for w in self.weights(self.times, t) if w != 0.0)
        return 0.0 if used <= 1 else 2.0 * used * self.values[-1].numel()

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values)

    @abstractmethod
    def weights(self, times: list[float], t: float) -> list[float]:
        """Weights of the stored anchors (oldest first) whose sum forecasts the value at t."""
