"""Bad prior files get a clear message naming the fix, never a traceback from deep inside and never executed code."""

import json

import pytest
import torch

from calibrated_cache.calibration.calibrator import Reused, Site
from calibrated_cache.calibration.tcc import site_key
from calibrated_cache.priors import PriorFileError, load_priors, read_metadata
from calibrated_cache.priors.card import prior_card
from calibrated_cache.priors.report import summarize

from prior_cases import CASES, CHANNELS, MARKER, valid_file


def test_the_valid_file_loads_with_typed_metadata_and_every_tensor(tmp_path):
    prior = load_priors(valid_file(tmp_path / "p.tcc.safetensors"))
    assert len(prior.priors.priors) == 8 and set(prior.channels) == {"0/qkv", "1/qkv"}
    assert prior.meta["steps"] == 4 and prior.meta["cfg"] == 2.0 and prior.meta["samples"] == 1
    assert prior.meta["format_version"] == "2" and prior.meta["sigmas"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    p = prior.priors.priors[("cond", 1, 0, "attn")]
    assert p.a.dtype == torch.float32 and p.a.shape == (CHANNELS,) and (p.sigma, p.anchor_sigma) == (0.75, 1.0)
    assert prior_card(prior.meta)["error_after"] == 0.04 and "2 Linears" in summarize(prior)


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_a_bad_prior_file_is_refused_with_a_message_naming_it_and_the_fix(case, tmp_path):
    path = case.make(tmp_path)
    with pytest.raises(PriorFileError, match=case.message) as err:
        load_priors(path)
    message = str(err.value)
    assert path.name in message
    assert any(fix in message for fix in ("refit", "fit the priors", "copy", "Refit")), message
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("case", [c for c in CASES if "tensor" not in c.label and "site" not in c.label
                                  and "ICC statistics" not in c.label and "no priors" not in c.label],
                         ids=lambda c: c.label)
def test_the_header_reader_refuses_the_same_metadata_the_loader_refuses(case, tmp_path):
    """The graph editor's prior card reads only the header; it must not show what loading would refuse."""
    with pytest.raises(PriorFileError, match=case.message):
        read_metadata(case.make(tmp_path))


def test_metadata_fields_this_version_does_not_know_are_dropped_not_passed_on(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = valid_file(tmp_path / "good.tcc.safetensors")
    with safe_open(str(good), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    save_file(tensors, str(tmp_path / "extra.tcc.safetensors"), metadata={**meta, "__init__": "os.system('x')"})
    assert "__init__" not in load_priors(tmp_path / "extra.tcc.safetensors").meta


def test_a_prior_for_another_width_is_refused_when_it_meets_the_model(tmp_path):
    priors = load_priors(valid_file(tmp_path / "p.tcc.safetensors")).priors
    site = Site("cond", 1, 0.75, 1.0, 1, 0, "attn", 1)
    assert site_key(site) in priors.priors
    value = torch.zeros(1, 4, CHANNELS * 2)
    with pytest.raises(ValueError, match="8 channels but the model's value has 16: the priors belong to another "
                                         "model; choose priors fitted for it, or refit"):
        priors.calibrate([site], Reused(value, lambda: None, None))


def test_a_wall_clock_fits_timing_round_trips_and_a_malformed_one_is_refused(tmp_path):
    """The device a wall-clock target was timed on travels with the file; a timing entry that is not the pack's is
    refused rather than trusted (a run compares devices and speedups from it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = valid_file(tmp_path / "good.tcc.safetensors")
    with safe_open(str(good), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    timing = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "predicted_speedup": 4.1,
              "measured_speedup": 3.8, "full_step_s": 0.012}
    save_file(tensors, str(tmp_path / "timed.tcc.safetensors"), metadata={**meta, "timing": json.dumps(timing)})
    assert load_priors(tmp_path / "timed.tcc.safetensors").meta["timing"] == timing
    for bad in ({**timing, "device": ""}, {**timing, "predicted_speedup": "fast"}, {**timing, "host": "x"}):
        save_file(tensors, str(tmp_path / "bad.tcc.safetensors"), metadata={**meta, "timing": json.dumps(bad)})
        with pytest.raises(PriorFileError, match="metadata field 'timing'"):
            load_priors(tmp_path / "bad.tcc.safetensors")
