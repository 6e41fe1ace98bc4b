"""TCC priors as they travel between nodes, and the identity of the model they belong to."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io
from torch import Tensor, nn

from ..calibration.icc import ChannelTable
from ..calibration.tcc import TccPriors
from ..priors import load_priors, model_fingerprint
from ..priors.fingerprint import tensor_sample

TccPriorsType = io.Custom("TCC_PRIORS")

_fingerprints: WeakKeyDictionary[nn.Module, dict[str, dict[str, str]]] = WeakKeyDictionary()


@dataclass(frozen=True)
class FittedPriors:
    """What a TCC_PRIORS socket carries: the priors, their provenance (the prior file's metadata), their file, and
    ICC's channel statistics when the file has them."""

    priors: TccPriors
    meta: dict[str, Any]
    path: str
    channels: ChannelTable | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def load(path: str) -> FittedPriors:
    """A prior file; a damaged or foreign one raises PriorFileError with a message naming the file and the fix."""
    prior = load_priors(path)
    return FittedPriors(prior.priors, prior.meta, path, prior.channels)


def patches_description(model: ModelPatcher) -> str:
    """The model's weight patches (LoRAs and similar) by key, strengths and a sample of their tensors: priors fitted
    with one LoRA belong to it, not to another LoRA on the same keys."""
    return ";".join(f"{key}:" + ",".join(f"{p[0]:g}/{p[2]:g}/{_patch_sample(p[1])}" for p in model.patches[key])
                    for key in sorted(model.patches))


def _patch_sample(patch: object, depth: int = 0) -> str:
    """A short hash of the tensors inside a patch value (a tensor, nested tuples, or an adapter with `weights`)."""
    if isinstance(patch, Tensor):
        return hashlib.sha256(tensor_sample(patch)).hexdigest()[:8]
    if depth < 4 and isinstance(patch, (tuple, list)):
        return "(" + " ".join(_patch_sample(p, depth + 1) for p in patch) + ")"
    weights = getattr(patch, "weights", None)
    if depth < 4 and weights is not None:
        return type(patch).__name__ + _patch_sample(weights, depth + 1)
    return type(patch).__name__


def fingerprint(model: ModelPatcher, family: str) -> dict[str, str]:
    """The prior-file identity of a ModelPatcher's diffusion model; cached per model object and patch set, since it
    hashes samples of every weight."""
    diffusion_model = model.get_model_object("diffusion_model")
    extra = patches_description(model)
    known = _fingerprints.setdefault(diffusion_model, {})
    if extra not in known:
        known[extra] = model_fingerprint(_unpatched_state(model, diffusion_model), family, extra)
    return dict(known[extra])


def _unpatched_state(model: ModelPatcher, diffusion_model: nn.Module) -> dict[str, Tensor]:
    """The weights as loaded: while a patched clone is loaded, ComfyUI has its patches applied in place and keeps the
    originals in the patchers' shared `backup`, so the hash must not depend on which clone ran last."""
    state = diffusion_model.state_dict()
    prefix = "diffusion_model."
    for key, saved in model.backup.items():
        name = key[len(prefix):]
        if key.startswith(prefix) and name in state:
            state[name] = saved.weight
    return state
