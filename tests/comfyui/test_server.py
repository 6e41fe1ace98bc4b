"""ComfyUI tier: a real ComfyUI server, started headless, loads the pack and runs workflows with its nodes through its
HTTP API: caching, then fitting TCC priors in one prompt and sampling with the saved file in another (skipped without
COMFYUI_PATH)."""

from pathlib import Path

import torch

from harness import POLICY, failure, fit_workflow, get, run_prompt, saved_latent, workflow


def test_server_lists_the_pack_nodes_with_their_types(server):
    _, info, _, _ = server
    assert info["CalibratedCache_CachePolicy"]["output"] == ["CACHE_POLICY"]
    assert info["CalibratedCache_Apply"]["input"]["optional"]["policy"][0] == "CACHE_POLICY"  # a plan file suffices
    assert info["CalibratedCache_Apply"]["category"] == "sampling/calibrated cache"


def test_workflow_with_both_nodes_runs_cached_and_requeues_with_a_new_seed(server):
    url, _, model_name, log_path = server
    start = len(log_path.read_text())
    for seed in (1, 2):
        result = run_prompt(url, workflow(model_name, seed))
        assert result["status"]["status_str"] == "success", failure(result)
    log = log_path.read_text()[start:]
    lines = [line for line in log.splitlines() if "calibrated_cache [TAYLOR2_N3_W1_G2] Wan" in line]
    assert len(lines) == 2, log[-3000:]
    # 9 steps: warm-up step 0, then steps 1, 4, 7 computed, 2 blocks, cond + uncond; each run starts afresh.
    assert all("computed 16 of 36 block evaluations over 9 steps" in line for line in lines), lines


def test_priors_fitted_in_one_prompt_are_loaded_by_name_in_another(server):
    url, info, model_name, log_path = server
    assert info["CalibratedCache_FitTCCPriors"]["output"] == ["TCC_PRIORS", "STRING"]
    assert set(info["CalibratedCache_Apply"]["input"]["optional"]) == {"policy", "priors", "prior_file", "icc_rank",
                                                                         "icc_svd", "cache_offload", "cache_limit_mb"}
    assert model_name in info["CalibratedCache_FitTCCPriors"]["input"]["required"]["checkpoint"][1]["options"]
    fitted = run_prompt(url, fit_workflow(model_name))
    assert fitted["status"]["status_str"] == "success", failure(fitted)
    (report,) = fitted["outputs"]["9"]["text"]
    name = f"{Path(model_name).stem}.TAYLOR2_N3_W1_G2.tcc.safetensors"
    base = log_path.parent
    assert str(base / "models" / "cache_priors" / name) in report and "with priors" in report
    assert name in get(f"{url}/models/cache_priors")
    assert name in get(f"{url}/object_info/CalibratedCache_Apply")["CalibratedCache_Apply"]["input"]["optional"][
        "prior_file"][1]["options"]

    for prefix, inputs in (("cc_plain", {}), ("cc_priors", {"prior_file": name})):
        result = run_prompt(url, workflow(model_name, 1, prefix, **inputs))
        assert result["status"]["status_str"] == "success", failure(result)
    lines = [line for line in log_path.read_text().splitlines() if line.endswith(f", priors {name}")]
    assert len(lines) == 1 and "calibrated_cache [TAYLOR2_N3_W1_G2] Wan: computed 16 of 36" in lines[0], lines
    plain, calibrated = saved_latent(base, "cc_plain"), saved_latent(base, "cc_priors")
    assert plain.shape == calibrated.shape and not torch.equal(plain, calibrated)


def test_one_workflow_chains_cache_policy_goc_corrector_fit_and_apply(server):
    url, info, model_name, log_path = server
    assert info["CalibratedCache_GOC"]["output"] == ["CACHE_POLICY"]
    assert info["CalibratedCache_GOC"]["input"]["required"]["policy"][0] == "CACHE_POLICY"
    prompt = workflow(model_name, 1, "cc_goc", priors=["9", 0])
    prompt["2"]["inputs"] = {**POLICY, "forecaster": "reuse", "interval": 2}
    prompt["10"] = {"class_type": "CalibratedCache_GOC",
                    "inputs": {"policy": ["2", 0], "weight": 0.8, "inflection": "auto", "threshold": -1.0, "steps": ""}}
    prompt["9"] = fit_workflow(model_name)["9"]
    prompt["9"]["inputs"].update(policy=["10", 0], checkpoint="none", overwrite=True)
    prompt["3"]["inputs"]["policy"] = ["10", 0]
    start = len(log_path.read_text())
    result = run_prompt(url, prompt)
    assert result["status"]["status_str"] == "success", failure(result)
    (report,) = result["outputs"]["9"]["text"]
    assert "FORA_N2_W1_G2_GOC0.8t-1.tcc.safetensors" in report
    lines = [line for line in log_path.read_text()[start:].splitlines()
             if "calibrated_cache [FORA_N2_W1_G2_GOC0.8t-1] Wan" in line and "priors" in line]
    assert lines, log_path.read_text()[start:][-3000:]
    assert saved_latent(log_path.parent, "cc_goc").isfinite().all()


def test_one_workflow_fits_priors_with_icc_and_samples_with_icc_and_them(server):
    url, _, model_name, log_path = server
    prompt = workflow(model_name, 1, "cc_icc", priors=["9", 0], icc_rank=8, icc_svd="channel-aware")
    prompt["2"]["inputs"] = {**POLICY, "forecaster": "reuse", "interval": 2}
    prompt["9"] = fit_workflow(model_name)["9"]
    prompt["9"]["inputs"].update(checkpoint="none", overwrite=True, icc_rank=8, icc_svd="channel-aware")
    start = len(log_path.read_text())
    result = run_prompt(url, prompt)
    assert result["status"]["status_str"] == "success", failure(result)
    (report,) = result["outputs"]["9"]["text"]
    assert "FORA_N2_W1_G2_ICC8.tcc.safetensors" in report
    lines = [line for line in log_path.read_text()[start:].splitlines()
             if "calibrated_cache [FORA_N2_W1_G2_ICC8] Wan" in line and "priors" in line]
    assert lines, log_path.read_text()[start:][-3000:]
    assert saved_latent(log_path.parent, "cc_icc").isfinite().all()
