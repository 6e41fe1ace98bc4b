import pytest
import torch

from calibrated_cache.calibration import CachePolicy, RunState
from calibrated_cache.calibration.calibrator import Calibrator
from calibrated_cache.testbed.sampling import flow_sigmas, sample

STEPS, CFG = 12, 3.0
LABELS = torch.tensor([3, 1, 4, 1])
POLICIES = {
    "fora": CachePolicy(interval=3),
    "taylor": CachePolicy(interval=3, forecaster="taylor", order=2, warmup_steps=0),
    "foca": CachePolicy(interval=4, forecaster="foca", time_unit="sigma"),
    "block": CachePolicy(interval=3, granularity="block", forecaster="taylor"),
    "dynamic": CachePolicy(mode="dynamic", threshold=0.3, max_skips=2, forecaster="taylor"),
}


def noise(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("granularity", ["module", "block"])
@pytest.mark.parametrize("batched", [True, False])
def test_policy_that_computes_everything_is_bit_identical_to_the_unpatched_model(random_dit, sampler, granularity, batched):
    plain, _ = sample(random_dit, LABELS, noise(), STEPS, CFG, sampler, batched=batched)
    policy = CachePolicy(interval=1, granularity=granularity)
    cached, run = sample(random_dit, LABELS, noise(), STEPS, CFG, sampler, policy=policy, batched=batched)
    assert torch.equal(plain, cached)
    assert run.stats.compute_fraction == 1.0 and run.stats.peak_cache_bytes == 0


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_batched_and_split_cfg_give_identical_results(random_dit, name):
    batched, a = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=POLICIES[name], batched=True)
    split, b = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=POLICIES[name], batched=False)
    assert torch.equal(batched, split)
    assert a.stats.blocks_skipped == b.stats.blocks_skipped > 0


@pytest.mark.parametrize("name", ["fora", "taylor", "foca", "block"])
def test_batch_of_four_gives_the_per_sample_results_of_batch_one(random_dit, name):
    policy = POLICIES[name]
    together, _ = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=policy)
    alone = torch.cat([sample(random_dit, LABELS[i : i + 1], noise()[i : i + 1], STEPS, CFG, policy=policy)[0] for i in range(4)])
    full, _ = sample(random_dit, LABELS, noise(), STEPS, CFG)
    # Float batching in the matmuls differs at ~1e-6 (full computation shows the same); caching must add nothing.
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)
    assert (together - full).abs().max() > 100 * (together - alone).abs().max()


def test_runs_are_isolated_from_each_other(random_dit):
    policy = POLICIES["taylor"]
    first, _ = sample(random_dit, LABELS, noise(seed=1), STEPS, CFG, policy=policy)
    sample(random_dit, LABELS.flip(0), noise(seed=2), STEPS + 3, CFG, "heun", policy=policy)
    again, _ = sample(random_dit, LABELS, noise(seed=1), STEPS, CFG, policy=policy)
    assert torch.equal(first, again)


def test_finishing_a_run_releases_its_caches(random_dit):
    _, run = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=POLICIES["foca"])
    assert run.stats.peak_cache_bytes > 0
    assert run.stats.cache_bytes == 0 and not run.groups


def test_heun_counts_schedule_steps_and_every_evaluation(random_dit):
    policy = CachePolicy(interval=2, warmup_steps=0)
    _, run = sample(random_dit, LABELS, noise(), STEPS, CFG, "heun", policy=policy, batched=False)
    stats = run.stats
    assert len(stats.steps) == STEPS
    assert stats.rounds == 2 * STEPS - 1
    assert stats.model_calls == 2 * (2 * STEPS - 1)
    full_rounds = 1 + 2 * len(range(2, STEPS, 2))  # step 0 has one round, later steps two (corrector + own)
    depth = len(random_dit.blocks)
    assert stats.blocks_computed == full_rounds * 2 * depth
    assert stats.blocks_computed + stats.blocks_skipped == stats.model_calls * depth


def test_partial_schedule_applies_the_policy_from_its_own_first_step(random_dit):
    sigmas = flow_sigmas(STEPS)[6:]
    policy = CachePolicy(interval=3, warmup_steps=1)
    _, run = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=policy, sigmas=sigmas)
    depth = len(random_dit.blocks)
    assert len(run.stats.steps) == 6
    assert run.stats.blocks_computed == 3 * depth * 2  # steps 0 (warm-up), 1 and 4, for cond and uncond


def test_first_and_last_blocks_are_always_computed(random_dit):
    policy = CachePolicy(interval=4, first_blocks=1, last_blocks=2)
    _, run = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=policy)
    depth = len(random_dit.blocks)
    full_steps = [0, 1, 5, 9]  # warm-up, then every 4th step
    per_branch = sum(depth if s in full_steps else 1 + 2 for s in range(STEPS))
    assert run.stats.blocks_computed == 2 * per_branch
    assert run.stats.blocks_computed + run.stats.blocks_skipped == 2 * STEPS * depth


def test_dynamic_policy_skips_while_the_probe_is_steady_and_caps_consecutive_skips(random_dit):
    _, eager = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=CachePolicy(mode="dynamic", threshold=1e-6))
    assert eager.stats.blocks_skipped == 0
    lazy_policy = CachePolicy(mode="dynamic", threshold=1e6, max_skips=2, warmup_steps=1)
    _, lazy = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=lazy_policy)
    depth = len(random_dit.blocks)
    # Step 0 is computed (warm-up, and the first anchor); then skip, skip, compute: steps 3, 6, 9.
    computed_rounds = len(range(0, STEPS, 3))
    probe_only_rounds = STEPS - computed_rounds
    assert lazy.stats.blocks_computed == 2 * (computed_rounds * depth + probe_only_rounds)


def test_a_change_of_shape_starts_the_branch_afresh(random_dit):
    run = RunState(CachePolicy(interval=2, warmup_steps=0), flow_sigmas(4).tolist(), len(random_dit.blocks))
    y = torch.tensor([1, 2])
    for sigma, n in ((1.0, 2), (0.75, 2), (0.5, 1)):
        x = noise(n)
        call = run.call(sigma, ["cond"], x)
        random_dit(x, torch.full((n,), sigma), y[:n], call)
    assert run.groups[("cond",)].signature[0] == 1
    assert run.stats.blocks_computed == 2 * len(random_dit.blocks)  # step 0 and the reset step 2


def test_a_batch_that_does_not_split_into_branches_is_refused(random_dit):
    run = RunState(CachePolicy(), flow_sigmas(4).tolist(), len(random_dit.blocks))
    with pytest.raises(ValueError, match="cannot hold 2 equal branch chunks"):
        run.call(1.0, ["cond", "uncond"], noise(3))


def test_compute_fraction_weighs_skipped_sites_by_their_flops(random_dit):
    _, run = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=CachePolicy(interval=4, warmup_steps=0))
    flops = random_dit.blocks[0].site_flops(16)
    blocks = sum(flops.values()) * len(random_dit.blocks)
    outside = random_dit.flops() - blocks  # embedders and final layer: computed at every step, so they count too
    skipped = (flops["attn"] + flops["mlp"]) * len(random_dit.blocks) * 9 / 12
    assert run.stats.compute_fraction == pytest.approx(1 - skipped / (blocks + outside), rel=1e-9)


def _streams(n: int, img: int, txt: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"img": torch.randn(n, img, 8, generator=g)}
    if txt is not None:
        out["txt"] = torch.randn(n, txt, 8, generator=g)
    return out


def _double(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v * 1.01 + 0.1 for k, v in s.items()}


def test_dynamic_probe_spanning_double_and_single_blocks_does_not_crash():
    """Flux-like: block 0 takes {img, txt}; block 1 (single) takes cat(txt, img) as one longer `img` stream."""
    run = RunState(CachePolicy(mode="dynamic", first_blocks=2, threshold=10.0), flow_sigmas(4).tolist(), 3)
    for sigma in flow_sigmas(4)[:-1].tolist():
        call = run.call(sigma, ["cond"], torch.zeros(1, 4))
        double = call.block(0, _streams(1, 4, 2), lambda: _double(_streams(1, 4, 2)))
        joined = {"img": torch.cat([double["txt"], double["img"]], dim=1)}
        single = call.block(1, joined, lambda: _double(joined))
        call.block(2, single, lambda: _double(single))
    assert run.stats.blocks_computed == 3 * 4  # no like-for-like probe stream: every round is computed


def test_a_text_stream_that_changes_length_mid_run_is_computed_not_forecast():
    """ComfyUI pads text to a common length when it batches conds, not when it runs them apart."""
    run = RunState(CachePolicy(interval=4, warmup_steps=0), flow_sigmas(4).tolist(), 1)
    first = _streams(2, 4, 6)
    run.call(1.0, ["uncond", "cond"], torch.zeros(2, 4)).block(0, first, lambda: _double(first))
    shorter = _streams(1, 4, 3)
    call = run.call(0.75, ["cond"], torch.zeros(1, 4))
    out = call.block(0, shorter, lambda: _double(shorter))
    assert out["txt"].shape == (1, 3, 8) and run.stats.blocks_computed == 3
    again = run.call(0.5, ["cond"], torch.zeros(1, 4))
    assert again.block(0, shorter, lambda: _double(shorter))["txt"].shape == (1, 3, 8)
    assert run.stats.blocks_skipped == 1  # the recomputed value became the new anchor


def test_dynamic_skips_only_while_every_stream_is_steady_not_the_mean_of_a_large_and_a_small_one():
    """A large video stream that barely moves beside a small audio stream that moves a lot: a decision over both
    streams concatenated would see the video's calm and skip, leaving the audio stale (as peers do); it must not."""
    steps = 8
    run = RunState(CachePolicy(mode="dynamic", threshold=0.1, max_skips=4), flow_sigmas(steps).tolist(), 2)
    video = torch.ones(1, 256, 8)
    for step, sigma in enumerate(flow_sigmas(steps)[:-1].tolist()):
        audio = torch.ones(1, 2, 8) * (1.0 + step)
        streams = {"img": video, "txt": audio}

        def block(s=streams, step=step):
            return {"img": s["img"] * 1.001, "txt": s["txt"] * (1.5 + 0.5 * step)}

        call = run.call(sigma, ["cond"], torch.zeros(1, 4))
        call.block(1, call.block(0, streams, block), block)
    assert run.stats.blocks_skipped == 0


def test_dynamic_policy_computes_a_round_whose_streams_changed_shape_since_the_reference():
    """ComfyUI pads a branch's text to a common length when it batches cond and uncond, not when it runs it alone."""
    run = RunState(CachePolicy(mode="dynamic", threshold=10.0, max_skips=4), flow_sigmas(6).tolist(), 2)
    sigmas = flow_sigmas(6)[:-1].tolist()
    for i, sigma in enumerate(sigmas):
        txt = 8 if i < 2 else 4
        streams = _streams(1, 4, txt)
        call = run.call(sigma, ["cond"], torch.zeros(1, 4))
        call.block(1, call.block(0, streams, lambda s=streams: _double(s)), lambda s=streams: _double(s))
    # probe block 0 runs in all 6 rounds; block 1 in round 0 (no reference) and 2 (new shapes), skipped in 1, 3, 4, 5
    assert (run.stats.blocks_computed, run.stats.blocks_skipped) == (8, 4)


def _probe_rounds(calls: list[list[tuple[str, ...]]], moving: dict[str, list[int]], images: int = 1,
                  steps: int = 8) -> RunState:
    """A dynamic run of a 2-block model over `steps` rounds. Each round makes the model calls `calls` lists (the
    branch groups of each call, in order); every image's probe residual is 1, except that the images `moving` names
    for a branch alternate between 1 and 1.4 (30-40% per round, against 0 for the others)."""
    run = RunState(CachePolicy(mode="dynamic", threshold=0.2, max_skips=4), flow_sigmas(steps).tolist(), 2)
    for step, sigma in enumerate(flow_sigmas(steps)[:-1].tolist()):
        for group in calls[step % len(calls)]:
            x = torch.zeros(len(group) * images, 4)
            residual = torch.ones(len(group) * images, 16, 8)
            for i, branch in enumerate(group):
                for image in moving.get(branch, []):
                    residual[i * images + image] = 1.4 if step % 2 else 1.0
            streams = {"img": torch.zeros(len(group) * images, 16, 8)}
            call = run.call(sigma, list(group), x)
            out = call.block(0, streams, lambda s=streams, r=residual: {"img": s["img"] + r})
            call.block(1, out, lambda o=out: {"img": o["img"] * 1.01})
    return run


def test_dynamic_computes_while_one_image_of_a_batch_moves_though_the_others_are_steady():
    """One image of four still changes by 30-40% a round, three are steady: their batch mean (10%) is under the
    threshold (20%), but skipping would serve the moving image stale values."""
    one_moving = _probe_rounds([[("cond",)]], {"cond": [2]}, images=4)
    assert one_moving.stats.blocks_skipped == 0
    all_steady = _probe_rounds([[("cond",)]], {}, images=4)
    assert all_steady.stats.blocks_skipped > 0  # skipping works when every image is steady


@pytest.mark.parametrize("moving", ["cond", "uncond"])
def test_dynamic_considers_every_branch_of_a_batched_call_not_only_the_first(moving):
    run = _probe_rounds([[("cond", "uncond")]], {moving: [0]})
    assert run.stats.blocks_skipped == 0
    assert _probe_rounds([[("cond", "uncond")]], {}).stats.blocks_skipped > 0


def test_a_split_call_whose_branch_moved_computes_though_an_earlier_call_of_the_round_skips():
    """Split cond and uncond: the cond call decides the round (steady: skip) before the uncond call is seen; the
    uncond call, whose probe moved, computes its blocks rather than follow."""
    run = _probe_rounds([[("cond",), ("uncond",)]], {"uncond": [0]})
    skipped = run.stats.blocks_skipped
    steady = _probe_rounds([[("cond",), ("uncond",)]], {}).stats.blocks_skipped
    assert 0 < skipped and 2 * skipped == steady  # cond skips as when all is steady, uncond never


def test_the_dynamic_change_is_one_scalar_the_largest_over_images_branches_and_streams():
    """One maximum per decision, on the device, that devices sharing a batch can combine with a max."""
    run = RunState(CachePolicy(mode="dynamic"), flow_sigmas(4).tolist(), 2)
    ref = (torch.ones(2, 3), torch.full((2, 5), 2.0))
    run.decider.probe_refs = {"cond": ref, "uncond": ref}
    cond = (torch.tensor([[1.1] * 3, [1.0] * 3]), torch.full((2, 5), 2.0))  # image 0 of stream 0: 10%
    uncond = (torch.ones(2, 3), torch.tensor([[2.0] * 5, [2.5, 2.0, 2.0, 2.0, 2.0]]))  # image 1 of stream 1: 5%
    change = run.decider.change([cond, uncond], ["cond", "uncond"])
    assert change.dim() == 0 and change.item() == pytest.approx(0.1)
    assert run.decider.change([uncond, cond], ["uncond", "cond"]).item() == pytest.approx(0.1)
    assert run.decider.change([cond], ["other"]).item() == float("inf")  # no reference: the round computes


class _Staleness(Calibrator):
    """Uses the policy's values unchanged and records how many steps old each reused value is."""

    def __init__(self) -> None:
        self.stale: list[int] = []

    def calibrate(self, sites, reused):
        self.stale += [s.stale_steps for s in sites]
        return reused.value


@pytest.mark.parametrize("name", ["fora", "taylor", "block"])
def test_a_run_whose_batching_switches_mid_run_never_reuses_values_older_than_the_policy_allows(random_dit, name):
    """ComfyUI batches cond and uncond by the memory it finds free, so a run may go split → batched → split. The
    split calls' old caches predate the batched steps: reusing them served values many steps stale."""
    policy, sigmas = POLICIES[name], flow_sigmas(STEPS).tolist()
    switching = lambda sigma: 3 <= sigmas.index(sigma) < 7  # split, batched for steps 3-6, split again
    seen = _Staleness()
    _, run = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=policy, batched=switching, calibrator=seen)
    _, alone = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=policy, batched=False)
    assert seen.stale and max(seen.stale) < policy.interval
    assert run.stats.regroupings == 3  # cond and uncond join, then each leaves
    assert 0 < run.stats.blocks_skipped < alone.stats.blocks_skipped  # the restarted groups compute until anchored
