"""Model identity for prior files: the architecture (parameter names, shapes, dtypes) and a hash of the weights.

Hashing every byte of a 12-billion-parameter model takes minutes, so the weights hash reads a fixed sample of each
tensor (its first and last 64 KiB, and its size): any fine-tune or merge changes it, and it costs milliseconds.
Callers pass the weights as loaded, before any in-place patching (ComfyUI patches LoRAs into the live weights).
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from torch import Tensor

SAMPLE_BYTES = 65536


def architecture_hash(state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def weights_hash(state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(tensor_sample(state[name]))
    return h.hexdigest()[:16]


def tensor_sample(t: Tensor) -> bytes:
    """Size and first/last bytes of a tensor; quantized tensor subclasses that refuse a byte view fall back to a
    float sample of their values."""
    try:
        flat = t.detach().reshape(-1)
        raw = flat.view(torch.uint8) if flat.dtype != torch.bool and flat.numel() else flat.to(torch.uint8)
        return str(raw.numel()).encode() + raw[:SAMPLE_BYTES].cpu().numpy().tobytes() + \
            raw[-SAMPLE_BYTES:].cpu().numpy().tobytes()
    except (RuntimeError, TypeError, NotImplementedError):
        values = t.detach().float().reshape(-1)
        return f"{tuple(t.shape)}".encode() + values[:4096].cpu().numpy().tobytes() + \
            values[-4096:].cpu().numpy().tobytes()


def model_fingerprint(state: Mapping[str, Tensor], family: str, extra: str = "") -> dict[str, str]:
    """`extra` names what changes the model beyond its weights (e.g. LoRA patches applied at load)."""
    fp = {"family": family, "architecture": architecture_hash(state), "weights": weights_hash(state)}
    if extra:
        fp["patches"] = hashlib.sha256(extra.encode()).hexdigest()[:16]
    return fp
