"""scikit-learn's 8×8 digits as [-1, 1] tensors: the dataset is bundled with sklearn, so nothing is downloaded."""

from __future__ import annotations

import torch
from torch import Tensor

HELD_OUT_FRACTION = 0.2


class MissingDependency(RuntimeError):
    """An optional package a command needs is not installed; the message names the extra that brings it."""

SPLIT_SEED = 1234


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1797 digits as (N, 1, 8, 8) float32 in [-1, 1] (pixel values 0..16 → pixel/8 − 1) and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDependency("training needs scikit-learn, which ships the digits: pip install "
                                "'calibrated-cache[train]' (from a checkout: pip install -e '.[train]')") from None

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return images, labels


def split_indices(
    n: int, held_out_fraction: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED
) -> tuple[Tensor, Tensor]:
    """A fixed permutation, independent of any training seed, so held-out accuracy always means the same digits."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = round(n * held_out_fraction)
    return perm[n_held:], perm[:n_held]


def load_split() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((train images, labels), (held-out images, labels))."""
    images, labels = load_digits_tensors()
    train, held = split_indices(len(labels))
    return (images[train], labels[train]), (images[held], labels[held])
