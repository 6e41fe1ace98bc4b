"""Where a run's caches live and how large they may grow.

The caches hold, per block and branch, one to four activations (more with Taylor orders): on a video model that is
gigabytes of device memory. `offload` keeps them in CPU memory (pinned when CUDA is present, so copies run
asynchronously) and brings a value back to the device when a skipped block needs it: the caches then cost the device
only the block being served, and each reused value two copies. `limit_bytes` caps their size: blocks are admitted to
the cache in the order they first store until the next would pass the cap; the rest are computed every step, so a run
never grows past the cap, at a cost in speed that the run's report shows (blocks over the limit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import PolicyError


@dataclass(frozen=True)
class CacheMemory:
    offload: bool = False
    limit_bytes: int = 0  # 0: no limit

    def __post_init__(self) -> None:
        if not isinstance(self.offload, bool):
            raise PolicyError(f"cache offload must be true or false (got {self.offload!r})")
        if isinstance(self.limit_bytes, bool) or not isinstance(self.limit_bytes, int) or self.limit_bytes < 0:
            raise PolicyError(f"the cache limit must be a whole number of bytes >= 0 (got {self.limit_bytes!r}); 0 "
                              "sets no limit")

    @property
    def limit(self) -> int | None:
        return self.limit_bytes or None

    def moves(self, value: Tensor) -> bool:
        """Whether `keep` moves `value` away from where it was computed (with offload, off an accelerator)."""
        return self.offload and value.device.type != "cpu"

    def keep(self, value: Tensor) -> Tensor:
        """What the cache stores of `value`: itself, or with offload a copy in CPU memory."""
        if not self.moves(value):
            return value
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=torch.cuda.is_available())
        return host.copy_(value, non_blocking=True)

    def use(self, value: Tensor, device: torch.device) -> Tensor:
        """A cached value on the device of the computation that reads it."""
        return value if value.device == device else value.to(device, non_blocking=True)
