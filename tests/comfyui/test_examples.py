"""ComfyUI tier: the example workflows. Each one validates against the schemas a real server publishes (/object_info),
is offered by the server's template route, and the Wan example runs end to end through the HTTP API on tiny models:
a tiny Wan under the example's model name and a random-weight Wan VAE of the real architecture. Only its text
encoder is stood in for (a 5B-parameter umt5 cannot be made tiny): the two prompts become seeded random contexts of
the encoder's width. The browser test loads every example in the graph editor."""

import json
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from harness import REPO, VIRTUAL_NODES, WIDGET_TYPES, api_prompt, failure, get, run_prompt, schema_inputs, widget_slots

EXAMPLES = sorted((REPO / "example_workflows").glob("*.json"))
# inputs that name the user's files: checked for form, since the server lists only the files it has
FILE_INPUTS = ("unet_name", "ckpt_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name",
               "checkpoint", "prior_file")
PACK_NODES = ("CalibratedCache_CachePolicy", "CalibratedCache_Apply")


def problems(workflow: dict, info: dict) -> list[str]:
    """Everything in a UI-format workflow that the nodes' schemas do not allow."""
    found = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        src, dst = nodes.get(source), nodes.get(target)
        if src is None or dst is None:
            found.append(f"link {link_id} joins missing nodes {source} -> {target}")
            continue
        produced = info[src["type"]]["output"][source_slot]
        slot = dst["inputs"][target_slot]
        wanted = dict((name, k) for name, k, _, _ in schema_inputs(info, dst["type"])).get(slot["name"])
        if not produced == kind == slot["type"] == wanted or slot["link"] != link_id:
            found.append(f"link {link_id}: {src['type']} gives {produced}, {dst['type']}.{slot['name']} takes {wanted}")
        if link_id not in src["outputs"][source_slot]["links"]:
            found.append(f"link {link_id} is missing from {src['type']}'s output {source_slot}")
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_NODES:
            continue
        if kind not in info:
            found.append(f"node {node['id']}: unknown type {kind}")
            continue
        linked = {s["name"] for s in node["inputs"] if s.get("link") is not None}
        for name, k, _, required in schema_inputs(info, kind):
            if required and k not in WIDGET_TYPES and name not in linked:
                found.append(f"{kind}.{name} ({k}) is not connected")
        slots = widget_slots(info, kind)
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            found.append(f"{kind} has {len(values)} widget values; its schema lays out {len(slots)}")
            continue
        options = {name: (k, o) for name, k, o, _ in schema_inputs(info, kind)}
        for name, value in zip(slots, values):
            if name is None:
                if value not in ("fixed", "increment", "decrement", "randomize"):
                    found.append(f"{kind}: control_after_generate {value!r}")
            else:
                found.extend(f"{kind}.{name}: {p}" for p in value_problems(name, value, *options[name]))
    return found


def value_problems(name: str, value, kind: str, options: dict) -> list[str]:
    if kind == "COMBO":
        if name in FILE_INPUTS:
            return [] if value == "none" or str(value).endswith(".safetensors") else [f"{value!r} is not a file name"]
        return [] if value in options.get("options", []) else [f"{value!r} is not one of its options"]
    checks = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "BOOLEAN": lambda v: isinstance(v, bool), "STRING": lambda v: isinstance(v, str)}
    if not checks[kind](value):
        return [f"{value!r} is not a {kind}"]
    low, high = options.get("min"), options.get("max")
    if kind in ("INT", "FLOAT") and not ((low is None or value >= low) and (high is None or value <= high)):
        return [f"{value} is outside [{low}, {high}]"]
    return []


def test_there_are_examples_for_flux_sd3_and_wan_each_with_the_pack_nodes():
    names = [p.stem for p in EXAMPLES]
    assert [n for n in names if n.startswith(("flux", "sd3", "wan"))] == names and len(names) == 3, names
    for path in EXAMPLES:
        types = {n["type"] for n in json.loads(path.read_text())["nodes"]}
        assert set(PACK_NODES) <= types, (path.name, types)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_validates_against_the_node_schemas(server, path):
    workflow = json.loads(path.read_text())
    assert problems(workflow, server.info) == []


def test_a_broken_workflow_is_caught_by_the_validation(server):
    workflow = json.loads(EXAMPLES[0].read_text())
    apply = next(n for n in workflow["nodes"] if n["type"] == "CalibratedCache_Apply")
    apply["widgets_values"][1] = 99999  # icc_rank above its maximum
    policy = next(n for n in workflow["nodes"] if n["type"] == "CalibratedCache_CachePolicy")
    policy["widgets_values"][:] = policy["widgets_values"][:-2]  # a value missing besides the optional last one
    found = problems(workflow, server.info)
    assert any("icc_rank: 99999 is outside" in p for p in found), found
    count = len(policy["widgets_values"])
    assert any(f"CalibratedCache_CachePolicy has {count} widget values" in p for p in found), found


def test_the_server_offers_the_examples_in_its_template_browser(server):
    templates = get(f"{server.url}/api/workflow_templates")
    assert sorted(templates["calibrated_cache"]) == [p.stem for p in EXAMPLES]
    for path in EXAMPLES:
        assert get(f"{server.url}/api/workflow_templates/calibrated_cache/{path.name}") == json.loads(path.read_text())


def _save_random_wan_vae(path: Path) -> None:
    """Wan 2.1's VAE as ComfyUI builds it for such a file, with random weights."""
    import comfy.ldm.wan.vae

    torch.manual_seed(0)
    vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}, str(path))


def test_the_wan_example_runs_end_to_end_through_the_http_api_on_tiny_models(server):
    (path,) = [p for p in EXAMPLES if p.stem.startswith("wan")]
    workflow = json.loads(path.read_text())
    prompt = api_prompt(workflow, server.info)
    models = server.log.parent / "models"
    by_type = {node["class_type"]: key for key, node in prompt.items()}
    unet = prompt[by_type["UNETLoader"]]["inputs"]["unet_name"]
    shutil.copy(models / "diffusion_models" / server.model_name, models / "diffusion_models" / unet)
    _save_random_wan_vae(models / "vae" / prompt[by_type["VAELoader"]]["inputs"]["vae_name"])

    del prompt[by_type["CLIPLoader"]]
    encoders = sorted(k for k, node in prompt.items() if node["class_type"] == "CLIPTextEncode")
    for seed, key in enumerate(encoders):
        prompt[key] = {"class_type": "CCTest_ZeroConditioning",
                       "inputs": {"tokens": 16, "dim": 4096, "pooled_dim": 0, "seed": seed}}
    latent = prompt[by_type["EmptyHunyuanLatentVideo"]]["inputs"]
    latent.update(width=64, height=64, length=5)  # 2 latent frames; 832x480x33 is a GPU's work
    prompt[by_type["SaveAnimatedWEBP"]]["inputs"]["filename_prefix"] = "cc_example_wan"

    start = len(server.log.read_text())
    result = run_prompt(server.url, prompt)
    assert result["status"]["status_str"] == "success", failure(result)
    (saved,) = result["outputs"][by_type["SaveAnimatedWEBP"]]["images"]
    assert (server.log.parent / "output" / saved["subfolder"] / saved["filename"]).stat().st_size > 0
    log = server.log.read_text()[start:]
    steps = prompt[by_type["KSampler"]]["inputs"]["steps"]
    assert re.search(rf"calibrated_cache \[TAYLOR2_N3_W2_G2\] Wan: computed \d+ of \d+ block evaluations over {steps} "
                     r"steps", log), log[-3000:]
