"""Safetensors checkpoints for the testbed: atomic saves, JSON-typed metadata, and loaders for the committed weights."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file, safe_open
from torch import Tensor, nn

from ..priors.files import write_atomic
from .classifier import Classifier, ClassifierConfig
from .model import DiT, DiTConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
DIT_PATH = WEIGHTS_DIR / "dit.safetensors"
CLASSIFIER_PATH = WEIGHTS_DIR / "classifier.safetensors"


def save_atomic(path: str | os.PathLike[str], tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write via a temp file in the target directory and os.replace, so readers never see a half-written file.

    Every metadata value is stored JSON-encoded (safetensors metadata is str → str) and decoded again by `read`.
    """
    encoded = {k: json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    kept = {k: v.detach().contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(kept, tmp, metadata=encoded))


class ShippedWeights(ValueError):
    """A training run asked to write where it must not without an explicit flag; the message names the flag."""


def add_output_arguments(parser: argparse.ArgumentParser, shipped: Path, used_by: str) -> None:
    """--out, --replace-shipped, --overwrite and --seed, which every training command takes."""
    parser.add_argument("--out", type=Path, default=Path(shipped.name),
                        help=f"where to write the weights (default ./{shipped.name})")
    parser.add_argument("--replace-shipped", action="store_true",
                        help=f"write the package's own weights ({shipped}), which {used_by}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")


def output_path(out: str | os.PathLike[str], shipped: Path, replace_shipped: bool, overwrite: bool) -> Path:
    """Where a training run writes: `shipped` (the package's own weights) only with `replace_shipped`, and an
    existing file only with `overwrite`."""
    path = shipped if replace_shipped else Path(out)
    if not replace_shipped and path.resolve() == shipped.resolve():
        raise ShippedWeights(f"{path} is the package's shipped weights: pass --replace-shipped to replace them, or "
                             "choose another --out")
    if not replace_shipped and path.exists() and not overwrite:
        raise ShippedWeights(f"{path} exists: pass --overwrite to replace it, or choose another --out")
    return path


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a file written by `save_atomic`."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    return load_file(str(path)), {k: json.loads(v) for k, v in raw.items()}


def save_module(path: str | os.PathLike[str], module: nn.Module, config: dict[str, int], **metadata: Any) -> Path:
    """Save a module's state dict with its constructor config under metadata key "config"."""
    return save_atomic(path, module.state_dict(), {"config": config, **metadata})


def load_dit(path: str | os.PathLike[str] | None = None) -> tuple[DiT, dict[str, Any]]:
    """The trained testbed DiT in eval mode (float32) and its metadata; defaults to the weights in the package."""
    tensors, meta = read(DIT_PATH if path is None else path)
    model = DiT(DiTConfig(**meta["config"]))
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval().requires_grad_(False), meta


def load_classifier(path: str | os.PathLike[str] | None = None) -> tuple[Classifier, dict[str, Any]]:
    """The digits classifier (with its real-digit FD reference buffers) in eval mode and its metadata."""
    tensors, meta = read(CLASSIFIER_PATH if path is None else path)
    model = Classifier(ClassifierConfig(**meta["config"]))
    model.load_state_dict(tensors)
    return model.eval().requires_grad_(False), meta
