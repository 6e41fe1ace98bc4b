"""Which steps a policy computes: fixed FORA intervals, the dynamic policy's eligible steps, or a searched plan's
steps and blocks."""

from __future__ import annotations

import math
from typing import Sequence

from .errors import PolicyError
from .policy import CachePolicy


class StepPlan:
    """Per-step facts the run needs before any feature is seen.

    `cacheable[s]`: the policy may skip step s. `full[s]` (fixed and plan modes): every block of step s is computed.
    The first cacheable step of the window is always computed, since a skip needs an anchor. `blocks[s]` (plan mode):
    per block, whether it is computed at step s; a plan needs the run's `sigmas` to map onto them. `whole[s]`: a
    skipping step s forecasts the model's output whole (granularity step, or a plan's whole steps).
    """

    def __init__(self, policy: CachePolicy, steps: int, sigmas: Sequence[float] | None = None) -> None:
        first = max(policy.warmup_steps, math.ceil(policy.start * steps - 1e-9))
        stop = math.ceil(policy.end * steps - 1e-9)
        self.cacheable = [first <= s < stop for s in range(steps)]
        self.blocks: list[tuple[bool, ...]] | None = None
        if policy.plan is not None:
            if sigmas is None or len(sigmas) != steps + 1:
                raise PolicyError("a searched plan maps onto a run through its sigmas: pass the run's schedule")
            self.blocks = policy.plan.computed(sigmas)
            self.full = [all(row) for row in self.blocks]
            self.cacheable = [not f for f in self.full]
            self.whole = policy.plan.whole(sigmas)
        elif policy.mode == "fixed":
            self.full = [not c or (s - first) % policy.interval == 0 for s, c in enumerate(self.cacheable)]
        else:
            self.full = [not c for c in self.cacheable]
        if policy.granularity == "step":
            self.whole = [not f for f in self.full]
        elif policy.plan is None:
            self.whole = [False] * steps
        self.keeps_output = any(self.whole)  # the model's output is cached for whole-step forecasts
        self._dynamic = policy.mode == "dynamic"
        skippable = self.cacheable if self._dynamic else [not f for f in self.full]
        self._skippable_from = [any(skippable[s:]) for s in range(steps)] + [False]

    def may_skip_after(self, step: int) -> bool:
        """Whether a value computed at `step` can still be used: a later round may skip.

        In fixed mode every round of a step shares its decision, so only later steps count; in dynamic mode a second
        round of the same step (Heun) may skip too.
        """
        return self._skippable_from[step if self._dynamic else step + 1]
