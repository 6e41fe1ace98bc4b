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
up to order 2); the budget fixes the count: the most whose compute fraction is at or below the target (never above:
who asks for 4× gets at least 4× by the FLOP count). What that count leaves below the target is spent on prefixes
(`_fill`): at some filled-in steps the first blocks are computed too, which reads no forecast. Uniform intervals,
warm-up and first/last blocks are all plans the search can return.

Memory. The program's states are only the valid ones (`Table`: about C(steps, history) of them, and one row per state
and later step), and the blocks' errors are summed one block at a time into one running sum per choice of first
blocks, so the search holds O(C(steps, history + 1)) floats whatever the number of blocks: a dense table over
(steps + 1)^history states per block took 2.8 GiB for 57 blocks at 50 steps with Taylor-2 and 44 GiB at 100.
Above MAX_TABLE_BYTES a search is refused before it starts, naming the fix (`check_size`).
"""

from __future__ import annotations

import itertools
import math
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
SLACK = 1e-9  # relative: a compute fraction this far above the target is the target, up to rounding
MAX_TABLE_BYTES = 4 * 2**30  # what the search's tables may take (`check_size`): refused with the fix above it


class SearchTooLarge(PolicyError):
    """The search's tables would pass MAX_TABLE_BYTES at this step count and history; the message names the fix."""


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
    nbytes: int  # the program's arrays: moves, costs, pointers


@dataclass
class Searched:
    plan: BlockPlan
    predicted: float  # the model's squared relative error of the output
    fraction: float  # the predicted compute fraction, at most the target
    seconds: float
    nbytes: int  # the most its tables held at once (`Table`, the running sums, one block's errors, the program's)


def check_size(steps: int, history: int, sums: int = MAX_EDGE + 1) -> int:
    """An upper bound of the bytes `search`'s tables take at `steps` steps and `history` anchors, with `sums` running
    sums of the blocks' errors (one per choice of first blocks); refused above MAX_TABLE_BYTES, before any is built."""
    need = table_bytes(steps, history, sums)
    if need > MAX_TABLE_BYTES:
        cap = MAX_TABLE_BYTES / 2**30
        raise SearchTooLarge(f"the plan search at {steps} steps with a forecaster reading {history} anchors needs "
                             f"about {need / 2**30:.1f} GiB for its tables, above its {cap:.0f} GiB cap: fit at "
                             "fewer steps (a plan maps onto other step counts through σ) or with a forecaster reading "
                             "fewer anchors (FORA reads one, Taylor order 1 two)")
    return need


def table_bytes(steps: int, history: int, sums: int) -> int:
    """The bound `check_size` reads: valid states, one row per state and later step (the first `history + 1` steps
    chosen among `steps`, and fewer with "none yet" in front), and what each holds (`Table`, the running sums, one
    block's errors, and the dynamic program's moves, values and pointers for up to `steps` counts)."""
    states = sum(math.comb(steps, r) for r in range(1, history + 1))
    rows = sum(math.comb(steps, r + 1) for r in range(1, history + 1))
    per_row = 4 * (history + 1) + 8 * history + 4 + 8 + 4 + 8 * sums + 2 * 8 + 3 * 8
    per_state = 4 * history + 2 * 8 + 2 * 4 + 4 * 8 + 4 * steps
    return rows * per_row + states * per_state


@dataclass
class Table:
    """The search's model over valid states only: a state is the last `history` anchor steps, oldest first, `steps`
    standing for "none yet", only at the front; states are in lexicographic order (so a least value's first index is
    the state a dense table over (steps + 1)^history would pick). A row is a state and a later step: its anchors, the
    forecaster's weights for that step, and the move to the state that anchors there. Rows are grouped by the state's
    last anchor, then by state, then by step, so every state's later steps lie together."""

    steps: int
    states: np.ndarray  # (states, history) int32
    rows: np.ndarray  # (rows, history + 1) int32: the state's anchors, then the step
    weights: np.ndarray  # (rows, history) float64
    state: np.ndarray  # (rows,) int32: the row's state
    groups: list[tuple[int, int, np.ndarray]]  # per last anchor with later steps: first row, later steps, the states
    order: np.ndarray  # (rows,) int64: the rows by the state they move to, then by the state they move from
    source: np.ndarray  # (rows,) int32: state[order]
    starts: np.ndarray  # where each reached state's moves start in `order`
    sizes: np.ndarray  # how many moves reach it
    heads: np.ndarray  # the reached state
    start: int  # no anchor before step 0, which is always computed

    @property
    def nbytes(self) -> int:
        arrays = (self.states, self.rows, self.weights, self.state, self.order, self.source, self.starts, self.sizes,
                  self.heads, *(g[2] for g in self.groups))
        return int(sum(a.nbytes for a in arrays))


def make_table(forecaster: WeightedForecaster, steps: int, history: int) -> Table:
    """The states, rows and moves for `steps` steps and forecasters reading `history` anchors (see `Table`)."""
    states = np.concatenate([_padded(steps, real, history) for real in range(history, 0, -1)])
    last = states[:, -1]
    by_last = np.argsort(last, kind="stable").astype(np.int32)
    counts = np.bincount(last, minlength=steps)
    groups, state_parts, step_parts, first, offset = [], [], [], 0, 0
    for anchor in range(steps):
        members = by_last[offset:offset + counts[anchor]]
        offset += counts[anchor]
        later = steps - 1 - anchor
        if later and len(members):
            groups.append((first, later, members))
            state_parts.append(np.repeat(members, later))
            step_parts.append(np.tile(np.arange(anchor + 1, steps, dtype=np.int32), len(members)))
            first += len(members) * later
    state = np.concatenate(state_parts) if state_parts else np.zeros(0, np.int32)
    step = np.concatenate(step_parts) if step_parts else np.zeros(0, np.int32)
    rows = np.concatenate([states[state], step[:, None]], axis=1)
    weights = _row_weights(forecaster, rows, steps, history)
    base = steps + 1
    codes = _codes(states, base)
    successor = np.searchsorted(codes, codes[state] % base ** (history - 1) * base + step)
    order = np.lexsort((state, successor))
    reached = successor[order]
    starts = np.flatnonzero(np.concatenate([[True], reached[1:] != reached[:-1]])) if len(order) else np.zeros(0, int)
    sizes = np.diff(np.append(starts, len(order)))
    start = int(np.searchsorted(codes, _codes(np.array([(steps,) * (history - 1) + (0,)]), base)[0]))
    return Table(steps, states, rows, weights, state, groups, order, state[order], starts, sizes,
                 reached[starts].astype(np.int32), start)


def _codes(states: np.ndarray, base: int) -> np.ndarray:
    """Each state's index in a dense table over base^history states: increasing with the lexicographic order."""
    history = states.shape[1]
    return (states.astype(np.int64) * base ** np.arange(history - 1, -1, -1, dtype=np.int64)).sum(axis=1)


def _padded(steps: int, real: int, history: int) -> np.ndarray:
    """The states with `real` anchors, in lexicographic order: `steps` (none) in front of increasing anchor steps."""
    combos = np.array(list(itertools.combinations(range(steps), real)), dtype=np.int32).reshape(-1, real)
    return np.concatenate([np.full((len(combos), history - real), steps, dtype=np.int32), combos], axis=1)


def _row_weights(forecaster: WeightedForecaster, rows: np.ndarray, steps: int, history: int) -> np.ndarray:
    """The forecaster's weights of each row's anchors for its step, padded with zeros in front to `history`. A
    forecaster's weights depend on the gaps between its anchors and the step only, so it is asked once per gaps, with
    the first anchor at step 0."""
    weights = np.zeros((len(rows), history))
    real = (rows[:, :history] < steps).sum(axis=1)
    for count in range(1, history + 1):
        picked = np.flatnonzero(real == count)
        if not len(picked):
            continue
        gaps = np.diff(rows[picked, history - count:], axis=1).astype(np.int64)
        keys, inverse = np.unique((gaps * steps ** np.arange(count - 1, -1, -1, dtype=np.int64)).sum(axis=1),
                                  return_inverse=True)
        table = []
        for key in keys:
            times = np.cumsum([0, *reversed([int(key) // steps ** i % steps for i in range(count)])])
            w = forecaster.weights([float(a) for a in times[:-1]], float(times[-1]))
            table.append([0.0] * (history - len(w)) + list(w[-history:]))
        weights[picked] = np.array(table).reshape(-1, history)[inverse.reshape(-1)]
    return weights
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


def frontier(table: Table, err: np.ndarray, counts: int | None = None) -> Frontier:
    """The least total of `err` (one value per row of `table`: a step's weighted error given the state's anchors) for
    every count of computed steps up to `counts` (all by default).

    The program moves from a state to its next anchor d paying the errors of the steps in between, and ends paying
    those after its last anchor; a tie goes to the first state in lexicographic order, as a dense table's argmin."""
    steps, n = table.steps, len(table.states)
    counts = steps if counts is None else counts
    end, move = np.zeros(n), np.empty(len(err))
    for first, later, members in table.groups:
        span = slice(first, first + len(members) * later)
        seg = err[span].reshape(len(members), later).cumsum(axis=1)  # sequential: as a dense row's cumsum
        end[members] = seg[:, -1]
        moves = move[span].reshape(len(members), later)
        moves[:, 0], moves[:, 1:] = 0.0, seg[:, :-1]
    move = move[table.order]
    cost = np.full(n, np.inf)
    cost[table.start] = 0.0
    errors, finals, pointers = np.full(counts, np.inf), [], []
    for k in range(1, counts + 1):
        total = cost + end
        finals.append(int(np.argmin(total)))
        errors[k - 1] = total[finals[-1]]
        if k == counts:
            break
        options = cost[table.source] + move
        least = np.minimum.reduceat(options, table.starts)
        hits = np.flatnonzero(options == np.repeat(least, table.sizes))
        pointer = np.zeros(n, dtype=np.int32)
        pointer[table.heads] = table.source[hits[np.searchsorted(hits, table.starts)]]  # the first of equal moves
        pointers.append(pointer)
        cost = np.full(n, np.inf)
        cost[table.heads] = least
    plans = []
    for k in range(1, counts + 1):
        state = finals[k - 1]
        picked = [int(table.states[state, -1])]
        for j in range(k - 1, 0, -1):
            state = int(pointers[j - 1][state])
            picked.append(int(table.states[state, -1]))
        plans.append(tuple(sorted(picked)))
    workspace = end.nbytes + 3 * move.nbytes + 2 * cost.nbytes + sum(p.nbytes for p in pointers)
    return Frontier(errors, plans, workspace)


def search(grams: Sequence[torch.Tensor | None], weights: Sequence[Sequence[float]], sigmas: Sequence[float],
           costs: Costs, fraction: float, forecaster: WeightedForecaster, history: int, aggregate: str = "squares"
           ) -> Searched:
    """The aligned plan for `fraction` with the least predicted error (see the module's docstring). `grams[b]` is
    block b's Gram over the schedule's steps (None: the engine computes it every step), `weights[b][s]` what its
    squared error at step s weighs in the output (`gains`); `history` how many anchors the forecaster reads.

    The blocks' weighted errors are summed one block at a time into one running sum per choice of first blocks, over
    the table's rows, so memory is the table's and a few sums (`check_size`), whatever the number of blocks."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES} (got {aggregate!r})")
    if not 1 <= history <= MAX_HISTORY:
        raise PolicyError(f"the plan search models forecasters that read 1 to {MAX_HISTORY} anchors (FORA, TaylorSeer "
                          "up to order 2); choose one of those")
    start = time.perf_counter()
    grams = [None if g is None else np.asarray(g, dtype=np.float64) for g in grams]  # once: `_fill` reads them often
    steps, blocks = len(sigmas) - 1, len(grams)
    always = {b for b in range(blocks) if grams[b] is None}
    edges: dict[tuple[int, int], int] = {}  # (first, last) blocks computed every step -> count of computed steps
    for first in range(min(MAX_EDGE, blocks) + 1):
        for last in range(min(MAX_EDGE, blocks - first) + 1):
            edge = always | set(range(first)) | set(range(blocks - last, blocks))
            if all(b in edge for b in range(blocks)):
                continue
            counts = lambda k: [steps if b in edge else k for b in range(blocks)]  # noqa: E731
            k = _count(lambda k: costs.fraction(counts(k), steps), steps, fraction)
            if k is not None and k < steps:
                edges[(first, last)] = k
    if not edges:
        cheapest = costs.fraction([1 if grams[b] is not None else steps for b in range(blocks)], steps)
        raise PolicyError(f"a compute fraction of {fraction:.3f} is below what computing every block once costs "
                          f"({cheapest:.3f}): choose a lower target speedup (at most {1 / cheapest:.1f}×)")
    check_size(steps, history, len({first for first, _ in edges}))
    table = make_table(forecaster, steps, history)
    anchors, at = table.rows[:, :history], table.rows[:, history]
    sums: dict[int, np.ndarray] = {}
    found: list[tuple[float, int, int, tuple[int, ...]]] = []
    workspace = 0
    for b in range(blocks):
        if grams[b] is not None and any(first <= b for first, _ in edges):
            err = _squared_errors(grams[b], anchors, at, table.weights) * np.asarray(weights[b], dtype=np.float64)[at]
            if aggregate == "norms":
                err = np.sqrt(err)
            for first in sorted({first for first, _ in edges if first <= b}):
                if first in sums:
                    sums[first] += err
                else:
                    sums[first] = err.copy()
        for (first, last), k in edges.items():
            if blocks - last - 1 == b:
                total = sums[first] if aggregate == "squares" else sums[first] ** 2
                front = frontier(table, total, k)
                workspace = max(workspace, front.nbytes + total.nbytes * (aggregate == "norms"))
                found.append((float(front.errors[k - 1]), first, last, front.anchors[k - 1]))
    held = table.nbytes + sum(s.nbytes for s in sums.values()) + 8 * len(at) + workspace
    error, first, last, picked = min(found, key=lambda f: f[:3])  # ties: the fewest first, then last blocks
    edge = always | set(range(first)) | set(range(blocks - last, blocks))
    row = "".join("1" if s in set(picked) else "0" for s in range(steps))
    best = ["1" * steps if b in edge else row for b in range(blocks)]
    block_errors = {b: step_errors(g, best[b], forecaster, history) * np.asarray(weights[b])
                    for b, g in enumerate(grams) if g is not None}
    rows, predicted = _fill(best, grams, weights, costs, fraction, forecaster, history, aggregate, block_errors)
    plan = BlockPlan(tuple(float(s) for s in sigmas), tuple(rows))
    return Searched(plan, predicted, costs.fraction([r.count("1") for r in rows], steps), time.perf_counter() - start,
                    held)


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
            if spent + extra > budget * (1 + SLACK) or extra <= 0:
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
    """The most computed steps whose compute fraction is at or below the target (aligned plans move in whole steps;
    `_fill` spends what is left on prefixes); None when even one step is above it."""
    return max((k for k in range(1, steps + 1) if fraction_of(k) <= target * (1 + SLACK)), default=None)


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
