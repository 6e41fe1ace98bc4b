"""ComfyUI tier: the GOC Corrector node, chained Cache Policy → GOC Corrector → Fit TCC Priors → Apply Calibrated
Cache on a tiny real Wan model with a real sampler (skipped without COMFYUI_PATH)."""

import pytest
import torch

from .test_priors import FIT, SETTINGS, apply, modules, pack, rel_l2, session_of  # noqa: F401 (fixtures)
from .tiny_models import build_family, comfyui_nodes, run_sampler

FORA = {**SETTINGS, "forecaster": "reuse", "interval": 2}
# The tiny random model's residuals reverse direction at every computed step, so the default detector (threshold 0)
# drops every push; threshold -1 counts no turn as an inflection and keeps GOC at work.
GOC = dict(weight=0.8, inflection="auto", threshold=-1.0, steps="")


@pytest.fixture(scope="module")
def goc_node(pack):
    return comfyui_nodes().NODE_CLASS_MAPPINGS["CalibratedCache_GOC"]


@pytest.fixture(scope="module")
def wan():
    return build_family("Wan")


@pytest.fixture
def cache_priors(tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "cache_priors", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def policies(pack, goc_node, **goc):
    fora = pack[0].execute(**FORA).result[0]
    return fora, goc_node.execute(fora, **{**GOC, **goc}).result[0]


def test_goc_node_takes_and_returns_a_policy_and_names_bad_settings(goc_node):
    schema = goc_node.define_schema()
    assert schema.category == "sampling/calibrated cache" and schema.display_name == "GOC Corrector"
    assert [i.id for i in schema.inputs] == ["policy", "weight", "inflection", "threshold", "steps"]
    assert all(i.tooltip for i in schema.inputs) and [o.io_type for o in schema.outputs] == ["CACHE_POLICY"]
    assert goc_node.validate_inputs(**GOC) is True
    assert "needs the steps" in goc_node.validate_inputs(**{**GOC, "inflection": "manual"})
    assert "whole step numbers" in goc_node.validate_inputs(**{**GOC, "inflection": "manual", "steps": "9, x"})
    assert goc_node.validate_inputs(**{**GOC, "inflection": "manual", "steps": "17, 9"}) is True


def test_goc_on_a_forecasting_policy_is_refused_with_the_fix(pack, goc_node):
    taylor = pack[0].execute(**SETTINGS).result[0]
    with pytest.raises(ValueError, match="set the Cache Policy forecaster to reuse"):
        goc_node.execute(taylor, **GOC)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding: plain FORA sums the residuals of blocks skipped together (spans), GOC corrects each."""
    return torch.allclose(a, b, rtol=0.0, atol=1e-5 * b.abs().max().item())


def test_goc_changes_what_is_reused_and_each_run_starts_afresh(pack, goc_node, wan):
    model, positive, negative, latent = wan
    fora, goc = policies(pack, goc_node)
    assert goc.tag() == "FORA_N2_W1_GOC0.8t-1" and fora.goc is None
    plain = run_sampler(apply(pack, model, fora), positive, negative, latent, steps=9, cfg=2.0)
    patched = apply(pack, model, goc)
    first = run_sampler(patched, positive, negative, latent, steps=9, cfg=2.0)
    second = run_sampler(patched, positive, negative, latent, steps=9, cfg=2.0)
    assert not same(first, plain) and torch.equal(first, second)
    assert session_of(patched).last_report["policy"] == "FORA_N2_W1_G2_GOC0.8t-1"
    # Dropping the push at every step is plain FORA; pushing at every step is not what "auto" does.
    everywhere = policies(pack, goc_node, inflection="manual", steps=", ".join(map(str, range(9))))[1]
    assert same(run_sampler(apply(pack, model, everywhere), positive, negative, latent, steps=9, cfg=2.0), plain)
    off = run_sampler(apply(pack, model, policies(pack, goc_node, inflection="off")[1]), positive, negative, latent,
                      steps=9, cfg=2.0)
    assert not torch.equal(off, first) and not same(off, plain)
    detected = run_sampler(apply(pack, model, policies(pack, goc_node, threshold=0.0)[1]), positive, negative, latent,
                           steps=9, cfg=2.0)
    assert same(detected, plain)  # every turn here is a reversal (see GOC above)


def test_policy_goc_fit_and_apply_chained_lower_the_error_of_goc_alone(pack, goc_node, wan, cache_priors):
    model, positive, negative, latent = wan
    fora, goc = policies(pack, goc_node)
    priors, report = pack[2].execute(model, goc, positive, negative, {"samples": latent}, **FIT).result
    assert priors.meta["policy_tag"] == "FORA_N2_W1_G2_GOC0.8t-1" and "GOC0.8t-1" in priors.path
    goc_meta = priors.meta["policy"]["goc"]
    assert goc_meta["weight"] == 0.8 and goc_meta["inflection"] == "auto" and goc_meta["threshold"] == -1.0
    assert list(goc_meta["steps"]) == []
    numbers = priors.meta["report"]
    assert numbers["held_out_after"] < numbers["held_out_before"], report
    held_out = priors.meta["held_out_seeds"][0]  # measured on a seed the priors were not fitted on
    full = run_sampler(model, positive, negative, latent, steps=9, cfg=2.0, seed=held_out)
    goc_only = run_sampler(apply(pack, model, goc), positive, negative, latent, steps=9, cfg=2.0, seed=held_out)
    both = run_sampler(apply(pack, model, goc, priors=priors), positive, negative, latent, steps=9, cfg=2.0,
                       seed=held_out)
    assert rel_l2(both, full) < rel_l2(goc_only, full)
    with pytest.raises(ValueError, match="fitted for cache policy FORA_N2_W1_G2_GOC0.8t-1; this run uses FORA_N2_W1_G2"):
        apply(pack, model, fora, priors=priors)
