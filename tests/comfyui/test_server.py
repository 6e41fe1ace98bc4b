"""ComfyUI tier: a real ComfyUI server, started headless, loads the pack and runs workflows with its nodes through its
HTTP API: caching, then fitting TCC priors in one prompt and sampling with the saved file in another (skipped without
COMFYUI_PATH)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import safetensors.torch
import torch

from .tiny_models import SPECS, save_tiny_unet

REPO = Path(__file__).resolve().parents[2]
POLICY = dict(mode="fixed", forecaster="taylor", interval=3, warmup_steps=1, start=0.0, end=1.0, first_blocks=0,
              last_blocks=0, threshold=0.1, max_skips=3, order=2, time_unit="step", foca_lambda=0.0)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfyui_dir):
    """ComfyUI on a free loopback port, with the pack and a test-only conditioning node under custom_nodes."""
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "calibrated_cache").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "cc_test_pack").symlink_to(Path(__file__).parent / "test_pack", target_is_directory=True)
    model = Path(save_tiny_unet(SPECS["Wan"], str(base / "models")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(base / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base)], cwd=comfyui_dir, stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                info = _get(f"{url}/object_info")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not start: {(base / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield url, info, model.name, base / "server.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def workflow(model_name: str, seed: int, prefix: str = "cc_test", **apply_inputs) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default"}},
        "2": {"class_type": "CalibratedCache_CachePolicy", "inputs": POLICY},
        "3": {"class_type": "CalibratedCache_Apply",
              "inputs": {"model": ["1", 0], "policy": ["2", 0], **apply_inputs}},
        "4": {"class_type": "CCTest_ZeroConditioning", "inputs": {"tokens": 16, "dim": 4096, "pooled_dim": 0, "seed": 0}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": 64, "height": 64, "length": 1, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": seed, "steps": 9, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }


def fit_workflow(model_name: str) -> dict:
    """Fit TCC priors for the KSampler settings of `workflow` and save them in the cache_priors folder."""
    prompt = workflow(model_name, 0)
    fit = {"model": ["1", 0], "policy": ["2", 0], "positive": ["4", 0], "negative": ["5", 0], "latent": ["6", 0],
           "samples": 2, "seed": 0, "steps": 9, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
           "variant": "drift", "checkpoint": model_name, "save_to": "cache_priors folder", "overwrite": False}
    return {k: prompt[k] for k in ("1", "2", "4", "5", "6")} | {"9": {"class_type": "CalibratedCache_FitTCCPriors",
                                                                     "inputs": fit}}


def saved_latent(base: Path, prefix: str):
    (path,) = (base / "output").glob(f"{prefix}_*.latent")
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def run_prompt(url: str, prompt: dict) -> dict:
    prompt_id = _post(f"{url}/prompt", {"prompt": prompt, "client_id": "calibrated-cache-test"})["prompt_id"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish")


def test_server_lists_the_pack_nodes_with_their_types(server):
    _, info, _, _ = server
    assert info["CalibratedCache_CachePolicy"]["output"] == ["CACHE_POLICY"]
    assert info["CalibratedCache_Apply"]["input"]["required"]["policy"][0] == "CACHE_POLICY"
    assert info["CalibratedCache_Apply"]["category"] == "sampling/calibrated cache"


def test_workflow_with_both_nodes_runs_cached_and_requeues_with_a_new_seed(server):
    url, _, model_name, log_path = server
    start = len(log_path.read_text())
    for seed in (1, 2):
        result = run_prompt(url, workflow(model_name, seed))
        assert result["status"]["status_str"] == "success", result["status"]
    log = log_path.read_text()[start:]
    lines = [line for line in log.splitlines() if "calibrated_cache [TAYLOR2_N3_W1_G2] Wan" in line]
    assert len(lines) == 2, log[-3000:]
    # 9 steps: warm-up step 0, then steps 1, 4, 7 computed, 2 blocks, cond + uncond; each run starts afresh.
    assert all("computed 16 of 36 block evaluations over 9 steps" in line for line in lines), lines


def test_priors_fitted_in_one_prompt_are_loaded_by_name_in_another(server):
    url, info, model_name, log_path = server
    assert info["CalibratedCache_FitTCCPriors"]["output"] == ["TCC_PRIORS", "STRING"]
    assert set(info["CalibratedCache_Apply"]["input"]["optional"]) == {"priors", "prior_file", "icc_rank", "icc_svd"}
    assert model_name in info["CalibratedCache_FitTCCPriors"]["input"]["required"]["checkpoint"][1]["options"]
    fitted = run_prompt(url, fit_workflow(model_name))
    assert fitted["status"]["status_str"] == "success", fitted["status"]
    (report,) = fitted["outputs"]["9"]["text"]
    name = f"{Path(model_name).stem}.TAYLOR2_N3_W1_G2.tcc.safetensors"
    base = log_path.parent
    assert str(base / "models" / "cache_priors" / name) in report and "with priors" in report
    assert _get(f"{url}/models/cache_priors") == [name]
    assert name in _get(f"{url}/object_info/CalibratedCache_Apply")["CalibratedCache_Apply"]["input"]["optional"][
        "prior_file"][1]["options"]

    for prefix, inputs in (("cc_plain", {}), ("cc_priors", {"prior_file": name})):
        result = run_prompt(url, workflow(model_name, 1, prefix, **inputs))
        assert result["status"]["status_str"] == "success", result["status"]
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
    assert result["status"]["status_str"] == "success", result["status"]
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
    assert result["status"]["status_str"] == "success", result["status"]
    (report,) = result["outputs"]["9"]["text"]
    assert "FORA_N2_W1_G2_ICC8.tcc.safetensors" in report
    lines = [line for line in log_path.read_text()[start:].splitlines()
             if "calibrated_cache [FORA_N2_W1_G2_ICC8] Wan" in line and "priors" in line]
    assert lines, log_path.read_text()[start:][-3000:]
    assert saved_latent(log_path.parent, "cc_icc").isfinite().all()
