"""Smoke tests of the tiny ComfyUI model fixtures: every family samples, deterministically, with the expected blocks."""

import dataclasses
import json
import os
import time

import pytest
import torch

import tiny_models

FAMILY_NAMES = list(tiny_models.FAMILIES)
_TIMINGS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _report_timings():
    yield
    if _TIMINGS:
        lines = [f"{name:14s} {t['cfg2_s']:.3f} s (6-step euler/simple, cfg 2), cfg 1: {t['cfg1_s']:.3f} s"
                 for name, t in _TIMINGS.items()]
        print("\ntiny model wall times (CPU):\n  " + "\n  ".join(lines))
        out = os.environ.get("TINY_TIMINGS_JSON")
        if out:
            with open(out, "w", encoding="utf-8") as f:
                json.dump(_TIMINGS, f, indent=2)


def test_families_cover_brief():
    assert set(FAMILY_NAMES) == {"SD3", "Wan", "HunyuanVideo", "Flux", "PixArt", "Lumina2", "QwenImage",
                                 "Chroma", "AuraFlow", "LTXV", "Wan22", "WanVace", "WanCamera", "WanHuMo",
                                 "WanAnimate", "WanS2V", "ChromaRadiance", "Hunyuan3D2", "Hunyuan3D21", "OmniGen2",
                                 "ACEStep", "HiDream", "CosmosPredict2", "HunyuanImage21", "HunyuanImage21Refiner",
                                 "HunyuanDiT", "StableAudio", "Mochi"}
    assert set(tiny_models.SPECS) == set(FAMILY_NAMES)


def test_a_field_a_later_comfyui_requires_goes_only_to_the_classes_that_declare_it():
    """One tiny config serves every ComfyUI version: what the installed params dataclass declares decides."""

    @dataclasses.dataclass
    class Older:
        in_channels: int

    @dataclasses.dataclass
    class Later:
        in_channels: int
        txt_ids_dims: list

    assert tiny_models.with_declared_fields(Older, {"in_channels": 16}) == {"in_channels": 16}
    assert tiny_models.with_declared_fields(Later, {"in_channels": 16}) == {"in_channels": 16, "txt_ids_dims": []}
    assert tiny_models.with_declared_fields(Later, {"in_channels": 16, "txt_ids_dims": [3]})["txt_ids_dims"] == [3]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_samples(name, tiny_bundle, record_property):
    spec = tiny_models.SPECS[name]
    model_patcher, positive, negative, latent = tiny_bundle(name)

    # Built through the intended path, with the intended architecture and block counts.
    model = model_patcher.model
    assert type(model.model_config).__name__ == spec.detected_as
    dm = model.diffusion_model
    assert type(dm).__name__ == spec.model_class
    for attr, n in spec.block_lists.items():
        assert len(dm.get_submodule(attr)) == n, attr
    assert model.get_dtype() == torch.float32
    assert all(torch.isfinite(p).all() for p in dm.parameters())
    assert all(torch.isfinite(b).all() for b in dm.buffers() if b.is_floating_point())

    # Conditioning widths.
    ctx, extra = positive[0]
    assert tuple(ctx.shape) == spec.context_shape
    assert negative[0][0].shape == ctx.shape and not negative[0][0].any()
    for key, value in spec.cond_extras.items():
        assert key in extra
        if isinstance(value, int) and not isinstance(value, bool):
            assert tuple(extra[key].shape) == (1, value)
    assert tuple(latent.shape) == spec.latent_shape
    out_shape = tiny_models.sampled_shape(model_patcher, spec.latent_shape)

    t0 = time.perf_counter()
    out = tiny_models.run_sampler(model_patcher, positive, negative, latent, steps=6, cfg=2.0)
    cfg2_s = time.perf_counter() - t0
    assert tuple(out.shape) == out_shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 0

    again = tiny_models.run_sampler(model_patcher, positive, negative, latent, steps=6, cfg=2.0)
    assert torch.equal(out, again), "a second identical run is not bit-identical"

    if name in tiny_models.BATCHED_CFG_ONLY:
        return
    t0 = time.perf_counter()
    out1 = tiny_models.run_sampler(model_patcher, positive, negative, latent, steps=6, cfg=1.0)
    cfg1_s = time.perf_counter() - t0
    assert tuple(out1.shape) == out_shape
    assert torch.isfinite(out1).all()
    assert not torch.equal(out1, out), "cfg 1 and cfg 2 gave the same latent: the negative has no effect"
    assert torch.equal(out1, tiny_models.run_sampler(model_patcher, positive, negative, latent, steps=6, cfg=1.0))

    # Partial schedule (KSamplerAdvanced style) runs and differs from the full one.
    part = tiny_models.run_sampler(model_patcher, positive, negative, latent, steps=6, cfg=2.0, start_step=0,
                                   last_step=3)
    assert tuple(part.shape) == out_shape and torch.isfinite(part).all()
    assert not torch.equal(part, out)

    record_property("cfg2_wall_s", cfg2_s)
    record_property("cfg1_wall_s", cfg1_s)
    _TIMINGS[name] = {"cfg2_s": round(cfg2_s, 4), "cfg1_s": round(cfg1_s, 4),
                      "params": sum(p.numel() for p in dm.parameters())}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_block_matters(name, tiny, tiny_models_dir):
    """Zeroing a block's weights (about the same as skipping it) visibly changes the sampled latent."""
    spec = tiny.SPECS[name]
    model_patcher, positive, negative, latent = tiny.build_family(name, tiny_models_dir)  # private copy: mutated
    dm = model_patcher.model.diffusion_model
    ref = tiny.run_sampler(model_patcher, positive, negative, latent, steps=3, cfg=2.0)
    for attr in spec.block_lists:
        block = dm.get_submodule(attr)[-1]
        saved = {k: v.clone() for k, v in block.state_dict().items()}
        with torch.no_grad():
            for p in block.parameters():
                p.zero_()
        skipped = tiny.run_sampler(model_patcher, positive, negative, latent, steps=3, cfg=2.0)
        block.load_state_dict(saved)
        rel = ((skipped - ref).norm() / ref.norm()).item()
        assert rel > 1e-2, f"{attr}[-1] barely matters (relative change {rel:.2e})"
    assert torch.equal(ref, tiny.run_sampler(model_patcher, positive, negative, latent, steps=3, cfg=2.0))
