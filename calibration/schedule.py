"""Which steps a policy computes: fixed FORA intervals, or the dynamic policy's eligible steps."""

from __future__ import annotations

import math

from .policy import CachePolicy


class StepPlan:
    """Per-step facts the run needs before any feature is seen.

    `cacheable[s]`: the policy may skip step s. `full[s]` (fixed mode): step s is computed. The first cacheable step
    of the window is always computed, since a skip needs an anchor.
    """

    def __init__(self, policy: CachePolicy, steps: int) -> None:
        first = max(policy.warmup_steps, math.ceil(policy.start * steps - 1e-9))
        stop = math.ceil(policy.end * steps - 1e-9)
        self.cacheable = [first <= s < stop for s in range(steps)]
        if policy.mode == "fixed":
            self.full = [not c or (s - first) % policy.interval == 0 for s, c in enumerate(self.cacheable)]
        else:
            self.full = [not c for c in self.cacheable]
        self._dynamic = policy.mode == "dynamic"
        skippable = self.cacheable if self._dynamic else [not f for f in self.full]
        self._skippable_from = [any(skippable[s:]) for s in range(steps)] + [False]

    def may_skip_after(self, step: int) -> bool:
        """Whether a value computed at `step` can still be used: a later round may skip.

        In fixed mode every round of a step shares its decision, so only later steps count; in dynamic mode a second
        round of the same step (Heun) may skip too.
        """
        return self._skippable_from[step if self._dynamic else step + 1]
