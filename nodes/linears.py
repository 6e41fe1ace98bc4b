"""ICC in ComfyUI: every Linear inside the hooked blocks is object-patched to pass through the session's current
target (the run's increments, or a calibration run's statistics recorder); with no target it is the layer itself.

Linears are recognised by what they do, not by class: ComfyUI's mixed-precision Linears, which load quantized
checkpoints (scaled fp8 ones too, since ComfyUI 0.8), are cast-weight ops but not `nn.Linear`. The weights ICC
factorises are read the way the layer computes with them: ComfyUI's casting Linears (manual cast, fp8, lowvram,
quantized) cast and patch their weight per call, so `comfy.ops.cast_bias_weight` gives the weight after LoRAs and other
patches; a quantized weight it leaves quantized (same dtype as the input) is dequantised here, and the scaled fp8
Linears of earlier ComfyUI multiply by their weight scale.
"""

from __future__ import annotations

import hashlib
from typing import Callable
from weakref import WeakKeyDictionary

import comfy.ops
import comfy.patcher_extension
import torch
from comfy.model_patcher import ModelPatcher
from torch import Tensor, nn

from ..calibration.icc import ChannelTable, FactorCache, IccLinear, LinearTarget, StatsRecorder, parallel_parts
from .families import BlockSite

try:  # ComfyUI's quantized weights (fp8, nvfp4), where it has them: a tensor subclass that dequantises on request
    from comfy.quant_ops import QuantizedTensor
except ImportError:
    QuantizedTensor = ()  # isinstance(x, ()) is False

KEY = "calibrated_cache.stats"
_factor_caches: WeakKeyDictionary[nn.Module, dict[str, FactorCache]] = WeakKeyDictionary()


def factor_cache(model: ModelPatcher, channels: ChannelTable | None) -> FactorCache:
    """One factor cache per diffusion model and set of statistics, shared by every Apply node and re-run on it: a LoRA
    or a re-queued graph then refactorises only the Linears whose weights changed. It lives as long as the model and
    holds its factors in host memory: each run takes the ones it uses to the device."""
    per_model = _factor_caches.setdefault(model.get_model_object("diffusion_model"), {})
    digest = hashlib.sha256()
    for key in sorted(channels or {}):
        digest.update(key.encode())
        for side in channels[key]:
            digest.update(side.numpy().tobytes())
    return per_model.setdefault(digest.hexdigest() if channels else "", FactorCache(channels))


def is_linear(module: nn.Module) -> bool:
    """A Linear by what it does: `nn.Linear`, or one of ComfyUI's cast-weight ops with an (out_features ×
    in_features) weight. Its mixed-precision Linear is a bare Module; embeddings and convolutions are not matched."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    return isinstance(module, comfy.ops.CastWeightBiasOp) and isinstance(weight, Tensor) and weight.dim() == 2 \
        and tuple(weight.shape) == shape


def effective_weight(module: nn.Module, like: Tensor) -> Tensor:
    weight = module.weight
    if getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None) \
            or isinstance(weight, QuantizedTensor):
        weight = comfy.ops.cast_bias_weight(module, like)[0]
    if isinstance(weight, QuantizedTensor):
        weight = weight.dequantize()
    weight = weight.to(like.device, like.dtype)
    scale = getattr(module, "scale_weight", None)
    return weight if scale is None else weight * scale.to(weight.device, weight.dtype)


def output_chunks(block: nn.Module, name: str, module: nn.Module) -> tuple[int, ...] | None:
    """Fused outputs factored per part, as ICC factors q, k and v separately: a qkv projection (grouped-query
    attention included), the single-stream blocks' first Linear (q, k, v and the MLP input, whose gated form has a
    gate and an up part), and a gated MLP's first Linear (gate and up: twice as wide as the next Linear's input)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    if name.endswith("qkv"):
        heads, kv_heads, dim = (getattr(parent, a, None) for a in ("n_local_heads", "n_local_kv_heads", "head_dim"))
        if heads and kv_heads and dim and (heads + 2 * kv_heads) * dim == module.out_features:
            return heads * dim, kv_heads * dim, kv_heads * dim
        if module.out_features % 3 == 0:
            return (module.out_features // 3,) * 3
    hidden, mlp = getattr(block, "hidden_size", None), getattr(block, "mlp_hidden_dim", None)
    if name == "linear1" and isinstance(hidden, int) and isinstance(mlp, int):
        return parallel_parts(module.out_features, hidden, mlp)
    if isinstance(parent, nn.Sequential) and leaf.isdigit():
        following = [m for m in list(parent)[int(leaf) + 1:] if is_linear(m)]
        if following and 2 * following[0].in_features == module.out_features:
            return following[0].in_features, following[0].in_features
    return None


def route_linears(model: ModelPatcher, blocks: list[BlockSite], target: Callable[[], LinearTarget | None]) -> int:
    """Object-patch the forward of every Linear inside `blocks`; returns how many."""
    diffusion_model = model.get_model_object("diffusion_model")
    count = 0
    for site in blocks:
        block = diffusion_model.get_submodule(site.segment.attr)[site.position]
        for name, module in block.named_modules():
            if not is_linear(module):
                continue
            path = f"diffusion_model.{site.segment.attr}.{site.position}.{name}.forward"
            layer = IccLinear(site.index, name, lambda like, m=module: effective_weight(m, like),
                              output_chunks(block, name, module))
            model.add_object_patch(path, _forward(layer, model.get_model_object(path), target))
            count += 1
    return count


@torch.compiler.disable
def _routed(current: LinearTarget, layer: IccLinear, x: Tensor, original: Callable) -> Tensor:
    """ICC's bookkeeping per Linear stays outside compiled graphs (traced, it breaks on symbolic shapes)."""
    return current.linear(layer, x, original)


def _forward(layer: IccLinear, original: Callable, target: Callable[[], LinearTarget | None]) -> Callable:
    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        current = target()
        if current is None or args or kwargs:
            return original(x, *args, **kwargs)
        return _routed(current, layer, x, original)

    return forward


def record_linears(model: ModelPatcher, blocks: list[BlockSite], recorder: StatsRecorder,
                   target: Callable[[], LinearTarget | None]) -> None:
    """Route the block Linears of `model` (a clone) to `target()`, and tell `recorder` the batch layout of every model
    call and the end of every sampling run, so that it takes changes only between calls of one run and layout."""
    route_linears(model, blocks, target)

    def outer_sample(executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            recorder.end_sample()

    def apply_model(executor, *args, **kwargs):
        options = kwargs.get("transformer_options") or (args[5] if len(args) > 5 else {})
        recorder.group = tuple(options.get("cond_or_uncond") or ())
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, outer_sample)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, apply_model)
