"""Plans that mix granularities per step: at some skipped steps the model's output is forecast whole (nothing of the
model runs), at others the blocks are filled in one by one (the work outside the blocks still runs), and the rest
compute every block.

Where the work outside the blocks is large (small or distilled models, short prompts, CPUs) a block-level skip still
costs that work, so a block plan cannot reach a high wall-clock target with few enough errors; forecasting whole
calls reaches it, with a coarser error. `mix` starts from a block plan searched at a looser budget and forecasts whole
the skipped steps where that costs the least predicted error per second saved, until the plan meets the budget.

Error model. A whole step s forecasts the output from the steps that computed every block (`A`, the plan's anchors),
so its squared error is the output trajectory's e_out(s | A) (`search.step_errors` on the output's Gram, recorded in
the reference run); it weighs g_out · Δσ_s² in the sample (an error in the output moves an Euler step by Δσ_s times
it), g_out fitted from one probe run that forecasts whole steps at a uniform interval (`output_gain`). A filled-in
step's error is its blocks' weighted errors, as the search models them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .forecast import WeightedForecaster
from .plan import BlockPlan
from .search import SLACK, step_errors, step_weights


@dataclass(frozen=True)
class StepSeconds:
    """Seconds per sample: outside the blocks, each block computed and filled in, and a whole-step forecast."""

    outside: float
    computed: tuple[float, ...]
    filled: tuple[float, ...]
    whole: float

    def step(self, rows: Sequence[str], s: int) -> float:
        """A called step: the outside work and each block computed or filled in."""
        return self.outside + sum(c if r[s] == "1" else f for r, c, f in zip(rows, self.computed, self.filled))

    def full(self) -> float:
        return self.outside + sum(self.computed)

    def aligned(self, computed: int, steps: int) -> float:
        """The wall fraction of an aligned block plan computing `computed` of `steps` steps, filling in the rest."""
        filled = self.outside + sum(self.filled)
        return (computed * self.full() + (steps - computed) * filled) / (steps * self.full())

    def fraction(self, plan: BlockPlan) -> float:
        """The plan's predicted wall time over full computation's."""
        calls = plan.calls or "1" * plan.steps
        spent = sum(self.whole if calls[s] == "0" else self.step(plan.rows, s) for s in range(plan.steps))
        return spent / (plan.steps * self.full())


def output_errors(gram: torch.Tensor, computed: str, forecaster: WeightedForecaster, history: int,
                  sigmas: Sequence[float]) -> np.ndarray:
    """Per step, the unscaled weight Δσ_s² · e_out(s | computed) of forecasting the output whole there, from the steps
    `computed` marks "1" (0 at those)."""
    return step_errors(gram, computed, forecaster, history) * np.asarray(step_weights(sigmas))


def output_gain(gram: torch.Tensor, computed: str, forecaster: WeightedForecaster, history: int,
                sigmas: Sequence[float], measured: float) -> float | None:
    """g_out from a probe that forecast the output whole wherever `computed` is "0": its measured mean squared relative
    error of the sample over what the model predicts unscaled (None where nothing is predicted)."""
    predicted = float(output_errors(gram, computed, forecaster, history, sigmas).sum())
    return measured / predicted if predicted > 0 and measured > 0 else None


def mix(rows: Sequence[str], grams: Sequence[torch.Tensor | None], weights: Sequence[Sequence[float]],
        output: torch.Tensor, gain: float, seconds: StepSeconds, sigmas: Sequence[float], fraction: float,
        forecaster: WeightedForecaster, history: int) -> tuple[BlockPlan, float] | None:
    """The block plan `rows` with skipped steps forecast whole, least predicted error added per second saved first,
    until its predicted wall fraction is at most `fraction`; and its predicted squared error (blocks' errors added
    as squares). None when it takes forecasting every skipped step whole (or more) to meet the budget."""
    steps = len(rows[0])
    anchors = "".join("1" if all(r[s] == "1" for r in rows) else "0" for s in range(steps))
    blocks = [step_errors(g, r, forecaster, history) * np.asarray(w) if g is not None else np.zeros(steps)
              for g, r, w in zip(grams, rows, weights)]
    filled = np.sum(blocks, axis=0)
    whole = gain * output_errors(output, anchors, forecaster, history, sigmas)
    budget = fraction * steps * seconds.full() * (1 + SLACK)
    spent = sum(seconds.step(rows, s) for s in range(steps))
    order = sorted((s for s in range(1, steps) if anchors[s] == "0" and seconds.step(rows, s) > seconds.whole),
                   key=lambda s: (whole[s] - filled[s]) / (seconds.step(rows, s) - seconds.whole))
    calls = ["1"] * steps
    for s in order:
        if spent <= budget:
            break
        calls[s] = "0"
        spent -= seconds.step(rows, s) - seconds.whole
    if spent > budget or not any(calls[s] == "1" and anchors[s] == "0" for s in range(steps)):
        return None  # over the budget, or every skipped step forecast whole: a whole-step schedule, not a mix
    mixed = tuple("".join("0" if calls[s] == "0" else r[s] for s in range(steps)) for r in rows)
    error = float(sum(whole[s] if calls[s] == "0" else filled[s] for s in range(steps)))
    return BlockPlan(tuple(float(x) for x in sigmas), mixed, "".join(calls)), error
