"""ComfyUI tier: the DiT families ComfyUI added by 0.8.0, each a tiny model of its real class sampled through
`comfy.sample` (tiny_models_2026.py): exact at interval 1, the blocks a fixed policy skips counted, LoRA patches kept,
spans equal to block-by-block caching; LTX-2's video and audio cached as two streams, one of them switched off, absent,
or conditioned on an image; Kandinsky 5 cached by its own family entry. A block that passes the pack nothing to cache
runs plainly, and the log says so once.

The family tests run on the families this ComfyUI has (feature detection). Where it has none of them (0.3.64) a test
with no family is left undefined rather than given an empty parameter set, which pytest reports as a skip and CI fails;
`test_every_model_class_of_this_comfyui_has_a_tiny_model` runs everywhere and fails when a class goes uncovered."""

from __future__ import annotations

import logging
import re
from typing import Callable

import pytest
import torch

from .test_nodes import SETTINGS, patched
from .tiny_models import cache_block_by_block, run_sampler, session_of
from .tiny_models_2026 import SPECS, available, build, flat, parts

NEW = available()
# comfy.model_base classes with a tiny model in tiny_models.py, and those the pack does not hook (U-Nets, Stable
# Cascade) or refuses (Cosmos 1.0); HunyuanVideo's I2V variants run the HunyuanVideo model the tier tests.
OLDER_TIER = {"SD3", "AuraFlow", "StableAudio1", "HunyuanDiT", "PixArt", "Flux", "GenmoMochi", "LTXV", "HunyuanVideo",
              "CosmosPredict2", "Lumina2", "WAN21", "WAN21_Vace", "WAN21_Camera", "WAN21_HuMo", "WAN22_Animate",
              "WAN22_S2V", "WAN22", "Hunyuan3Dv2", "Hunyuan3Dv2_1", "HiDream", "Chroma", "ChromaRadiance", "ACEStep",
              "Omnigen2", "QwenImage", "HunyuanImage21", "HunyuanImage21Refiner", "HunyuanVideoI2V",
              "HunyuanVideoSkyreelsI2V"}
NOT_DITS = {"BaseModel", "SD21UNCLIP", "SDXLRefiner", "SDXL", "SVD_img2vid", "SV3D_u", "SV3D_p", "Stable_Zero123",
            "SD_X4Upscaler", "IP2P", "SD15_instructpix2pix", "SDXL_instructpix2pix", "Lotus", "StableCascade_C",
            "StableCascade_B"}
REFUSED = {"CosmosVideo"}


def each(families: list[str] | None = None, **cases: list) -> Callable:
    """Parametrize a test over `families` (default: every new one) that this ComfyUI has, and over each of `cases`'
    values; with no family, there is no test."""
    present = [f for f in (families or SPECS) if f in NEW]

    def wrap(test: Callable) -> Callable | None:
        if not present:
            return None
        for name, values in cases.items():
            test = pytest.mark.parametrize(name, values)(test)
        return pytest.mark.parametrize("family", present)(test)

    return wrap


def bundle(bundles: dict, family: str):
    if family not in bundles:
        bundles[family] = build(family)
    return bundles[family]


def rel(a, b) -> float:
    a, b = flat(a), flat(b)
    return ((a - b).norm() / b.norm()).item()


def test_every_model_class_of_this_comfyui_has_a_tiny_model():
    import comfy.model_base

    classes = {name for name, value in vars(comfy.model_base).items()
               if isinstance(value, type) and issubclass(value, comfy.model_base.BaseModel)}
    assert classes - OLDER_TIER - NOT_DITS - REFUSED <= {SPECS[f].model_base for f in NEW}, \
        "a model class of this ComfyUI has no tiny model"
    for family, spec in SPECS.items():  # a new class's family is tested wherever this ComfyUI has the class
        if spec.model_base not in OLDER_TIER:
            assert (family in NEW) == (spec.model_base in classes), family


@each()
def test_computing_every_block_is_bit_identical_to_the_model(pack, bundles, family):
    model, positive, negative, latent = bundle(bundles, family)
    full = run_sampler(model, positive, negative, latent, steps=4, cfg=2.0)
    exact = patched(pack, model, interval=1)
    assert torch.equal(flat(run_sampler(exact, positive, negative, latent, steps=4, cfg=2.0)), flat(full))
    assert session_of(exact).last_report["blocks_skipped"] == 0


@each()
def test_a_fixed_policy_skips_every_block_of_the_steps_it_skips(pack, bundles, family, caplog):
    spec = SPECS[family]
    model, positive, negative, latent = bundle(bundles, family)
    full = run_sampler(model, positive, negative, latent, steps=8, cfg=2.0)
    cached_model = patched(pack, model)
    with caplog.at_level(logging.WARNING, logger="calibrated_cache"):
        cached = run_sampler(cached_model, positive, negative, latent, steps=8, cfg=2.0)
    session = session_of(cached_model)
    assert session.family.name == spec.pack_family and not session.family.fallback
    assert [r for r in caplog.records if r.name == "calibrated_cache"] == []  # no fallback, no block left uncached
    assert [(site.segment.attr, site.position) for site in session.blocks] == \
        [(attr, i) for attr, n in spec.block_lists.items() for i in range(n)]
    # interval 2 after one warm-up step: steps 2, 4 and 6 skip every block, for cond and uncond (batched)
    report = session.last_report
    assert report["blocks_skipped"] == 3 * 2 * len(session.blocks)
    assert report["blocks_computed"] == 5 * 2 * len(session.blocks)
    assert 0 < rel(cached, full) < 0.25


@each()
def test_a_lora_patch_applied_before_the_cache_still_applies(pack, bundles, family):
    model, positive, negative, latent = bundle(bundles, family)
    lora = model.clone()
    blocks = tuple(f"diffusion_model.{name}.0." for name, n in SPECS[family].block_lists.items() if n)
    key = next(k for k, v in lora.model.state_dict().items()
               if k.startswith(blocks) and k.endswith(".weight") and v.ndim == 2)  # a Linear's: what LoRAs patch
    lora.add_patches({key: (torch.randn_like(lora.model.state_dict()[key]) * 0.05,)}, 1.0)
    with_lora = run_sampler(lora, positive, negative, latent, steps=4, cfg=2.0)
    assert not torch.equal(flat(with_lora), flat(run_sampler(model, positive, negative, latent, steps=4, cfg=2.0)))
    exact = patched(pack, lora, interval=1)
    assert torch.equal(flat(run_sampler(exact, positive, negative, latent, steps=4, cfg=2.0)), flat(with_lora))


@each()
def test_spans_of_blocks_skipped_together_equal_caching_block_by_block(pack, bundles, family, monkeypatch):
    """Every new family chains its blocks, so spans apply; they hold one residual per span, so less memory."""
    model, positive, negative, latent = bundle(bundles, family)
    runs = []
    for one_by_one in (False, True):
        cached = patched(pack, model, forecaster="taylor", interval=3)
        assert session_of(cached).family.chained
        if one_by_one:
            cache_block_by_block(monkeypatch, cached)
        out = run_sampler(cached, positive, negative, latent, steps=8, cfg=2.0)
        runs.append((out, session_of(cached).last_report))
    (spans, spanned), (alone, single) = runs
    assert spanned["blocks_skipped"] == single["blocks_skipped"] > 0
    assert spanned["peak_cache_bytes"] < single["peak_cache_bytes"]
    assert rel(spans, alone) < 1e-5


@each(["LTX2"])
def test_ltx2_caches_video_and_audio_as_two_streams_of_their_own_lengths(pack, bundles, family):
    model, positive, negative, latent = bundle(bundles, family)
    full = run_sampler(model, positive, negative, latent, steps=8, cfg=2.0)
    cached_model = patched(pack, model)
    cached = run_sampler(cached_model, positive, negative, latent, steps=8, cfg=2.0)
    session = session_of(cached_model)
    assert session.last_report["blocks_skipped"] > 0
    # what each block gave the engine: the two streams by name, with their token counts
    layouts = {streams for _, streams in session._block_flops}
    (((video, video_tokens, _), (audio, audio_tokens, _)),) = layouts
    assert (video, audio) == ("video", "audio") and video_tokens != audio_tokens
    for out, reference in zip(parts(cached), parts(full)):  # both forecast on skipped steps, close to the full run
        assert 0 < rel(out, reference) < 0.25


@each(["LTX2"], off=["run_vx", "run_ax"])
def test_ltx2_with_one_modality_switched_off_leaves_it_as_the_full_run_does(pack, bundles, family, off):
    """run_vx/run_ax False: the blocks leave that stream untouched, so its residuals are zero and its output is the
    full run's, bit for bit, while the other stream is cached."""
    model, positive, negative, latent = bundle(bundles, family)
    switched = model.clone()
    switched.model_options.setdefault("transformer_options", {})[off] = False
    full = run_sampler(switched, positive, negative, latent, steps=8, cfg=2.0)
    exact = patched(pack, switched, interval=1)
    assert torch.equal(flat(run_sampler(exact, positive, negative, latent, steps=8, cfg=2.0)), flat(full))
    cached_model = patched(pack, switched)
    cached = run_sampler(cached_model, positive, negative, latent, steps=8, cfg=2.0)
    assert session_of(cached_model).last_report["blocks_skipped"] > 0
    (video, audio), (full_video, full_audio) = parts(cached), parts(full)
    kept, cached_part, reference = (video, audio, full_audio) if off == "run_vx" else (audio, video, full_video)
    assert torch.equal(kept, parts(full)[0 if off == "run_vx" else 1])
    assert 0 < rel(cached_part, reference) < 0.25


@each(["LTX2"])
def test_ltx2_sampled_without_audio_caches_the_video_alone(pack, bundles, family):
    """A plain video latent: the model's audio stream is empty, passes through, and the video is cached."""
    model, positive, negative, _ = bundle(bundles, family)
    video = torch.zeros(parts(SPECS[family].latent()["samples"])[0].shape)
    full = run_sampler(model, positive, negative, video, steps=8, cfg=2.0)
    assert torch.equal(run_sampler(patched(pack, model, interval=1), positive, negative, video, steps=8, cfg=2.0),
                       full)
    cached_model = patched(pack, model)
    cached = run_sampler(cached_model, positive, negative, video, steps=8, cfg=2.0)
    session = session_of(cached_model)
    assert session.last_report["blocks_skipped"] > 0 and not session.plain
    assert {tuple(k for k, *_ in streams) for _, streams in session._block_flops} == {("video",)}
    assert 0 < rel(cached, full) < 0.25


@each(["LTX2ImageToVideo"])
def test_ltx2_image_to_video_skips_blocks_and_keeps_the_image_frame(pack, bundles, family):
    """The image's latent frame has a timestep of zero, the others the step's: the cache keys on the step's σ and
    skips, and the image frame comes out as given (up to the latent format's scaling, as in the full run)."""
    model, positive, negative, latent = bundle(bundles, family)
    image = parts(latent["samples"])[0][:, :, :1]
    full = run_sampler(model, positive, negative, latent, steps=8, cfg=2.0)
    cached_model = patched(pack, model)
    cached = run_sampler(cached_model, positive, negative, latent, steps=8, cfg=2.0)
    assert session_of(cached_model).last_report["blocks_skipped"] > 0
    frame = parts(cached)[0][:, :, :1]
    assert torch.equal(frame, parts(full)[0][:, :, :1]) and torch.allclose(frame, image, rtol=0, atol=1e-5)
    assert 0 < rel(cached, full) < 0.25


def test_a_block_that_passes_no_stream_runs_plainly_and_the_log_says_so_once(pack, bundles, caplog):
    """A dit-replace call without an image or text tensor (a loop the pack does not know) is not a crash: the block
    runs as it is, once reported in the run's log."""
    from .test_nodes import bundle as older_bundle

    model, *_ = older_bundle(bundles, "Wan")
    cached_model = patched(pack, model)
    session = session_of(cached_model)
    patch = cached_model.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    x = torch.ones(1, 4, 8)
    session.call = object()  # inside a model call of a cached run
    try:
        with caplog.at_level(logging.WARNING, logger="calibrated_cache"):
            outs = [patch({"x": x, "transformer_options": {}}, {"original_block": lambda args: {"x": args["x"] * 2}})
                    for _ in range(2)]
    finally:
        session.call = None
    assert all(torch.equal(out["x"], 2 * x) for out in outs) and session.plain == {0}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["calibrated_cache: block 0 of Wan passed no stream the pack can cache (its arguments: x: "
                        "Tensor); such blocks run uncached in this run. Please report the model so it can be "
                        "supported."]


@each(["LTX2", "LTX2ImageToVideo"], target=[0.0, 2.0])
def test_fit_tcc_priors_on_ltx2s_video_and_audio_latent_fits_and_reports_its_held_out_error(
        pack, bundles, family, target, tmp_path, monkeypatch):
    """LTX-2 samples a nested latent (video and audio): the fit measures its error over both parts, and the priors
    it saves (with a searched plan, given a target) apply to the cached run."""
    import folder_paths

    from .test_priors import modelled_clock
    from .tiny_models import comfyui_nodes

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "cache_priors", ([str(tmp_path)], {".safetensors"}))
    fit_node = comfyui_nodes().NODE_CLASS_MAPPINGS["CalibratedCache_FitTCCPriors"]
    modelled_clock((*pack, fit_node), monkeypatch, outside=1e-6, per_flop=1e-12, whole=1e-6)  # not this host's noise
    model, positive, negative, latent = bundle(bundles, family)
    policy = pack[0].execute(**{**SETTINGS, "interval": 3}).result[0]
    priors, text = fit_node.execute(model, policy, positive, negative, latent, samples=2, seed=0, steps=9, cfg=2.0,
                                    sampler_name="euler", scheduler="simple", variant="drift", checkpoint="none",
                                    save_to="cache_priors folder", overwrite=False,
                                    target_speedup=target).result[:2]
    assert "held-out seeds 1: error against full computation" in text and list(tmp_path.glob("*.safetensors"))
    full = run_sampler(model, positive, negative, latent, steps=9, cfg=2.0)
    calibrated = run_sampler(pack[1].execute(model, policy, priors=priors).result[0], positive, negative, latent,
                             steps=9, cfg=2.0)
    assert [p.shape for p in parts(calibrated)] == [p.shape for p in parts(full)]
    assert 0 < rel(calibrated, full) < 0.25


@each()
def test_icc_routes_each_new_familys_block_linears_exact_at_full_rank_and_live_at_low_rank(
        pack, bundles, family, monkeypatch):
    """ICC on every 2026 family: its block Linears are routed (modulation ones left exact), at a rank above every
    layer's the increments are exact, and at rank 4 they are not, so the routing is live."""
    monkeypatch.setenv("CALIBRATED_CACHE_ICC_ANY_SIZE", "1")  # tiny blocks: proving wiring and accuracy, not speed
    model, positive, negative, latent = bundle(bundles, family)
    fora = pack[0].execute(**{**SETTINGS, "interval": 2, "warmup_steps": 0}).result[0]
    full = run_sampler(model, positive, negative, latent, steps=8, cfg=2.0)
    exact = pack[1].execute(model, fora, icc_rank=4096, icc_svd="plain").result[0]
    assert rel(run_sampler(exact, positive, negative, latent, steps=8, cfg=2.0), full) < 1e-4
    assert session_of(exact).last_report["blocks_skipped"] > 0
    factored = [key for (key, *_) in session_of(exact).factors._entries]
    assert factored and not any(re.search(r"(^|[._])(mod|modulation)(\.|$)", key.split("/", 1)[1]) for key in factored)
    low = pack[1].execute(model, fora, icc_rank=4, icc_svd="plain").result[0]
    assert rel(run_sampler(low, positive, negative, latent, steps=8, cfg=2.0), full) > 1e-4
