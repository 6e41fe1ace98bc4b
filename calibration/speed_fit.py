"""Calibrate for a speed target: one fit that chooses the plan, the forecaster and the TCC priors.

With a round timer (the ComfyUI node always has one) the target is wall-clock time on this machine: the fit times the
rounds of its own runs and fits what a step costs (`step_costs.py`: outside the blocks, per computed block, per
forecast, and a step whose model call is forecast whole); every budget below is in those seconds, and the compute
fraction is reported beside it. Without one (the testbed's reproducible tables) the budget is in FLOPs.

The runs, in order, all on the calibration (fitting) seeds but the held-out ones of the last two steps:

1. one reference run that records every block's trajectory (`trajectories.py`); its output is full computation;
2. one run computing every block once (FORA): what a filled-in block still costs (an adaLN block's modulation);
   then probe runs that skip one group of blocks, or every block within one window of steps, alone: they fit how much
   an error there weighs in the output (`search.gains`); timed, one whole-step run (TaylorSeer-2 forecasting the
   model's output at a uniform interval), which also times a forecast step;
3. the search, per forecaster and error aggregate, then one run of each distinct searched plan; timed, also the
   whole-step schedules with the most computed calls the wall budget allows (`whole_step_candidates`), and plans
   that mix granularities per step (`mixing.py`: block plans searched at looser budgets, with the skipped steps where
   it costs least forecast whole until the budget is met; the MIXED_RUNS best predicted are run). Of the candidates
   within the budget, the least measured error wins (the model ranks plans; a run decides between close ones), so the
   choice is never worse on the fitting seeds than the uniform whole-step and searched block policies;
4. a local search from a block plan (`_refine`): computed steps moved by one, kept where they measure better, within
   a budget of runs;
5. TCC priors fitted for the winning plan (`fitting.fit_tcc`: one fitting run, then full, uncalibrated and calibrated
   runs on the held-out seeds, which no step above has seen, and the same on the fitting seeds). With variant "auto"
   each variant (drift, trend, mm) is fitted, the full and uncalibrated runs shared, and the one with the least error
   on the fitting seeds is kept: which variant helps depends on the plan's forecaster and gaps, and no single one won
   on every measured plan. The priors are kept only if they lower the error on the fitting seeds by PRIORS_MARGIN
   and the held-out seeds do not say they raise it (`keep_priors`); otherwise the file holds the plan alone, which
   Apply runs uncorrected (in spans). The held-out seeds can only drop priors, never choose them: their figure stays
   a fair verdict on the plan alone, and for kept priors it is one they passed, not an unbiased estimate;
6. timed, the chosen policy's wall speedup on the held-out seeds: full and cached runs interleaved
   (`measure_speedup`), reported beside the prediction.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .calibrator import Calibrator
from .errors import PolicyError
from .call import OUTPUT
from .fitting import AFTER, BEFORE, FIT, FULL, HELD_OUT, FitRun, fit_plan, fit_tcc, rel_l2
from .mixing import StepSeconds, mix, output_gain
from .plan import BlockPlan
from .policy import CachePolicy
from .registry import make_forecaster
from .search import AGGREGATES, SLACK, Costs, Probe, SearchTooLarge, check_size, gains, search, step_errors
from .stats import RunStats
from .step_costs import RoundTimer, StepCosts, fit_step_costs
from .tcc import FLOPS as TCC_FLOPS, VARIANTS, TccPriors, check_variant
from .trajectories import TrajectoryRecorder

# (policy or None for full computation, calibrator, part) -> the part's final latents, and the run's statistics (None
# for full computation)
Run = Callable[[CachePolicy | None, Calibrator | None, str], tuple[Tensor, RunStats | None]]
FORECASTERS = (("reuse", 1), ("taylor", 1), ("taylor", 2))
PROBE_GROUPS = 8
PROBE_WINDOWS = 4
REFINE_RUNS = 24
WHOLE_STEP = "whole-step"
MIXED = "mixed"
# Block plans searched at these multiples of the budget, and at the budget of an aligned plan computing as many steps
# as the fastest whole-step schedule within the budget (and one more), are mixed down to it.
MIXED_LOOSER = (1.5, 2.0)
MIXED_RUNS = 3  # mixed plans run on the fitting seeds: the best predicted of each forecaster, then the next best
TIMING_PAIRS = 2  # held-out full and cached runs, interleaved, for the measured wall speedup
# Relative gain on the fitting seeds that priors must show to be kept: on two seeds, the 0.7% (scenes Flux, 4x) and
# 1.5% (testbed, 3x) gains measured there came with higher held-out errors (docs/methods.md, "Searched plans").
PRIORS_MARGIN = 0.02


@dataclass
class Candidate:
    policy: CachePolicy
    aggregate: str  # the search's error aggregate, WHOLE_STEP for a whole-step policy, MIXED for a mixed plan
    predicted: float  # the model's squared relative error of the output (NaN: not modelled)
    fraction: float  # predicted fraction of full computation's cost: wall time where timed, else FLOPs
    error: float = math.nan  # measured rel_l2 on the calibration seeds
    squared: float = math.nan  # measured mean squared relative error there (what the error model predicts)
    measured_fraction: float = math.nan  # measured compute fraction (FLOPs)


@dataclass
class SpeedFit:
    policy: CachePolicy
    priors: TccPriors  # empty when they were dropped (`keep_priors`)
    report: dict[str, float]  # scalars, as a prior file's report holds them
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why a forecaster was not searched (`search.check_size`)


def tcc_variants(variant: str) -> tuple[str, ...]:
    """The TCC variants a speed fit fits for its plan: every one for "auto", else the one named."""
    if variant == "auto":
        return VARIANTS
    check_variant(variant)
    return (variant,)


def fit_runs(tcc: bool = True, held_out: bool = True, groups: int = PROBE_GROUPS, windows: int = PROBE_WINDOWS,
             forecasters: int = len(FORECASTERS), variant: str = "auto", timed: bool = False
             ) -> list[tuple[str, bool]]:
    """The (part, cached) runs `fit_for_speed` makes, at most (identical searched plans run once): for progress."""
    runs = [(FIT, True)] * (2 + groups + windows + REFINE_RUNS) + [(FIT, True)] * forecasters * len(AGGREGATES)
    if timed:  # the whole-step probe and candidates, and the held-out timing pairs
        held = [(HELD_OUT, False), (HELD_OUT, True)] * TIMING_PAIRS + [(HELD_OUT, False)]
        runs += [(FIT, True)] * (4 + MIXED_RUNS) + held * held_out
    if tcc:
        steps = fit_plan("drift", 1, held_out, verify=True)
        runs += [(s.part, s.cached) for s in steps]
        # each further variant: its fitting and calibrated runs; the full and uncalibrated ones are shared
        further = len(tcc_variants(variant)) - 1
        runs += [(s.part, s.cached) for s in steps if s.cached and s.purpose != BEFORE] * further
    return runs


def plan_policy(base: CachePolicy, plan: BlockPlan, forecaster: str = "reuse", order: int = 1) -> CachePolicy:
    return dataclasses.replace(base, mode="plan", plan=plan, forecaster=forecaster, order=order, time_unit="step",
                               warmup_steps=0, first_blocks=0, last_blocks=0, goc=None, icc=None)


def uniform_row(steps: int, interval: int) -> str:
    return "".join("1" if s % interval == 0 else "0" for s in range(steps))


def fit_for_speed(run: Run, base: CachePolicy, sigmas: list[float], blocks: int, speedup: float,
                  forecasters: tuple[tuple[str, int], ...] = FORECASTERS, variant: str = "auto", tcc: bool = True,
                  held_out: bool = True, groups: int = PROBE_GROUPS, windows: int = PROBE_WINDOWS,
                  refine: int = REFINE_RUNS, timer: RoundTimer | None = None,
                  fewer_steps: Callable[[int], Tensor] | None = None) -> SpeedFit:
    """The plan, forecaster and priors for `speedup`; see the module. With a `timer` (the runs' rounds are timed on
    this machine) the speedup is a wall-clock one: the search budgets in measured seconds, uniform whole-step
    policies are candidates beside the searched block plans, and the chosen policy's wall speedup is measured on the
    held-out seeds against full computation. Without one it is a compute fraction of 1 / speedup, in FLOPs.
    `fewer_steps(k)`: full computation of the held-out seeds at k steps, the honest floor the chosen policy is
    compared with at its measured speed."""
    if not speedup > 1:
        raise PolicyError(f"the target speedup must be above 1 (got {speedup}); 1 computes everything")
    base = dataclasses.replace(base, granularity="block")  # the candidates set their own granularity
    steps = len(sigmas) - 1
    everything_once = BlockPlan(tuple(sigmas), ("1" + "0" * (steps - 1),) * blocks)
    methods, skipped = {}, []
    for forecaster, order in forecasters:  # before any run: a search too large for memory is refused up front
        method = make_forecaster(plan_policy(base, everything_once, forecaster, order))
        history = order + 1 if forecaster == "taylor" else method.history
        try:
            check_size(steps, history)
            methods[(forecaster, order)] = method, history
        except SearchTooLarge as err:
            skipped.append(err)
    if not methods:
        raise skipped[0]
    recorder = TrajectoryRecorder(steps, outputs=timer is not None)
    reference, recorded = run(plan_policy(base, everything_once), recorder, FIT)
    grams = recorder.grams()
    output_gram = grams.pop(OUTPUT[0], None)
    elements = recorder.block_elements()
    if not grams:
        raise PolicyError("the recording run saw no block that can be skipped: nothing to plan")
    _, once = run(plan_policy(base, everything_once), None, FIT)

    weights, probes = _gains(run, base, sigmas, blocks, speedup, grams, reference, groups, windows)
    candidates: list[Candidate] = []
    gain = None
    whole_probe = whole_step_policy(base, steps, max(2, min(round(speedup), steps)))
    if timer is not None:
        # the probes reuse, which costs no arithmetic: a Taylor-2 run filling every block from its third step on
        # times what forecasts cost; a whole-step run times what forecasting a model call costs, and is a candidate
        anchored = BlockPlan(tuple(sigmas), ("1" * min(3, steps) + "0" * (steps - min(3, steps)),) * blocks)
        run(plan_policy(base, anchored, "taylor", 2), None, FIT)
        probe = _measured(run, Candidate(whole_probe, WHOLE_STEP, math.nan, math.nan), reference)
        candidates.append(probe)
        taylor2 = make_forecaster(plan_policy(base, everything_once, "taylor", 2))
        gain = None if output_gram is None else output_gain(output_gram, whole_step_row(steps, whole_probe.interval),
                                                            taylor2, 3, sigmas, probe.squared)
    computed = [recorded.block_flops.get(b, 0.0) for b in range(blocks)]
    timed = fit_step_costs(timer.rounds) if timer is not None else None
    seconds, nbytes = 0.0, 0
    mixable = timed is not None and timed.whole is not None and gain is not None
    block_grams = [grams.get(b) for b in range(blocks)]
    mixed: list[Candidate] = []
    for (forecaster, order), (method, history) in methods.items():
        overhead = (2.0 * history if history > 1 else 0.0) + (TCC_FLOPS if tcc else 0.0)
        filled = [once.skipped_flops.get(b, 0.0) + overhead * elements.get(b, 0) for b in range(blocks)]
        costs = timed.costs(computed, filled) if timed else Costs(tuple(computed), tuple(filled),
                                                                  recorded.outside_flops)
        for aggregate in AGGREGATES:
            try:
                found = search(block_grams, weights, sigmas, costs, 1.0 / speedup, method,
                               history, aggregate)
            except PolicyError as err:  # no block plan this fast: whole steps may still be
                if timed is None or timed.whole is None:
                    raise
                skipped.append(err)
                continue
            seconds, nbytes = seconds + found.seconds, max(nbytes, found.nbytes)
            policy = plan_policy(base, found.plan, forecaster, order)
            if any(c.policy == policy for c in candidates):
                continue
            candidates.append(_measured(run, Candidate(policy, aggregate, found.predicted, found.fraction), reference))
        if mixable:
            step_seconds = StepSeconds(costs.outside, costs.computed, costs.skipped, timed.whole)
            anchors = whole_step_count(sigmas, speedup, timed, computed) or 0
            budgets = {looser / speedup for looser in MIXED_LOOSER} | \
                {step_seconds.aligned(k, steps) for k in (anchors, anchors + 1) if 0 < k < steps}
            for budget in sorted(b for b in budgets if b < 1.0):
                try:
                    found = search(block_grams, weights, sigmas, costs, budget, method,
                                   history)
                except PolicyError:
                    continue
                seconds, nbytes = seconds + found.seconds, max(nbytes, found.nbytes)
                made = mix(found.plan.rows, block_grams, weights, output_gram, gain,
                           step_seconds, sigmas, 1.0 / speedup, method, history)
                if made is not None:
                    plan, predicted = made
                    mixed.append(Candidate(plan_policy(base, plan, forecaster, order), MIXED, predicted,
                                           step_seconds.fraction(plan)))
    for c in best_per_forecaster(mixed, MIXED_RUNS):
        candidates.append(_measured(run, c, reference))
    if timed is not None and timed.whole is not None:
        candidates = [_whole_fraction(c, timed, computed, steps) for c in candidates]
        probe_row = whole_step_row(steps, whole_probe.interval)
        for whole in whole_step_candidates(base, sigmas, speedup, timed, computed):
            if whole.policy.plan.rows[0] != probe_row:  # the probe ran that schedule already
                candidates.append(_measured(run, whole, reference))
    within = [c for c in candidates if c.fraction <= (1.0 / speedup) * (1 + SLACK)]
    if not within:
        fastest = min(candidates, key=lambda c: c.fraction)
        reach = math.floor(10 / fastest.fraction) / 10
        raise PolicyError(f"no plan reaches {speedup:g}x on this machine: the fastest found, {fastest.policy.tag()}, "
                          f"is predicted at {1 / fastest.fraction:.2f}x: " +
                          (f"choose a target speedup of at most {reach:g}" if reach > 1 else
                           "caching gains this model nothing on this machine"))
    searched = min(within, key=lambda c: c.error)
    best, moves = _refine(run, searched, reference, refine) if searched.aggregate not in (WHOLE_STEP, MIXED) \
        else (searched, 0)
    computed_steps, filled_steps, whole_steps = step_mix(best.policy, steps)
    report: dict[str, float] = {
        "target_speedup": float(speedup), "plan_predicted_fraction": searched.fraction,
        "plan_calibration_fraction": best.measured_fraction, "plan_calibration_error": best.error,
        "plan_searched_error": searched.error, "plan_predicted_error": math.sqrt(searched.predicted),
        "plan_candidates": len(candidates), "plan_refine_runs": moves,
        "plan_rank_correlation": rank_correlation([c.predicted for c in candidates if c.aggregate != WHOLE_STEP],
                                                  [c.error for c in candidates if c.aggregate != WHOLE_STEP]),
        "plan_search_s": seconds, "plan_search_bytes": float(nbytes), "plan_forecasters_skipped": float(len(skipped)),
        "plan_runs": 2 + probes + len(candidates) + moves + (timer is not None), "plan_priors": 0.0,
        "plan_file_fraction": best.measured_fraction, "plan_whole_steps": float(searched.aggregate == WHOLE_STEP),
        "plan_mixed": float(searched.aggregate == MIXED), "plan_wall_timed": float(timed is not None),
        "plan_steps_computed": float(computed_steps), "plan_steps_blocks_filled": float(filled_steps),
        "plan_steps_forecast_whole": float(whole_steps)}
    if timed is not None:
        report.update({"cost_outside_s": timed.outside, "cost_per_gflop_s": timed.per_flop * 1e9,
                       "cost_per_fill_gflop_s": timed.per_fill * 1e9, "cost_rounds": float(timed.rounds),
                       "plan_predicted_speedup": 1.0 / searched.fraction, "cost_full_step_s": timed.step(computed),
                       **({"cost_whole_step_s": timed.whole} if timed.whole is not None else {}),
                       **({"cost_output_gain": gain} if gain is not None else {})})
    variants = tcc_variants(variant)
    priors = TccPriors({}, variants[0])
    if tcc:
        shared: dict[tuple[str, str], Tensor] = {}
        fractions: dict[str, float] = {}  # variant -> measured compute fraction with its priors, fitting seeds
        made = 0

        def tcc_run(calibrator: Calibrator | None, step: FitRun) -> Tensor:
            nonlocal made
            key = (step.part, step.purpose)
            if key in shared:  # full and uncalibrated runs are the same for every variant
                return shared[key]
            made += 1
            out, stats = run(best.policy if step.cached else None, calibrator, step.part)
            if step.purpose in (FULL, BEFORE):
                shared[key] = out
            if key == (FIT, AFTER) and isinstance(calibrator, TccPriors):
                fractions[calibrator.variant] = stats.compute_fraction
            return out

        # The variant is chosen on the fitting seeds alone; the held-out seeds can only drop its priors.
        fits = [fit_tcc(tcc_run, v, held_out=held_out, verify=True) for v in variants]
        fitted, tcc_report = min(fits, key=lambda f: f[1]["in_sample_after"])
        report.update(tcc_report)
        report["plan_runs"] += made
        report["plan_variants"] = float(len(variants))
        report["plan_priors_margin"] = PRIORS_MARGIN
        report["plan_priors"] = float(keep_priors(tcc_report))
        if report["plan_priors"]:
            priors = fitted
            report["plan_file_fraction"] = fractions.get(fitted.variant, math.nan)
        else:  # the plan runs uncorrected, and in spans
            priors = TccPriors({}, fitted.variant)
    if timed is not None and held_out:
        measured, spread, full, cached = measure_speedup(run, best.policy, priors if priors.priors else None)
        report.update({"plan_measured_speedup": measured, "plan_measured_speedup_low": spread[0],
                       "plan_measured_speedup_high": spread[1], "plan_held_out_error": rel_l2(cached, full)})
        report["plan_runs"] += 2 * TIMING_PAIRS
        if fewer_steps is not None:  # the honest floor: full computation at the steps that take the same time
            k = max(1, min(steps - 1, round(steps / measured)))
            report.update({"fewer_steps": float(k), "fewer_steps_error": rel_l2(fewer_steps(k), full)})
            report["plan_runs"] += 1
    return SpeedFit(best.policy, priors, report, candidates, [str(err) for err in skipped])


def step_mix(policy: CachePolicy, steps: int) -> tuple[int, int, int]:
    """A fitted policy's granularity mix: steps computing every block, steps filling blocks in, steps forecast whole."""
    if policy.plan is None:  # the uniform whole-step probe
        row = whole_step_row(steps, policy.interval)
        return row.count("1"), 0, row.count("0")
    plan = policy.plan
    computed = sum(all(r[s] == "1" for r in plan.rows) for s in range(steps))
    whole = steps - computed if policy.granularity == "step" else plan.whole_steps
    return computed, steps - computed - whole, whole


def whole_step_policy(base: CachePolicy, steps: int, interval: int) -> CachePolicy:
    """A uniform whole-step policy: after one computed step, every `interval`-th model call computed and the others
    forecast whole by TaylorSeer order 2 (granularity step)."""
    return dataclasses.replace(base, mode="fixed", granularity="step", forecaster="taylor", order=2,
                               interval=max(2, min(interval, steps)), warmup_steps=1, start=0.0, end=1.0,
                               first_blocks=0, last_blocks=0, time_unit="step", goc=None, icc=None, plan=None)


def whole_step_rows(steps: int, computed: int) -> list[str]:
    """Schedules computing `computed` of `steps` model calls whole, the rest forecast: steps 0 and 1 (TaylorSeer's
    first anchors), then either spread evenly to the last step or every interval-th as a fixed policy does."""
    rows = []
    if computed >= 3:
        spread = {0} | {1 + round(i * (steps - 2) / (computed - 2)) for i in range(computed - 1)}
        rows.append("".join("1" if s in spread else "0" for s in range(steps)))
    for interval in range(2, steps):
        row = whole_step_row(steps, interval)
        if row.count("1") <= computed:
            rows.append(row)
            break
    return list(dict.fromkeys(r for r in rows if r.count("1") >= 2))


def best_per_forecaster(candidates: list[Candidate], runs: int) -> list[Candidate]:
    """Up to `runs` distinct candidates, least predicted error first: the best of each forecaster, then the next best
    (the model's errors compare plans of one forecaster better than across forecasters)."""
    ranked = sorted({c.policy: c for c in candidates}.values(), key=lambda c: c.predicted)
    firsts = list({(c.policy.forecaster, c.policy.order): c for c in reversed(ranked)}.values())
    chosen = sorted(firsts, key=lambda c: c.predicted)[:runs]
    return chosen + [c for c in ranked if c not in chosen][:runs - len(chosen)]


def whole_step_count(sigmas: list[float], speedup: float, timed: StepCosts, computed: list[float]) -> int | None:
    """The most model calls a whole-step schedule may compute within the target's predicted wall time."""
    steps = len(sigmas) - 1
    return max((k for k in range(2, steps) if (timed.whole_step_fraction(computed, "1" * k + "0" * (steps - k))
                                               or math.inf) <= (1.0 / speedup) * (1 + SLACK)), default=None)


def whole_step_candidates(base: CachePolicy, sigmas: list[float], speedup: float, timed: StepCosts,
                          computed: list[float]) -> list[Candidate]:
    """Whole-step schedules with the most computed calls whose predicted wall time meets the target (TaylorSeer
    order 2 forecasts the model's output in between)."""
    steps, blocks = len(sigmas) - 1, len(computed)
    count = whole_step_count(sigmas, speedup, timed, computed)
    if count is None:
        return []
    out = []
    for row in whole_step_rows(steps, count):
        plan = BlockPlan(tuple(sigmas), (row,) * blocks)
        policy = dataclasses.replace(plan_policy(base, plan, "taylor", 2), granularity="step")
        out.append(Candidate(policy, WHOLE_STEP, math.nan, timed.whole_step_fraction(computed, row)))
    return out


def whole_step_row(steps: int, interval: int) -> str:
    """The model calls a `whole_step_policy` computes: the warm-up step, then every `interval`-th."""
    return "1" + "".join("1" if (s - 1) % interval == 0 else "0" for s in range(1, steps))


def _whole_fraction(c: Candidate, timed: StepCosts, computed: list[float], steps: int) -> Candidate:
    """A whole-step candidate's predicted wall fraction, once the cost model is fitted."""
    if c.aggregate != WHOLE_STEP or not math.isnan(c.fraction):
        return c
    fraction = timed.whole_step_fraction(computed, whole_step_row(steps, c.policy.interval))
    return dataclasses.replace(c, fraction=math.nan if fraction is None else fraction)


def _measured(run: Run, c: Candidate, reference: Tensor) -> Candidate:
    out, stats = run(c.policy, None, FIT)
    c.error, c.squared, c.measured_fraction = rel_l2(out, reference), squared_error(out, reference), \
        stats.compute_fraction
    return c


def squared_error(out: Tensor, reference: Tensor) -> float:
    """Mean over samples of the squared relative error, the quantity the error models predict."""
    return float(((out - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1).clamp_min(1e-12))
                 .square().mean())


def measure_speedup(run: Run, policy: CachePolicy, calibrator: Calibrator | None
                    ) -> tuple[float, list[float], Tensor, Tensor]:
    """Wall speedup of `policy` on the held-out seeds: full and cached runs interleaved, TIMING_PAIRS of each, the
    median of the paired ratios and their range; and the last full and cached outputs."""
    ratios = []
    for _ in range(TIMING_PAIRS):
        start = time.perf_counter()
        full, _ = run(None, None, HELD_OUT)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        cached, _ = run(policy, calibrator, HELD_OUT)
        ratios.append(seconds / (time.perf_counter() - start))
    return statistics.median(ratios), [min(ratios), max(ratios)], full, cached


def keep_priors(report: dict[str, float], margin: float = PRIORS_MARGIN) -> bool:
    """Whether a speed fit keeps its TCC priors: they lower the error on the fitting seeds by more than `margin`
    (relative), and the held-out seeds, where measured, do not say they raise it. The held-out verdict only drops: a
    choice made on two fitting seeds follows noise (0.7% and 1.5% gains there came with held-out losses)."""
    fits = report["in_sample_after"] < report["in_sample_before"] * (1 - margin)
    hurts = "held_out_after" in report and report["held_out_after"] >= report["held_out_before"]
    return fits and not hurts


def priors_verdict(report: dict[str, float], variant: str, seeds: str = "seeds") -> str:
    """One line: what the file holds, priors or the plan alone, and why (`keep_priors`); `seeds` names the runs'
    unit ("requests" on the testbed). Empty when no priors were fitted."""
    if "in_sample_after" not in report:
        return ""
    fitting = f"{report['in_sample_after'] / report['in_sample_before'] - 1:+.1%} on the fitting {seeds}"
    margin = report.get("plan_priors_margin", PRIORS_MARGIN)
    held = ("held_out_after" in report
            and f"{report['held_out_after'] / report['held_out_before'] - 1:+.1%} on the held-out {seeds}")
    if report["plan_priors"]:
        return (f"TCC priors ({variant}) kept: {fitting}, past the {margin:.0%} gain required"
                + (f", and {held}, which could only have dropped them" if held else f"; no held-out {seeds}"))
    hurts = held and report["held_out_after"] >= report["held_out_before"]
    if report["in_sample_after"] >= report["in_sample_before"] * (1 - margin):
        why = f"{fitting}, not the {margin:.0%} gain required" + (f", and {held}" if hurts else "")
    else:
        why = f"{fitting} but {held}"
    return f"TCC priors ({variant}) dropped: {why}. The file holds the plan alone, which Apply runs uncorrected"


def _refine(run: Run, start: Candidate, reference: Tensor, budget: int) -> tuple[Candidate, int]:
    """Local search on the calibration seeds: move one computed step of the plan one step earlier or later in every
    block that does not compute every step (same count, so the same compute; a move onto a step where a prefix is
    computed is not made, since it would change the count), and keep a move that lowers the measured error, until no
    move helps or `budget` runs are spent; a plan is measured once. The model's plan is a good start, not the optimum:
    it ranks plans, and steps one apart differ by less than it resolves."""
    best, runs = start, 0
    tried = {start.policy.plan.rows}
    improved = True
    while improved and runs < budget:
        improved = False
        rows = best.policy.plan.rows
        moving = [b for b, r in enumerate(rows) if "0" in r]
        shared = max((rows[b] for b in moving), key=lambda r: r.count("0"))  # the row of the blocks skipped most
        for s in [s for s, c in enumerate(shared) if c == "1"][1:]:
            for to in (s - 1, s + 1):
                if runs >= budget or to <= 0 or to >= len(shared) or any(rows[b][to] == "1" for b in moving):
                    continue
                moved = list(rows)
                for b in moving:
                    moved[b] = rows[b][:s] + "0" + rows[b][s + 1:]
                    moved[b] = moved[b][:to] + "1" + moved[b][to + 1:]
                if tuple(moved) in tried:
                    continue
                tried.add(tuple(moved))
                policy = dataclasses.replace(best.policy, plan=dataclasses.replace(best.policy.plan, rows=tuple(moved)))
                out, stats = run(policy, None, FIT)
                runs += 1
                error = rel_l2(out, reference)
                if error < best.error:
                    best = Candidate(policy, best.aggregate, best.predicted, best.fraction, error,
                                     squared_error(out, reference), stats.compute_fraction)
                    improved = True
                    break
            if improved:
                break
    return best, runs


def _gains(run: Run, base: CachePolicy, sigmas: list[float], blocks: int, speedup: float,
           grams: dict[int, Tensor], reference: Tensor, groups: int, windows: int) -> tuple[list[list[float]], int]:
    """Per block and step, the weight of a squared error there in the output (`search.gains`), from probe runs that
    skip (FORA, interval round(speedup)) one group of blocks on every step, or every block within one window of steps;
    and the number of probe runs."""
    steps = len(sigmas) - 1
    interval = max(2, min(round(speedup), steps))
    reuse = make_forecaster(CachePolicy(forecaster="reuse"))
    size = math.ceil(blocks / min(groups, blocks))
    block_groups = [list(range(first, min(first + size, blocks))) for first in range(0, blocks, size)]
    length = math.ceil(steps / min(windows, steps))
    step_windows = [list(range(first, min(first + length, steps))) for first in range(0, steps, length)]
    probes = []
    for kind, parts in (("group", block_groups), ("window", step_windows)):
        for index, part in enumerate(parts):
            if kind == "group":
                rows = [uniform_row(steps, interval) if b in part else "1" * steps for b in range(blocks)]
            else:
                inside = "".join("1" if (s - part[0]) % interval == 0 else "0" for s in part)
                rows = ["1" * part[0] + inside + "1" * (steps - part[-1] - 1)] * blocks
            errors = {b: step_errors(grams[b], rows[b], reuse, 1) for b in grams if "0" in rows[b]}
            if not errors:  # nothing there can be skipped
                continue
            out, _ = run(plan_policy(base, BlockPlan(tuple(sigmas), tuple(rows))), None, FIT)
            probes.append(Probe(kind, index, errors, squared_error(out, reference)))
    return gains(probes, sigmas, blocks, block_groups, step_windows), len(probes)


def rank_correlation(predicted: list[float], measured: list[float]) -> float:
    """Spearman's ρ (NaN with fewer than three points or no spread)."""
    if len(predicted) < 3:
        return math.nan
    ranks = [torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (predicted, measured)]
    a, b = (r - r.mean() for r in ranks)
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom else math.nan
