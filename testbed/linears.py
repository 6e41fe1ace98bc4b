"""Routes the testbed DiT's block Linears through an ICC target (a run's `IccRun`, or a `StatsRecorder` while
calibrating) for the duration of a sampling run; the model is restored afterwards."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor, nn

from ..calibration.icc import IccLinear, LinearTarget
from .model import DiT


def block_linears(model: DiT) -> list[tuple[IccLinear, nn.Linear]]:
    """Every Linear inside the blocks; the fused qkv is factored as q, k and v."""
    found = []
    for index, block in enumerate(model.blocks):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                chunks = (module.in_features,) * 3 if name.endswith("qkv") else None
                found.append((IccLinear(index, name, lambda like, m=module: m.weight.to(like), chunks), module))
    return found


@contextlib.contextmanager
def routed_linears(model: DiT, target: LinearTarget | None) -> Iterator[None]:
    if target is None:
        yield
        return
    routed = block_linears(model)
    for layer, module in routed:
        compute = module.forward

        def forward(x: Tensor, layer: IccLinear = layer, compute=compute) -> Tensor:
            return target.linear(layer, x, compute)

        module.forward = forward
    try:
        yield
    finally:
        for _, module in routed:
            del module.forward
