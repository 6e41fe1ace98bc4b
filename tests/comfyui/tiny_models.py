"""Tiny random-weight ComfyUI diffusion models for the ComfyUI integration test tier.

This is a plain helper module (not a test file). Importing it boots ComfyUI's `comfy` package from the checkout named
by the ``COMFYUI_PATH`` environment variable, in CPU mode, without parsing any command line arguments. Use it only
under ``tests/comfyui`` (whose conftest skips everything when ``COMFYUI_PATH`` is not set).

Every family builder returns a :class:`TinyBundle` ``(model_patcher, positive, negative, latent)``:

* ``model_patcher``: a ``comfy.model_patcher.ModelPatcher`` around a real ComfyUI ``BaseModel`` subclass whose
  ``diffusion_model`` is a few-block, narrow version of the family's transformer with deterministic random weights.
* ``positive`` / ``negative``: ComfyUI CONDITIONING lists ``[[cross_attn, {...}]]`` with the widths the family's text
  encoder would produce (random for positive, zeros for negative, as ``ConditioningZeroOut`` would give), built with
  a fixed seed.
* ``latent``: an empty (all-zero) latent tensor in the family's latent layout, like the Empty*Latent nodes produce.

Three families (SD3, Wan 2.1 T2V, HunyuanVideo) go through ComfyUI's own detection and UNETLoader path: their state dict
is saved as safetensors into ``<dir>/diffusion_models/`` and loaded back with ``comfy.sd.load_diffusion_model``. The
others (Flux, PixArt Sigma, Lumina 2, Qwen-Image) cannot be made tiny through detection (it hard-codes their widths),
so they are built directly from ``comfy.supported_models`` configs with a small ``unet_config``.

Weights are random (not trained): outputs are meaningless as images, but finite, deterministic, and every block
contributes (no zero-initialised gates or output layers), so block skipping and caching change the result.

One spec serves every ComfyUI version (0.3.64 and 0.8.0 are tested): a field a later version's model class requires
is added only where the installed class declares it (`with_declared_fields`), and a latent format that repacks the
model's output is read from the installed ComfyUI (`sampled_shape`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import atexit
import functools
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, NamedTuple

try:  # this folder is on sys.path when conftest.py enabled the tier; standalone scripts: load by file path
    import comfy_boot
except ImportError:  # pragma: no cover
    import importlib.util as _ilu

    _spec = _ilu.spec_from_file_location("comfy_boot", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                    "comfy_boot.py"))
    comfy_boot = _ilu.module_from_spec(_spec)
    sys.modules["comfy_boot"] = comfy_boot
    _spec.loader.exec_module(comfy_boot)

COMFYUI_DIR = comfy_boot.bootstrap_comfy()

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

import comfy.ldm.chroma.model  # noqa: E402
import comfy.ldm.chroma_radiance.model  # noqa: E402
import comfy.ldm.flux.model  # noqa: E402
import comfy.ldm.hunyuan_video.model  # noqa: E402
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402


class TinyBundle(NamedTuple):
    """What a family builder returns; unpacks as ``model_patcher, positive, negative, latent``."""

    model_patcher: Any
    positive: list
    negative: list
    latent: torch.Tensor


class FamilySpec(NamedTuple):
    """Static facts about a tiny family, for assertions."""

    name: str
    unet_config: dict  # config the tiny diffusion model is built from (detected config for the loader families)
    block_lists: dict  # attribute of diffusion_model -> expected number of blocks
    latent_shape: tuple
    context_shape: tuple  # positive cross_attn shape [batch, tokens, width]
    cond_extras: dict  # other keys in the conditioning dict (pooled_output width, guidance, attention_mask)
    via_loader: bool  # True: saved as safetensors and loaded with comfy.sd.load_diffusion_model
    detected_as: str  # comfy.supported_models class name
    model_class: str  # diffusion_model class name


# ----------------------------------------------------------------------------------------------------------------------
# Weights and conditioning

_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)
WEIGHT_GAIN = 1.0  # fan-in scaled matrices: attention is not uniform, blocks and prompts visibly matter


def init_tiny_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.02,
                      gain: float | None = WEIGHT_GAIN) -> torch.nn.Module:
    """Deterministic random weights for every parameter of `module` (plus the fixed tables checkpoints fill in: SD3's
    pos_embed, Stable Audio's rotary frequencies).

    Norm scales are 1 (plus N(0, std) noise); matrices of linear and conv layers (any parameter named ``weight`` with
    2+ dims) are N(0, gain / sqrt(fan_in)) when `gain` is set, else N(0, std); everything else (biases, modulation
    tables, gates, output layers, embeddings) is N(0, std). Nothing is left at zero, so every block and the final
    layer contribute to the output.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            is_norm = isinstance(mod, _NORM_TYPES) or type(mod).__name__.lower().endswith("norm")
            for p_name, p in mod.named_parameters(recurse=False):
                scale = std
                if gain is not None and p_name == "weight" and p.ndim >= 2:
                    scale = gain / math.sqrt(p[0].numel())
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
                if is_norm and p.ndim == 1 and p_name in ("weight", "scale"):
                    noise = noise + 1.0
                p.copy_(noise.to(p.dtype))
            for b_name, b in mod.named_buffers(recurse=False):
                # MMDiT (SD3) keeps a fixed sin-cos table in an uninitialised (torch.empty) persistent buffer that
                # checkpoints fill in. Give it the real table. Other buffers are computed by their modules: keep them.
                if b_name == "pos_embed" and b.ndim == 3 and b.shape[0] == 1:
                    side = math.isqrt(b.shape[1])
                    if side * side == b.shape[1]:
                        table = mmdit.get_2d_sincos_pos_embed(b.shape[2], side)
                        b.copy_(torch.from_numpy(table).reshape(b.shape).to(b.dtype))
                    else:
                        b.copy_((torch.randn(b.shape, generator=gen) * std).to(b.dtype))
                # Stable Audio's rotary embedding keeps its frequencies in an uninitialised buffer too.
                if b_name == "inv_freq" and type(mod).__module__ == "comfy.ldm.audio.dit":
                    n = b.shape[0]
                    b.copy_((1.0 / 10000 ** (torch.arange(0, 2 * n, 2, dtype=torch.float32) / (2 * n))).to(b.dtype))
    return module


def _randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed), dtype=torch.float32)


def make_conditioning(context_shape, extras: dict, seed: int = 1234) -> tuple[list, list]:
    """Positive (random, fixed seed) and negative (zeros, like ConditioningZeroOut) CONDITIONING lists.

    `extras` maps conditioning-dict keys to either an int width (a ``[1, width]`` tensor, e.g. pooled_output), a
    float/str constant (e.g. guidance) or a tensor (used as is for both, e.g. an attention mask).
    """
    pos_ctx = _randn(context_shape, seed)
    pos_extra, neg_extra = {}, {}
    for i, (key, value) in enumerate(extras.items()):
        if isinstance(value, int) and not isinstance(value, bool):
            pos_extra[key] = _randn((context_shape[0], value), seed + 1 + i)
            neg_extra[key] = torch.zeros_like(pos_extra[key])
        elif isinstance(value, torch.Tensor):
            pos_extra[key] = value.clone()
            neg_extra[key] = value.clone()
        else:
            pos_extra[key] = value
            neg_extra[key] = value
    positive = [[pos_ctx, pos_extra]]
    negative = [[torch.zeros_like(pos_ctx), neg_extra]]
    return positive, negative


# ----------------------------------------------------------------------------------------------------------------------
# Building models

_TMP_DIR: str | None = None


def _copied_input(executor, *args, **kwargs):
    return executor(args[0].clone(), *args[1:], **kwargs)


def with_copied_input(model):
    """A clone whose diffusion-model wrappers added after this one get a copy of the model's input, as a
    half-precision model's cast gives them: ComfyUI's EasyCache adds to that input in place, which in float32 is the
    very tensor the denoised latent is computed from (studies/easycache_alias.py)."""
    import comfy.patcher_extension

    model = model.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "copied_input", _copied_input)
    return model


def force_split_cfg(monkeypatch) -> None:
    """Report no free memory, as a busy GPU would: ComfyUI then evaluates cond and uncond in separate calls."""
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda dev=None, torch_free_too=False: (0, 0) if torch_free_too else 0)


def default_models_dir() -> str:
    """A per-process temporary ComfyUI-style ``models`` directory (removed at exit)."""
    global _TMP_DIR
    if _TMP_DIR is None:
        _TMP_DIR = tempfile.mkdtemp(prefix="tiny_comfy_models_")
        atexit.register(shutil.rmtree, _TMP_DIR, True)
    return _TMP_DIR


def _patcher(model) -> Any:
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _model_config(unet_config: dict, expected: str):
    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if model_config is None or type(model_config).__name__ != expected:
        raise RuntimeError(f"{unet_config} matched {type(model_config).__name__}, expected {expected}")
    return model_config


def build_direct(spec: FamilySpec, seed: int = 0) -> Any:
    """Build a float32 BaseModel from `spec.unet_config` straight from the comfy classes, wrap it in a ModelPatcher."""
    model_config = _model_config(spec.unet_config, spec.detected_as)
    model_config.set_inference_dtype(torch.float32, None)  # what comfy.sd does on CPU; sets unet_config["dtype"]
    model = model_config.get_model(_outside_weights(spec))
    init_tiny_weights(model.diffusion_model, seed=seed)
    for i, embedder in enumerate(_outside_modules(model)):
        init_tiny_weights(embedder, seed=seed + 1 + i)
    model.eval()
    return _patcher(model)


def _outside_weights(spec: FamilySpec) -> dict:
    """Weights ComfyUI's model class loads besides the diffusion model's: Stable Audio's seconds embedders (their
    checkpoint keys; random here, replaced by `_outside_modules`' initialisation)."""
    if spec.detected_as != "StableAudio":
        return {}
    from comfy.ldm.audio.embedders import NumberConditioner

    return {f"conditioner.conditioners.{name}.{k}": v for name in ("seconds_start", "seconds_total")
            for k, v in NumberConditioner(768, min_val=0, max_val=512).state_dict().items()}


def _outside_modules(model) -> list:
    return [getattr(model, name) for name in ("seconds_start_embedder", "seconds_total_embedder") if hasattr(model, name)]


def unet_file_name(name: str, seed: int = 0) -> str:
    """File name of a saved tiny model: ``tiny_sd3.safetensors`` (seed 0), ``tiny_sd3_s7.safetensors`` (seed 7)."""
    return f"tiny_{name.lower()}{'' if seed == 0 else f'_s{seed}'}.safetensors"


def save_tiny_unet(spec: FamilySpec, models_dir: str | None = None, seed: int = 0) -> str:
    """Save the tiny diffusion model's state dict into ``<models_dir>/diffusion_models/`` (if not there yet).

    ``models_dir`` defaults to a per-process temporary directory. Returns the file's path.
    """
    models_dir = models_dir or default_models_dir()
    out_dir = os.path.join(models_dir, "diffusion_models")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, unet_file_name(spec.name, seed))
    if not os.path.exists(path):
        model_config = _model_config(spec.unet_config, spec.detected_as)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model({})
        init_tiny_weights(model.diffusion_model, seed=seed)
        sd = {k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}
        tmp = path + f".tmp{os.getpid()}"
        safetensors.torch.save_file(sd, tmp)
        os.replace(tmp, path)
    return path


def build_via_loader(spec: FamilySpec, models_dir: str | None = None, seed: int = 0) -> Any:
    """Save the tiny model and load it back through ComfyUI's detection + UNETLoader code path."""
    path = save_tiny_unet(spec, models_dir, seed)
    patcher = comfy.sd.load_diffusion_model(path)
    got = type(patcher.model.model_config).__name__
    if got != spec.detected_as:
        raise RuntimeError(f"{path} was detected as {got}, expected {spec.detected_as}")
    return patcher


# ----------------------------------------------------------------------------------------------------------------------
# Family specs. Token counts are small; widths are those of the family's real text encoder.

# Required fields later ComfyUI versions added to the params dataclasses of these families, each with the value
# ComfyUI's detection gives a checkpoint without the feature (so the model is the one older versions build).
LATER_FIELDS = {"txt_ids_dims": [], "vec_in_dim": None, "use_x0": False, "use_cond_type_embedding": False,
                "vision_in_dim": None, "meanflow_sum": False}


def with_declared_fields(params_class: type, unet_config: dict) -> dict:
    """`unet_config` plus those of LATER_FIELDS that the installed ComfyUI's `params_class` (the dataclass the model's
    constructor fills from the config) declares and the config lacks: one config serves every ComfyUI version, by
    what each version's class accepts rather than by its version number."""
    declared = {field.name for field in dataclasses.fields(params_class)}
    return {**{k: v for k, v in LATER_FIELDS.items() if k in declared and k not in unet_config}, **unet_config}


FLUX_PARAMS, CHROMA_PARAMS = comfy.ldm.flux.model.FluxParams, comfy.ldm.chroma.model.ChromaParams
RADIANCE_PARAMS = comfy.ldm.chroma_radiance.model.ChromaRadianceParams
HUNYUAN_PARAMS = comfy.ldm.hunyuan_video.model.HunyuanVideoParams


TOKENS = 16
# ComfyUI's Hunyuan3D 2.1 swaps cond and uncond context inside one batch: it cannot sample at cfg 1 or with CFG split.
BATCHED_CFG_ONLY = {"Hunyuan3D21"}
# Drift bounds of the random-weight models: Chroma Radiance decodes pixels with a NeRF head per patch, which turns a
# small feature change into a large pixel one; Stable Audio samples from σ = 500, where a whole step forecast in
# noise units moves far; the others stay within the common bounds.
DRIFT_SCALE = {"ChromaRadiance": 3.0, "StableAudio": 2.0}
WAN_TINY = {"image_model": "wan2.1", "dim": 128, "out_dim": 16, "in_dim": 16, "num_heads": 1, "ffn_dim": 256,
            "num_layers": 4, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
            "cross_attn_norm": True, "eps": 1e-6}

SPECS: dict[str, FamilySpec] = {
    # MMDiT: hidden = 64 * depth, heads = depth (hard-wired in comfy's MMDiT); pos_embed_max_size 16 -> latent <= 32x32.
    "SD3": FamilySpec(
        name="SD3",
        unet_config={
            "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
            "adm_in_channels": 2048,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 128}},
            "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
            "x_block_self_attn_layers": [],
        },
        block_lists={"joint_blocks": 2},
        latent_shape=(1, 16, 32, 32),
        context_shape=(1, TOKENS, 4096),
        cond_extras={"pooled_output": 2048},
        via_loader=True, detected_as="SD3", model_class="OpenAISignatureMMDITWrapper",
    ),
    # Wan 2.1: heads = dim // 128 is what detection infers.
    "Wan": FamilySpec(
        name="Wan",
        unet_config={
            "image_model": "wan2.1", "model_type": "t2v", "dim": 128, "out_dim": 16, "num_heads": 1, "ffn_dim": 256,
            "num_layers": 2, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
            "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16,
        },
        block_lists={"blocks": 2},
        latent_shape=(1, 16, 2, 16, 16),
        context_shape=(1, TOKENS, 4096),
        cond_extras={},
        via_loader=True, detected_as="WAN21_T2V", model_class="WanModel",
    ),
    # HunyuanVideo: heads = hidden // 128, axes_dim [16, 56, 56] are what detection infers.
    "HunyuanVideo": FamilySpec(
        name="HunyuanVideo",
        unet_config=with_declared_fields(HUNYUAN_PARAMS, {
            "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
            "vec_in_dim": 768, "axes_dim": [16, 56, 56], "meanflow": False, "context_in_dim": 4096,
            "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 2, "depth_single_blocks": 2,
            "theta": 256, "qkv_bias": True, "byt5": False, "guidance_embed": False,
        }),
        block_lists={"double_blocks": 2, "single_blocks": 2},
        latent_shape=(1, 16, 2, 16, 16),
        context_shape=(1, TOKENS, 4096),
        cond_extras={"pooled_output": 768},
        via_loader=True, detected_as="HunyuanVideo", model_class="HunyuanVideo",
    ),
    # Flux dev (guidance-distilled): T5-XXL context 4096, CLIP-L pooled 768.
    "Flux": FamilySpec(
        name="Flux",
        unet_config=with_declared_fields(FLUX_PARAMS, {
            "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
            "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2,
            "depth": 2, "depth_single_blocks": 4, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
        }),
        block_lists={"double_blocks": 2, "single_blocks": 4},
        latent_shape=(1, 16, 32, 32),
        context_shape=(1, TOKENS, 4096),
        cond_extras={"pooled_output": 768, "guidance": 3.5},
        via_loader=False, detected_as="Flux", model_class="Flux",
    ),
    # PixArt Sigma (PixArtMS): T5-XXL context 4096, no pooled output, EPS prediction, SDXL 4-channel latent.
    "PixArt": FamilySpec(
        name="PixArt",
        unet_config={
            "image_model": "pixart_sigma", "micro_condition": False, "patch_size": 2, "in_channels": 4,
            "hidden_size": 128, "depth": 3, "num_heads": 2, "caption_channels": 4096, "model_max_length": 300,
            "pe_interpolation": None, "input_size": None,
        },
        block_lists={"blocks": 3},
        latent_shape=(1, 4, 48, 48),
        context_shape=(1, TOKENS, 4096),
        cond_extras={},
        via_loader=False, detected_as="PixArtSigma", model_class="PixArtMS",
    ),
    # Lumina 2 (NextDiT): Gemma-2-2B context 2304; the text encoder also gives an attention mask (-> num_tokens).
    "Lumina2": FamilySpec(
        name="Lumina2",
        unet_config={
            "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 128, "cap_feat_dim": 2304,
            "n_layers": 3, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "qk_norm": True,
            "axes_dims": [16, 24, 24], "axes_lens": [300, 512, 512],
        },
        block_lists={"layers": 3, "noise_refiner": 1, "context_refiner": 1},
        latent_shape=(1, 16, 32, 32),
        context_shape=(1, TOKENS, 2304),
        cond_extras={"attention_mask": torch.ones(1, TOKENS, dtype=torch.long)},
        via_loader=False, detected_as="Lumina2", model_class="NextDiT",
    ),
    # Qwen-Image: Qwen2.5-VL-7B context 3584, no pooled output, Wan 2.1 latent layout [B, 16, T, H, W].
    "QwenImage": FamilySpec(
        name="QwenImage",
        unet_config={
            "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "patch_size": 2, "num_layers": 3,
            "attention_head_dim": 64, "num_attention_heads": 2, "joint_attention_dim": 3584,
            "axes_dims_rope": (16, 24, 24),
        },
        block_lists={"transformer_blocks": 3},
        latent_shape=(1, 16, 1, 32, 32),
        context_shape=(1, TOKENS, 3584),
        cond_extras={},
        via_loader=False, detected_as="QwenImage", model_class="QwenImageTransformer2DModel",
    ),
    # Chroma (Flux without pooled text or guidance inputs: its modulations come from the distilled guidance layer);
    # ComfyUI's Flux base still reads a pooled vector, which Chroma ignores. in_channels is the patchified 16 x 2 x 2.
    "Chroma": FamilySpec(
        name="Chroma",
        unet_config=with_declared_fields(CHROMA_PARAMS, {
            "image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2, "context_in_dim": 4096,
            "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
            "axes_dim": [16, 24, 24], "theta": 10000, "qkv_bias": True, "in_dim": 64, "out_dim": 128,
            "hidden_dim": 256, "n_layers": 2,
        }),
        block_lists={"double_blocks": 2, "single_blocks": 2},
        latent_shape=(1, 16, 32, 32),
        context_shape=(1, TOKENS, 4096),
        cond_extras={"pooled_output": 768},
        via_loader=False, detected_as="Chroma", model_class="Chroma",
    ),
    # AuraFlow (MMDiT): detection reads only the layer counts and widths of the inputs, so dim, heads and the global
    # conditioning width are set here; SDXL 4-channel latent, Pile-T5 context 2048.
    "AuraFlow": FamilySpec(
        name="AuraFlow",
        unet_config={
            "max_seq": 256, "cond_seq_dim": 2048, "n_double_layers": 2, "n_layers": 4, "dim": 128, "n_heads": 2,
            "global_conddim": 128, "in_channels": 4, "out_channels": 4, "patch_size": 2,
        },
        block_lists={"double_layers": 2, "single_layers": 2},
        latent_shape=(1, 4, 32, 32),
        context_shape=(1, TOKENS, 2048),
        cond_extras={},
        via_loader=False, detected_as="AuraFlow", model_class="MMDiT",
    ),
    # LTXV: 128-channel video latent [B, 128, T, H, W] with patch size 1; T5-XXL context 4096 with its attention mask.
    "LTXV": FamilySpec(
        name="LTXV",
        unet_config={
            "image_model": "ltxv", "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
            "cross_attention_dim": 64, "in_channels": 128, "caption_channels": 4096,
        },
        block_lists={"transformer_blocks": 2},
        latent_shape=(1, 128, 2, 8, 8),
        context_shape=(1, TOKENS, 4096),
        cond_extras={"attention_mask": torch.ones(1, TOKENS, dtype=torch.long)},
        via_loader=False, detected_as="LTXV", model_class="LTXVModel",
    ),
    # ---- the families added for issue 20: each verified to build, detect and sample ----
    # Wan 2.2 5B: 48-channel latent; the plain WanModel loop.
    "Wan22": FamilySpec(
        name="Wan22", unet_config=dict(WAN_TINY, model_type="t2v", in_dim=48, out_dim=48),
        block_lists={"blocks": 4}, latent_shape=(1, 48, 2, 8, 8), context_shape=(1, TOKENS, 4096), cond_extras={},
        via_loader=False, detected_as="WAN22_T2V", model_class="WanModel",
    ),
    # VACE: hints from its own blocks are added to the hidden state in place after some blocks (a side stream).
    "WanVace": FamilySpec(
        name="WanVace", unet_config=dict(WAN_TINY, model_type="vace", vace_layers=2, vace_in_dim=96),
        block_lists={"blocks": 4}, latent_shape=(1, 16, 2, 8, 8), context_shape=(1, TOKENS, 4096),
        cond_extras={"vace_frames": [_randn((1, 32, 2, 8, 8), 11)], "vace_strength": [1.0]},
        via_loader=False, detected_as="WAN21_Vace", model_class="VaceWanModel",
    ),
    # Camera: camera features are added once before the blocks; image cross-attention from a CLIP vision output.
    "WanCamera": FamilySpec(
        name="WanCamera", unet_config=dict(WAN_TINY, model_type="camera", in_dim=32),
        block_lists={"blocks": 4}, latent_shape=(1, 16, 2, 8, 8), context_shape=(1, TOKENS, 4096),
        cond_extras={"camera_conditions": _randn((1, 24, 2, 64, 64), 12),
                     "clip_vision_output": SimpleNamespace(penultimate_hidden_states=_randn((1, 257, 1280), 13))},
        via_loader=False, detected_as="WAN21_Camera", model_class="CameraWanModel",
    ),
    # HuMo: audio cross-attention inside each block.
    "WanHuMo": FamilySpec(
        name="WanHuMo", unet_config=dict(WAN_TINY, model_type="humo"),
        block_lists={"blocks": 4}, latent_shape=(1, 16, 2, 8, 8), context_shape=(1, TOKENS, 4096),
        cond_extras={"audio_embed": _randn((1, 2, 8, 5, 1280), 14)},
        via_loader=False, detected_as="WAN21_HuMo", model_class="HumoWanModel",
    ),
    # Animate: pose latents added before the blocks; its face adapter (every 5th block, out of place) needs face
    # pixels at 512², left out here (2 s a call).
    "WanAnimate": FamilySpec(
        name="WanAnimate", unet_config=dict(WAN_TINY, model_type="animate", num_layers=5),
        block_lists={"blocks": 5}, latent_shape=(1, 16, 2, 8, 8), context_shape=(1, TOKENS, 4096),
        cond_extras={"pose_video_latent": _randn((1, 16, 1, 8, 8), 15)},
        via_loader=False, detected_as="WAN22_Animate", model_class="AnimateWanModel",
    ),
    # S2V: an audio injector adds to the hidden state in place after blocks 0 and 2 (a side stream).
    "WanS2V": FamilySpec(
        name="WanS2V", unet_config=dict(WAN_TINY, model_type="s2v", audio_inject_layers=[0, 2]),
        block_lists={"blocks": 4}, latent_shape=(1, 16, 2, 8, 8), context_shape=(1, TOKENS, 4096),
        cond_extras={"audio_embed": _randn((1, 25, 1024, 8), 16)},
        via_loader=False, detected_as="WAN22_S2V", model_class="WanModel_S2V",
    ),
    # Chroma Radiance: Chroma's loop in pixel space, with a NeRF head after the blocks.
    "ChromaRadiance": FamilySpec(
        name="ChromaRadiance",
        unet_config=with_declared_fields(RADIANCE_PARAMS, {
                     "image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3, "patch_size": 16,
                     "context_in_dim": 4096, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
                     "depth_single_blocks": 2, "axes_dim": [16, 24, 24], "theta": 10000, "qkv_bias": True,
                     "in_dim": 64, "out_dim": 128, "hidden_dim": 256, "n_layers": 2, "nerf_hidden_size": 32,
                     "nerf_mlp_ratio": 4, "nerf_depth": 2, "nerf_max_freqs": 8, "nerf_tile_size": 32,
                     "nerf_final_head_type": "conv", "nerf_embedder_dtype": torch.float32}),
        block_lists={"double_blocks": 2, "single_blocks": 2}, latent_shape=(1, 3, 128, 128),
        context_shape=(1, TOKENS, 4096), cond_extras={"pooled_output": 768},
        via_loader=False, detected_as="ChromaRadiance", model_class="ChromaRadiance",
    ),
    # Hunyuan3D 2.0: Flux's double/single loop over shape latents, with dit replace.
    "Hunyuan3D2": FamilySpec(
        name="Hunyuan3D2",
        unet_config={"image_model": "hunyuan3d2", "in_channels": 64, "context_in_dim": 1536, "hidden_size": 128,
                     "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "qkv_bias": True,
                     "guidance_embed": False},
        block_lists={"double_blocks": 2, "single_blocks": 2}, latent_shape=(1, 64, 32),
        context_shape=(1, TOKENS, 1536), cond_extras={},
        via_loader=False, detected_as="Hunyuan3Dv2", model_class="Hunyuan3Dv2",
    ),
    # Hunyuan3D 2.1: a U-Net of blocks (the first half's outputs feed the second half through a skip stack), the
    # last one MoE; it swaps cond and uncond context inside one batch, so it samples with CFG batched only.
    "Hunyuan3D21": FamilySpec(
        name="Hunyuan3D21",
        unet_config={"image_model": "hunyuan3d2_1", "in_channels": 64, "context_dim": 1024, "hidden_size": 128,
                     "mlp_ratio": 4.0, "num_heads": 2, "depth": 5, "qkv_bias": False, "guidance_cond_proj_dim": None,
                     "num_moe_layers": 1, "num_experts": 2},
        block_lists={"blocks": 5}, latent_shape=(1, 64, 32), context_shape=(1, TOKENS, 1024), cond_extras={},
        via_loader=False, detected_as="Hunyuan3Dv2_1", model_class="HunYuanDiTPlain",
    ),
    # OmniGen2: Lumina-like layers after text and noise refiners, object-patched.
    "OmniGen2": FamilySpec(
        name="OmniGen2",
        unet_config={"image_model": "omnigen2", "axes_dim_rope": [16, 24, 24], "axes_lens": [1024, 1664, 1664],
                     "ffn_dim_multiplier": None, "hidden_size": 128, "in_channels": 16, "multiple_of": 256,
                     "norm_eps": 1e-05, "num_attention_heads": 2, "num_kv_heads": 1, "num_layers": 3,
                     "num_refiner_layers": 1, "out_channels": None, "patch_size": 2, "text_feat_dim": 2048,
                     "timestep_scale": 1000.0},
        block_lists={"layers": 3}, latent_shape=(1, 16, 32, 32), context_shape=(1, TOKENS, 2048),
        cond_extras={"attention_mask": torch.ones(1, TOKENS, dtype=torch.long)},
        via_loader=False, detected_as="Omnigen2", model_class="OmniGen2Transformer2DModel",
    ),
    # ACE-Step (audio): blocks called with keywords only; the lyrics Conformer (fixed width 1024) runs every call.
    "ACEStep": FamilySpec(
        name="ACEStep",
        unet_config={"audio_model": "ace", "attention_head_dim": 64, "num_attention_heads": 2, "inner_dim": 128,
                     "num_layers": 3, "in_channels": 8, "out_channels": 8, "mlp_ratio": 2.5, "patch_size": [16, 1],
                     "max_height": 16, "max_width": 32768, "max_position": 32768, "rope_theta": 1000000.0,
                     "speaker_embedding_dim": 512, "text_embedding_dim": 768, "ssl_encoder_depths": [8, 8],
                     "ssl_latent_dims": [1024, 768], "ssl_names": ["mert", "m-hubert"],
                     "lyric_encoder_vocab_size": 6693, "lyric_hidden_size": 1024},
        block_lists={"transformer_blocks": 3}, latent_shape=(1, 8, 16, 32), context_shape=(1, TOKENS, 768),
        cond_extras={"conditioning_lyrics": torch.arange(12).reshape(1, 12)},
        via_loader=False, detected_as="ACEStep", model_class="ACEStepTransformer2DModel",
    ),
    # HiDream: keyword-only blocks, a (image, text) tuple from double blocks; per-block Llama features.
    "HiDream": FamilySpec(
        name="HiDream",
        unet_config={"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16,
                     "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 64, "num_attention_heads": 2,
                     "caption_channels": [4096, 4096], "text_emb_dim": 2048, "num_routed_experts": 2,
                     "num_activated_experts": 1, "axes_dims_rope": [32, 16, 16], "max_resolution": [32, 32],
                     "llama_layers": [0, 1, 2, 3]},
        block_lists={"double_stream_blocks": 2, "single_stream_blocks": 2}, latent_shape=(1, 16, 32, 32),
        context_shape=(1, TOKENS, 4096),
        cond_extras={"pooled_output": 2048, "conditioning_llama3": _randn((1, 4, 8, 4096), 17)},
        via_loader=False, detected_as="HiDream", model_class="HiDreamImageTransformer2DModel",
    ),
    # Cosmos Predict2: batch-first video blocks, object-patched.
    "CosmosPredict2": FamilySpec(
        name="CosmosPredict2",
        unet_config={"image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
                     "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1,
                     "model_channels": 128, "num_blocks": 3, "num_heads": 2, "concat_padding_mask": True,
                     "crossattn_emb_channels": 1024, "pos_emb_cls": "rope3d", "pos_emb_learnable": True,
                     "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30, "use_adaln_lora": True,
                     "adaln_lora_dim": 32, "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
                     "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0,
                     "extra_h_extrapolation_ratio": 1.0, "extra_w_extrapolation_ratio": 1.0,
                     "extra_t_extrapolation_ratio": 1.0, "rope_enable_fps_modulation": False},
        block_lists={"blocks": 3}, latent_shape=(1, 16, 1, 32, 32), context_shape=(1, TOKENS, 1024), cond_extras={},
        via_loader=False, detected_as="CosmosT2IPredict2", model_class="MiniTrainDIT",
    ),
    # HunyuanImage 2.1 and its refiner: ComfyUI's HunyuanVideo class (meanflow, byT5), loaded through detection.
    "HunyuanImage21": FamilySpec(
        name="HunyuanImage21",
        unet_config=with_declared_fields(HUNYUAN_PARAMS, {
                     "image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "patch_size": [1, 1],
                     "vec_in_dim": None, "axes_dim": [64, 64], "meanflow": True, "context_in_dim": 3584,
                     "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 2, "depth_single_blocks": 2,
                     "theta": 256, "qkv_bias": True, "byt5": True, "guidance_embed": True}),
        block_lists={"double_blocks": 2, "single_blocks": 2}, latent_shape=(1, 64, 16, 16),
        context_shape=(1, TOKENS, 3584), cond_extras={},
        via_loader=True, detected_as="HunyuanImage21", model_class="HunyuanVideo",
    ),
    "HunyuanImage21Refiner": FamilySpec(
        name="HunyuanImage21Refiner",
        unet_config=with_declared_fields(HUNYUAN_PARAMS, {
                     "image_model": "hunyuan_video", "in_channels": 128, "out_channels": 64, "patch_size": [1, 1, 1],
                     "vec_in_dim": None, "axes_dim": [16, 56, 56], "meanflow": False, "context_in_dim": 3584,
                     "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 2, "depth_single_blocks": 2,
                     "theta": 256, "qkv_bias": True, "byt5": False, "guidance_embed": True}),
        block_lists={"double_blocks": 2, "single_blocks": 2}, latent_shape=(1, 64, 1, 16, 16),
        context_shape=(1, TOKENS, 3584), cond_extras={},
        via_loader=True, detected_as="HunyuanImage21Refiner", model_class="HunyuanVideo",
    ),
    # HunyuanDiT: dit replace returns the image stream only; long skips from the first half to the second.
    "HunyuanDiT": FamilySpec(
        name="HunyuanDiT",
        unet_config={"image_model": "hydit", "depth": 4, "hidden_size": 128, "num_heads": 2, "patch_size": 2,
                     "in_channels": 4, "text_len": TOKENS, "text_len_t5": TOKENS},
        block_lists={"blocks": 4}, latent_shape=(1, 4, 32, 32), context_shape=(1, TOKENS, 1024),
        cond_extras={"attention_mask": torch.ones(1, TOKENS, dtype=torch.long),
                     "conditioning_mt5xl": _randn((1, TOKENS, 2048), 18),
                     "attention_mask_mt5xl": torch.ones(1, TOKENS, dtype=torch.long)},
        via_loader=False, detected_as="HunyuanDiT", model_class="HunYuanDiT",
    ),
    # Stable Audio 1.0: a continuous transformer under `transformer.layers`, with dit replace; seconds conditioning.
    "StableAudio": FamilySpec(
        name="StableAudio",
        unet_config={"audio_model": "dit1.0", "io_channels": 64, "patch_size": 1, "embed_dim": 128,
                     "cond_token_dim": 768, "project_cond_tokens": False, "global_cond_dim": 1536,
                     "project_global_cond": True, "input_concat_dim": 0, "prepend_cond_dim": 0, "depth": 2,
                     "num_heads": 2, "transformer_type": "continuous_transformer", "global_cond_type": "prepend"},
        block_lists={"transformer.layers": 2}, latent_shape=(1, 64, 32), context_shape=(1, TOKENS, 768),
        cond_extras={"seconds_start": 0.0, "seconds_total": 10.0},
        via_loader=False, detected_as="StableAudio", model_class="AudioDiffusionTransformer",
    ),
    # Mochi: asymmetric joint blocks (image and text of different widths) with dit replace.
    "Mochi": FamilySpec(
        name="Mochi",
        unet_config={"image_model": "mochi_preview", "depth": 3, "patch_size": 2, "num_heads": 2, "hidden_size_x": 128,
                     "hidden_size_y": 64, "mlp_ratio_x": 96.0, "mlp_ratio_y": 4.0, "learn_sigma": False,
                     "in_channels": 12, "qk_norm": True, "qkv_bias": False, "out_bias": True, "attn_drop": 0.0,
                     "patch_embed_bias": True, "posenc_preserve_area": True, "timestep_mlp_bias": True,
                     "attend_to_padding": False, "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": 4096,
                     "t5_token_length": 256, "rope_theta": 10000.0},
        block_lists={"blocks": 3}, latent_shape=(1, 12, 2, 16, 16), context_shape=(1, TOKENS, 4096),
        cond_extras={"attention_mask": torch.ones(1, TOKENS, dtype=torch.long)},
        via_loader=False, detected_as="GenmoMochi", model_class="AsymmDiTJoint",
    ),
}


def build_family(name: str, models_dir: str | None = None, seed: int = 0) -> TinyBundle:
    """Build the tiny bundle of family `name` (a key of SPECS / FAMILIES)."""
    spec = SPECS[name]
    if spec.via_loader:
        patcher = build_via_loader(spec, models_dir, seed)
    else:
        patcher = build_direct(spec, seed)
    dm_class = type(patcher.model.diffusion_model).__name__
    if dm_class != spec.model_class:
        raise RuntimeError(f"{name}: diffusion model is {dm_class}, expected {spec.model_class}")
    positive, negative, latent = make_inputs(name, seed)
    return TinyBundle(patcher, positive, negative, latent)


def make_inputs(name: str, seed: int = 0) -> tuple[list, list, torch.Tensor]:
    """Fresh ``(positive, negative, latent)`` for family `name`: deterministic conditioning, empty (zero) latent."""
    spec = SPECS[name]
    positive, negative = make_conditioning(spec.context_shape, spec.cond_extras, seed=1234 + seed)
    latent = torch.zeros(spec.latent_shape, dtype=torch.float32)
    return positive, negative, latent


def build_sd3(models_dir: str | None = None, seed: int = 0) -> TinyBundle:
    return build_family("SD3", models_dir, seed)


def build_wan21(models_dir: str | None = None, seed: int = 0) -> TinyBundle:
    return build_family("Wan", models_dir, seed)


def build_hunyuan_video(models_dir: str | None = None, seed: int = 0) -> TinyBundle:
    return build_family("HunyuanVideo", models_dir, seed)


def build_flux(models_dir: str | None = None, seed: int = 0) -> TinyBundle:
    return build_family("Flux", models_dir, seed)


def build_pixart(models_dir: str | None = None, seed: int = 0) -> TinyBundle:
    return build_family("PixArt", models_dir, seed)


def build_lumina2(models_dir: str | None = None, seed: int = 0) -> TinyBundle:
    return build_family("Lumina2", models_dir, seed)


def build_qwen_image(models_dir: str | None = None, seed: int = 0) -> TinyBundle:
    return build_family("QwenImage", models_dir, seed)


def build_chroma(models_dir: str | None = None, seed: int = 0) -> TinyBundle:
    return build_family("Chroma", models_dir, seed)


def build_auraflow(models_dir: str | None = None, seed: int = 0) -> TinyBundle:
    return build_family("AuraFlow", models_dir, seed)


def build_ltxv(models_dir: str | None = None, seed: int = 0) -> TinyBundle:
    return build_family("LTXV", models_dir, seed)


FAMILIES: dict[str, Callable[..., TinyBundle]] = {
    "SD3": build_sd3,
    "Wan": build_wan21,
    "HunyuanVideo": build_hunyuan_video,
    "Flux": build_flux,
    "PixArt": build_pixart,
    "Lumina2": build_lumina2,
    "QwenImage": build_qwen_image,
    "Chroma": build_chroma,
    "AuraFlow": build_auraflow,
    "LTXV": build_ltxv,
    **{name: functools.partial(build_family, name) for name in (
        "Wan22", "WanVace", "WanCamera", "WanHuMo", "WanAnimate", "WanS2V", "ChromaRadiance", "Hunyuan3D2",
        "Hunyuan3D21", "OmniGen2", "ACEStep", "HiDream", "CosmosPredict2", "HunyuanImage21", "HunyuanImage21Refiner",
        "HunyuanDiT", "StableAudio", "Mochi")},
}


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


def run_sampler(model_patcher, positive, negative, latent, steps: int = 6, cfg: float = 2.0, sampler: str = "euler",
                scheduler: str = "simple", seed: int = 1, start_step: int | None = None,
                last_step: int | None = None, denoise: float = 1.0, add_noise: bool = True,
                force_full_denoise: bool = False, callback=None) -> torch.Tensor:
    """Sample like ComfyUI's KSampler / KSamplerAdvanced (nodes.common_ksampler) and return the output latent tensor.

    `latent` is a tensor or a LATENT dict ``{"samples": tensor, ...}`` (``noise_mask`` / ``batch_index`` honoured).
    `start_step` / `last_step` / `add_noise` / `force_full_denoise` mirror KSamplerAdvanced (its
    ``return_with_leftover_noise == "disable"`` is ``force_full_denoise=True``); with the defaults this is KSampler.
    """
    noise_mask = None
    batch_inds = None
    if isinstance(latent, dict):
        noise_mask = latent.get("noise_mask")
        batch_inds = latent.get("batch_index")
        latent = latent["samples"]
    latent = comfy.sample.fix_empty_latent_channels(model_patcher, latent)
    if add_noise:
        noise = comfy.sample.prepare_noise(latent, seed, batch_inds)
    else:
        noise = torch.zeros(latent.size(), dtype=latent.dtype, layout=latent.layout, device="cpu")
    return comfy.sample.sample(model_patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=denoise, disable_noise=not add_noise, start_step=start_step,
                               last_step=last_step, force_full_denoise=force_full_denoise, noise_mask=noise_mask,
                               callback=callback, disable_pbar=True, seed=seed)


def sampled_shape(model_patcher, latent_shape: tuple) -> tuple:
    """Shape of the latent that sampling a `latent_shape` latent returns: the latent format's `process_out` may repack
    the model's output (HunyuanImage 2.1's refiner, where ComfyUI's latent format folds frame pairs into channels)."""
    latent_format = model_patcher.get_model_object("latent_format")
    return tuple(latent_format.process_out(torch.zeros(latent_shape)).shape)


def diffusion_model(model_patcher) -> torch.nn.Module:
    """The transformer inside a bundle's ModelPatcher."""
    return model_patcher.model.diffusion_model


def count_params(model_patcher) -> int:
    return sum(p.numel() for p in diffusion_model(model_patcher).parameters())


def comfyui_nodes() -> ModuleType:
    """ComfyUI's own top-level `nodes` module (its nodes.py: KSampler, NODE_CLASS_MAPPINGS, the custom-node loader).
    Named `nodes` like the pack's package, so it is fetched here only, and checked to be the booted checkout's."""
    module = importlib.import_module("nodes")
    if os.path.dirname(os.path.abspath(module.__file__)) != COMFYUI_DIR:
        raise RuntimeError(f"`nodes` resolved to {module.__file__}, not ComfyUI's nodes.py in {COMFYUI_DIR}")
    return module


def session_of(model_patcher) -> Any:
    """The pack's session behind a patched model (its OUTER_SAMPLE wrapper is the session's bound method)."""
    return model_patcher.wrappers["outer_sample"]["calibrated_cache"][0].__self__


def cache_block_by_block(monkeypatch, model_patcher) -> None:
    """Make the pack's runs on this patched model cache every block on its own (the engine without spans), as the
    reference spans must equal."""
    module = sys.modules[type(session_of(model_patcher)).__module__]

    class BlockByBlock(module.RunState):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.caches_spans = False

    monkeypatch.setattr(module, "RunState", BlockByBlock)


def load_pack(parent: str | None = None) -> tuple[type, type]:
    """Load the repo as ComfyUI loads a cloned pack (custom_nodes/<any folder name>/__init__.py) and return its Cache
    Policy and Apply Calibrated Cache node classes."""
    nodes = comfyui_nodes()
    folder = Path(parent or tempfile.mkdtemp()) / "some_folder_name"
    folder.symlink_to(Path(__file__).resolve().parents[2], target_is_directory=True)
    if not asyncio.run(nodes.load_custom_node(str(folder))):
        raise RuntimeError("ComfyUI could not load the pack; its log says why")
    return nodes.NODE_CLASS_MAPPINGS["CalibratedCache_CachePolicy"], nodes.NODE_CLASS_MAPPINGS["CalibratedCache_Apply"]
