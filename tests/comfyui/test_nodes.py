"""ComfyUI tier: the pack loaded by ComfyUI's own loader, patching real models of every supported family and
sampling through `comfy.sample` (skipped without COMFYUI_PATH)."""

import importlib
import logging
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from .tiny_models import DRIFT_SCALE, force_split_cfg, FAMILIES, run_sampler, session_of

SETTINGS = dict(mode="fixed", forecaster="reuse", interval=2, warmup_steps=1, start=0.0, end=1.0, first_blocks=0,
                last_blocks=0, threshold=0.1, max_skips=3, order=2, time_unit="step", foca_lambda=1.0)


def bundle(bundles, family):
    if family not in bundles:
        bundles[family] = FAMILIES[family]()
    return bundles[family]


def patched(pack, model, **settings):
    policy_node, apply_node = pack
    policy = policy_node.execute(**{**SETTINGS, **settings}).result[0]
    return apply_node.execute(model, policy).result[0]


def test_pack_loads_with_v3_nodes_tooltips_and_category(pack):
    for node in pack:
        schema = node.define_schema()
        assert schema.category == "sampling/calibrated cache"
        assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]


def test_policy_node_refuses_impossible_settings_with_the_fix(pack):
    policy_node, _ = pack
    assert "interval must be an integer >= 1" in policy_node.validate_inputs(**{**SETTINGS, "interval": 0})
    assert "0 <= start < end <= 1" in policy_node.validate_inputs(**{**SETTINGS, "start": 0.9, "end": 0.5})
    assert policy_node.validate_inputs(**SETTINGS) is True


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_run_reaches_the_compute_fraction_stays_close_and_leaves_the_model_untouched(pack, bundles, family):
    model, positive, negative, latent = bundle(bundles, family)
    full = run_sampler(model, positive, negative, latent, steps=8, cfg=2.0)
    cached_model = patched(pack, model)
    cached = run_sampler(cached_model, positive, negative, latent, steps=8, cfg=2.0)
    session = session_of(cached_model)
    report = session.last_report
    assert report["steps"] == 8
    # steps 0 (warm-up), 1, 3, 5, 7 compute their blocks; the model's work outside its blocks is done at every step
    blocks = sum(session._block_flops.values())
    (model_flops,) = session._model_flops.values()
    outside = model_flops - blocks
    assert 0 < outside < model_flops
    assert report["compute_fraction"] == pytest.approx((5 / 8 * blocks + outside) / model_flops, rel=1e-6)
    drift = ((cached - full).norm() / full.norm()).item()
    assert 0 < drift < 0.25 * DRIFT_SCALE.get(family, 1.0), drift
    assert torch.equal(run_sampler(cached_model, positive, negative, latent, steps=8, cfg=2.0), cached)
    assert torch.equal(run_sampler(model, positive, negative, latent, steps=8, cfg=2.0), full)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_policy_computing_everything_is_bit_identical_to_the_model(pack, bundles, family):
    model, positive, negative, latent = bundle(bundles, family)
    full = run_sampler(model, positive, negative, latent, steps=4, cfg=2.0)
    exact = patched(pack, model, interval=1)
    assert torch.equal(run_sampler(exact, positive, negative, latent, steps=4, cfg=2.0), full)


@pytest.mark.parametrize("family", ["Flux", "Wan", "PixArt"])
def test_split_cfg_under_low_memory_matches_batched_cfg(pack, bundles, family, monkeypatch):
    model, positive, negative, latent = bundle(bundles, family)
    cached_model = patched(pack, model, forecaster="taylor", interval=3)
    batched = run_sampler(cached_model, positive, negative, latent, steps=7, cfg=2.0)
    calls_batched = session_of(cached_model).last_report["model_calls"]
    force_split_cfg(monkeypatch)
    split = run_sampler(cached_model, positive, negative, latent, steps=7, cfg=2.0)
    assert session_of(cached_model).last_report["model_calls"] == 2 * calls_batched
    # Same decisions and caches; only the model's own float batching differs (outputs here reach ~1e3).
    assert ((split - batched).norm() / batched.norm()).item() < 1e-5


def test_batching_that_memory_flips_mid_run_restarts_the_regrouped_caches(pack, bundles, monkeypatch):
    """ComfyUI batches cond and uncond when its estimate fits the free memory, asked anew at every step: here memory
    runs short for a few steps. The regrouped branches' caches restart rather than serve values from before."""
    model, positive, negative, latent = bundle(bundles, "Flux")
    cached_model = patched(pack, model, interval=3)
    run_sampler(cached_model, positive, negative, latent, steps=9, cfg=2.0)
    steady = session_of(cached_model).last_report
    asked = iter(range(10**6))

    def free_memory(dev=None, torch_free_too=False):
        free = 0 if 3 <= next(asked) < 9 else 2**40  # short for a few of the sampler's questions
        return (free, free) if torch_free_too else free

    monkeypatch.setattr(sys.modules["comfy.model_management"], "get_free_memory", free_memory)
    run_sampler(cached_model, positive, negative, latent, steps=9, cfg=2.0)
    report = session_of(cached_model).last_report
    assert report["model_calls"] > steady["model_calls"] and report["regroupings"] >= 2
    assert 0 < report["blocks_skipped"] < steady["blocks_skipped"]


def test_cfg_one_runs_a_single_branch(pack, bundles):
    model, positive, negative, latent = bundle(bundles, "Flux")
    cached_model = patched(pack, model)
    run_sampler(cached_model, positive, negative, latent, steps=6, cfg=1.0)
    report = session_of(cached_model).last_report
    assert report["model_calls"] == 6 and report["blocks_skipped"] > 0


def taylor_gaps(monkeypatch, patched_model) -> dict[int, float]:
    """While FoCa runs in the pack, each of its forecasts from three anchors set against TaylorSeer-2's from the same
    anchors at the same time: ‖FoCa − Taylor‖ over ‖Taylor − newest anchor‖, the share of Taylor's own move the two
    disagree by, per block forecaster (its smallest over the run)."""
    package = type(session_of(patched_model)).__module__.rsplit(".nodes.", 1)[0]  # the pack as ComfyUI loaded it
    calibration = sys.modules[f"{package}.calibration"]
    gaps: dict[int, float] = {}
    forecast = calibration.FocaForecaster.forecast

    def compared(self, t, fetch):
        value = forecast(self, t, fetch)
        if len(self.times) >= 3:
            taylor = calibration.TaylorForecaster(2)
            for time, anchor in zip(self.times, self.values):
                taylor.update(time, fetch(anchor))
            expected = taylor.forecast(t, fetch)
            gap = ((value - expected).norm() / (expected - fetch(self.values[-1])).norm()).item()
            gaps[id(self)] = min(gap, gaps.get(id(self), math.inf))
        return value

    monkeypatch.setattr(calibration.FocaForecaster, "forecast", compared)
    return gaps


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_foca_integrates_the_skipped_blocks_of_every_family_and_is_not_taylor(pack, bundles, family, monkeypatch):
    model, positive, negative, latent = bundle(bundles, family)
    full = run_sampler(model, positive, negative, latent, steps=12, cfg=2.0)
    foca_model = patched(pack, model, forecaster="foca", interval=4)
    foca = run_sampler(foca_model, positive, negative, latent, steps=12, cfg=2.0)
    report = session_of(foca_model).last_report
    assert report["policy"] == "FOCAI1_N4_W1_G2" and report["blocks_skipped"] > 0 and torch.isfinite(foca).all()
    gaps = taylor_gaps(monkeypatch, foca_model)
    assert torch.equal(run_sampler(foca_model, positive, negative, latent, steps=12, cfg=2.0), foca)
    # another method block by block, not rounding: a FoCa forecasting Taylor-2 per block ended 3e-7 from Taylor-2's
    # spanned run, never bit-equal; here every block's forecasts are more than 13% of Taylor's move away from it
    assert gaps and min(gaps.values()) > 0.05, gaps
    taylor_model = patched(pack, model, forecaster="taylor", interval=4)
    run_sampler(taylor_model, positive, negative, latent, steps=12, cfg=2.0)
    assert session_of(taylor_model).last_report["blocks_skipped"] == report["blocks_skipped"]
    assert report["compute_fraction"] > session_of(taylor_model).last_report["compute_fraction"]  # its work counts
    assert ((foca - full).norm() / full.norm()).item() < 0.5 * DRIFT_SCALE.get(family, 1.0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_whole_step_forecasting_runs_nothing_of_the_model_on_a_skipped_step(pack, bundles, family, caplog):
    from .tiny_models import diffusion_model

    model, positive, negative, latent = bundle(bundles, family)
    full = run_sampler(model, positive, negative, latent, steps=12, cfg=2.0)
    calls = []
    handle = diffusion_model(model).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        step_model = patched(pack, model, interval=4, granularity="step")
        out = run_sampler(step_model, positive, negative, latent, steps=12, cfg=2.0)
        report = session_of(step_model).last_report
        assert len(calls) == 4  # steps 0 (warm-up), 1, 5, 9, cond and uncond batched: the model ran only there
        everything = patched(pack, model, interval=1, granularity="step")
        assert torch.equal(run_sampler(everything, positive, negative, latent, steps=12, cfg=2.0), full)
    finally:
        handle.remove()
    blocks = report["blocks_computed"] // 8  # 4 computed model calls, cond and uncond
    assert report["policy"] == "FORA_N4_W1_G1" and report["blocks_skipped"] == 8 * 2 * blocks
    assert report["compute_fraction"] == pytest.approx(4 / 12, abs=1e-9)  # reuse forecasts cost nothing
    assert torch.isfinite(out).all() and 0 < ((out - full).norm() / full.norm()).item() < 0.5 * DRIFT_SCALE.get(family, 1.0)
    assert torch.equal(run_sampler(step_model, positive, negative, latent, steps=12, cfg=2.0), out)
    assert "ran through the cache" not in caplog.text  # its blocks run plainly: no warning that none was hooked


def test_a_plan_mixing_whole_steps_and_block_fills_calls_the_model_only_at_its_called_steps(pack, bundles):
    """A fitted plan may forecast the model's output whole at some steps and fill blocks in at others (issue 33):
    through Apply, ComfyUI's model runs only at the called steps, whose skipped blocks are filled in, and a whole
    step's output is forecast from steps that computed every block (noise units, converted back by σ)."""
    import comfy.samplers

    from .tiny_models import diffusion_model

    model, positive, negative, latent = bundle(bundles, "Flux")
    package = pack[1].__module__.rsplit(".", 2)[0]
    plan_policy = importlib.import_module(f"{package}.calibration.speed_fit").plan_policy
    BlockPlan = importlib.import_module(f"{package}.calibration.plan").BlockPlan
    CachePolicy = importlib.import_module(f"{package}.calibration.policy").CachePolicy
    blocks = len(session_of(patched(pack, model)).blocks)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 12).tolist()
    plan = BlockPlan(tuple(sigmas), ("110010001000",) * blocks, "111011101011")
    mixed = pack[1].execute(model, plan_policy(CachePolicy(granularity="block"), plan)).result[0]
    full = run_sampler(model, positive, negative, latent, steps=12, cfg=2.0)
    calls = []
    handle = diffusion_model(model).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = run_sampler(mixed, positive, negative, latent, steps=12, cfg=2.0)
    finally:
        handle.remove()
    report = session_of(mixed).last_report
    assert len(calls) == 9 and report["calls_skipped"] == 3  # cond and uncond batched: one call per called step
    assert report["blocks_skipped"] == 2 * blocks * (12 - 4)  # filled at 5 called steps, not run at 3 whole ones
    assert torch.isfinite(out).all() and 0 < ((out - full).norm() / full.norm()).item() < 0.5
    assert torch.equal(run_sampler(mixed, positive, negative, latent, steps=12, cfg=2.0), out)


def test_whole_step_forecasting_refuses_a_policy_that_computes_some_blocks_of_every_step(pack):
    policy_node, _ = pack
    message = policy_node.validate_inputs(**{**SETTINGS, "granularity": "step", "last_blocks": 1})
    assert "set those to 0 and the mode to fixed, or forecast block by block" in message


def test_batch_of_two_gives_the_per_sample_results_of_batch_one(pack, bundles):
    model, positive, negative, latent = bundle(bundles, "Wan")
    samples = latent["samples"] if isinstance(latent, dict) else latent
    pair = {"samples": torch.cat([samples, samples])} if isinstance(latent, dict) else torch.cat([samples, samples])
    cached_model = patched(pack, model, forecaster="foca", interval=3)
    together = run_sampler(cached_model, positive, negative, pair, steps=6, cfg=2.0)
    alone = run_sampler(cached_model, positive, negative, latent, steps=6, cfg=2.0)
    # comfy.sample draws one noise tensor for the whole batch, so the first sample shares noise with the single run
    assert torch.allclose(together[:1], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler, calls_per_step", [("heun", 2), ("dpm_2", 2)])
def test_multi_evaluation_samplers_count_schedule_steps(pack, bundles, sampler, calls_per_step):
    model, positive, negative, latent = bundle(bundles, "Flux")
    cached_model = patched(pack, model)
    run_sampler(cached_model, positive, negative, latent, steps=6, cfg=2.0, sampler=sampler)
    report = session_of(cached_model).last_report
    assert report["steps"] == 6
    assert report["model_calls"] == calls_per_step * 6 - 1
    assert report["blocks_skipped"] > 0


def test_two_samplers_on_one_model_and_partial_schedules_each_get_a_fresh_run(pack, bundles):
    """KSamplerAdvanced-style: steps 0-4 then 4-8 on the same patched model (Wan 2.2 two-pass layout)."""
    model, positive, negative, latent = bundle(bundles, "Wan")
    cached_model = patched(pack, model)
    first = run_sampler(cached_model, positive, negative, latent, steps=8, cfg=2.0, start_step=0, last_step=4)
    assert session_of(cached_model).last_report["steps"] == 4
    second_latent = {"samples": first} if isinstance(latent, dict) else first
    run_sampler(cached_model, positive, negative, second_latent, steps=8, cfg=2.0, start_step=4, last_step=8)
    report = session_of(cached_model).last_report
    assert report["steps"] == 4 and report["blocks_skipped"] > 0


def test_two_patched_models_keep_separate_states(pack, bundles):
    model, positive, negative, latent = bundle(bundles, "Wan")
    high, low = patched(pack, model, interval=2), patched(pack, model, interval=3)
    run_sampler(high, positive, negative, latent, steps=6, cfg=2.0)
    run_sampler(low, positive, negative, latent, steps=6, cfg=2.0)
    assert session_of(high) is not session_of(low)
    assert session_of(high).last_report["compute_fraction"] > session_of(low).last_report["compute_fraction"]


def test_requeue_with_a_new_seed_still_caches(pack, bundles):
    model, positive, negative, latent = bundle(bundles, "Flux")
    cached_model = patched(pack, model)
    for seed in (1, 2):
        run_sampler(cached_model, positive, negative, latent, steps=6, cfg=2.0, seed=seed)
        assert session_of(cached_model).last_report["blocks_skipped"] > 0
        assert session_of(cached_model).run is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_applied_before_the_patch_still_applies(pack, bundles, family):
    """Weight patches (what a LoRA loader adds) must reach blocks the pack hooks, object-patched ones included."""
    from .tiny_models import SPECS

    model, positive, negative, latent = bundle(bundles, family)
    lora = model.clone()
    blocks = tuple(f"diffusion_model.{name}.0." for name in SPECS[family].block_lists)  # inside a cached block
    keys = [k for k in lora.model.state_dict() if k.startswith(blocks) and k.endswith(".weight")]
    key = next(k for k in keys if lora.model.state_dict()[k].ndim == 2)
    weight = lora.model.state_dict()[key]
    lora.add_patches({key: (torch.randn_like(weight) * 0.05,)}, 1.0)
    with_lora = run_sampler(lora, positive, negative, latent, steps=4, cfg=2.0)
    assert not torch.equal(with_lora, run_sampler(model, positive, negative, latent, steps=4, cfg=2.0))
    exact = patched(pack, lora, interval=1)
    assert torch.equal(run_sampler(exact, positive, negative, latent, steps=4, cfg=2.0), with_lora)


COSMOS_VIDEO = {"image_model": "cosmos", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
                "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 128, "num_blocks": 2,
                "num_heads": 2, "block_config": "FA-CA-MLP", "concat_padding_mask": True, "pos_emb_cls": "rope3d",
                "pos_emb_learnable": False, "pos_emb_interpolation": "crop", "block_x_format": "THWBD",
                "affline_emb_norm": True, "use_adaln_lora": True, "adaln_lora_dim": 32,
                "crossattn_emb_channels": 1024, "extra_per_block_abs_pos_emb": True,
                "extra_per_block_abs_pos_emb_type": "learnable", "rope_h_extrapolation_ratio": 1.0,
                "rope_w_extrapolation_ratio": 1.0, "rope_t_extrapolation_ratio": 2.0}


def test_an_unsupported_family_gets_a_clear_message_at_patch_time(pack):
    """A tiny Cosmos 1.0 video model of ComfyUI's own classes."""
    from .tiny_models import _model_config, _patcher

    config = _model_config(COSMOS_VIDEO, "CosmosT2V")
    config.set_inference_dtype(torch.float32, None)
    model = _patcher(config.get_model({}))
    assert type(model.model.diffusion_model).__name__ == "GeneralDIT"
    with pytest.raises(ValueError, match="cannot cache GeneralDIT yet: Cosmos 1.0's blocks take time-first"):
        patched(pack, model)


class _Executor:
    """Stands in for ComfyUI's OUTER_SAMPLE executor: a guider with `options`, a sampling that returns."""

    def __init__(self, **options) -> None:
        self.class_obj = SimpleNamespace(model_options=options)

    def __call__(self, *args, **kwargs):
        return "sampled"


UNCACHEABLE = {"flipped": ([0.0, 0.5, 1.0], {}, "this sampler's schedule cannot be cached ("),
               "single": ([0.7], {}, "this sampler's schedule cannot be cached ("),
               "context windows": ([1.0, 0.5, 0.0], {"context_handler": object()}, "context windows are active")}


@pytest.mark.parametrize("case", sorted(UNCACHEABLE))
def test_runs_the_engine_cannot_follow_go_uncached_and_the_run_report_says_so(pack, bundles, case, caplog,
                                                                             monkeypatch):
    """FlipSigmas (unsampling), SplitSigmas at the last step and context windows reach the sampler; the cache steps
    aside, with a warning in the log and in the report the node's panel shows."""
    sigmas, options, said = UNCACHEABLE[case]
    model, *_ = bundle(bundles, "Wan")
    session = session_of(patched(pack, model))
    sent = []
    server = SimpleNamespace(PromptServer=SimpleNamespace(instance=SimpleNamespace(
        send_sync=lambda event, data: sent.append((event, data)))))
    monkeypatch.setitem(sys.modules, "server", server)
    with caplog.at_level(logging.WARNING, logger="calibrated_cache"):
        assert session.outer_sample(_Executor(**options), None, None, None, torch.tensor(sigmas)) == "sampled"
    assert session.run is None
    reason = session.last_report["uncached"]
    assert reason.startswith(said) and session.last_report["family"] == "Wan"
    assert sent == [("calibrated_cache.stats", session.last_report)]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == \
        [f"calibrated_cache: {reason}; this run is not cached"]


def _patch_with(pack, model, **policy):
    """Apply's model patching with a policy no Cache Policy node makes (a searched plan, ICC without a prior file)."""
    package = pack[1].__module__.rsplit(".", 2)[0]
    apply_node = importlib.import_module(pack[1].__module__)
    calibration = importlib.import_module(f"{package}.calibration")
    return session_of(apply_node.patch_model(model, calibration.CachePolicy(granularity="block", **policy))[0])


@pytest.mark.parametrize("case", ["plan", "icc"])
def test_settings_the_model_cannot_take_are_refused_with_the_fix_not_run_uncached(pack, bundles, case):
    """A plan searched for another block count, or channel-aware ICC without a prior file's statistics, is the
    user's to fix: the run stops with the reason and the fix rather than sample slowly without a word."""
    model, *_ = bundle(bundles, "Wan")
    calibration = f"{pack[1].__module__.rsplit('.', 2)[0]}.calibration"
    blocks = len(session_of(patched(pack, model)).blocks)
    if case == "plan":
        plan = importlib.import_module(f"{calibration}.plan").BlockPlan((1.0, 0.5, 0.0), ("11",) * (blocks + 1))
        session = _patch_with(pack, model, mode="plan", plan=plan)
        expected = (f"calibrated_cache: the policy's plan was searched for a model with {blocks + 1} blocks; this "
                    f"model has {blocks}: fit a plan for this model (Fit TCC Priors with a target speedup)")
    else:
        icc = importlib.import_module(f"{calibration}.icc").IccSettings(8, "channel-aware")
        session = _patch_with(pack, model, icc=icc)
        expected = ("calibrated_cache: channel-aware ICC needs the channel statistics a prior file records: choose a "
                    "prior file fitted on this model with Fit TCC Priors, or set ICC svd to plain")
    with pytest.raises(ValueError) as refused:
        session.outer_sample(_Executor(), None, None, None, torch.tensor([1.0, 0.5, 0.0]))
    assert str(refused.value) == expected
    assert session.run is None and session.last_report is None


def test_a_sampler_nested_in_a_run_on_the_same_model_runs_uncached(pack, bundles):
    model, *_ = bundle(bundles, "Wan")
    session = session_of(patched(pack, model))
    seen = []

    class Inner:
        class_obj = SimpleNamespace(model_options={})

        def __call__(self, *args, **kwargs):
            seen.append(session.run)
            return "inner"

    class Outer(Inner):
        def __call__(self, *args, **kwargs):
            outer_run = session.run
            assert session.outer_sample(Inner(), None, None, None, torch.tensor([1.0, 0.5, 0.0])) == "inner"
            assert session.run is outer_run
            return "outer"

    assert session.outer_sample(Outer(), None, None, None, torch.tensor([1.0, 0.5, 0.0])) == "outer"
    assert seen == [None] and session.run is None


def test_a_cache_limit_computes_the_blocks_that_do_not_fit_and_the_report_shows_it(pack, bundles):
    model, positive, negative, latent = bundle(bundles, "Flux")
    samples = latent["samples"] if isinstance(latent, dict) else latent
    large = {"samples": torch.zeros(*samples.shape[:2], 96, 96)}  # caches of several MiB, so that 1 MiB steps tell
    free = patched(pack, model)
    reference = run_sampler(free, positive, negative, large, steps=6, cfg=2.0)
    peak = session_of(free).last_report["peak_cache_bytes"]
    assert peak > 3 * 2**20
    policy_node, apply_node = pack
    policy = policy_node.execute(**SETTINGS).result[0]
    limit_mb = math.ceil(0.6 * peak / 2**20)  # the double blocks' span fits, the single blocks' does not
    capped = apply_node.execute(model, policy, cache_limit_mb=limit_mb).result[0]
    run_sampler(capped, positive, negative, large, steps=6, cfg=2.0)
    report = session_of(capped).last_report
    assert report["cache_limit_bytes"] == limit_mb * 2**20 and report["peak_cache_bytes"] <= limit_mb * 2**20
    assert report["blocks_over_limit"] > 0 and report["blocks_skipped"] > 0
    offloaded = apply_node.execute(model, policy, cache_offload=True).result[0]
    out = run_sampler(offloaded, positive, negative, large, steps=6, cfg=2.0)
    assert session_of(offloaded).last_report["cache_offloaded"] is True and torch.equal(out, reference)
    with pytest.raises(ValueError, match="whole number of bytes >= 0"):
        apply_node.execute(model, policy, cache_limit_mb=-1)


def test_the_compute_fraction_is_measured_alike_under_inference_mode_as_the_server_samples(pack, bundles):
    """Under inference mode composite ops (linear, attention) reach the FLOP counter undecomposed; counted as they
    are without it, the report's compute fraction is the same."""
    model, positive, negative, latent = bundle(bundles, "Flux")
    fractions = []
    for inference in (False, True):
        cached = patched(pack, model, interval=3)
        with torch.inference_mode(inference):
            run_sampler(cached, positive, negative, latent, steps=8, cfg=2.0)
        session = session_of(cached)
        assert min(session._block_flops.values()) > 1e6  # measured, not the floor of 1 FLOP
        fractions.append(session.last_report["compute_fraction"])
    assert fractions[0] == pytest.approx(fractions[1], rel=1e-9) and fractions[0] < 0.7
