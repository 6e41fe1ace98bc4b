"""Tiny checkpoints in the formats of quantized and half-precision releases, for the ComfyUI tier (a helper module, not
a test file; import it after the tier's conftest booted ComfyUI, or from a script run with COMFYUI_PATH set).

The tiny HunyuanVideo of `tiny_models` (double and single blocks, fused qkv and single-block linear1) is saved

* as a scaled-fp8 checkpoint: every Linear weight in float8 e4m3 with its float32 `scale_weight`, and the empty
  `scaled_fp8` marker, the layout ComfyUI itself writes for such models. ComfyUI 0.8 converts it on load into its
  mixed-precision Linears holding quantized weights; earlier versions load it into their scaled-fp8 Linears;
* or in bfloat16, as most releases are.

`load` reads a file as UNETLoader does: ComfyUI's detection, then its own path for the file's weights.
"""

from __future__ import annotations

import os

import safetensors.torch
import torch

import tiny_models

FAMILY = "HunyuanVideo"
KINDS = ("fp8_scaled", "bf16")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8 e4m3 value


def save_checkpoint(directory: str, kind: str) -> str:
    """The tiny model's weights (seed 0) saved as `kind` into `directory` (kept if already there); returns the path."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} (got {kind!r})")
    path = os.path.join(directory, f"tiny_{FAMILY.lower()}_{kind}.safetensors")
    if os.path.exists(path):
        return path
    weights = safetensors.torch.load_file(tiny_models.save_tiny_unet(tiny_models.SPECS[FAMILY]))
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if kind == "bf16":
            out[key] = value.to(torch.bfloat16)
        elif key.endswith(".weight") and value.dim() == 2:  # HunyuanVideo's 2-D weights are its Linears'
            scale = value.abs().amax().float() / FP8_MAX
            out[key] = (value.float() / scale).to(FP8)
            out[key[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value
    if kind == "fp8_scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    safetensors.torch.save_file(out, tmp)
    os.replace(tmp, path)
    return path


def load(path: str):
    """The file loaded as UNETLoader loads it (a ModelPatcher), checked to be the tiny HunyuanVideo."""
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model(path)
    if type(patcher.model.model_config).__name__ != FAMILY:
        raise RuntimeError(f"{path} was detected as {type(patcher.model.model_config).__name__}, not {FAMILY}")
    return patcher


def inputs() -> tuple[list, list, torch.Tensor]:
    """The tiny model's (positive, negative, latent)."""
    return tiny_models.make_inputs(FAMILY)


# Prior files fitted on ComfyUI 0.3.64 for each kind of checkpoint, by fixtures/fit_on_comfyui_0364.py with these
# settings (Cache Policy, then Fit TCC Priors).
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FIXTURE_COMFYUI = "0.3.64"
FIXTURE_POLICY = dict(mode="fixed", forecaster="reuse", interval=2, warmup_steps=1, start=0.0, end=1.0,
                      first_blocks=0, last_blocks=0, threshold=0.1, max_skips=3, order=2, time_unit="step",
                      foca_lambda=1.0)
FIXTURE_FIT = dict(samples=2, seed=0, steps=6, cfg=2.0, sampler_name="euler", scheduler="simple", variant="drift",
                   checkpoint="none", save_to="cache_priors folder", overwrite=True)


def fixture_path(kind: str) -> str:
    """The path of the prior file fitted on ComfyUI 0.3.64 for the `kind` checkpoint."""
    return os.path.join(FIXTURES, f"tiny_{FAMILY.lower()}_{kind}.comfyui-{FIXTURE_COMFYUI}.tcc.safetensors")
