import pytest
import torch

from calibrated_cache.calibration import CachePolicy
from calibrated_cache.calibration.calibrator import Calibrator, Reused, Site
from calibrated_cache.calibration.fitting import (AFTER, BEFORE, FIT, FITTING, FULL, HELD_OUT, REFERENCE, STATISTICS,
                                                 FitRun, fit_plan, fit_tcc)
from calibrated_cache.calibration.tcc import (LeastSquares, MomentMatch, Moments, SitePrior, TccFit, TccPriors, correct,
                                             stack)
from calibrated_cache.testbed.evaluate import bench_inputs
from calibrated_cache.testbed.metrics import rel_l2
from calibrated_cache.testbed.sampling import sample
from calibrated_cache.testbed.weights import load_dit

SITE = Site("cond", 3, 0.5, 0.6, 1, 0, "attn", 3)
FORA = CachePolicy(interval=3, warmup_steps=0)


@pytest.fixture(scope="module")
def trained():
    return load_dit()[0]


def prior(a, g, b, site=SITE) -> SitePrior:
    return SitePrior(torch.tensor(a), torch.tensor(g), torch.tensor(b), site.sigma, site.anchor_sigma, site.stale_steps)


def corrected(value, increment, priors):
    """`increment` given as newest = increment, previous = 0 with unit staleness ratios."""
    anchors = None if increment is None else (increment, torch.zeros_like(increment), [1.0] * len(priors))
    return correct(Reused(value, lambda: anchors), stack(priors, value))


def test_the_increment_is_the_anchor_difference_scaled_per_chunk():
    newest, previous = torch.full((4, 2), 3.0), torch.ones(4, 2)
    increment = Reused(newest, lambda: (newest, previous, [0.5, 2.0])).increment()
    assert torch.equal(increment, torch.tensor([[1.0, 1.0]] * 2 + [[4.0, 4.0]] * 2))
    priors = [prior([1.0, 1.0], [1.0, 1.0], [0.0, 0.0])] * 2
    out = correct(Reused(torch.zeros(4, 2), lambda: (newest, previous, [0.5, 2.0])), stack(priors, newest))
    assert torch.equal(out, increment)


def test_correction_applies_each_chunk_its_own_prior_and_leaves_the_input_untouched():
    value = torch.ones(4, 3, 2)
    before = value.clone()
    out = corrected(value, torch.full_like(value, 2.0), [prior([2.0, 1.0], [0.5, 0.0], [0.0, 1.0]), None])
    assert torch.equal(value, before)
    assert torch.equal(out[:2], torch.tensor([3.0, 2.0]).expand(2, 3, 2))
    assert torch.equal(out[2:], value[2:])


def test_correction_without_an_increment_uses_scale_and_shift_only():
    value = torch.ones(2, 5, 2)
    out = corrected(value, None, [prior([1.0, 1.0], [9.0, 9.0], [0.5, -0.5])])
    assert torch.equal(out, value + torch.tensor([0.5, -0.5]))


def test_correction_refuses_priors_of_another_width():
    with pytest.raises(ValueError, match="another model"):
        corrected(torch.ones(1, 2, 4), None, [prior([1.0, 1.0], [0.0, 0.0], [0.0, 0.0])])


def test_drift_least_squares_recovers_a_known_per_channel_drift():
    torch.manual_seed(0)
    fit = LeastSquares("drift")
    g_true, b_true = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([0.5, 0.0, -0.25])
    for _ in range(3):  # statistics stream over batches
        h, d = torch.randn(4, 50, 3), torch.randn(4, 50, 3)
        fit.add(h, d, h + g_true * d + b_true)
    p = fit.solve(SITE)
    assert torch.allclose(p.g, g_true, atol=1e-4) and torch.allclose(p.b, b_true, atol=1e-4)
    assert torch.equal(p.a, torch.ones(3))
    assert p.after < 1e-8 < p.before


def test_trend_least_squares_fits_the_scale_too():
    torch.manual_seed(0)
    fit = LeastSquares("trend")
    h, d = torch.randn(8, 40, 2), torch.randn(8, 40, 2)
    fit.add(h, d, 0.5 * h + 3.0 * d + 1.0)
    p = fit.solve(SITE)
    assert torch.allclose(p.a, torch.full((2,), 0.5), atol=1e-4) and torch.allclose(p.g, torch.full((2,), 3.0), atol=1e-4)


def test_moment_matching_gives_the_reused_value_the_full_trajectory_moments():
    torch.manual_seed(0)
    full, cached = Moments(), torch.randn(6, 100, 4) * 0.8 + 0.3
    target = torch.randn(6, 100, 4) * 1.2 - 0.1
    full.add(target)
    mm = MomentMatch(full)
    mm.add(cached, None, None)
    out = corrected(cached, None, [mm.solve(SITE)])
    assert torch.allclose(out.mean((0, 1)), target.mean((0, 1)), atol=1e-4)
    assert torch.allclose(out.std((0, 1), unbiased=False), target.std((0, 1), unbiased=False), atol=1e-3)


class Recorder(Calibrator):
    reference = True

    def __init__(self):
        self.sites: list[Site] = []

    def observe(self, site, value):
        self.sites.append(site)

    def calibrate(self, sites, reused):
        raise AssertionError("a reference run never calibrates")


class Counter(Calibrator):
    def __init__(self):
        self.sites: list[Site] = []

    def calibrate(self, sites, reused):
        self.sites.extend(sites)
        return reused.value


@pytest.mark.parametrize("policy", [FORA, CachePolicy(interval=2, forecaster="taylor", granularity="block")])
def test_a_reference_run_computes_everything_and_observes_exactly_the_sites_the_policy_reuses(random_dit, policy):
    labels, noise = torch.tensor([1, 2]), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain, _ = sample(random_dit, labels, noise, 9, 2.0)
    recorder, counter = Recorder(), Counter()
    observed, run = sample(random_dit, labels, noise, 9, 2.0, policy=policy, calibrator=recorder)
    cached, _ = sample(random_dit, labels, noise, 9, 2.0, policy=policy, calibrator=counter)
    assert torch.equal(observed, plain) and run.stats.blocks_skipped == 0
    key = lambda s: (s.role, s.round, s.block, s.name, s.stale_steps)  # noqa: E731
    assert sorted(map(key, recorder.sites)) == sorted(map(key, counter.sites)) and recorder.sites
    assert {s.role for s in counter.sites} == {"cond", "uncond"}


def test_priors_cost_is_counted_in_the_compute_fraction(trained):
    labels, noise = bench_inputs(trained, 8, 1)
    fit = TccFit()
    sample(trained, labels, noise, 12, 2.0, policy=FORA, calibrator=fit)
    _, plain = sample(trained, labels, noise, 12, 2.0, policy=FORA)
    _, calibrated = sample(trained, labels, noise, 12, 2.0, policy=FORA, calibrator=fit.priors())
    assert plain.stats.compute_fraction < calibrated.stats.compute_fraction < plain.stats.compute_fraction + 0.01


def runner(model, labels, noise, steps, policy=FORA, sigmas=None, held_out=None):
    """fit_tcc's run over (labels, noise), and over `held_out` (labels, noise) for the held-out part."""
    parts = {FIT: (labels, noise), HELD_OUT: held_out}

    def run(calibrator, step):
        part_labels, part_noise = parts[step.part]
        return sample(model, part_labels, part_noise, steps, 2.0, policy=policy if step.cached else None,
                      sigmas=sigmas, calibrator=calibrator)[0]
    return run


@pytest.mark.parametrize("variant", ["drift", "trend"])
def test_fitted_priors_lower_the_error_on_held_out_requests_and_on_their_own(trained, variant):
    labels, noise = bench_inputs(trained, 16, 1)
    priors, report = fit_tcc(runner(trained, labels, noise, 12, held_out=bench_inputs(trained, 16, 2)), variant,
                             verify=True)
    assert report["held_out_after"] < report["held_out_before"]
    assert report["in_sample_after"] < report["in_sample_before"]
    assert all(p.a.shape == (trained.config.width,) for p in priors.priors.values())


def test_the_fit_runs_its_plan_and_fits_only_on_the_fit_requests(trained):
    """By default one fitting run over the fit requests (about one full sampling each), then full, cached and
    calibrated runs of the held-out requests alone: F + H full-cost runs and 2H cached ones."""
    labels, noise = bench_inputs(trained, 4, 1)
    run, calls = runner(trained, labels, noise, 6, held_out=bench_inputs(trained, 2, 2)), []

    def recorded(calibrator, step):
        calls.append((step, type(calibrator).__name__))
        return run(calibrator, step)

    priors, report = fit_tcc(recorded, "drift")
    assert [c[0] for c in calls] == fit_plan("drift") == [
        FitRun(FIT, True, FITTING, records=True), FitRun(HELD_OUT, False, FULL), FitRun(HELD_OUT, True, BEFORE),
        FitRun(HELD_OUT, True, AFTER)]
    assert [c[1] for c in calls] == ["TccFit", "NoneType", "NoneType", "TccPriors"]
    assert set(report) == {"sites", "rounds", "sequential", "held_out_before", "held_out_after"}


def test_the_plan_adds_the_reference_statistics_and_verification_runs_where_asked():
    assert fit_plan("mm") == fit_plan("drift")  # every variant fits in one run per request
    assert fit_plan("mm", full_trajectory=True)[:2] == [FitRun(FIT, True, REFERENCE, records=True),
                                                        FitRun(FIT, True, FITTING)]
    assert fit_plan("drift", statistics=True)[:2] == [FitRun(FIT, False, STATISTICS, records=True),
                                                      FitRun(FIT, True, FITTING)]
    verified = fit_plan("drift", rounds=2, held_out=False, verify=True)
    assert verified == [FitRun(FIT, True, FITTING, records=True), FitRun(FIT, True, FITTING),
                        FitRun(FIT, False, FULL), FitRun(FIT, True, BEFORE), FitRun(FIT, True, AFTER)]
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        fit_plan("drift", rounds=0)


@pytest.mark.parametrize("full_trajectory", [False, True], ids=["cache-side-targets", "full-trajectory-ablation"])
def test_moment_matching_fits_every_reused_site_with_its_targets_from_the_cache_side_or_a_reference_run(
        trained, full_trajectory):
    labels, noise = bench_inputs(trained, 4, 1)
    calls = []
    run = runner(trained, labels, noise, 6, held_out=bench_inputs(trained, 2, 2))
    priors, report = fit_tcc(lambda c, step: calls.append(getattr(c, "reference", None)) or run(c, step), "mm",
                             full_trajectory=full_trajectory)
    assert calls == [True] * full_trajectory + [False, None, None, False] and priors.priors
    assert all(float(p.g.abs().max()) == 0.0 for p in priors.priors.values())
    assert report["held_out_after"] < 1.5 * report["held_out_before"]


def test_sequential_fit_is_its_own_fixed_point_and_the_one_shot_fit_is_not(trained):
    """Each prior was fitted on the trajectory the earlier priors produce, so applying the final priors reproduces
    the fitting run exactly; the one-shot priors, fitted on the uncalibrated trajectory, do not reproduce theirs."""
    labels, noise = bench_inputs(trained, 8, 1)
    fit = TccFit()
    during, _ = sample(trained, labels, noise, 12, 2.0, policy=FORA, calibrator=fit)
    again, _ = sample(trained, labels, noise, 12, 2.0, policy=FORA, calibrator=fit.priors())
    assert torch.equal(during, again)
    oneshot = TccFit(sequential=False)
    oneshot_during, _ = sample(trained, labels, noise, 12, 2.0, policy=FORA, calibrator=oneshot)
    oneshot_again, _ = sample(trained, labels, noise, 12, 2.0, policy=FORA, calibrator=oneshot.priors())
    assert not torch.equal(oneshot_again, oneshot_during)


def test_trajectory_consistent_fit_beats_the_one_shot_ablation_on_held_out_samples(trained):
    cal_labels, cal_noise = bench_inputs(trained, 32, 1)
    labels, noise = bench_inputs(trained, 32, 0)
    full, _ = sample(trained, labels, noise, 24, 2.0)
    errors = {}
    for sequential in (True, False):
        priors, _ = fit_tcc(runner(trained, cal_labels, cal_noise, 24), sequential=sequential, held_out=False)
        x, _ = sample(trained, labels, noise, 24, 2.0, policy=FORA, calibrator=priors)
        errors[sequential] = rel_l2(x, full)
    plain, _ = sample(trained, labels, noise, 24, 2.0, policy=FORA)
    assert errors[True] < 0.6 * rel_l2(plain, full) and errors[True] < errors[False]


def test_priors_fitted_on_20_steps_still_help_at_25_by_sigma_interpolation(trained):
    cal_labels, cal_noise = bench_inputs(trained, 16, 1)
    labels, noise = bench_inputs(trained, 16, 0)
    priors, _ = fit_tcc(runner(trained, cal_labels, cal_noise, 20), held_out=False)
    used = []
    interpolate = priors._interpolate
    priors._interpolate = lambda site: used.append(site) or interpolate(site)
    full, _ = sample(trained, labels, noise, 25, 2.0)
    plain, _ = sample(trained, labels, noise, 25, 2.0, policy=FORA)
    moved, _ = sample(trained, labels, noise, 25, 2.0, policy=FORA, calibrator=priors)
    assert used and rel_l2(moved, full) < 0.7 * rel_l2(plain, full)


def test_the_fit_rejects_runs_that_reuse_nothing(trained):
    labels, noise = bench_inputs(trained, 2, 1)
    with pytest.raises(ValueError, match="nothing to calibrate"):
        fit_tcc(runner(trained, labels, noise, 4, CachePolicy(interval=1)), held_out=False)


def test_priors_apply_to_every_site_they_know_and_pass_others_through():
    priors = TccPriors({("cond", 3, 0, "attn"): prior([2.0, 2.0], [0.0, 0.0], [0.0, 0.0])}, "drift")
    value = torch.ones(2, 1, 2)
    other = Site("uncond", 3, 0.5, 0.6, 1, 1, "attn", 3)
    out = priors.calibrate([SITE, other], Reused(value, lambda: None))
    assert torch.equal(priors.calibrate([SITE, other], Reused(value, lambda: None)), out)  # from the stacked cache
    assert torch.equal(out, torch.tensor([[[2.0, 2.0]], [[1.0, 1.0]]]))


def test_fitting_half_precision_values_does_not_overflow():
    h = (torch.randn(2, 64, 3) * 300).half()
    fit = LeastSquares("trend")
    fit.add(h, (h * 0.1), h * 0.5 + 1.0)
    moments = Moments()
    moments.add(h)
    assert fit.solve(SITE).finite() and all(bool(torch.isfinite(t).all()) for t in moments.mean_std())


def test_priors_without_a_drift_term_keep_fora_memory(trained):
    labels, noise = bench_inputs(trained, 4, 1)
    priors, _ = fit_tcc(runner(trained, labels, noise, 9), "mm", held_out=False)
    _, plain = sample(trained, labels, noise, 9, 2.0, policy=FORA)
    _, calibrated = sample(trained, labels, noise, 9, 2.0, policy=FORA, calibrator=priors)
    assert priors.anchors == 1 and calibrated.stats.peak_cache_bytes == plain.stats.peak_cache_bytes
