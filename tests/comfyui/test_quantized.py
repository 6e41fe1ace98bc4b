"""ComfyUI tier: ICC and prior files on quantized checkpoints and across ComfyUI versions.

A tiny HunyuanVideo saved as a scaled-fp8 checkpoint is loaded as UNETLoader loads it: ComfyUI 0.8 makes its Linears
mixed-precision ones holding quantized weights (not `nn.Linear`), earlier versions scaled-fp8 `nn.Linear`s; ICC must
route and factor them either way. Prior files fitted on ComfyUI 0.3.64 (fixtures/, written by
fixtures/fit_on_comfyui_0364.py) are accepted for the same weights, and refused with the fix where this ComfyUI loads
the checkpoint into other tensors. Flux 2's gated MLP layout is factored per part where this ComfyUI has Flux 2.
"""

import os

import pytest
import safetensors
import torch

from .quantized import (FAMILY, FIXTURE_COMFYUI, FIXTURE_POLICY, KINDS, fixture_path, inputs, load,
                        save_checkpoint)
from .test_priors import apply, fit, folders, modules, pack, rel_l2, session_of  # noqa: F401
from .tiny_models import build_family, run_sampler
from .tiny_models_2026 import available, build

FLUX_FAMILIES = ["Flux"] + [name for name in ("Flux2",) if name in available()]
# Per family: the parts of a single block's linear1 (q, k, v, then the MLP input: one part, or Flux 2's gate and up)
# and of a double block's first MLP Linear, from the tiny models' widths (Flux: 256 wide, MLP 4x; Flux 2: 128, 3x).
FUSED_PARTS = {"Flux": ((256, 256, 256, 1024), (1024,)), "Flux2": ((128, 128, 128, 384, 384), (384, 384))}


@pytest.fixture(autouse=True)
def icc_any_size(monkeypatch):
    """The tiny models' blocks are too small for ICC to pay off, which the pack refuses; these tests prove wiring and
    accuracy, so they run it anyway, as a study would."""
    monkeypatch.setenv("CALIBRATED_CACHE_ICC_ANY_SIZE", "1")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("checkpoints"))
    return {kind: save_checkpoint(folder, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def fp8(checkpoints):
    return load(checkpoints["fp8_scaled"])


def policy(pack):
    return pack[0].execute(**FIXTURE_POLICY).result[0]


def sample(model, steps: int = 8):
    positive, negative, latent = inputs()
    return run_sampler(model, positive, negative, latent, steps=steps, seed=3)


def block_linears_in(path: str) -> set[str]:
    """The Linears of the checkpoint's double and single blocks, by name: each fp8 weight has its scale."""
    with safetensors.safe_open(path, "pt") as f:
        return {key[:-len(".scale_weight")] for key in f.keys()
                if key.endswith(".scale_weight") and key.startswith(("double_blocks.", "single_blocks."))}


def routed(model) -> set[str]:
    """The Linears whose forward the pack patched, by their path in the diffusion model."""
    prefix = "diffusion_model."
    return {key[len(prefix):-len(".forward")] for key in model.object_patches if key.endswith(".forward")}


def factorised(model, monkeypatch) -> dict[str, tuple[int, ...]]:
    """Filled while `model` (patched with ICC) samples: each Linear ICC factorises, by its key, with the sizes of the
    output parts it factors separately."""
    seen: dict[str, tuple[int, ...]] = {}
    cache = session_of(model).factors
    factors = cache.factors

    def spy(layer, like, settings):
        made = factors(layer, like, settings)
        seen[layer.key] = tuple(a.shape[0] for a in made.a)
        return made

    monkeypatch.setattr(cache, "factors", spy)
    return seen


def fitted_on(path: str) -> str:
    """The ComfyUI a prior file records it was fitted on, read from its raw metadata."""
    with safetensors.safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("comfyui_version", "")


def test_icc_routes_every_block_linear_of_a_scaled_fp8_checkpoint_and_beats_reuse(pack, checkpoints, fp8,
                                                                                  monkeypatch):
    """Whatever Linears this ComfyUI loads the file into (0.8: quantized mixed-precision ones, not nn.Linear), ICC
    routes all of them and factorises their dequantised weights: exact at full rank, closer than reuse at rank 16."""
    full = sample(fp8)
    reuse = apply(pack, fp8, policy(pack))
    exact = apply(pack, fp8, policy(pack), icc_rank=4096, icc_svd="plain")
    low = apply(pack, fp8, policy(pack), icc_rank=16, icc_svd="plain")
    factors = factorised(low, monkeypatch)
    assert routed(low) == block_linears_in(checkpoints["fp8_scaled"]) and len(routed(low)) == 26
    assert rel_l2(sample(exact), full) < 1e-4
    error, reuse_error = rel_l2(sample(low), full), rel_l2(sample(reuse), full)
    assert 0 < error < 0.8 * reuse_error, (error, reuse_error)
    report = session_of(low).last_report
    assert report["blocks_skipped"] > 0 and report["compute_fraction"] < 1.0
    assert len(factors) == 20 and not any(key.endswith(("mod.lin", "modulation.lin")) for key in factors)
    assert factors["0/img_attn.qkv"] == (128,) * 3 and factors["2/linear1"] == (128, 128, 128, 512)


def test_a_prior_file_fitted_on_a_scaled_fp8_checkpoint_holds_its_linears_and_loads_again(pack, folders, checkpoints,
                                                                                            fp8, modules):
    fitted = fit(pack, (fp8, *inputs()), policy(pack), samples=2, steps=6).result[0]
    assert len(fitted.channels) == 20 and "0/img_attn.qkv" in fitted.channels and "2/linear1" in fitted.channels
    assert fitted_on(fitted.path) == modules["fitted"].comfyui_version() != ""  # the file names this ComfyUI
    again = load(checkpoints["fp8_scaled"])  # a fresh load of the file, as the next session's UNETLoader
    name = os.path.basename(fitted.path)
    calibrated = apply(pack, again, policy(pack), prior_file=name)
    aware = apply(pack, again, policy(pack), prior_file=name, icc_rank=16)
    full, plain = sample(again, 6), sample(apply(pack, again, policy(pack)), 6)
    assert session_of(calibrated).prior_check.startswith("family, architecture, weights")
    assert not torch.equal(sample(calibrated, 6), plain)  # the priors apply
    assert session_of(calibrated).last_report["priors"] == name
    assert 0 < rel_l2(sample(aware, 6), full) < rel_l2(plain, full)  # channel-aware ICC with the file's statistics


def test_a_prior_file_fitted_on_comfyui_0364_for_a_bf16_checkpoint_is_accepted_for_the_same_weights(pack, checkpoints,
                                                                                                     modules):
    fixture = modules["fitted"].load(fixture_path("bf16"))
    assert fitted_on(fixture.path) == FIXTURE_COMFYUI and fixture.meta["model"]["family"] == FAMILY
    model = load(checkpoints["bf16"])
    calibrated = apply(pack, model, policy(pack), priors=fixture)
    assert session_of(calibrated).prior_check.startswith("family, architecture, weights")
    plain = sample(apply(pack, model, policy(pack)), 6)
    assert not torch.equal(sample(calibrated, 6), plain)
    assert session_of(calibrated).last_report["priors"] == os.path.basename(fixture.path)


def test_a_scaled_fp8_prior_file_from_comfyui_0364_says_refit_on_this_comfyui_where_the_file_loads_otherwise(pack, fp8,
                                                                                                            modules):
    """ComfyUI 0.8 loads scaled-fp8 files into quantized tensors under other names, so the model's identity differs
    from the one 0.3.64 fitted: the file says to refit on this ComfyUI. Where this ComfyUI loads the file as 0.3.64 did
    (its scaled-fp8 Linears, each with its `scale_weight`), the same file is accepted."""
    fixture = modules["fitted"].load(fixture_path("fp8_scaled"))
    assert fitted_on(fixture.path) == FIXTURE_COMFYUI
    qkv = fp8.get_model_object("diffusion_model").double_blocks[0].img_attn.qkv
    if hasattr(qkv, "scale_weight"):  # loaded as 0.3.64 loads it
        calibrated = apply(pack, fp8, policy(pack), priors=fixture)
        assert session_of(calibrated).prior_check.startswith("family, architecture, weights")
        return
    with pytest.raises(ValueError, match=r"fitted on ComfyUI 0\.3\.64 .*differs in architecture, weights\)\. This is "
                                         r"ComfyUI \S+, .*refit on this ComfyUI with Fit TCC Priors"):
        apply(pack, fp8, policy(pack), priors=fixture)


@pytest.mark.parametrize("family", FLUX_FAMILIES)
def test_flux_fused_linears_are_factored_per_part_in_each_mlp_layout_and_full_rank_icc_is_exact(pack, family,
                                                                                               monkeypatch):
    """Flux's single-block linear1 is q, k, v and the MLP input; Flux 2's gated MLP puts a gate and an up part there,
    and its double blocks' first MLP Linear is gate and up too: each part gets its own factors."""
    bundle = build_family(family) if family == "Flux" else build(family)
    model, positive, negative, latent = bundle
    run = lambda m: run_sampler(m, positive, negative, latent, steps=6, seed=3)  # noqa: E731
    full = run(model)
    exact = apply(pack, model, policy(pack), icc_rank=4096, icc_svd="plain")
    parts = factorised(exact, monkeypatch)
    assert rel_l2(run(exact), full) < 1e-4
    linear1, mlp_in = FUSED_PARTS[family]
    assert parts["2/linear1"] == linear1 and parts["0/img_mlp.0"] == parts["0/txt_mlp.0"] == mlp_in
    assert rel_l2(run(apply(pack, model, policy(pack), icc_rank=4, icc_svd="plain")), full) > 1e-4
