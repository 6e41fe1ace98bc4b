"""ComfyUI tier: ICC in Apply Calibrated Cache and Fit TCC Priors on a tiny real Flux, in float32 and with fp8
weights (ComfyUI's casting Linears), with a real sampler (skipped without COMFYUI_PATH)."""

import pytest
import torch

from .test_priors import FIT, SETTINGS, apply, fit, folders, modules, pack, rel_l2, session_of  # noqa: F401
from .tiny_models import SPECS, build_family, run_sampler

FORA = {**SETTINGS, "forecaster": "reuse", "interval": 2, "warmup_steps": 0}
WIDTH = 256  # the tiny Flux's hidden size: ICC at this rank is exact on every Linear
QKV = "diffusion_model.double_blocks.0.img_attn.qkv.weight"


@pytest.fixture(autouse=True)
def icc_any_size(monkeypatch):
    """The tiny models' blocks are too small for ICC to pay off, which the pack refuses; these tests prove wiring and
    accuracy, so they run it anyway, as a study would."""
    monkeypatch.setenv("CALIBRATED_CACHE_ICC_ANY_SIZE", "1")


@pytest.fixture(scope="module")
def flux():
    return build_family("Flux")


@pytest.fixture(scope="module")
def flux_fp8(flux):
    """The tiny Flux with fp8_e4m3fn weights computing in float32, as ComfyUI builds it for UNETLoader's
    weight_dtype fp8_e4m3fn (its manual-cast Linears)."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(SPECS["Flux"].unet_config))
    config.set_inference_dtype(torch.float8_e4m3fn, torch.float32)
    base = config.get_model({})
    base.diffusion_model.load_state_dict(flux[0].model.diffusion_model.state_dict())
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    return (model, *flux[1:])


def sample(model, bundle, steps: int = 8):
    _, positive, negative, latent = bundle
    return run_sampler(model, positive, negative, latent, steps=steps, seed=3)


def fora(pack):
    return pack[0].execute(**FORA).result[0]


def test_apply_offers_icc_rank_and_svd_and_refuses_what_cannot_work_with_the_fix(pack, flux):
    names = [i.id for i in pack[1].define_schema().inputs]
    assert names[-4:-2] == ["icc_rank", "icc_svd"]
    with pytest.raises(ValueError, match="set icc_svd to plain"):
        apply(pack, flux[0], fora(pack), icc_rank=16)
    with pytest.raises(ValueError, match=r"reuse \(FORA\) policy"):
        apply(pack, flux[0], pack[0].execute(**SETTINGS).result[0], icc_rank=16, icc_svd="plain")


def test_full_rank_icc_on_flux_is_full_computation_and_low_rank_beats_fora(pack, flux):
    model = flux[0]
    full = sample(model, flux)
    exact = apply(pack, model, fora(pack), icc_rank=WIDTH, icc_svd="plain")
    assert rel_l2(sample(exact, flux), full) < 1e-4
    report = session_of(exact).last_report
    assert report["blocks_skipped"] > 0 and report["compute_fraction"] > 1.0  # full rank costs more: said so
    reuse = rel_l2(sample(apply(pack, model, fora(pack)), flux), full)
    low = apply(pack, model, fora(pack), icc_rank=16, icc_svd="plain")
    error = rel_l2(sample(low, flux), full)
    assert 0 < error < reuse
    assert session_of(low).last_report["compute_fraction"] < 1.0
    assert torch.equal(sample(model, flux), full)  # the input model is untouched


def test_an_icc_run_reports_the_same_compute_fraction_whatever_the_node_ran_before(pack, flux):
    """The model's plain cost is measured on a session's first call: ICC's factorisation and projections during that
    call must not enter it (a queue reusing the node reported other fractions than the same prompt alone)."""
    before = apply(pack, flux[0], fora(pack), icc_rank=16, icc_svd="plain")
    sample(before, flux, steps=4)
    sample(before, flux, steps=8)
    fresh = apply(pack, flux[0], fora(pack), icc_rank=16, icc_svd="plain")
    sample(fresh, flux, steps=8)
    after, alone = session_of(before).last_report, session_of(fresh).last_report
    assert after["compute_fraction"] == pytest.approx(alone["compute_fraction"], rel=1e-9)
    assert after["compute_fraction"] < 1.0


def test_icc_on_blocks_too_small_to_pay_off_is_refused_with_the_fix(pack, flux, monkeypatch):
    """A 4×4-token latent gives blocks where ICC was measured slower than computing them; the run stops with the fix
    before sampling, and runs (for studies) with the override."""
    model, positive, negative, _ = flux
    monkeypatch.delenv("CALIBRATED_CACHE_ICC_ANY_SIZE")
    small = torch.zeros(1, 16, 8, 8)
    low = apply(pack, model, fora(pack), icc_rank=16, icc_svd="plain")
    with pytest.raises(ValueError, match="ICC would run slower than full computation here.*Set icc_rank to 0"):
        run_sampler(low, positive, negative, small, steps=4)
    monkeypatch.setenv("CALIBRATED_CACHE_ICC_ANY_SIZE", "1")
    assert run_sampler(low, positive, negative, small, steps=4).isfinite().all()
    assert session_of(low).last_report["blocks_skipped"] > 0


def test_icc_on_an_fp8_weight_flux_factorises_the_dequantised_weights(pack, flux_fp8):
    model = flux_fp8[0]
    qkv = model.get_model_object("diffusion_model").double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.comfy_cast_weights
    full = sample(model, flux_fp8)
    exact = apply(pack, model, fora(pack), icc_rank=WIDTH, icc_svd="plain")
    assert rel_l2(sample(exact, flux_fp8), full) < 1e-4
    low = apply(pack, model, fora(pack), icc_rank=16, icc_svd="plain")
    reuse = rel_l2(sample(apply(pack, model, fora(pack)), flux_fp8), full)
    assert 0 < rel_l2(sample(low, flux_fp8), full) < reuse


def test_a_lora_patched_weight_is_refactorised_and_an_unchanged_one_is_not(pack, flux):
    original = flux[0].get_model_object("diffusion_model").double_blocks[0].img_attn.qkv.weight.detach().clone()
    model = apply(pack, flux[0], fora(pack), icc_rank=16, icc_svd="plain")
    sample(model, flux, steps=4)
    factors = session_of(model).factors
    first = factors.factorized
    assert first > 0
    sample(model, flux, steps=4)
    assert factors.factorized == first  # the next queue item reuses them
    patched = model.clone()
    generator = torch.Generator().manual_seed(5)
    delta = 0.05 * torch.randn(3 * WIDTH, 4, generator=generator) @ torch.randn(4, WIDTH, generator=generator)
    patched.add_patches({QKV: (delta,)}, 1.0)
    sample(patched, flux, steps=4)
    assert factors.factorized == first + 1  # only the patched Linear
    (a, b), *_ = next(v for (key, settings, *_), v in factors._entries.items()  # q's: rank 16 of the patched weight
                      if key == "0/img_attn.qkv" and settings.rank == 16)[1]
    expected = torch.linalg.svdvals((original + delta)[:WIDTH])[:16]
    got = torch.linalg.svdvals(torch.from_numpy(a @ b))[:16]
    assert torch.allclose(got, expected, rtol=1e-4)


def test_fit_records_channel_statistics_and_channel_aware_icc_uses_them_with_or_without_tcc(pack, flux, folders):
    model = flux[0]
    full = sample(model, flux)
    fitted = fit(pack, flux, fora(pack)).result[0]
    assert fitted.channels and "0/img_attn.qkv" in fitted.channels and "0/img_mod.lin" not in fitted.channels
    assert fitted.meta["icc_stats"]["source"] == "delta_mag"
    path = fitted.path
    aware = apply(pack, model, fora(pack), prior_file=path.rsplit("/", 1)[-1], icc_rank=16)
    assert session_of(aware).priors is None  # priors fitted without ICC: only their statistics are used
    alone = sample(aware, flux)
    assert 0 < rel_l2(alone, full) < rel_l2(sample(apply(pack, model, fora(pack)), flux), full)
    with_tcc = fit(pack, flux, fora(pack), icc_rank=16, overwrite=True).result[0]
    assert with_tcc.meta["policy_tag"].endswith("_ICC16")
    both = apply(pack, model, fora(pack), priors=with_tcc, icc_rank=16)
    assert session_of(both).priors.calibrator() is not None
    assert not torch.equal(sample(both, flux), alone)  # the priors fitted on ICC's output are applied


def test_icc_leaves_the_measured_block_cost_alone_so_its_compute_fraction_is_honest(pack, flux):
    reuse = apply(pack, flux[0], fora(pack))
    icc = apply(pack, flux[0], fora(pack), icc_rank=16, icc_svd="plain")
    sample(reuse, flux)
    sample(icc, flux)
    assert session_of(icc)._block_flops == session_of(reuse)._block_flops  # factorising and projecting not counted
    fraction = session_of(icc).last_report["compute_fraction"]
    assert session_of(reuse).last_report["compute_fraction"] < fraction < 1.0


@pytest.mark.parametrize("family", ["SD3", "Wan", "HunyuanVideo", "PixArt", "Lumina2", "QwenImage", "StableAudio"])
def test_every_family_routes_its_block_linears_and_full_rank_icc_is_full_computation(pack, family):
    """Each family's Linears are routed (modulation ones left exact) and its fused projections factored per part
    (qkv and Stable Audio's to_qkv in three, HunyuanVideo's single-block linear1 in four); at a rank above every layer's the increments are
    exact, and at rank 4 they are not, so the routing is live."""
    bundle = build_family(family)
    model = bundle[0]
    full = sample(model, bundle)
    exact = apply(pack, model, fora(pack), icc_rank=4096, icc_svd="plain")
    assert rel_l2(sample(exact, bundle), full) < 1e-4
    report = session_of(exact).last_report
    assert report["blocks_skipped"] > 0
    factors = {key: f for (key, *_), (_, f) in session_of(exact).factors._entries.items()}
    assert factors and not any(key.endswith(("mod.lin", "modulation.lin", "adaLN_modulation.1")) for key in factors)
    for key, f in factors.items():
        assert len(f) == {"qkv": 3, "to_qkv": 3, "linear1": 4}.get(key.rsplit(".", 1)[-1].rsplit("/", 1)[-1], 1), key
        if family == "Lumina2" and key.endswith("qkv"):  # 2 query heads, 1 key/value head: q is twice k and v
            q, k, v = (a.shape[0] for a, _ in f)
            assert q == 2 * k == 2 * v, key
    low = apply(pack, model, fora(pack), icc_rank=4, icc_svd="plain")
    assert rel_l2(sample(low, bundle), full) > 1e-4  # the increments really are low-rank, so the routing is live
