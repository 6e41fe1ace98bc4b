import json
import os

import pytest
import torch
from safetensors.torch import save_file

from calibrated_cache.calibration import CachePolicy
from calibrated_cache.cli import main
from calibrated_cache.priors import (PriorFileError, PriorMismatch, check_model, check_policy, check_schedule,
                                     load_priors, read_metadata, run_warnings, save_priors)
from calibrated_cache.priors import format as prior_format
from calibrated_cache.testbed import sampling
from calibrated_cache.testbed.evaluate import bench_inputs
from calibrated_cache.testbed.fit_priors import fit_testbed, dit_fingerprint
from calibrated_cache.testbed.sampling import flow_sigmas, sample
from calibrated_cache.testbed.weights import load_dit

FORA = CachePolicy(interval=3, warmup_steps=0)


@pytest.fixture(scope="module")
def fitted():
    model = load_dit()[0]
    priors, meta = fit_testbed(model, FORA, 8, 12, 2.0)
    return model, priors, meta


@pytest.fixture
def saved(fitted, tmp_path):
    _, priors, meta = fitted
    return save_priors(tmp_path / "dit.FORA_N3_W0.tcc.safetensors", priors, meta)


def test_prior_file_round_trip_keeps_every_site_and_the_provenance(fitted, saved):
    model, priors, meta = fitted
    loaded = load_priors(saved)
    assert loaded.priors.priors.keys() == priors.priors.keys() and loaded.priors.variant == "drift"
    for key, p in priors.priors.items():
        q = loaded.priors.priors[key]
        assert torch.equal(p.a, q.a) and torch.equal(p.g, q.g) and torch.equal(p.b, q.b)
        assert (p.sigma, p.anchor_sigma, p.stale_steps) == (q.sigma, q.anchor_sigma, q.stale_steps)
    for field in ("format_version", "method", "model", "policy", "policy_tag", "sampler", "scheduler", "steps",
                  "sigmas", "cfg", "samples", "pack_version", "created"):
        assert field in loaded.meta
    assert loaded.meta["model"]["weights"] == dit_fingerprint(model)["weights"]
    assert loaded.meta["sigmas"] == pytest.approx(flow_sigmas(12).tolist())
    labels, noise = bench_inputs(model, 4, 0)
    a, _ = sample(model, labels, noise, 12, 2.0, policy=FORA, calibrator=priors)
    b, _ = sample(model, labels, noise, 12, 2.0, policy=FORA, calibrator=loaded.priors)
    assert torch.equal(a, b)


def test_a_truncated_file_is_refused_with_a_clear_message(saved, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(PriorFileError, match="truncated"):
        load_priors(cut)
    cut.write_bytes(saved.read_bytes()[:5])
    with pytest.raises(PriorFileError, match="truncated"):
        read_metadata(cut)


def test_wrong_shape_tensors_are_refused_naming_the_site(saved, tmp_path):
    meta = {k: v for k, v in read_metadata_raw(saved).items()}
    bad = tmp_path / "bad.safetensors"
    save_file({"tcc/cond/1/0/attn/a": torch.ones(4), "tcc/cond/1/0/attn/g": torch.ones(3),
               "tcc/cond/1/0/attn/b": torch.ones(4), "tcc/cond/1/0/attn/info": torch.ones(5, dtype=torch.float64)},
              str(bad), metadata=meta)
    with pytest.raises(PriorFileError, match="tcc/cond/1/0/attn.*mismatched shapes"):
        load_priors(bad)


def read_metadata_raw(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_files_that_are_not_priors_or_from_another_format_version_are_refused(saved, tmp_path):
    other = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    with pytest.raises(PriorFileError, match="not a calibrated_cache TCC prior file"):
        load_priors(other)
    meta = read_metadata_raw(saved)
    meta["format_version"] = "99"
    future = tmp_path / "future.safetensors"
    save_file({"w": torch.ones(2)}, str(future), metadata=meta)
    with pytest.raises(PriorFileError, match="version '99'"):
        load_priors(future)


def test_priors_of_another_model_are_refused_naming_both(fitted):
    model, _, meta = fitted
    other = load_dit()[0]
    with torch.no_grad():
        other.final.bias.add_(1.0)
    mine = dit_fingerprint(model)
    check_model(meta, mine, "p.safetensors")
    with pytest.raises(PriorMismatch) as err:
        check_model(meta, dit_fingerprint(other, "tuned dit"), "p.safetensors")
    text = str(err.value)
    assert mine["weights"] in text and dit_fingerprint(other)["weights"] in text and "tuned dit" in text


def test_a_file_whose_identity_changed_under_another_comfyui_is_refused_with_refit_on_this_comfyui(fitted, tmp_path):
    """ComfyUI 0.8 loads scaled-fp8 checkpoints into other tensors than 0.3.64 did: a file fitted on another ComfyUI
    that no longer matches says to refit here; one fitted here that does not match belongs to another model; one that
    does not record its ComfyUI says both."""
    model, priors, meta = fitted
    elsewhere = load_priors(save_priors(tmp_path / "p.safetensors", priors, {**meta, "comfyui_version": "0.3.64"}))
    assert elsewhere.meta["comfyui_version"] == "0.3.64"
    mine = dit_fingerprint(model)
    changed = {**mine, "architecture": "0123456789abcdef"}
    check_model(elsewhere.meta, mine, "p.safetensors", comfyui="0.8.0")  # the same identity: accepted on any version
    with pytest.raises(PriorMismatch, match=r"fitted on ComfyUI 0\.3\.64 .*differs in architecture\)\. This is "
                                            r"ComfyUI 0\.8\.0.*refit on this ComfyUI with Fit TCC Priors"):
        check_model(elsewhere.meta, changed, "p.safetensors", comfyui="0.8.0")
    with pytest.raises(PriorMismatch) as here:
        check_model(elsewhere.meta, changed, "p.safetensors", comfyui="0.3.64")
    assert "fitted for another model" in str(here.value) and "refit on this ComfyUI" not in str(here.value)
    assert "comfyui_version" not in meta  # the testbed's fit, like files older packs wrote, records no ComfyUI
    with pytest.raises(PriorMismatch, match=r"other than this 0\.8\.0 \(the file does not record which\), refit "
                                            "on this ComfyUI"):
        check_model(meta, changed, "p.safetensors", comfyui="0.8.0")


def test_priors_of_another_policy_or_a_dynamic_policy_are_refused(fitted):
    meta = fitted[2]
    check_policy(meta, FORA, "p")
    with pytest.raises(PriorMismatch, match="FORA_N3_W0.*FORA_N4_W0"):
        check_policy(meta, CachePolicy(interval=4, warmup_steps=0), "p")
    dynamic = {**meta, "policy_tag": CachePolicy(mode="dynamic").tag()}
    with pytest.raises(PriorMismatch, match="fixed-interval"):
        check_policy(dynamic, CachePolicy(mode="dynamic"), "p")


def test_schedules_are_matched_exactly_interpolated_when_close_and_refused_when_far(fitted):
    meta = fitted[2]
    assert check_schedule(meta, FORA, flow_sigmas(12).tolist(), "p") is None
    assert "interpolated" in check_schedule(meta, FORA, flow_sigmas(15).tolist(), "p")
    with pytest.raises(PriorMismatch, match="Refit"):
        check_schedule(meta, FORA, flow_sigmas(60).tolist(), "p")
    with pytest.raises(PriorMismatch, match="outside the fitted range"):
        check_schedule(meta, FORA, (flow_sigmas(12) * 5).tolist(), "p")


def test_cfg_sampler_and_scheduler_differences_are_warned_about(fitted):
    meta = fitted[2]
    assert run_warnings(meta, 2.0, "euler", meta["scheduler"]) == []
    notes = run_warnings(meta, 1.0, "heun", "karras")
    assert any("cfg 1" in n for n in notes) and any("heun" in n for n in notes) and any("karras" in n for n in notes)


def test_the_fit_reports_its_error_on_held_out_requests_and_the_file_keeps_the_split(fitted, saved, capsys):
    meta = load_priors(saved).meta
    assert meta["held_out"] == 16 and meta["held_out_seeds"] == [2] and meta["seeds"] == [1]
    report = meta["report"]
    assert report["held_out_after"] < report["held_out_before"] and "in_sample_before" not in report
    assert main(["inspect", str(saved)]) == 0
    text = capsys.readouterr().out
    assert f"held-out      error {report['held_out_before']:.4g} without priors -> {report['held_out_after']:.4g}" in text
    assert "on 16 requests (seeds 2); fitted on 8 requests (seeds 1)" in text


def test_prior_files_get_the_permissions_of_any_new_file_so_they_can_be_shared(fitted, tmp_path):
    _, priors, meta = fitted
    previous = os.umask(0o022)
    try:
        path = save_priors(tmp_path / "shared.tcc.safetensors", priors, meta)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_saving_is_atomic_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(fitted, saved, monkeypatch):
    _, priors, meta = fitted
    original = saved.read_bytes()

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(prior_format, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_priors(saved, priors, meta)
    assert saved.read_bytes() == original
    assert os.listdir(saved.parent) == [saved.name]


def test_cli_fits_saves_and_inspects_priors(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["fit-priors", "--samples", "4", "--held-out", "2", "--verify", "--steps", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "on 2 held-out requests" in printed and "on the 4 fitted requests (optimistic)" in printed
    assert set(load_priors(out).meta["report"]) >= {"held_out_before", "in_sample_before"}
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FORA_N3_W0" in text and "sites" in text and "mse before" in text
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["fit-priors", "--samples", "4", "--steps", "8", "--out", str(out)])


def test_an_interrupted_fit_leaves_no_file_and_exits_130(tmp_path, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = sampling.sample
    monkeypatch.setattr("calibrated_cache.testbed.fit_priors.sample", interrupted)
    assert main(["fit-priors", "--samples", "2", "--steps", "6", "--out", str(tmp_path / "p.safetensors")]) == 130
    assert len(calls) == 3 and os.listdir(tmp_path) == []


def test_inspect_reports_a_bad_file_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(SystemExit, match="not a readable safetensors file"):
        main(["inspect", str(bad)])


def test_metadata_is_json_where_structured(saved):
    raw = read_metadata_raw(saved)
    assert json.loads(raw["policy"])["interval"] == 3 and len(json.loads(raw["sigmas"])) == 13
