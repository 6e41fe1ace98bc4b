"""The scenes model: ComfyUI's own Flux classes (`comfy.ldm.flux.model.Flux`: double- and single-stream blocks,
adaLN modulation, RoPE), at a tiny width, built and loaded inside a real ComfyUI.

ComfyUI's model detection recognises a Flux checkpoint by its keys but hard-codes Flux-dev's widths (hidden 3072, 24
heads, context 4096), so the stock UNETLoader cannot load a model small enough to train on a CPU; `load` does what
UNETLoader does after detection, with this model's config: `FluxSchnell` (flow matching, shift 1, no guidance
embedding: it samples with real CFG and an empty negative prompt), `get_model`, `load_model_weights`, a ModelPatcher.
Importing this module boots ComfyUI from COMFYUI_PATH in CPU mode.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "comfyui"))
from comfy_boot import bootstrap_comfy  # noqa: E402

bootstrap_comfy()

import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
from tiny_models import FLUX_PARAMS, with_declared_fields  # noqa: E402  (tests/comfyui, on sys.path above)

from .codec import CONTEXT_DIM, LATENT_CHANNELS  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent / "weights" / "scenes_flux.safetensors"
# The fields later ComfyUI versions' FluxParams require are added with the values that keep this architecture.
UNET_CONFIG = with_declared_fields(FLUX_PARAMS, {
    "image_model": "flux", "guidance_embed": False, "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
    "patch_size": 2, "vec_in_dim": CONTEXT_DIM, "context_in_dim": CONTEXT_DIM, "hidden_size": 128, "mlp_ratio": 4.0,
    "num_heads": 4, "depth": 2, "depth_single_blocks": 4, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
})


def model_config():
    config = comfy.model_detection.model_config_from_unet_config(dict(UNET_CONFIG))
    if type(config).__name__ != "FluxSchnell":
        raise RuntimeError(f"ComfyUI matched the scenes model to {type(config).__name__}, not FluxSchnell")
    config.set_inference_dtype(torch.float32, None)
    return config


def build():
    """The BaseModel with ComfyUI's Flux inside, float32, weights uninitialised (ComfyUI skips initialisation)."""
    return model_config().get_model({})


def load(path: Path = WEIGHTS):
    """A ModelPatcher of the trained model, as UNETLoader returns one."""
    import safetensors.torch

    if not path.is_file():
        raise SystemExit(f"{path} is missing: train it with python -m benchmarks.scenes.train")
    model = build()
    model.load_model_weights(safetensors.torch.load_file(str(path)), "")
    model.eval()
    # ComfyUI batches cond and uncond in one call when its memory estimate (made for Flux-dev's width) fits the free
    # memory; at the benchmark's batch that estimate sits near this machine's free RAM, so the batching flipped between
    # runs and the rows with it. Scaled to this model's width, every run batches alike.
    model.memory_usage_factor *= UNET_CONFIG["hidden_size"] / 3072
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())
