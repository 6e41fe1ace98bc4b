"""Safetensors checkpoints for the testbed: atomic saves, JSON-typed metadata, and loaders for the committed weights."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file, safe_open
from torch import Tensor, nn

from .classifier import Classifier, ClassifierConfig
from .model import DiT, DiTConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
DIT_PATH = WEIGHTS_DIR / "dit.safetensors"
CLASSIFIER_PATH = WEIGHTS_DIR / "classifier.safetensors"


def _umask() -> int:
    """The process umask (readable only by setting it), so the final file gets normal permissions, not mkstemp's 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_atomic(path: str | os.PathLike[str], tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write via a temp file in the target directory and os.replace, so readers never see a half-written file.

    Every metadata value is stored JSON-encoded (safetensors metadata is str → str) and decoded again by `read`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = {k: json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=encoded)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
