"""Searched plans: the search's model and budget, the plan as a policy in the engine, and its prior file."""

import math
import random
import tracemalloc

import numpy as np
import pytest
import torch

from calibrated_cache.calibration import CachePolicy, PolicyError, RunState
from calibrated_cache.calibration.plan import BlockPlan
from calibrated_cache.calibration.reuse import ReuseForecaster
from calibrated_cache.calibration.search import Costs, search, step_errors
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
            assert found.fraction <= target * (1 + 1e-9)  # at or below the target, up to rounding


def test_a_target_between_whole_steps_is_met_from_below_and_the_rest_spent_on_prefixes():
    """0.24 lies between 5 of 24 steps (0.208) and 6 (0.25, within 5% of it): who asks for 1/0.24 = 4.17x gets at least
    that, so 5 whole steps, and prefixes up to 0.24."""
    blocks = 6
    x = torch.randn(STEPS, 30, generator=torch.Generator().manual_seed(4), dtype=torch.float64).cumsum(0)
    costs = Costs((1.0,) * blocks, (0.0,) * blocks, 0.0)
    found = search([x @ x.T] * blocks, [[1.0] * STEPS] * blocks, SIGMAS, costs, 0.24, ReuseForecaster(), 1)
    assert min(row.count("1") for row in found.plan.rows) == 5
    assert 5 / 24 < found.fraction <= 0.24


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
        assert run.caches_spans and close(spanned, alone)
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


def test_a_fit_for_a_target_speedup_lands_at_or_below_it_and_reports_held_out_errors_and_the_search_cost(speed_fit):
    """4 of 12 steps cost a little over 1/3 (forecasts and corrections): the fit computes 3 whole steps and prefixes,
    and the file as saved, priors included where kept, measures at or below 1/3 on any requests."""
    model, fitted, meta = speed_fit
    report = fitted.report
    at_most = 1 / 3 * (1 + 1e-9)
    assert fitted.policy.mode == "plan" and fitted.policy.forecaster in ("reuse", "taylor")
    assert report["plan_predicted_fraction"] <= at_most and report["plan_calibration_fraction"] <= at_most
    assert 0.25 < report["plan_file_fraction"] <= report["plan_predicted_fraction"]
    assert abs(report["plan_predicted_fraction"] - report["plan_calibration_fraction"]) < 0.01
    assert report["held_out_before"] > 0 and report["plan_runs"] >= 10 and report["plan_search_s"] > 0
    assert 0 < report["plan_search_bytes"] < 2**20 and report["plan_forecasters_skipped"] == 0
    assert report["plan_calibration_error"] <= report["plan_searched_error"]  # refinement keeps only improvements
    from calibrated_cache.calibration.speed_fit import keep_priors

    assert bool(fitted.priors.priors) == bool(report["plan_priors"]) == keep_priors(report)
    assert meta["seeds"] != meta["held_out_seeds"]
    labels, noise = bench_inputs(model, 4, 5)
    _, run = sample(model, labels, noise, 12, 2.0, policy=fitted.policy, sigmas=flow_sigmas(12),
                    calibrator=fitted.priors if fitted.priors.priors else None)
    assert run.stats.compute_fraction <= at_most


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
    from calibrated_cache.calibration.search import make_table

    table = make_table(TaylorForecaster(2), 8, 3)
    rows, weights = table.rows, table.weights
    assert len(rows) == len({tuple(r) for r in rows}) == math.comb(8, 2) + math.comb(8, 3) + math.comb(8, 4)
    for (a, b, c, s), w in zip(rows[::7], weights[::7]):
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


def test_the_search_holds_tables_over_valid_states_only_not_a_dense_table_per_block():
    """20 blocks at 30 steps with Taylor-2: a dense ((steps + 1)^3, steps) table per block peaked at 181 MiB; the
    valid states' rows (about C(30, 4)) with one running sum per choice of first blocks take a few."""
    steps, blocks = 30, 20
    sigmas = torch.linspace(1, 0, steps + 1).tolist()
    grams = []
    for b in range(blocks):
        x = torch.randn(steps, 16, generator=torch.Generator().manual_seed(b), dtype=torch.float64).cumsum(0)
        grams.append(x @ x.T)
    costs = Costs((1.0,) * blocks, (0.02,) * blocks, 0.5)
    tracemalloc.start()
    try:
        found = search(grams, [[1.0] * steps] * blocks, sigmas, costs, 0.25, TaylorForecaster(2), 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB"
    from calibrated_cache.calibration.search import table_bytes

    assert 0 < found.nbytes <= table_bytes(steps, 3, 5) and found.fraction <= 0.25 * (1 + 1e-9)


def test_a_search_too_large_for_memory_is_refused_before_it_starts_naming_the_fix(monkeypatch):
    from calibrated_cache.calibration import search as search_module
    from calibrated_cache.calibration.search import SearchTooLarge, check_size
    from calibrated_cache.calibration.speed_fit import fit_for_speed

    assert check_size(100, 3) < 2**30  # Taylor-2 at 100 steps: about 0.6 GiB, under the cap
    with pytest.raises(SearchTooLarge, match="fit at fewer steps .* or with a forecaster reading fewer anchors"):
        check_size(400, 3)
    monkeypatch.setattr(search_module, "MAX_TABLE_BYTES", 2**20)
    with pytest.raises(SearchTooLarge, match="at 24 steps with a forecaster reading 3 anchors"):
        search([drift_gram()] * 4, [[1.0] * STEPS] * 4, SIGMAS, Costs((1.0,) * 4, (0.0,) * 4, 0.0), 0.25,
               TaylorForecaster(2), 3)

    def run(*args):
        raise AssertionError("a fit whose every search is refused must not sample")

    monkeypatch.setattr(search_module, "MAX_TABLE_BYTES", 2**10)  # FORA's search too
    with pytest.raises(SearchTooLarge, match="at 60 steps"):
        fit_for_speed(run, CachePolicy(granularity="block"), torch.linspace(1, 0, 61).tolist(), 8, 4.0)


@pytest.mark.parametrize("history", [1, 2, 3])
def test_the_dynamic_program_finds_the_least_error_of_every_set_of_computed_steps(history):
    """Every anchor set that computes step 0, enumerated, against the program's least error per count (ties in the
    error may pick another set of the same total)."""
    from itertools import combinations

    from calibrated_cache.calibration.search import frontier, make_table

    steps = 9
    table = make_table(TaylorForecaster(history - 1) if history > 1 else ReuseForecaster(), steps, history)
    err = np.random.default_rng(history).random(len(table.rows)).round(1)  # rounded: ties happen
    row_of = {tuple(int(v) for v in r): i for i, r in enumerate(table.rows)}

    def total(computed: tuple[int, ...]) -> float:
        cost = 0.0
        for s in range(steps):
            if s not in computed:
                seen = [a for a in computed if a < s][-history:]
                cost += err[row_of[(*(steps,) * (history - len(seen)), *seen, s)]]
        return cost

    front = frontier(table, err)
    for k in range(1, steps + 1):
        least = min(total((0, *rest)) for rest in combinations(range(1, steps), k - 1))
        assert front.errors[k - 1] == pytest.approx(least) and total(front.anchors[k - 1]) == pytest.approx(least)
        assert len(front.anchors[k - 1]) == k and front.anchors[k - 1][0] == 0


@pytest.mark.parametrize("in_sample, held_out, kept", [
    ((0.17501, 0.17376), (0.16054, 0.16190), False),  # scenes Flux 4x: -0.7% fitting, +0.8% held out
    ((0.015806, 0.015576), (0.015901, 0.016155), False),  # testbed 3x: -1.5% fitting, +1.6% held out
    ((0.0574, 0.0566), (0.0550, 0.0513), False),  # -1.4% fitting: short of the margin, whatever held out says
    ((0.0574, 0.0485), (0.0550, 0.0551), False),  # -15% fitting, +0.2% held out: held out drops them
    ((0.0574, 0.0485), (0.0550, 0.0513), True),
    ((0.0574, 0.0485), None, True),  # no held-out requests: the fitting ones decide
])
def test_priors_are_kept_only_past_a_margin_on_the_fitting_seeds_and_unless_held_out_seeds_say_they_hurt(
        in_sample, held_out, kept):
    from calibrated_cache.calibration.speed_fit import keep_priors, priors_verdict

    report = {"in_sample_before": in_sample[0], "in_sample_after": in_sample[1]}
    if held_out:
        report.update(held_out_before=held_out[0], held_out_after=held_out[1])
    assert keep_priors(report) is kept
    verdict = priors_verdict({**report, "plan_priors": float(kept)}, "trend")
    change = f"{in_sample[1] / in_sample[0] - 1:+.1%} on the fitting seeds"
    assert verdict.startswith(f"TCC priors (trend) {'kept' if kept else 'dropped'}: {change}")
    assert ("the file holds the plan alone" in verdict.lower()) is not kept
    if held_out and held_out[1] >= held_out[0]:  # the held-out verdict is named where it dropped them
        assert f"{held_out[1] / held_out[0] - 1:+.1%} on the held-out seeds" in verdict


def test_priors_that_gain_on_the_fitting_seeds_but_raise_the_held_out_error_leave_a_plan_file_that_runs_alone(
        monkeypatch, tmp_path):
    """The committed scenes 4x fit kept such priors (fitting seeds 0.1750 -> 0.1738, held out 0.1605 -> 0.1619) and
    then advised leaving Apply's priors empty, which a plan file cannot do: now the file holds the plan alone."""
    from calibrated_cache.calibration import speed_fit as fit_module

    real_fit = fit_module.fit_tcc

    def scenes_figures(run, variant, **kwargs):
        priors, report = real_fit(run, variant, **kwargs)
        return priors, {**report, "in_sample_before": 0.17501, "in_sample_after": 0.17376,
                        "held_out_before": 0.16054, "held_out_after": 0.16190}

    monkeypatch.setattr(fit_module, "fit_tcc", scenes_figures)
    model, _ = load_dit()
    fitted, meta = fit_testbed_speed(model, CachePolicy(granularity="block"), 4.0, 4, 12, 2.0, variant="drift",
                                     held_out=2)
    assert fitted.report["plan_priors"] == 0 and fitted.priors.priors == {}
    assert fitted.report["plan_file_fraction"] == fitted.report["plan_calibration_fraction"] <= 0.25 * (1 + 1e-9)
    loaded = load_priors(save_priors(tmp_path / "plan.tcc.safetensors", fitted.priors, meta))
    assert loaded.priors.priors == {}
    policy = CachePolicy.from_dict(loaded.meta["policy"])
    labels, noise = bench_inputs(model, 2, 5)
    planned, run = sample(model, labels, noise, 12, 2.0, policy=policy, sigmas=flow_sigmas(12))
    alone, _ = sample(model, labels, noise, 12, 2.0, policy=fitted.policy, sigmas=flow_sigmas(12))
    assert torch.equal(planned, alone) and run.stats.compute_fraction <= 0.25 * (1 + 1e-9)


def test_a_fit_leaves_out_a_forecaster_whose_search_is_too_large_and_says_so(monkeypatch):
    from calibrated_cache.calibration import search as search_module
    from calibrated_cache.calibration.search import table_bytes

    monkeypatch.setattr(search_module, "MAX_TABLE_BYTES", table_bytes(12, 3, 5) - 1)  # Taylor-2's search only
    model, _ = load_dit()
    fitted, _ = fit_testbed_speed(model, CachePolicy(granularity="block"), 3.0, 4, 12, 2.0, variant="drift",
                                  held_out=2)
    assert fitted.report["plan_forecasters_skipped"] == 1 and len(fitted.skipped) == 1
    assert "at 12 steps with a forecaster reading 3 anchors" in fitted.skipped[0]
    assert fitted.candidates and all(c.policy.order == 1 for c in fitted.candidates)
