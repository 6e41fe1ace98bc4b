"""Tiny random-weight models of the DiT families ComfyUI added by 0.8.0, for the ComfyUI integration tier.

A plain helper module beside `tiny_models` (whose weights, conditioning and sampling it reuses). Each family is built
straight from its `comfy.supported_models` config class with a narrow `unet_config`: ComfyUI's own matching of a
config to a class keys on the real widths for some of them (Z-Image on dim 3840, Kandinsky 5 image on 2560), so the
config class is named rather than matched; the model is that class's real `comfy.model_base` model around the real
diffusion model.

A family is offered only where this ComfyUI has what it needs (`NewFamily.present`, a feature check, never a version
number): on ComfyUI 0.3.64 none of them is, and `available()` is empty.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Any, Callable, NamedTuple

import torch

from tiny_models import TOKENS, TinyBundle, _patcher, _randn, init_tiny_weights, make_conditioning

import comfy.model_base  # noqa: E402  (tiny_models booted ComfyUI)
import comfy.supported_models  # noqa: E402


def _has_class(module: Any, name: str) -> Callable[[], bool]:
    return lambda: hasattr(module, name)


def _takes(module: str, path: str, parameter: str) -> Callable[[], bool]:
    """Whether the callable at `path` (dotted, e.g. a class's method) in `module` takes `parameter`."""
    def check() -> bool:
        try:
            target = functools.reduce(getattr, path.split("."), importlib.import_module(module))
        except (ImportError, AttributeError):
            return False
        return parameter in inspect.signature(target).parameters
    return check


def _flux_field(name: str) -> Callable[[], bool]:
    def check() -> bool:
        from comfy.ldm.flux.model import FluxParams

        return name in {f.name for f in dataclasses.fields(FluxParams)}
    return check


class NewFamily(NamedTuple):
    """A tiny model of a family new in ComfyUI 0.8.0, and what the tests assert about it."""

    name: str
    config: str  # comfy.supported_models class the model is built from
    model_base: str  # comfy.model_base class of the built model
    model_class: str  # diffusion model class
    pack_family: str  # the pack's family name for it
    unet_config: dict
    block_lists: dict  # the block lists the pack hooks, in order: attribute of diffusion_model -> number of blocks
    context_shape: tuple
    cond_extras: dict
    latent: Callable[[], Any]  # a fresh latent: a tensor, or a LATENT dict (nested latents, noise masks)
    present: Callable[[], bool]  # this ComfyUI has what the family needs


FLUX2 = {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "hidden_size": 128,
         "mlp_ratio": 3.0, "num_heads": 2, "axes_dim": [16, 16, 16, 16], "theta": 2000, "patch_size": 1,
         "qkv_bias": False, "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
         "default_ref_method": "index", "ref_index_scale": 10.0}
LTXAV = {"image_model": "ltxav", "num_layers": 3, "attention_head_dim": 32, "num_attention_heads": 2,
         "cross_attention_dim": 64, "in_channels": 128, "audio_in_channels": 128, "audio_attention_head_dim": 16,
         "audio_num_attention_heads": 2, "audio_cross_attention_dim": 32, "caption_channels": 3840}
HUNYUAN_VIDEO_15 = {"image_model": "hunyuan_video", "out_channels": 32, "patch_size": [1, 1, 1], "vec_in_dim": None,
                    "axes_dim": [16, 56, 56], "context_in_dim": 3584, "hidden_size": 128, "mlp_ratio": 4.0,
                    "num_heads": 1, "depth": 3, "depth_single_blocks": 0, "theta": 256, "qkv_bias": True,
                    "byt5": True, "guidance_embed": False, "use_cond_type_embedding": True, "vision_in_dim": 1152,
                    "meanflow_sum": True}
KANDINSKY5 = {"image_model": "kandinsky5", "in_visual_dim": 16, "out_visual_dim": 16, "in_text_dim": 3584,
              "in_text_dim2": 768, "time_dim": 64, "model_dim": 128, "ff_dim": 256, "patch_size": (1, 2, 2),
              "num_text_blocks": 1, "num_visual_blocks": 3, "axes_dims": (16, 24, 24)}
LTX_LATENT = (1, 128, 2, 8, 8)  # video: 128 tokens
LTX_AUDIO = (1, 8, 10, 16)  # audio: 10 tokens of 8 channels x 16 frequency bins
LTX_MASK = torch.ones(1, TOKENS, dtype=torch.long)


def nested(*parts: torch.Tensor):
    """ComfyUI's audio+video latent (LTXVConcatAVLatent): one nested tensor, packed into one sequence to sample."""
    import comfy.nested_tensor

    return comfy.nested_tensor.NestedTensor(parts)


def ltx2_latent() -> dict:
    return {"samples": nested(torch.zeros(LTX_LATENT), torch.zeros(LTX_AUDIO))}


def ltx2_image_to_video_latent() -> dict:
    """LTXVImgToVideoInplace then LTXVConcatAVLatent: the first video frame is the image's latent, kept by a noise mask
    of zero there (the model then gets a timestep per token, zero on the image's)."""
    video = torch.zeros(LTX_LATENT)
    video[:, :, :1] = _randn((1, LTX_LATENT[1], 1, *LTX_LATENT[3:]), 21)
    mask = torch.ones((1, 1, *LTX_LATENT[2:]))
    mask[:, :, :1] = 0.0
    return {"samples": nested(video, torch.zeros(LTX_AUDIO)), "noise_mask": nested(mask, torch.ones(LTX_AUDIO))}


def _zeros(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.zeros(shape)


LTX2_PRESENT = _has_class(comfy.model_base, "LTXAV")
SPECS: dict[str, NewFamily] = {
    # Flux 2 dev: modulation outside the blocks (one per stream, shared by all blocks), SiLU-gated MLPs, no biases,
    # four RoPE axes, Mistral-3 context of 3 x 5120; ComfyUI pads the context to 512 tokens.
    "Flux2": NewFamily(
        "Flux2", "Flux2", "Flux2", "Flux", "Flux",
        dict(FLUX2, context_in_dim=15360, depth=2, depth_single_blocks=4, guidance_embed=True),
        {"double_blocks": 2, "single_blocks": 4}, (1, TOKENS, 15360), {"pooled_output": None, "guidance": 4.0},
        _zeros(1, 128, 16, 16), _has_class(comfy.model_base, "Flux2")),
    # Flux 2 klein's layout: no guidance embedding, a Qwen3-4B context (3 x 2560), few double blocks before many single.
    "Flux2Klein": NewFamily(
        "Flux2Klein", "Flux2", "Flux2", "Flux", "Flux",
        dict(FLUX2, context_in_dim=7680, depth=1, depth_single_blocks=4, guidance_embed=False),
        {"double_blocks": 1, "single_blocks": 4}, (1, TOKENS, 7680), {"pooled_output": None},
        _zeros(1, 128, 16, 16), _has_class(comfy.model_base, "Flux2")),
    # LTX-2: one list of audio-video blocks, each taking (video, audio) as one tuple; a Gemma context split in two.
    "LTX2": NewFamily(
        "LTX2", "LTXAV", "LTXAV", "LTXAVModel", "LTX-2", LTXAV, {"transformer_blocks": 3},
        (1, TOKENS, 2 * 3840), {"attention_mask": LTX_MASK}, ltx2_latent, LTX2_PRESENT),
    "LTX2ImageToVideo": NewFamily(
        "LTX2ImageToVideo", "LTXAV", "LTXAV", "LTXAVModel", "LTX-2", LTXAV, {"transformer_blocks": 3},
        (1, TOKENS, 2 * 3840), {"attention_mask": LTX_MASK}, ltx2_image_to_video_latent, LTX2_PRESENT),
    # Z-Image (Turbo): NextDiT with its own modulation (a 256-wide time embedding, so dim >= 256) and pad tokens, a
    # Qwen3-4B context.
    "ZImage": NewFamily(
        "ZImage", "ZImage", "Lumina2", "NextDiT", "Lumina2",
        {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 2560, "n_layers": 3,
         "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "qk_norm": True, "axes_dims": [32, 48, 48],
         "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
         "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32},
        {"layers": 3}, (1, TOKENS, 2560), {"attention_mask": torch.ones(1, TOKENS, dtype=torch.long)},
        _zeros(1, 16, 32, 32), _takes("comfy.ldm.lumina.model", "NextDiT", "z_image_modulation")),
    # HunyuanVideo 1.5: double blocks only (the single list is empty), byT5 glyph tokens before the Qwen context.
    "HunyuanVideo15": NewFamily(
        "HunyuanVideo15", "HunyuanVideo15", "HunyuanVideo15", "HunyuanVideo", "HunyuanVideo",
        dict(HUNYUAN_VIDEO_15, in_channels=65, meanflow=False), {"double_blocks": 3, "single_blocks": 0},
        (1, TOKENS, 3584), {"pooled_output": None, "conditioning_byt5small": _randn((1, 8, 1472), 22)},
        _zeros(1, 32, 2, 8, 8), _has_class(comfy.model_base, "HunyuanVideo15")),
    # Its distilled super-resolution model: the low-resolution video is concatenated, a second (mean-flow) time input.
    "HunyuanVideo15SR": NewFamily(
        "HunyuanVideo15SR", "HunyuanVideo15_SR_Distilled", "HunyuanVideo15_SR_Distilled", "HunyuanVideo",
        "HunyuanVideo", dict(HUNYUAN_VIDEO_15, in_channels=98, meanflow=True),
        {"double_blocks": 3, "single_blocks": 0}, (1, TOKENS, 3584),
        {"pooled_output": None, "conditioning_byt5small": _randn((1, 8, 1472), 23)}, _zeros(1, 32, 2, 8, 8),
        _has_class(comfy.model_base, "HunyuanVideo15_SR_Distilled")),
    # Kandinsky 5 video (Lite layout): text blocks refine the Qwen context every step, then the visual blocks.
    "Kandinsky5": NewFamily(
        "Kandinsky5", "Kandinsky5", "Kandinsky5", "Kandinsky5", "Kandinsky 5",
        dict(KANDINSKY5, visual_embed_dim=132), {"visual_transformer_blocks": 3},
        (1, TOKENS, 3584), {"pooled_output": 768}, _zeros(1, 16, 2, 16, 16),
        _has_class(comfy.model_base, "Kandinsky5")),
    "Kandinsky5Image": NewFamily(
        "Kandinsky5Image", "Kandinsky5Image", "Kandinsky5Image", "Kandinsky5", "Kandinsky 5",
        dict(KANDINSKY5, visual_embed_dim=64, rope_scale_factor=(1.0, 1.0, 1.0)),
        {"visual_transformer_blocks": 3}, (1, TOKENS, 3584), {"pooled_output": 768},
        _zeros(1, 16, 32, 32), _has_class(comfy.model_base, "Kandinsky5Image")),
    # Ovis-Image: Flux with gated (gate/up/down) MLPs and a normed Qwen3-2B context, no pooled vector or guidance.
    "OvisImage": NewFamily(
        "OvisImage", "FluxSchnell", "Flux", "Flux", "Flux",
        {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": None,
         "context_in_dim": 2048, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
         "depth_single_blocks": 2, "axes_dim": [16, 24, 24], "theta": 10000, "qkv_bias": True, "guidance_embed": False,
         "txt_ids_dims": [1, 2], "yak_mlp": True, "txt_norm": True},
        {"double_blocks": 2, "single_blocks": 2}, (1, TOKENS, 2048), {"pooled_output": None},
        _zeros(1, 16, 32, 32), _flux_field("yak_mlp")),
    # Qwen-Image Edit 2511: reference latents appended to the image tokens, which get a timestep of zero (the block
    # modulation then carries a doubled batch of time embeddings).
    "QwenImageEdit2511": NewFamily(
        "QwenImageEdit2511", "QwenImage", "QwenImage", "QwenImageTransformer2DModel", "Qwen-Image",
        {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "patch_size": 2, "num_layers": 3,
         "attention_head_dim": 64, "num_attention_heads": 2, "joint_attention_dim": 3584,
         "axes_dims_rope": (16, 24, 24), "default_ref_method": "index_timestep_zero"},
        {"transformer_blocks": 3}, (1, TOKENS, 3584), {"reference_latents": [_randn((1, 16, 1, 16, 16), 24)]},
        _zeros(1, 16, 1, 32, 32),
        _takes("comfy.ldm.qwen_image.model", "QwenImageTransformerBlock.forward", "timestep_zero_index")),
}


def available() -> list[str]:
    """The families this ComfyUI has, in SPECS order."""
    return [name for name, spec in SPECS.items() if spec.present()]


def build(name: str, seed: int = 0) -> TinyBundle:
    """The tiny bundle of family `name`: its model (float32, deterministic random weights), conditioning and latent."""
    spec = SPECS[name]
    config = getattr(comfy.supported_models, spec.config)(dict(spec.unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_tiny_weights(model.diffusion_model, seed=seed)
    model.eval()
    for built, expected in ((model, spec.model_base), (model.diffusion_model, spec.model_class)):
        if type(built).__name__ != expected:
            raise RuntimeError(f"{name}: built a {type(built).__name__}, expected {expected}")
    positive, negative = make_conditioning(spec.context_shape, spec.cond_extras, seed=1234 + seed)
    return TinyBundle(_patcher(model), positive, negative, spec.latent())


def flat(latent: Any) -> torch.Tensor:
    """A sampled latent as one tensor: the parts of a nested one (video and audio) concatenated, flattened."""
    if getattr(latent, "is_nested", False):
        return torch.cat([part.flatten() for part in latent.unbind()])
    return latent


def parts(latent: Any) -> list[torch.Tensor]:
    """The parts of a sampled nested latent (video, audio), or the latent alone."""
    return list(latent.unbind()) if getattr(latent, "is_nested", False) else [latent]


FAMILIES: dict[str, Callable[..., TinyBundle]] = {name: functools.partial(build, name) for name in SPECS}
