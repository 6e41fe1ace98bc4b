"""Where a model evaluation sits in the run's σ schedule, for any sampler."""

from __future__ import annotations

import bisect
import math
from typing import Sequence


class StepClock:
    """Maps σ to a continuous step position: schedule point i is position i, and σ between points i and i+1 lies
    linearly in between (DPM-2's midpoints). Heun's corrector, evaluated at point i+1, therefore belongs to step i+1,
    together with that step's own evaluation; the step count stays the schedule's, whatever the sampler.
    """

    def __init__(self, sigmas: Sequence[float]) -> None:
        values = [float(s) for s in sigmas]
        if len(values) < 2:
            raise ValueError(f"a sampling schedule needs at least 2 sigmas (got {len(values)})")
        if any(b > a for a, b in zip(values, values[1:])):
            raise ValueError("the sigma schedule must be non-increasing (noisiest first)")
        self.sigmas = values
        self.steps = len(values) - 1
        self._ascending = values[::-1]

    def position(self, sigma: float) -> float:
        s = self.sigmas
        if sigma >= s[0] or math.isclose(sigma, s[0], rel_tol=1e-4):
            return 0.0
        # Index of the last schedule point >= sigma, found on the ascending copy.
        i = self.steps - bisect.bisect_left(self._ascending, sigma)
        if i >= self.steps:
            return float(self.steps)
        if math.isclose(sigma, s[i + 1], rel_tol=1e-4, abs_tol=1e-9):
            return float(i + 1)
        if math.isclose(sigma, s[i], rel_tol=1e-4, abs_tol=1e-9):
            return float(i)
        return i + (s[i] - sigma) / (s[i] - s[i + 1])

    def step(self, sigma: float) -> int:
        """The schedule step a σ belongs to, 0 … steps − 1."""
        return min(int(math.floor(self.position(sigma) + 1e-9)), self.steps - 1)
