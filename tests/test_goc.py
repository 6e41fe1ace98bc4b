import json

import pytest
import torch

from calibrated_cache.calibration import CachePolicy, PolicyError
from calibrated_cache.calibration.calibrator import Calibrator, Reused, Site
from calibrated_cache.calibration.chain import Chain
from calibrated_cache.calibration.goc import GocCorrector, GocSettings, parse_steps
from calibrated_cache.testbed.evaluate import bench_inputs
from calibrated_cache.testbed.fit_priors import fit_testbed
from calibrated_cache.testbed.metrics import rel_l2
from calibrated_cache.testbed.sampling import sample
from calibrated_cache.testbed.weights import load_dit

STEPS, CFG = 24, 2.0


@pytest.fixture(scope="module")
def trained():
    return load_dit()[0]


@pytest.fixture(scope="module")
def requests(trained):
    labels, noise = bench_inputs(trained, 48, 0)
    full, _ = sample(trained, labels, noise, STEPS, CFG)
    return labels, noise, full


def site(sigma: float, anchor: float, step: int, role: str = "cond", stale: int = 1) -> Site:
    return Site(role, step, sigma, anchor, stale, 0, "attn", step)


def reuse(goc: Calibrator, sigma: float, anchor: float, value: torch.Tensor, step: int = 0,
          stale: int = 1) -> torch.Tensor:
    """One cached round as the engine runs it: calibrate the reused (newest computed) value, then settle the result."""
    sites = [site(sigma, anchor, step, stale=stale)]
    out = goc.calibrate(sites, Reused(value, lambda: None))
    goc.settle(sites, out)
    return out


def test_settings_are_validated_with_the_fix_and_tagged():
    assert GocSettings().tag() == "GOC0.8"
    assert GocSettings(1.2, "off").tag() == "GOC1.2plain"
    assert GocSettings(0.5, "manual", steps=(17, 9, 9)).tag() == "GOC0.5s9+17"
    assert GocSettings(0.5, "manual", steps=(*range(24), 30, 32, 33)).tag() == "GOC0.5s0to23+30+32+33"
    assert GocSettings(threshold=-0.3).tag() == "GOC0.8t-0.3"
    # What a mode ignores is dropped: equal behaviour, equal settings and tags.
    assert GocSettings(inflection="off", threshold=0.3, steps=(4,)) == GocSettings(inflection="off")
    assert parse_steps(" 9, 17 3") == (9, 17, 3) and parse_steps("") == ()
    for bad, match in (({"weight": 0.0}, "weight must be in"), ({"weight": 3.0}, "weight must be in"),
                       ({"inflection": "sometimes"}, "inflection must be one of"),
                       ({"threshold": 2.0}, "is a cosine"), ({"inflection": "manual"}, "needs the steps"),
                       ({"inflection": "manual", "steps": (-1,)}, "step numbers >= 0")):
        with pytest.raises(PolicyError, match=match):
            GocSettings(**bad)
    for text in ("9, seventeen", "9, ²", "-3"):
        with pytest.raises(PolicyError, match="whole step numbers"):
            parse_steps(text)
    with pytest.raises(PolicyError, match="is a cosine"):
        GocSettings(threshold="0.2")


def test_a_policy_carries_goc_in_its_tag_and_through_json():
    policy = CachePolicy(interval=2, warmup_steps=0, goc=GocSettings(0.5, "manual", steps=(9, 17)))
    assert policy.tag() == "FORA_N2_W0_GOC0.5s9+17"
    again = CachePolicy.from_dict(json.loads(json.dumps(policy.to_dict())))
    assert again == policy and again.tag() == policy.tag()
    with pytest.raises(PolicyError, match="set the Cache Policy forecaster to reuse"):
        CachePolicy(forecaster="taylor", goc=GocSettings())
    with pytest.raises(PolicyError, match="unknown GOC settings .*weight, inflection, threshold, steps"):
        CachePolicy.from_dict({"goc": {"weight": 0.8, "gain": 2}})
    assert CachePolicy.from_dict({"goc": {"weight": 0.5, "steps": None}}).goc == GocSettings(0.5)


def test_the_push_follows_recomputed_minus_cached_as_used_and_every_cached_step_of_an_interval_gets_it():
    goc = GocCorrector(GocSettings(0.5, "off"))
    goc.start()
    c0, c1 = torch.ones(1, 4), torch.full((1, 4), 3.0)
    assert torch.equal(reuse(goc, 0.9, 1.0, c0), c0)  # one computed value: nothing to take a gradient from
    assert torch.equal(reuse(goc, 0.8, 1.0, c0), c0)
    # The next computation at σ 0.7; the value used before it was c0 at σ 0.8: gradient c1 − c0 over a gap of 0.1.
    assert torch.allclose(reuse(goc, 0.6, 0.7, c1), c1 + 0.5 * (c1 - c0))
    assert torch.allclose(reuse(goc, 0.5, 0.7, c1), c1 + 0.5 * (c1 - c0))  # capped at one gap, not extrapolated
    # The gradient is taken from the value as used: the pushed one, so the cache's own error is fed back.
    c2 = torch.full((1, 4), 4.0)
    used = c1 + 0.5 * (c1 - c0)
    assert torch.allclose(reuse(goc, 0.3, 0.4, c2, stale=2), c2 + 0.5 * (c2 - used))
    # That value was two steps stale: the next gradient is taken per step of it.
    c3 = torch.full((1, 4), 6.0)
    assert torch.allclose(reuse(goc, 0.1, 0.2, c3), c3 + 0.5 / 2 * (c3 - (c2 + 0.5 * (c2 - used))))


def test_auto_drops_the_push_for_the_samples_whose_trajectory_reversed():
    goc = GocCorrector(GocSettings(1.0, "auto"))
    goc.start()
    # Two samples: the first keeps its direction (1 → 2 → 3), the second reverses (1 → 2 → 1).
    anchors = [torch.tensor([[1.0], [1.0]]), torch.tensor([[2.0], [2.0]]), torch.tensor([[3.0], [1.0]])]
    for sigma, anchor, value in ((0.75, 1.0, anchors[0]), (0.25, 0.5, anchors[1])):
        assert torch.equal(reuse(goc, sigma, anchor, value), value)  # no turn measured yet
    out = reuse(goc, -0.25, 0.0, anchors[2])  # gaps of exactly representable σ: a gain of exactly 1
    pushed = anchors[2] + (anchors[2] - anchors[1])  # the value used before was anchors[1] (unpushed)
    assert torch.equal(out[0], pushed[0]) and torch.equal(out[1], anchors[2][1])


def test_start_forgets_the_previous_run():
    goc = GocCorrector(GocSettings(1.0, "off"))
    values = [torch.zeros(1, 2), torch.ones(1, 2), torch.full((1, 2), 3.0)]

    def run() -> list[torch.Tensor]:
        goc.start()
        return [reuse(goc, sigma, anchor, value) for sigma, anchor, value in
                ((0.75, 1.0, values[0]), (0.25, 0.5, values[1]), (-0.25, 0.0, values[2]))]

    first = run()
    assert goc.nbytes > 0 and not torch.equal(first[1], values[1])
    again = run()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    goc.start()
    assert goc.nbytes == 0


def test_forgetting_a_role_restarts_its_push_as_a_new_run_would_and_releases_its_tracks():
    """ComfyUI regrouped cond's calls: what GOC derived from them is stale, so the push restarts from fresh anchors."""
    goc = GocCorrector(GocSettings(1.0, "off"))
    for sigma, anchor, value in ((0.75, 1.0, torch.zeros(1, 2)), (0.25, 0.5, torch.ones(1, 2))):
        reuse(goc, sigma, anchor, value)
    assert goc.nbytes > 0
    goc.forget(("uncond",))
    assert goc.nbytes > 0  # another role's calls keep theirs
    goc.forget(("cond", "uncond"))
    assert goc.nbytes == 0
    later = torch.full((1, 2), 3.0)
    assert torch.equal(reuse(goc, -0.25, 0.0, later), later)  # one anchor since the restart: nothing to push with


def test_a_chain_corrects_in_order_and_settles_the_final_value():
    seen = []

    class AddOne(Calibrator):
        def calibrate(self, sites, reused):
            seen.append(reused.value.clone())
            return reused.value + 1

    goc = GocCorrector(GocSettings(1.0, "off"))
    chain = Chain([goc, AddOne()])
    chain.start()
    c0, c1 = torch.zeros(1, 2), torch.ones(1, 2)
    for sigma, anchor, value in ((0.9, 1.0, c0), (0.7, 0.8, c1)):
        sites = [site(sigma, anchor, 0)]
        out = chain.calibrate(sites, Reused(value, lambda: None))
        chain.settle(sites, out)
    # GOC's gradient at σ 0.7 is c1 minus what was used at σ 0.9: GOC's output plus one, as the chain settled it.
    assert torch.equal(seen[1], c1 + (c1 - (c0 + 1)))
    # Cost: only the links that changed the value count; at σ 0.9 GOC had no gradient yet.
    assert chain.flops == goc.flops and not chain.reference and chain.anchors == 1 and not chain.needs_truth


def test_goc_at_interval_2_cuts_foras_error_and_inflection_awareness_helps(trained, requests):
    labels, noise, full = requests

    def error(goc: GocSettings | None) -> float:
        x, _ = sample(trained, labels, noise, STEPS, CFG, policy=CachePolicy(interval=2, warmup_steps=0, goc=goc))
        return rel_l2(x, full)

    fora, auto, plain = error(None), error(GocSettings()), error(GocSettings(inflection="off"))
    assert auto < 0.75 * fora and auto < plain, (fora, auto, plain)


def test_dropping_the_push_at_every_step_is_plain_fora_and_runs_do_not_share_state(trained, requests):
    labels, noise, _ = requests
    fora = CachePolicy(interval=2, warmup_steps=0)
    manual = CachePolicy(interval=2, warmup_steps=0, goc=GocSettings(inflection="manual", steps=tuple(range(STEPS))))
    assert torch.equal(sample(trained, labels, noise, STEPS, CFG, policy=manual)[0],
                       sample(trained, labels, noise, STEPS, CFG, policy=fora)[0])
    goc = CachePolicy(interval=2, warmup_steps=0, goc=GocSettings())
    first, run = sample(trained, labels, noise, STEPS, CFG, policy=goc)
    assert torch.equal(first, sample(trained, labels, noise, STEPS, CFG, policy=goc)[0])
    fora_run = sample(trained, labels, noise, STEPS, CFG, policy=fora)[1]
    assert run.stats.flops_computed > fora_run.stats.flops_computed  # the push is counted as compute
    # GOC's memory (the last used values, the previous ones, the last increment) shows in the peak cache figure.
    assert run.stats.peak_cache_bytes >= 3 * fora_run.stats.peak_cache_bytes


def test_tcc_priors_fitted_with_goc_active_apply_on_top_of_it(trained, requests):
    labels, noise, full = requests
    policy = CachePolicy(interval=2, warmup_steps=0, goc=GocSettings(0.5))
    priors, meta = fit_testbed(trained, policy, 16, STEPS, CFG)
    assert meta["policy_tag"] == "FORA_N2_W0_GOC0.5" and meta["policy"]["goc"]["weight"] == 0.5
    goc_only = sample(trained, labels, noise, STEPS, CFG, policy=policy)[0]
    both = sample(trained, labels, noise, STEPS, CFG, policy=policy, calibrator=priors)[0]
    assert rel_l2(both, full) < rel_l2(goc_only, full)


def test_cli_fits_priors_with_goc_active_and_names_it_in_the_file(tmp_path, capsys, monkeypatch):
    from calibrated_cache.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["fit-priors", "--interval", "2", "--goc-weight", "0.5", "--samples", "4", "--steps", "8"]) == 0
    assert (tmp_path / "dit.FORA_N2_W0_GOC0.5.tcc.safetensors").exists()
    assert main(["inspect", "dit.FORA_N2_W0_GOC0.5.tcc.safetensors"]) == 0
    assert "FORA_N2_W0_GOC0.5" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="GOC weight must be in"):
        main(["fit-priors", "--goc-weight", "5", "--samples", "4", "--steps", "8"])
    with pytest.raises(SystemExit, match="set the Cache Policy forecaster to reuse"):
        main(["fit-priors", "--forecaster", "taylor", "--goc-weight", "0.5", "--samples", "4", "--steps", "8"])
    with pytest.raises(SystemExit, match="--goc-inflection needs --goc-weight"):
        main(["fit-priors", "--goc-inflection", "off", "--samples", "4", "--steps", "8"])


@pytest.mark.parametrize("sampler, policy", [
    ("heun", CachePolicy(interval=2, warmup_steps=0, goc=GocSettings(inflection="off"))),
    ("euler", CachePolicy(mode="dynamic", threshold=0.3, max_skips=4, goc=GocSettings(inflection="off")))])
def test_goc_runs_with_heuns_shared_sigmas_and_with_a_dynamic_policy(trained, requests, sampler, policy):
    labels, noise, _ = requests
    plain = CachePolicy(**{**policy.to_dict(), "goc": None})
    x, run = sample(trained, labels[:8], noise[:8], 12, CFG, sampler=sampler, policy=policy)
    reference, _ = sample(trained, labels[:8], noise[:8], 12, CFG, sampler=sampler, policy=plain)
    assert run.stats.blocks_skipped > 0 and x.isfinite().all() and not torch.equal(x, reference)
