"""A real ComfyUI server for the tests: started headless on a free loopback port, with the pack and a test-only
conditioning node under custom_nodes and a tiny Wan model, and the HTTP helpers the server tests share."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import safetensors.torch

from tiny_models import SPECS, save_tiny_unet

REPO = Path(__file__).resolve().parents[2]
POLICY = dict(mode="fixed", forecaster="taylor", interval=3, warmup_steps=1, start=0.0, end=1.0, first_blocks=0,
              last_blocks=0, threshold=0.1, max_skips=3, order=2, time_unit="step", foca_lambda=0.0)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


class Server(NamedTuple):
    url: str
    info: dict  # /object_info
    model_name: str  # the tiny Wan model's file name
    log: Path  # the server's log; its folder is the base directory (models/, output/, custom_nodes/)


@contextmanager
def running_server(base: Path, comfyui_dir: str) -> Iterator[Server]:
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
                info = get(f"{url}/object_info")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not start: {(base / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield Server(url, info, model.name, base / "server.log")
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
    prompt_id = post(f"{url}/prompt", {"prompt": prompt, "client_id": "calibrated-cache-test"})["prompt_id"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        history = get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish")


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote")  # the graph editor's own; never sent to the server


def schema_inputs(info: dict, node_type: str) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, required) of a node's inputs in the order the graph editor lays them out."""
    spec = info[node_type]
    rows = []
    for section in ("required", "optional"):
        for name in spec["input_order"].get(section, []):
            kind, *rest = spec["input"][section][name]
            options = dict(rest[0]) if rest else {}
            if isinstance(kind, list):  # the older form of a combo: its options in place of the type
                kind, options["options"] = "COMBO", kind
            rows.append((name, kind, options, section == "required"))
    return rows


def widget_slots(info: dict, node_type: str) -> list[str | None]:
    """The names behind a UI node's `widgets_values`, None for the graph editor's control-after-generate values (it adds
    one after an INT or COMBO that asks for it, and after `seed` / `noise_seed` unless told not to)."""
    slots: list[str | None] = []
    for name, kind, options, _ in schema_inputs(info, node_type):
        if kind in WIDGET_TYPES:
            slots.append(name)
            if options.get("control_after_generate", name in ("seed", "noise_seed")):
                slots.append(None)
    return slots


def api_prompt(workflow: dict, info: dict) -> dict:
    """The API-format prompt the graph editor queues for a UI-format workflow (active nodes only)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) != 0:
            continue
        values = dict(zip(widget_slots(info, node["type"]), node.get("widgets_values", [])))
        inputs = {name: value for name, value in values.items() if name is not None}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
