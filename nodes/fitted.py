"""TCC priors as they travel between nodes, and the identity of the model they belong to."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io
from torch import Tensor, nn

from ..calibration.icc import ChannelTable, host_array
from ..calibration.tcc import SiteKey, SitePrior, TccPriors
from ..priors import file_hash, load_priors, model_fingerprint
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

    @classmethod
    def output(cls, priors: TccPriors, meta: dict[str, Any], path: str,
               channels: ChannelTable | None = None) -> FittedPriors:
        """What Fit TCC Priors outputs, which ComfyUI keeps between prompts: the priors' values, without what the fit's
        own runs derived from them (their stacks on the device)."""
        return cls(TccPriors(priors.priors, priors.variant), meta, path, channels)

    @property
    def digest(self) -> str:
        """The file's hash (the GPUs of one model check they all read the same file); the metadata where unsaved."""
        return file_hash(self.path) if os.path.isfile(self.path) else json.dumps(self.meta, sort_keys=True)

    def held(self) -> HeldPriors:
        """What a patched model keeps of these priors (their channel statistics go to ICC's factor cache)."""
        sites = {key: {f.name: host_array(v) if isinstance(v := getattr(prior, f.name), Tensor) else v
                       for f in fields(prior) if f.init}
                 for key, prior in self.priors.priors.items()}
        return HeldPriors(self.meta, self.path, self.priors.variant, sites)


@dataclass(frozen=True)
class HeldPriors:
    """TCC priors as a patched model holds them between runs: their provenance and their values as host arrays, no
    tensors (newer ComfyUI pages weights in and out and moves what patches hold). Each run builds its own TccPriors
    from them, which take what they correct with to the run's device and are dropped at its end."""

    meta: dict[str, Any]
    path: str
    variant: str
    sites: dict[SiteKey, dict[str, Any]]  # each site's SitePrior fields, its tensors as arrays

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def calibrator(self) -> TccPriors | None:
        """One run's priors (CPU tensors viewing the arrays); None where the file holds none (a searched plan whose
        priors did not help: nothing corrects)."""
        if not self.sites:
            return None
        return TccPriors({key: SitePrior(**{name: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                            for name, v in values.items()})
                          for key, values in self.sites.items()}, self.variant)


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


def comfyui_version() -> str | None:
    """The running ComfyUI's version (its root's comfyui_version module), recorded with every fit: another version
    can load the same checkpoint into other tensors, so a file whose model identity no longer matches is told to
    refit on this ComfyUI. None where the checkout has no such module, or no version a prior file can hold."""
    try:
        from comfyui_version import __version__
    except ImportError:
        return None
    valid = isinstance(__version__, str) and 0 < len(__version__) <= 64 and __version__.isprintable()
    return __version__ if valid else None


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
