"""The interface correctors implement: correct the value the policy uses where it skips a computation, and (in
reference runs, which compute everything) see the full value at each place where the policy would have skipped.

The engine calls a calibrator with a batch of equal chunks, one per conditioning branch of the model call, so that a
correction costs one fused elementwise operation per site however many branches share the call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Site:
    """One value the policy reuses: a site of one block, for one conditioning role, in one round of the run.

    `round` counts model evaluations of the run (Heun has two per step), `step` the schedule's steps; `anchor_sigma`
    is σ of the round whose computation the reused value comes from, so `anchor_sigma − sigma` is how stale it is,
    and `stale_steps` how many schedule steps lie in between.
    """

    role: str
    round: int
    sigma: float
    anchor_sigma: float
    stale_steps: int
    block: int
    name: str
    step: int


@dataclass
class Reused:
    """What a calibrator may use at a reuse site, for the whole batch of the model call (one chunk per site).

    `value` is the policy's value (reuse or forecast) and must not be modified. `anchors()` gives the site's newest and
    previous computed values for the batch and, per chunk, the staleness ratio (t − t_newest) / (t_newest −
    t_previous), or None while a branch has a single anchor. `truth()` computes the site on the current input:
    offered only to calibrators with `needs_truth`.
    """

    value: Tensor
    anchors: Callable[[], tuple[Tensor, Tensor, list[float]] | None]
    truth: Callable[[], Tensor] | None = None

    def increment(self) -> Tensor | None:
        """Newest minus previous anchor, scaled to this round's staleness (the Taylor-1 step), for the batch."""
        got = self.anchors()
        if got is None:
            return None
        newest, previous, scales = got
        ratio = torch.tensor(scales, dtype=newest.dtype, device=newest.device)
        return (newest - previous) * ratio.repeat_interleave(newest.shape[0] // len(scales)).view(
            -1, *(1,) * (newest.dim() - 1))


class Calibrator(ABC):
    """`reference = True` makes the run compute every block and call `observe` where the policy would skip.

    `records_anchors` asks for `anchor` calls; `records_output` for the model's output at every step too (as `anchor`
    calls at block -1, "output": the value a whole-step forecast caches); `anchors` is how many computed values per
    site the calibrator needs kept (the policy's forecaster may keep fewer); `needs_truth` asks the engine to offer the
    site's true value (fitting only: it costs a computation); `flops` is the elementwise work per value element of the
    last correction that changed a value, for honest compute accounting; `nbytes` the tensors a corrector holds for the
    run beyond the policy's own cache, for the run's peak-cache figure.
    """

    reference: bool = False
    records_anchors: bool = False
    records_output: bool = False
    anchors: int = 1
    needs_truth: bool = False
    flops: float = 0.0
    nbytes: int = 0

    def start(self) -> None:
        """A sampling run begins: drop whatever was derived for the previous one (a calibrator outlives runs)."""

    def forget(self, roles: tuple[str, ...]) -> None:
        """ComfyUI regrouped these roles' branches: the run's values for every call holding one of them restart, so
        drop what was derived from them."""

    def observe(self, site: Site, value: Tensor) -> None:
        """The full-computation value at a site the policy reuses (reference runs only)."""

    def anchor(self, sites: list[Site], values: list[Tensor]) -> None:
        """A computed value stored as an anchor, per site (calibrators with `records_anchors`: trajectory recording,
        whose reference runs observe every later value)."""

    def settle(self, sites: list[Site], value: Tensor) -> None:
        """The value finally used at `sites` (after every calibrator of a chain): for correctors with a memory."""

    @abstractmethod
    def calibrate(self, sites: list[Site], reused: Reused) -> Tensor:
        """Return the corrected value of `reused.value`, whose equal chunks belong to `sites` in order."""
