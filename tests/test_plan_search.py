"""Searched plans: the search's model and budget, the plan as a policy in the engine, and its prior file."""

import random

import numpy as np
import pytest
import torch

from calibrated_cache.calibration import CachePolicy, PolicyError, RunState
from calibrated_cache.calibration.plan import BlockPlan
from calibrated_cache.calibration.reuse import ReuseForecaster
from calibrated_cache.calibration.search import TOLERANCE, Costs, search, step_errors
from calibrated_cache.calibration.speed_fit import plan_policy, uniform_row
from calibrated_cache.calibration.taylor import TaylorForecaster
from calibrated_cache.calibration.trajectories import Sketcher
from calibrated_cache.calibration.tcc import VARIANTS, TccPriors
from calibrated_cache.priors import PriorFileError, PriorMismatch, check_schedule, load_priors, save_priors
from calibrated_cache.testbed.evaluate import bench_inputs
from calibrated_cache.testbed.fit_priors import fit_testbed_speed
from calibrated_cache.testbed.sampling import flow_sigmas, sample
from calibrated_cache.testbed.weights import load_dit

STEPS = 24
SIGMAS = torch.linspace(1, 0, STEPS + 1).tolist()


def drift_gram(power: float = 1.0) -> torch.Tensor:
    """A trajectory drifting at a constant rate: equal gaps between anchors are optimal for reuse."""
    t = torch.arange(STEPS, dtype=torch.float64) ** power
    return torch.outer(t, t)


def test_the_search_returns_the_uniform_interval_when_that_is_optimal():
    blocks = 6
    costs = Costs((1.0,) * blocks, (0.0,) * blocks, 0.0)
    weights = [[1.0] * STEPS] * blocks
    found = search([drift_gram()] * blocks, weights, SIGMAS, costs, 0.25, ReuseForecaster(), 1)
    assert found.plan.rows == (uniform_row(STEPS, 4),) * blocks
    assert found.fraction == pytest.approx(0.25)


def test_the_search_moves_computation_to_where_the_trajectory_moves():
    """A trajectory that moves only early: computed steps crowd there (what a uniform interval cannot do)."""
    t = torch.tensor([min(s, 8) for s in range(STEPS)], dtype=torch.float64)
    gram = torch.outer(t, t) + 1.0
    costs = Costs((1.0,) * 2, (0.0,) * 2, 0.0)
    found = search([gram] * 2, [[1.0] * STEPS] * 2, SIGMAS, costs, 0.25, ReuseForecaster(), 1)
    computed = [s for s, c in enumerate(found.plan.rows[0]) if c == "1"]
    uniform = sum(sum(step_errors(gram, uniform_row(STEPS, 4), ReuseForecaster(), 1)) for _ in range(2))
    assert max(computed) <= 8 and found.predicted < uniform / 2


@pytest.mark.parametrize("seed", range(6))
def test_the_search_never_exceeds_the_budget(seed):
    rng = random.Random(seed)
    blocks = rng.randint(2, 7)
    grams = []
    for _ in range(blocks):
        x = torch.randn(STEPS, 40, generator=torch.Generator().manual_seed(rng.randint(0, 999)), dtype=torch.float64)
        grams.append(x.cumsum(0) @ x.cumsum(0).T)
    computed = tuple(rng.uniform(1.0, 3.0) for _ in range(blocks))
    costs = Costs(computed, tuple(c * rng.uniform(0, 0.05) for c in computed), rng.uniform(0.0, 1.0))
    weights = [[rng.uniform(0.5, 2.0)] * STEPS for _ in range(blocks)]
    for target in (0.5, 0.33, 0.25, 0.2):
        for method, history in ((ReuseForecaster(), 1), (TaylorForecaster(1), 2), (TaylorForecaster(2), 3)):
            if costs.fraction([1] * blocks, STEPS) > target:  # not even one computed step fits: refused
                with pytest.raises(PolicyError, match="lower target speedup"):
                    search(grams, weights, SIGMAS, costs, target, method, history)
                continue
            found = search(grams, weights, SIGMAS, costs, target, method, history)
            counts = [row.count("1") for row in found.plan.rows]
            assert costs.fraction(counts, STEPS) == pytest.approx(found.fraction)
            assert found.fraction <= target * (1 + TOLERANCE) + 1e-12


def test_what_whole_steps_leave_below_the_target_is_spent_on_prefixes_of_filled_in_steps():
    """7 of 24 steps cost 0.292 of a 0.3 target: the rest goes to blocks at the front of skipped steps."""
    blocks = 6
    x = torch.randn(STEPS, 30, generator=torch.Generator().manual_seed(4), dtype=torch.float64).cumsum(0)
    costs = Costs((1.0,) * blocks, (0.0,) * blocks, 0.0)
    weights = [[1.0] * STEPS] * blocks
    found = search([x @ x.T] * blocks, weights, SIGMAS, costs, 0.3, ReuseForecaster(), 1)
    whole_steps = min(found.plan.rows, key=lambda r: r.count("1")).count("1")
    assert whole_steps == 7 and 7 / 24 < found.fraction <= 0.3
    for s in range(STEPS):
        column = "".join(row[s] for row in found.plan.rows)
        assert column == "1" * column.count("1") + "0" * column.count("0")  # computed blocks are a prefix
    aligned = min(found.plan.rows, key=lambda r: r.count("1"))
    assert found.predicted < sum(sum(step_errors(x @ x.T, aligned, ReuseForecaster(), 1)) for _ in range(blocks))


def test_a_plan_with_prefixes_runs_in_spans_as_block_by_block_and_skips_exactly_what_it_plans(random_dit,
                                                                                                 monkeypatch):
    from calibrated_cache.testbed import sampling
    from test_spans import BlockByBlock, close

    sigmas = flow_sigmas(12)
    aligned = uniform_row(12, 3)
    prefix = "11" + aligned[2:4] + "1" + aligned[5:]  # also computed at steps 1 and 4
    rows = {"aligned": (aligned,) * 6, "prefixes": (prefix, prefix) + (aligned,) * 4}
    labels, noise = torch.tensor([3, 1]), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    skipped = {}
    for name, plan_rows in rows.items():
        policy = plan_policy(CachePolicy(granularity="block"), BlockPlan(tuple(sigmas.tolist()), plan_rows), "taylor", 2)
        spanned, run = sample(random_dit, labels, noise, 12, 2.0, policy=policy, sigmas=sigmas)
        with monkeypatch.context() as m:
            m.setattr(sampling, "RunState", BlockByBlock)
            alone, _ = sample(random_dit, labels, noise, 12, 2.0, policy=policy, sigmas=sigmas)
        assert run.spans and close(spanned, alone)
        skipped[name] = run.stats.blocks_skipped
    zeros = {name: sum(r.count("0") for r in plan_rows) for name, plan_rows in rows.items()}
    assert skipped["prefixes"] * zeros["aligned"] == skipped["aligned"] * zeros["prefixes"] > 0


def test_the_refinement_measures_no_plan_twice_and_moves_prefixes_with_their_steps():
    from calibrated_cache.calibration.speed_fit import Candidate, _refine

    rows = ("1" * 12, "100100100100", "110100100100", "100100100100")
    measured: list[tuple[str, ...]] = []

    def run(policy, calibrator, part):
        measured.append(policy.plan.rows)
        counts = [r.count("1") for r in policy.plan.rows]
        return torch.tensor([[float(len(measured) % 3)]]), type("Stats", (), {"compute_fraction": sum(counts) / 48})

    plan = BlockPlan(tuple(torch.linspace(1, 0, 13).tolist()), rows)
    start = Candidate(plan_policy(CachePolicy(granularity="block"), plan), "squares", 1.0, 0.5, error=1.0)
    best, runs = _refine(run, start, torch.tensor([[1.0]]), budget=40)
    assert runs == len(measured) == len(set(measured)) and rows not in measured
    for moved in measured:
        assert moved[0] == "1" * 12 and moved[2][1] == "1"  # full rows and the prefix step stay
        assert [r.count("1") for r in moved] == [r.count("1") for r in rows]
        assert moved[1] == moved[3] and moved[1] == moved[2][:1] + "0" + moved[2][2:]


def test_a_target_below_computing_every_block_once_is_refused_with_the_fix():
    costs = Costs((1.0, 1.0), (0.0, 0.0), 1.0)
    with pytest.raises(PolicyError, match="lower target speedup"):
        search([drift_gram()] * 2, [[1.0] * STEPS] * 2, SIGMAS, costs, 0.1, ReuseForecaster(), 1)


def test_a_sketch_keeps_differences_of_trajectory_values_within_a_few_percent():
    sketch = Sketcher(dims=4096)
    a = torch.randn(50000, generator=torch.Generator().manual_seed(0))
    b = a + 0.1 * torch.randn(50000, generator=torch.Generator().manual_seed(1))
    exact = float((a - b).square().sum())
    assert float((sketch(a) - sketch(b)).square().sum()) == pytest.approx(exact, rel=0.1)


def test_a_uniform_plan_reproduces_the_fixed_policy_bit_for_bit():
    model, _ = load_dit()
    labels, noise = bench_inputs(model, 4, 3)
    sigmas = flow_sigmas(12)
    rows = (uniform_row(12, 3),) * len(model.blocks)
    for granularity in ("block", "module"):
        fixed = CachePolicy(interval=3, warmup_steps=0, forecaster="taylor", order=2, granularity=granularity)
        planned = plan_policy(CachePolicy(granularity=granularity), BlockPlan(tuple(sigmas.tolist()), rows),
                              "taylor", 2)
        a, run_a = sample(model, labels, noise, 12, 2.0, policy=fixed, sigmas=sigmas)
        b, run_b = sample(model, labels, noise, 12, 2.0, policy=planned, sigmas=sigmas)
        assert torch.equal(a, b) and run_a.stats.compute_fraction == run_b.stats.compute_fraction


def test_a_plan_maps_to_other_step_counts_through_sigma_and_keeps_its_share():
    fitted = flow_sigmas(12).tolist()
    plan = BlockPlan(tuple(fitted), ("110100010001", "100100100100"))
    assert plan.computed(fitted) == [tuple(r[s] == "1" for r in plan.rows) for s in range(12)]
    doubled = plan.computed(flow_sigmas(24).tolist())
    assert len(doubled) == 24 and doubled[0] == (True, True)
    for b, row in enumerate(plan.rows):
        assert sum(step[b] for step in doubled) / 24 == pytest.approx(row.count("1") / 12, abs=1 / 12)


@pytest.mark.parametrize("rows, message", [(("0111",), "skips the first step"), (("101",), "4 characters"),
                                           (("1x11",), "characters of 0 and 1")])
def test_a_malformed_plan_is_refused_naming_the_row(rows, message):
    with pytest.raises(PolicyError, match=message):
        BlockPlan((1.0, 0.75, 0.5, 0.25, 0.0), rows)


def test_a_plan_for_another_number_of_blocks_is_refused():
    plan = BlockPlan((1.0, 0.5, 0.0), ("10",) * 3)
    with pytest.raises(PolicyError, match="3 blocks; this model has 8"):
        RunState(plan_policy(CachePolicy(granularity="block"), plan), [1.0, 0.5, 0.0], 8)


@pytest.fixture(scope="module")
def speed_fit():
    model, _ = load_dit()
    return model, *fit_testbed_speed(model, CachePolicy(granularity="block"), 3.0, 8, 12, 2.0, held_out=4)


def test_a_fit_for_a_target_speedup_lands_within_five_percent_of_it_and_reports_held_out_errors(speed_fit):
    model, fitted, meta = speed_fit
    report = fitted.report
    assert fitted.policy.mode == "plan" and fitted.policy.forecaster in ("reuse", "taylor")
    assert abs(report["plan_calibration_fraction"] - 1 / 3) <= 0.05 / 3
    assert abs(report["plan_predicted_fraction"] - report["plan_calibration_fraction"]) < 0.01
    assert report["held_out_before"] > 0 and report["plan_runs"] >= 10 and report["plan_search_s"] > 0
    assert report["plan_calibration_error"] <= report["plan_searched_error"]  # refinement keeps only improvements
    assert bool(fitted.priors.priors) == bool(report["plan_priors"])
    assert (report["in_sample_after"] < report["in_sample_before"]) == bool(report["plan_priors"])
    assert meta["seeds"] != meta["held_out_seeds"]
    labels, noise = bench_inputs(model, 4, 5)
    _, run = sample(model, labels, noise, 12, 2.0, policy=fitted.policy, sigmas=flow_sigmas(12),
                    calibrator=fitted.priors if fitted.priors.priors else None)
    assert abs(run.stats.compute_fraction - 1 / 3) <= 0.05 / 3


def test_auto_fits_every_tcc_variant_for_the_plan_and_keeps_the_best_on_the_fitting_seeds(monkeypatch):
    """The full and uncalibrated runs are shared between variants: two full runs (fitting and held-out seeds), not
    one per variant; the choice reads the fitting seeds only."""
    from calibrated_cache.calibration import speed_fit as fit_module
    from calibrated_cache.testbed import fit_priors

    reports, full_runs = [], []
    real_fit, real_sample = fit_module.fit_tcc, fit_priors.sample

    def recording_fit(run, variant, **kwargs):
        priors, report = real_fit(run, variant, **kwargs)
        reports.append((variant, report))
        return priors, report

    def counting_sample(*args, **kwargs):
        if kwargs.get("policy") is None:
            full_runs.append(kwargs.get("calibrator"))
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(fit_module, "fit_tcc", recording_fit)
    monkeypatch.setattr(fit_priors, "sample", counting_sample)
    model, _ = load_dit()
    fitted, _ = fit_testbed_speed(model, CachePolicy(granularity="block"), 4.0, 8, 12, 2.0, held_out=4)
    assert [v for v, _ in reports] == list(VARIANTS)
    chosen, best = min(reports, key=lambda r: r[1]["in_sample_after"])
    assert fitted.priors.variant == chosen and fitted.report["in_sample_after"] == best["in_sample_after"]
    assert fitted.report["held_out_after"] == best["held_out_after"]
    assert len({r["in_sample_before"] for _, r in reports}) == 1 and len(full_runs) == 2
    assert fitted.report["plan_variants"] == len(VARIANTS)


def test_a_searched_plan_survives_a_prior_file_and_refuses_a_schedule_it_cannot_serve(speed_fit, tmp_path):
    _, fitted, meta = speed_fit
    path = save_priors(tmp_path / "plan.tcc.safetensors", fitted.priors, meta)
    loaded = load_priors(path)
    policy = CachePolicy.from_dict(loaded.meta["policy"])
    assert policy == fitted.policy and loaded.meta["policy_tag"] == policy.tag()
    assert check_schedule(loaded.meta, policy, meta["sigmas"], path.name) is None
    with pytest.raises(PriorMismatch):
        check_schedule(loaded.meta, policy, flow_sigmas(48).tolist(), path.name)


def test_the_weight_table_matches_the_forecasters_own_weights():
    from calibrated_cache.calibration.search import weight_table

    rows, weights = weight_table(TaylorForecaster(2), 8, 3)
    for (a, b, c, s), w in zip(rows[::37], weights[::37]):
        real = [x for x in (a, b, c) if x < 8]
        expected = TaylorForecaster(2).weights([float(x) for x in real], float(s))
        assert np.allclose(w[3 - len(real):], expected)


def test_a_plan_file_may_hold_no_priors_and_any_other_file_may_not(speed_fit, tmp_path):
    """Priors that did not help on the fit are dropped: the file carries the plan alone."""
    _, fitted, meta = speed_fit
    empty = TccPriors({}, "drift")
    path = save_priors(tmp_path / "plan-only.tcc.safetensors", empty, meta)
    assert load_priors(path).priors.priors == {}
    fixed = CachePolicy(interval=3, granularity="block")
    other = save_priors(tmp_path / "fixed.tcc.safetensors", empty,
                        {**meta, "policy": fixed.to_dict(), "policy_tag": fixed.tag()})
    with pytest.raises(PriorFileError, match="holds no priors"):
        load_priors(other)
