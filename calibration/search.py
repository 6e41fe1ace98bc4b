"""Budgeted plan search: at which steps the blocks are computed, which blocks are computed on every step, and so
which forecaster fills in the rest with the least predicted error, at a given compute fraction.

Error model. Block b's forecast at step s from anchor steps A has squared error e_b(s | A) = wᵀG_b[A, A]w −
2wᵀG_b[A, s] + G_b[s, s] on the reference trajectories (`trajectories.py`), exact for any weighted forecaster. Its weight
in the output is w_b(s) = Δσ_s² · g_group(b) · h_window(s) (an error in the velocity at step s moves the sample by Δσ_s
times it; g and h, fitted from probe runs, carry it through the later blocks and steps: `gains`), and errors add over
steps. Within a step the blocks' errors add as squares ("squares") or as norms ("norms"), two bounds on how coherent
they are; the caller picks between the two plans by a real run.

Search. Plans are aligned: a step computes every block or none, apart from blocks computed on every step (the first
and last few, as a uniform policy's first/last blocks). A block computed at a step where the one before it was
filled in would anchor on a hidden state carrying that forecast's error, which no open-loop model sees: staggered
per-block plans searched this way measured 1.4 to 2.1 times the error of a uniform interval on the testbed
(docs/methods.md). For each choice of first/last blocks, a dynamic program over the last `history` anchor steps
gives the least error for every count of computed steps (the first step is always one; exact for FORA and TaylorSeer
up to order 2); the budget fixes the count: the one whose compute fraction is nearest the target, within 5% of it.
What that count leaves below the target is spent on prefixes (`_fill`): at some filled-in steps the first blocks
are computed too, which reads no forecast. Uniform intervals, warm-up and first/last blocks are all plans the
search can return.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import PolicyError
from .forecast import WeightedForecaster
from .plan import BlockPlan

AGGREGATES = ("squares", "norms")
MAX_HISTORY = 3
MAX_EDGE = 4  # first/last blocks the search may compute on every step, each
TOLERANCE = 0.05  # how far the compute fraction may be from the target, relative


@dataclass(frozen=True)
class Costs:
    """Per sample and model call: each block's FLOPs when computed, and when filled in (forecast and correction), and
    the work outside the blocks (embedders, final layer), which every step computes."""

    computed: tuple[float, ...]
    skipped: tuple[float, ...]
    outside: float

    def fraction(self, counts: Sequence[int], steps: int) -> float:
        """The compute fraction of a plan computing block b on counts[b] of `steps` steps."""
        spent = steps * self.outside + sum(k * c + (steps - k) * o for k, c, o in zip(counts, self.computed,
                                                                                        self.skipped))
        return spent / (steps * (self.outside + sum(self.computed)))


@dataclass
class Frontier:
    """The least error for k = 1 … steps computed steps (index k − 1), and the anchor steps achieving it."""

    errors: np.ndarray
    anchors: list[tuple[int, ...]]


@dataclass
class Searched:
    plan: BlockPlan
    predicted: float  # the model's squared relative error of the output
    fraction: float  # the predicted compute fraction
    seconds: float


def weight_table(forecaster: WeightedForecaster, steps: int, history: int) -> tuple[np.ndarray, np.ndarray]:
    """For every state (the last `history` anchor steps, oldest first; `steps` marks "no anchor yet", only at the
    front) and every later step: the forecaster's weights of those anchors. Returns (states, weights) as arrays
    (n, history + 1) of (anchors…, step) and (n, history)."""
    rows, weights = [], []
    cache: dict[tuple[int, ...], list[float]] = {}
    for state in _states(steps, history):
        real = [a for a in state if a < steps]
        for s in range(real[-1] + 1, steps):
            key = tuple(b - a for a, b in zip(real, real[1:] + [s]))
            if key not in cache:
                cache[key] = forecaster.weights([float(a) for a in real], float(s))
            w = cache[key]
            rows.append((*state, s))
            weights.append([0.0] * (history - len(w)) + list(w[-history:]))
    return np.array(rows, dtype=np.int64).reshape(-1, history + 1), np.array(weights).reshape(-1, history)


def _states(steps: int, history: int):
    """Tuples of `history` anchor steps, strictly increasing, with `steps` (none) only at the front."""
    for real in range(1, history + 1):
        for combo in _increasing(steps, real):
            yield (steps,) * (history - real) + combo


def _increasing(steps: int, n: int, start: int = 0):
    if n == 0:
        yield ()
        return
    for a in range(start, steps - n + 1):
        for rest in _increasing(steps, n - 1, a + 1):
            yield (a,) + rest


def step_table(gram: torch.Tensor | np.ndarray, table: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A block's squared forecast error for every dense state (see `frontier`) and step, zero at or before the state's
    last anchor."""
    steps = np.asarray(gram).shape[0]
    rows, w = table
    history = w.shape[1]
    anchors, s = rows[:, :history], rows[:, history]
    e = np.zeros(((steps + 1) ** history, steps))
    e[np.ravel_multi_index(tuple(anchors.T), (steps + 1,) * history), s] = _squared_errors(gram, anchors, s, w)
    return e


def _squared_errors(gram: torch.Tensor | np.ndarray, anchors: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """wᵀG[A, A]w − 2wᵀG[A, s] + G[s, s] per row of (anchors (n, h), s (n,), weights (n, h)); an anchor index equal to
    the step count stands for none (a zero row and column)."""
    g = np.asarray(gram, dtype=np.float64)
    steps = g.shape[0]
    padded = np.zeros((steps + 1, steps + 1))
    padded[:steps, :steps] = g
    err = padded[s, s].copy()
    for i in range(w.shape[1]):
        err -= 2 * w[:, i] * padded[anchors[:, i], s]
        for j in range(w.shape[1]):
            err += w[:, i] * w[:, j] * padded[anchors[:, i], anchors[:, j]]
    return np.maximum(err, 0.0)


def frontier(err: np.ndarray, steps: int, history: int) -> Frontier:
    """The least total of `err` (dense states × steps, from `step_table`) for every count of computed steps.

    A state is the last `history` anchor steps, oldest first, `steps` standing for "none yet" at the front; the
    program moves from a state to the next anchor d paying the error of the steps in between."""
    shape = (steps + 1,) * history
    seg = np.concatenate([np.zeros((err.shape[0], 1)), np.cumsum(err, axis=1)], axis=1)
    states = np.array(list(_states(steps, history)), dtype=np.int64)
    valid = np.zeros(err.shape[0], dtype=bool)
    last = np.full(err.shape[0], steps)
    index = np.ravel_multi_index(tuple(states.T), shape)
    valid[index], last[index] = True, states[:, -1]
    seg[~valid] = np.inf
    seg[np.arange(steps + 1)[None, :] <= last[:, None]] = np.inf
    end = seg[:, steps].reshape(shape)
    move = seg.copy()
    move[:, steps] = np.inf
    move = move.reshape(shape + (steps + 1,))
    cost = np.full(shape, np.inf)
    cost[(steps,) * (history - 1) + (0,)] = 0.0
    errors, finals, pointers = np.full(steps, np.inf), [], []
    for k in range(1, steps + 1):
        total = cost + end
        finals.append(np.unravel_index(int(np.argmin(total)), shape))
        errors[k - 1] = total[finals[-1]]
        if k == steps:
            break
        options = cost[..., None] + move
        pointers.append(np.argmin(options, axis=0))
        cost = np.min(options, axis=0)
    plans = []
    for k in range(1, steps + 1):
        state = tuple(int(a) for a in finals[k - 1])
        picked = [state[-1]]
        for j in range(k - 1, 0, -1):
            state = (int(pointers[j - 1][state]),) + state[:-1]
            picked.append(state[-1])
        plans.append(tuple(sorted(picked)))
    return Frontier(errors, plans)


def search(grams: Sequence[torch.Tensor | None], weights: Sequence[Sequence[float]], sigmas: Sequence[float],
           costs: Costs, fraction: float, forecaster: WeightedForecaster, history: int, aggregate: str = "squares"
           ) -> Searched:
    """The aligned plan for `fraction` with the least predicted error (see the module's docstring). `grams[b]` is
    block b's Gram over the schedule's steps (None: the engine computes it every step), `weights[b][s]` what its
    squared error at step s weighs in the output (`gains`); `history` how many anchors the forecaster reads."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES} (got {aggregate!r})")
    if not 1 <= history <= MAX_HISTORY:
        raise PolicyError(f"the plan search models forecasters that read 1 to {MAX_HISTORY} anchors (FORA, TaylorSeer "
                          "up to order 2); choose one of those")
    start = time.perf_counter()
    grams = [None if g is None else np.asarray(g, dtype=np.float64) for g in grams]  # once: `_fill` reads them often
    steps, blocks = len(sigmas) - 1, len(grams)
    table = weight_table(forecaster, steps, history)
    weighted = {b: step_table(g, table) * np.asarray(weights[b], dtype=np.float64)[None, :]
                for b, g in enumerate(grams) if g is not None}
    always = {b for b in range(blocks) if grams[b] is None}
    best: tuple[float, BlockPlan, float] | None = None
    for first in range(min(MAX_EDGE, blocks) + 1):
        for last in range(min(MAX_EDGE, blocks - first) + 1):
            edge = always | set(range(first)) | set(range(blocks - last, blocks))
            free = [b for b in weighted if b not in edge]
            if not free:
                continue
            counts = lambda k: [steps if b in edge else k for b in range(blocks)]  # noqa: E731
            k = _count(lambda k: costs.fraction(counts(k), steps), steps, fraction)
            if k is None or k == steps:
                continue
            if aggregate == "squares":
                err = sum(weighted[b] for b in free)
            else:
                err = sum(np.sqrt(weighted[b]) for b in free) ** 2
            front = frontier(err, steps, history)
            if best is None or front.errors[k - 1] < best[0]:
                row = "".join("1" if s in set(front.anchors[k - 1]) else "0" for s in range(steps))
                best = (float(front.errors[k - 1]), ["1" * steps if b in edge else row for b in range(blocks)])
    if best is None:
        cheapest = costs.fraction([1 if grams[b] is not None else steps for b in range(blocks)], steps)
        raise PolicyError(f"a compute fraction of {fraction:.3f} is below what computing every block once costs "
                          f"({cheapest:.3f}): choose a lower target speedup (at most {1 / cheapest:.1f}×)")
    block_errors = {b: step_errors(g, best[1][b], forecaster, history) * np.asarray(weights[b])
                    for b, g in enumerate(grams) if g is not None}
    rows, predicted = _fill(best[1], grams, weights, costs, fraction, forecaster, history, aggregate, block_errors)
    plan = BlockPlan(tuple(float(s) for s in sigmas), tuple(rows))
    return Searched(plan, predicted, costs.fraction([r.count("1") for r in rows], steps), time.perf_counter() - start)


def _total(block_errors: dict[int, np.ndarray], aggregate: str) -> float:
    if aggregate == "squares":
        return float(sum(e.sum() for e in block_errors.values()))
    return float((sum(np.sqrt(e) for e in block_errors.values()) ** 2).sum())


def _fill(rows: list[str], grams: Sequence[torch.Tensor | np.ndarray | None], weights: Sequence[Sequence[float]],
          costs: Costs, fraction: float, forecaster: WeightedForecaster, history: int, aggregate: str,
          block_errors: dict[int, np.ndarray]) -> tuple[list[str], float]:
    """Spend what the aligned plan leaves below the target on prefixes: at a step where the blocks are filled in,
    also compute the first filled-in block (after the ones already computed there), greedily by predicted error saved
    per FLOP. A prefix block's input is that step's exact hidden state, so it anchors on no forecast: unlike a staggered
    plan, the open-loop model holds for it. Aligned plans move in whole steps (at 20 steps and a 3× target, 6 computed
    steps give 0.31 and 7 give 0.36); prefixes fill the gap block by block. Returns the rows and the predicted error."""
    steps, blocks = len(rows[0]), len(rows)
    spent = costs.fraction([r.count("1") for r in rows], steps) * steps * (costs.outside + sum(costs.computed))
    budget = fraction * steps * (costs.outside + sum(costs.computed))
    total = _total(block_errors, aggregate)
    while True:
        best = None
        for s in range(1, steps):
            b = next((b for b in range(blocks) if rows[b][s] == "0"), None)
            if b is None:
                continue
            extra = costs.computed[b] - costs.skipped[b]
            if spent + extra > budget * (1 + 1e-9) or extra <= 0:
                continue
            row = rows[b][:s] + "1" + rows[b][s + 1:]
            errors = step_errors(grams[b], row, forecaster, history) * np.asarray(weights[b])
            saved = total - _total({**block_errors, b: errors}, aggregate)
            if saved > 0 and (best is None or saved / extra > best[0]):
                best = (saved / extra, s, b, row, errors, extra)
        if best is None:
            return rows, total
        _, s, b, rows[b], block_errors[b], extra = best
        spent += extra
        total = _total(block_errors, aggregate)


def _count(fraction_of, steps: int, target: float) -> int | None:
    """The count of computed steps whose compute fraction is nearest the target within TOLERANCE (aligned plans
    move in whole steps), else the largest below it; None when even one step is above."""
    fractions = {k: fraction_of(k) for k in range(1, steps + 1)}
    near = [k for k, f in fractions.items() if abs(f - target) <= TOLERANCE * target]
    if near:
        return min(near, key=lambda k: (abs(fractions[k] - target), k))
    return max((k for k, f in fractions.items() if f <= target), default=None)


def step_weights(sigmas: Sequence[float]) -> list[float]:
    """Δσ_s²: how much an error in the model's output at step s moves the sample (an Euler step's size squared)."""
    return [(float(a) - float(b)) ** 2 for a, b in zip(sigmas, sigmas[1:])]


def step_errors(gram: torch.Tensor | np.ndarray, row: str, forecaster: WeightedForecaster, history: int
                ) -> np.ndarray:
    """One block's squared error at every step under a row of a plan (0 where it is computed): probes fit the
    gains with it, and `_fill` weighs prefixes."""
    steps = len(row)
    computed = [s for s, c in enumerate(row) if c == "1"]
    skipped = [s for s, c in enumerate(row) if c == "0"]
    anchors = np.full((len(skipped), history), steps)
    w = np.zeros((len(skipped), history))
    for i, s in enumerate(skipped):
        used = [a for a in computed if a < s][-history:]
        anchors[i, history - len(used):] = used
        w[i, history - len(used):] = forecaster.weights([float(a) for a in used], float(s))
    out = np.zeros(steps)
    out[skipped] = _squared_errors(gram, anchors, np.array(skipped, dtype=np.int64), w)
    return out


@dataclass
class Probe:
    """A run that skips one group of blocks on a uniform interval (kind "group") or every block on a uniform interval
    within one window of steps ("window"): its blocks' open-loop errors per step, and the output's measured squared
    relative error."""

    kind: str
    index: int
    errors: dict[int, np.ndarray]
    measured: float


def gains(probes: Sequence[Probe], sigmas: Sequence[float], blocks: int, groups: Sequence[Sequence[int]],
          windows: Sequence[Sequence[int]], rounds: int = 20) -> list[list[float]]:
    """Per block and step, what a squared error there weighs in the output: Δσ_s² · g_group(b) · h_window(s), with g
    and h fitted alternately so that the model reproduces every probe's measured error."""
    base = step_weights(sigmas)
    g, h = [1.0] * len(groups), [1.0] * len(windows)
    group_of = {b: i for i, grp in enumerate(groups) for b in grp}
    window_of = {s: i for i, win in enumerate(windows) for s in win}

    def weight(b: int, s: int) -> float:
        return base[s] * g[group_of[b]] * h[window_of[s]]

    for _ in range(rounds):
        for kind, factors in (("group", g), ("window", h)):
            for probe in probes:
                predicted = sum(weight(b, s) * e for b, errs in probe.errors.items() for s, e in enumerate(errs))
                if probe.kind == kind and predicted > 0 and probe.measured > 0:
                    factors[probe.index] *= probe.measured / predicted
    return [[weight(b, s) for s in range(len(base))] for b in range(blocks)]
