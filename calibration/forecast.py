"""The interface every forecaster implements: one site's cached values for one group of branch chunks (the batch of a
model call), and how a skipped evaluation of the site is filled in from them.

A forecaster owns its state. Every method keeps the site's newest computed values (its anchors); some keep more: an
integrator its own forecasts, a fitted basis its coefficients. All of a forecaster's arithmetic is per row (the
first dimension: one sample of one branch), so a batch forecasts each sample exactly as it would alone, and cond and
uncond do not mix.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

Fetch = Callable[[Tensor], Tensor]  # a stored tensor where the model computes (caches may be offloaded)


def same_time(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


class Forecaster(ABC):
    """`history`: computed anchors the method needs; `keep` (>= history) is how many the run keeps, because a
    calibrator may need more (TCC's drift term reads the two newest)."""

    history: int = 1
    keeps_forecasts = False  # whether a forecast adds to what the forecaster holds (an integrator's trajectory)

    def __init__(self, keep: int = 1) -> None:
        self.keep = max(keep, self.history)
        self.times: list[float] = []
        self.values: list[Tensor] = []

    def update(self, t: float, value: Tensor) -> None:
        """A computed value at time t; a second one at the same time (Heun) replaces the newest. The caller must not
        modify `value` in place afterwards."""
        if self.times and same_time(t, self.times[-1]):
            self.values[-1] = value
        else:
            self.times.append(t)
            self.values.append(value)
            if len(self.times) > self.keep:
                del self.times[0], self.values[0]
        self.anchored()

    def anchored(self) -> None:
        """A new anchor arrived: derive what the method keeps from its anchors (nothing by default)."""

    @abstractmethod
    def forecast(self, t: float, fetch: Fetch) -> Tensor:
        """The value at time t (t after the newest anchor, or equal to it). The result may be an anchor itself: do not
        modify it in place."""

    def forecast_onto(self, t: float, fetch: Fetch, base: Tensor, gate: Tensor | None = None) -> Tensor:
        """base + forecast (times `gate`, broadcast, when given): how a skipped site enters the hidden state when
        nothing corrects the forecast first. A method whose forecast is a weighted sum writes it straight into one new
        tensor."""
        value = self.forecast(t, fetch)
        return base + value if gate is None else torch.addcmul(base, gate, value)

    @abstractmethod
    def flops(self, t: float) -> float:
        """Elementwise work per value element of `forecast(t)`, and of the derivations `anchored` made for it, so that
        compute fractions count all the work a method does on a skipped step."""

    @property
    def shape(self) -> torch.Size:
        return self.values[-1].shape

    @property
    def numel(self) -> int:
        return self.values[-1].numel()

    @property
    def nbytes(self) -> int:
        """Every tensor the forecaster holds, once (its own forecasts and derived tensors included)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.tensors()}
        return sum(storages.values())

    def tensors(self) -> list[Tensor]:
        return list(self.values)


class WeightedForecaster(Forecaster):
    """A method whose forecast is a weighted sum of its anchors, with weights from the anchor times alone (Python
    floats): FORA, TaylorSeer, Spectrum's Chebyshev regression. A forecast then costs one fused pass, and a weight of
    one on the newest anchor returns it without a copy."""

    def __init__(self, keep: int = 1) -> None:
        super().__init__(keep)
        self._cached: dict[float, list[float]] = {}  # weights by forecast time, for the current anchors

    def anchored(self) -> None:
        self._cached.clear()

    @abstractmethod
    def weights(self, times: list[float], t: float) -> list[float]:
        """Weights of the anchors (oldest first) whose sum forecasts the value at t."""

    def weights_at(self, t: float) -> list[float]:
        """The weights for the current anchors, computed once per forecast time (a skipped step asks twice: for its
        cost and for its value)."""
        weights = self._cached.get(t)
        if weights is None:
            weights = self._cached[t] = self.weights(self.times, t)
        return weights

    def forecast(self, t: float, fetch: Fetch) -> Tensor:
        active = [(w, v) for w, v in zip(self.weights_at(t), self.values) if w != 0.0]
        if len(active) == 1 and active[0][0] == 1.0:
            return fetch(active[0][1])
        (w0, v0), rest = active[0], active[1:]
        out = torch.mul(fetch(v0), w0)
        for w, v in rest:
            out.add_(fetch(v), alpha=w)
        return out

    def forecast_onto(self, t: float, fetch: Fetch, base: Tensor, gate: Tensor | None = None) -> Tensor:
        """Without a gate the sum is written onto a copy of `base` by scalar multiply-adds. With one (an adaLN site's
        (batch, 1, channels) gate) the forecast is summed first and gated once: a broadcast multiply-add per anchor
        measured three times slower than a scalar one on the CPU."""
        if gate is not None:
            return torch.addcmul(base, gate, self.forecast(t, fetch))
        out = None
        for w, v in zip(self.weights_at(t), self.values):
            if w == 0.0:
                continue
            if out is None:
                out = torch.add(base, fetch(v), alpha=w)
            else:
                out.add_(fetch(v), alpha=w)
        return out

    def flops(self, t: float) -> float:
        used = sum(1 for w in self.weights_at(t) if w != 0.0)
        return 0.0 if used <= 1 else 2.0 * used
