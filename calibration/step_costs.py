"""What a step costs on this machine, in seconds: the cost model a fit for a target speedup plans with.

A FLOP count is not a clock: the work outside the blocks (embedders, the final layer, the sampler, the host's own
per-step work) and the forecasts' memory traffic weigh differently on every model, resolution and device. So the fit
times the rounds of its own cached runs (`RoundTimer`, one mark per round, with a device sync where the device runs
asynchronously) and fits, per evaluated sample,

    seconds(round) = outside + per_flop · (FLOPs of the blocks it computed) + per_fill · (FLOPs of the fills)

by least squares in relative terms over every timed round (the runs compute different sets of blocks, so the three
are told apart), dropping the rounds far off the fit one by one, worst first (a first run's allocations, a hiccup),
and keeping each coefficient at or above zero.
A round that forecasts its whole model call (granularity step) is its own kind: its median time. The plan search
then budgets in these seconds (`StepCosts.costs`), so a target speedup is a wall-clock one.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .search import Costs
from .stats import RunStats

MIN_ROUNDS = 8  # timed rounds below which no cost model is fitted
OUTLIER = 4.0  # rounds further off the fit than this many median relative residuals, and FLOOR, are dropped
FLOOR = 0.1


@dataclass(frozen=True)
class RoundTime:
    """One timed round, summed over its model calls: FLOPs of the blocks computed and of the fills, samples evaluated,
    whether the calls were forecast whole, and the seconds from its start to the next round's."""

    blocks: float
    filled: float
    evaluations: int
    whole: bool
    seconds: float
    step_run: bool = False  # from a run with granularity step: its computed rounds count the whole call as blocks


@dataclass
class RoundTimer:
    """Marks each round's start (and a run's end); a round's time runs to the next mark. `sync` waits for the device
    (an asynchronous GPU), so that a mark reads the time the work took, not the time it took to queue."""

    sync: Callable[[], None] | None = None
    clock: Callable[[], float] = time.perf_counter
    rounds: list[RoundTime] = field(default_factory=list)
    _open: tuple[float, float, float, int, int] | None = None

    def mark(self, stats: RunStats, last: bool = False, step_run: bool = False) -> None:
        """A round starts (or, `last`, the run ends: its final round also holds the host's cleanup, so it is not
        kept)."""
        if self.sync is not None:
            self.sync()
        now = self.clock()
        totals = (stats.flops_blocks, stats.flops_filled, stats.evaluations, stats.calls_skipped)
        if self._open is not None and not last:
            start, blocks, filled, evaluations, skipped = self._open
            if totals[2] > evaluations and totals[0] >= blocks:  # the same run's counters moved: one round
                self.rounds.append(RoundTime(totals[0] - blocks, totals[1] - filled, totals[2] - evaluations,
                                             totals[3] > skipped, now - start, step_run))
        self._open = None if last else (now, *totals)


@dataclass(frozen=True)
class StepCosts:
    """Seconds per evaluated sample: outside the blocks, per FLOP of a computed block and of a fill, and of a round
    that forecasts its whole model call (None where no such round was timed)."""

    outside: float
    per_flop: float
    per_fill: float
    whole: float | None
    rounds: int

    def costs(self, computed: Sequence[float], filled: Sequence[float]) -> Costs:
        """The plan search's costs in seconds, from each block's FLOPs computed and filled in."""
        return Costs(tuple(self.per_flop * c for c in computed), tuple(self.per_fill * f for f in filled),
                     self.outside)

    def step(self, computed: Sequence[float]) -> float:
        """Seconds per sample of a step that computes every block."""
        return self.outside + self.per_flop * sum(computed)

    def whole_step_fraction(self, computed: Sequence[float], row: str) -> float | None:
        """The wall fraction of a whole-step schedule (`row`: "1" computes the model call, "0" forecasts it whole)."""
        if self.whole is None:
            return None
        full = self.step(computed)
        return (row.count("1") * full + row.count("0") * self.whole) / (len(row) * full)


def fit_step_costs(rounds: Sequence[RoundTime]) -> StepCosts | None:
    """The cost model from timed rounds (see the module's docstring); None with fewer than MIN_ROUNDS block rounds."""
    block_rounds = [r for r in rounds if not r.whole and not r.step_run and r.evaluations]
    if len(block_rounds) < MIN_ROUNDS:
        return None
    x = torch.tensor([[1.0, r.blocks / r.evaluations, r.filled / r.evaluations] for r in block_rounds],
                     dtype=torch.float64)
    y = torch.tensor([r.seconds / r.evaluations for r in block_rounds], dtype=torch.float64)
    # relative errors (each row divided by its time): timing jitter scales with the time
    scale = 1.0 / y.clamp_min(1e-12)
    kept = torch.ones(len(y), dtype=torch.bool)
    while True:
        coef = _nonnegative_fit(x[kept] * scale[kept, None], y[kept] * scale[kept])
        residuals = ((x @ coef - y) * scale).abs()
        worst = int(torch.where(kept, residuals, -1.0).argmax())
        if int(kept.sum()) <= MIN_ROUNDS or residuals[worst] <= max(OUTLIER * float(residuals[kept].median()), FLOOR):
            break
        kept[worst] = False  # the worst round first: one far-off round must not push good ones off the fit
    whole = [r.seconds / r.evaluations for r in rounds if r.whole and r.evaluations]
    if float(coef[0]) + float(coef[1]) <= 0:  # a full step priced at nothing: no model to budget with
        return None
    return StepCosts(float(coef[0]), float(coef[1]), float(coef[2]), statistics.median(whole) if whole else None,
                     int(kept.sum()))


def _nonnegative_fit(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least squares with every coefficient at or above zero: a negative one is pinned at zero and the rest refitted
    (three unknowns, so dropping one at a time settles)."""
    free = list(range(x.shape[1]))
    while True:
        coef = torch.zeros(x.shape[1], dtype=x.dtype)
        if free:
            coef[free] = torch.linalg.lstsq(x[:, free], y.unsqueeze(1)).solution.squeeze(1)
        negative = [i for i in free if coef[i] < 0]
        if not negative:
            return coef
        free.remove(min(negative, key=lambda i: float(coef[i])))
