"""The wall-clock cost model a fit for a target speedup plans with (calibration/step_costs.py), and the fit's choice
between searched block plans, whole-step schedules and plans mixing the two under it."""

import math

import pytest
import torch

from calibrated_cache.calibration import CachePolicy, PolicyError
from calibrated_cache.calibration.speed_fit import MIXED, WHOLE_STEP, whole_step_rows
from calibrated_cache.calibration.stats import RunStats
from calibrated_cache.calibration.step_costs import RoundTime, RoundTimer, StepCosts, fit_step_costs
from calibrated_cache.testbed.fit_priors import fit_testbed_speed
from calibrated_cache.testbed.weights import load_dit


def rounds_from(outside: float, per_flop: float, per_fill: float, noise: float = 0.0, seed: int = 0):
    """Rounds of 4 samples with varied computed and filled FLOPs, timed by a known model (plus relative noise)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(40):
        blocks, filled = float(i % 9) * 1e9, float((8 - i % 9) * 3 + i % 4) * 1e7
        seconds = 4 * (outside + per_flop * blocks / 4 + per_fill * filled / 4)
        out.append(RoundTime(blocks, filled, 4, False, seconds * (1 + noise * float(torch.randn(1, generator=g)))))
    return out


def test_the_cost_model_recovers_outside_block_and_fill_costs_from_timed_rounds():
    fitted = fit_step_costs(rounds_from(2e-3, 5e-11, 4e-10))
    assert fitted.outside == pytest.approx(2e-3, rel=1e-6)
    assert fitted.per_flop == pytest.approx(5e-11, rel=1e-6) and fitted.per_fill == pytest.approx(4e-10, rel=1e-6)
    assert fitted.whole is None  # no whole-step round was timed


def test_a_round_far_off_the_fit_is_dropped_and_no_coefficient_goes_negative():
    rounds = rounds_from(2e-3, 5e-11, 0.0, noise=0.01)
    rounds[0] = RoundTime(rounds[0].blocks, rounds[0].filled, 4, False, 50 * rounds[0].seconds)  # a first run's warm-up
    fitted = fit_step_costs(rounds)
    assert fitted.rounds == len(rounds) - 1
    assert fitted.per_flop == pytest.approx(5e-11, rel=0.05) and fitted.per_fill >= 0.0 and fitted.outside >= 0.0
    assert fitted.step([1e9] * 8) == pytest.approx(2e-3 + 5e-11 * 8e9, rel=0.02)  # what a full step costs
    assert fit_step_costs(rounds[1:]).rounds == len(rounds) - 1  # nothing else was far off


def test_too_few_rounds_give_no_model_and_whole_step_rounds_are_their_own_kind():
    assert fit_step_costs(rounds_from(1e-3, 1e-11, 0.0)[:5]) is None
    whole = [RoundTime(0.0, 1e6, 2, True, 2 * 3e-4)] * 3
    fitted = fit_step_costs(rounds_from(1e-3, 1e-11, 0.0) + whole)
    assert fitted.whole == pytest.approx(3e-4)
    costs = StepCosts(1e-3, 1e-11, 0.0, 3e-4, 10)
    full = 1e-3 + 1e-11 * 4e9
    assert costs.whole_step_fraction([1e9] * 4, "1100") == pytest.approx((2 * full + 2 * 3e-4) / (4 * full))


def test_the_timer_gives_each_round_its_own_work_and_time():
    ticks = iter([0.0, 1.0, 3.0, 6.0])
    timer = RoundTimer(clock=lambda: next(ticks))
    stats = RunStats()
    timer.mark(stats)  # round 0 starts
    stats.flops_blocks, stats.evaluations = 8e9, 2
    timer.mark(stats)  # round 1 starts: round 0 computed everything
    stats.flops_filled, stats.evaluations, stats.calls_skipped = 1e6, 4, 1
    timer.mark(stats)
    stats.evaluations = 6
    timer.mark(stats, last=True)  # the run's last round also holds the host's cleanup: not kept
    assert [(r.blocks, r.filled, r.evaluations, r.whole, r.seconds) for r in timer.rounds] == [
        (8e9, 0.0, 2, False, 1.0), (0.0, 1e6, 2, True, 2.0)]


def test_whole_step_schedules_compute_the_first_two_calls_and_spread_or_step_the_rest():
    assert whole_step_rows(12, 4) == ["110000100001", "110001000100"]  # spread to the end; every 4th, as N4 W1
    assert whole_step_rows(12, 2) == ["110000000000"]


class ModelledClock(RoundTimer):
    """Rounds take the time a cost model gives their work, so a fit's choice is deterministic: per sample, `outside`
    for every round that calls the model, `whole` for one that forecasts its calls whole, and per FLOP of a computed
    block and of a forecast."""

    def __init__(self, outside: float, per_flop: float, whole: float, per_fill: float = 0.0) -> None:
        self.now, self.outside, self.per_flop, self.whole, self.per_fill = 0.0, outside, per_flop, whole, per_fill
        super().__init__(clock=lambda: self.now)

    def mark(self, stats: RunStats, last: bool = False, step_run: bool = False) -> None:
        if self._open is not None:
            _, blocks, filled, evaluations, skipped = self._open
            n = stats.evaluations - evaluations
            self.now += n * (self.whole if stats.calls_skipped > skipped else self.outside)
            self.now += (stats.flops_blocks - blocks) * self.per_flop + (stats.flops_filled - filled) * self.per_fill
        super().mark(stats, last, step_run)


@pytest.fixture(scope="module")
def model():
    return load_dit()[0]


def fit(model, speedup: float, clock: RoundTimer):
    from calibrated_cache.testbed import fit_priors

    original = fit_priors.RoundTimer
    fit_priors.RoundTimer = lambda: clock
    try:
        return fit_testbed_speed(model, CachePolicy(granularity="block"), speedup, 4, 12, 2.0, held_out=2,
                                 tcc=False, timed=True)[0]
    finally:
        fit_priors.RoundTimer = original


def test_where_the_work_outside_the_blocks_dominates_the_fit_forecasts_whole_steps(model):
    """Outside the blocks costs nine times the blocks: a block plan skipping every block saves at most a tenth of a
    step, so only plans forecasting whole steps reach 2x (uniform ones, or mixed with a block fill or two); the fit
    takes the one measuring least error on the fitting seeds."""
    per_flop = 1e-3 / 53e6  # the testbed's 8 blocks: 53 MFLOPs per sample and step, so 1 ms against 9
    fitted = fit(model, 2.0, ModelledClock(outside=9e-3, per_flop=per_flop, whole=1e-4))
    assert fitted.report["plan_steps_forecast_whole"] >= 12 / 2 - 1
    assert fitted.report["plan_predicted_fraction"] <= 0.5 * (1 + 1e-9)
    assert {c.aggregate for c in fitted.candidates} <= {WHOLE_STEP, MIXED}  # no block plan came near 2x
    within = [c for c in fitted.candidates if c.fraction <= 0.5 * (1 + 1e-9)]
    assert fitted.report["plan_calibration_error"] == min(c.error for c in within)
    assert fitted.skipped and all("below what computing every block once costs" in note for note in fitted.skipped)


def test_where_the_blocks_dominate_a_searched_block_plan_meets_the_wall_target(model):
    fitted = fit(model, 3.0, ModelledClock(outside=1e-5, per_flop=1e-9, whole=1e-5, per_fill=5e-9))
    report = fitted.report
    # forecasts are priced from the fit's own Taylor-2 timing run (the probes reuse, which costs no arithmetic)
    assert report["cost_per_fill_gflop_s"] == pytest.approx(5.0, rel=0.05)
    assert report["cost_per_gflop_s"] == pytest.approx(1.0, rel=0.05)
    assert report["plan_wall_timed"] == 1.0 and report["plan_predicted_fraction"] <= 1 / 3 * (1 + 1e-9)
    assert {c.aggregate for c in fitted.candidates} >= {WHOLE_STEP, "squares"}
    assert not math.isnan(report["plan_measured_speedup"]) and report["plan_measured_speedup"] > 1


def test_a_target_no_policy_reaches_on_this_machine_is_refused_naming_the_fastest(model):
    with pytest.raises(PolicyError, match=r"no plan reaches 50x on this machine: the fastest found"):
        fit(model, 50.0, ModelledClock(outside=9e-3, per_flop=1e-9, whole=5e-3))


def test_where_outside_and_blocks_cost_alike_a_wall_clock_fit_mixes_whole_steps_and_block_fills(model):
    """Outside the blocks costs what the blocks cost: a block fill still costs half a step, so no block plan reaches
    3x, and the whole-step schedules within it compute only 3 of 12 calls. Mixing forecasts most skipped steps whole
    and fills the blocks at one or more: far below every whole-step candidate's measured error on the fitting seeds."""
    per_flop = 1e-3 / 53e6  # the testbed's 8 blocks: 1 ms per sample and step, as outside
    fitted = fit(model, 3.0, ModelledClock(outside=1e-3, per_flop=per_flop, whole=1e-5))
    report, plan = fitted.report, fitted.policy.plan
    assert report["plan_mixed"] == 1.0 and fitted.policy.granularity == "block" and plan.whole_steps > 0
    assert report["plan_steps_blocks_filled"] >= 1 and report["plan_steps_forecast_whole"] == plan.whole_steps
    assert sum(report[f"plan_steps_{k}"] for k in ("computed", "blocks_filled", "forecast_whole")) == 12
    assert report["plan_predicted_fraction"] <= 1 / 3 * (1 + 1e-9)
    mixed = [c for c in fitted.candidates if c.aggregate == MIXED]
    within = [c for c in fitted.candidates if c.aggregate == WHOLE_STEP and c.fraction <= 1 / 3 * (1 + 1e-9)]
    assert mixed and within and min(c.error for c in mixed) < 0.5 * min(c.error for c in within)
    assert math.isfinite(report["cost_output_gain"]) and report["cost_output_gain"] > 0
