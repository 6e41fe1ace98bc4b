"""Seeded, deterministic execution for the training scripts, without leaking global settings to the caller."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def deterministic(seed: int) -> Iterator[torch.Generator]:
    """Seed torch's global RNG (parameter init) and yield a private generator (batches, noise, augmentation).

    Deterministic algorithms are switched on for the duration and restored afterwards; results are bit-identical on
    the same machine and thread count.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield torch.Generator().manual_seed(seed)
    finally:
        torch.use_deterministic_algorithms(previous)
