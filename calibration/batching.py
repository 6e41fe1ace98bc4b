"""Branches of one batched model call are stored as slices of the call's tensors; a later call with the same branches
in the same order can use them as one tensor again, without a copy."""

from __future__ import annotations

import torch
from torch import Tensor


def adjacent(parts: list[Tensor]) -> Tensor | None:
    """The tensor the parts were split from, if they are consecutive contiguous slices of one storage."""
    head = parts[0]
    if not head.is_contiguous():
        return None
    step = head.numel()
    for i, p in enumerate(parts):
        if (p.shape != head.shape or not p.is_contiguous() or p.untyped_storage().data_ptr() !=
                head.untyped_storage().data_ptr() or p.storage_offset() != head.storage_offset() + i * step):
            return None
    return head.as_strided((len(parts) * head.shape[0], *head.shape[1:]), head.stride(), head.storage_offset())


def joined(parts: list[Tensor]) -> Tensor:
    """The parts as one batch: a view when they are adjacent, else a concatenation."""
    if len(parts) == 1:
        return parts[0]
    whole = adjacent(parts)
    return torch.cat(parts) if whole is None else whole
