"""FLOPs of what runs inside a `with FlopCounter() as counter:` block, by torch's own per-op formulas (matmuls,
convolutions, attention).

torch's FlopCounterMode also tracks modules for its report, through autograd hooks on each module's inputs; under
inference mode (how ComfyUI's server samples) those hooks fail on a parameter passed to a submodule (Wan S2V's audio
encoder does), so the pack counts with this mode, which tracks nothing but the total. Like torch's, it decomposes an op it has no
formula for: under inference mode composite ops (linear, matmul, attention) arrive undecomposed.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = flop_registry.get(func._overloadpacket)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.total
