"""Flow-matching samplers (Euler, Heun) with classifier-free guidance, optionally driven through a cache run.

Time is σ ∈ [0, 1]: x_σ = (1 − σ)·data + σ·noise and the model predicts v = noise − data, so dx/dσ = v.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..calibration import CacheMemory, CachePolicy, RunState
from ..calibration.calibrator import Calibrator
from ..calibration.icc import FactorCache, StatsRecorder
from ..calibration.step_costs import RoundTimer
from .linears import routed_linears
from .model import DiT

Velocity = Callable[[Tensor, float], Tensor]
Batching = bool | Callable[[float], bool]  # cond and uncond in one call: always, never, or per σ
COND, UNCOND = "cond", "uncond"


def flow_sigmas(steps: int, shift: float = 1.0) -> Tensor:
    """σ from 1 to 0 in `steps` steps; shift > 1 spends more steps at high noise (as SD3/Flux schedules do)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


class GuidedVelocity:
    """CFG velocity v_u + w·(v_c − v_u); cond and uncond run batched in one call or as two calls (cond first), or
    either at each σ as `batched(σ)` says (ComfyUI decides by the memory it finds free)."""

    def __init__(self, model: DiT, labels: Tensor, cfg: float, batched: Batching = True, run: RunState | None = None,
                 recorder: StatsRecorder | None = None):
        self.model, self.labels, self.cfg, self.batched, self.run = model, labels, cfg, batched, run
        self.recorder = recorder
        self.null = torch.full_like(labels, model.null_class)

    def _call(self, x: Tensor, sigma: float, y: Tensor, branches: list[str]) -> Tensor:
        t = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        if self.recorder is not None:
            self.recorder.group = tuple(branches)
        if self.run is None:
            return self.model(x, t, y)
        call = self.run.call(sigma, branches, x)
        runner = None if self.run.policy.granularity == "step" else call  # whole steps: the blocks run plainly
        return call.model(lambda: self.model(x, t, y, runner), self.model.flops(), x)[0]

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        if self.cfg == 1.0:
            return self._call(x, sigma, self.labels, [COND])
        if self.batched(sigma) if callable(self.batched) else self.batched:
            v_c, v_u = self._call(torch.cat([x, x]), sigma, torch.cat([self.labels, self.null]), [COND, UNCOND]).chunk(2)
        else:
            v_c = self._call(x, sigma, self.labels, [COND])
            v_u = self._call(x, sigma, self.null, [UNCOND])
        return v_u + self.cfg * (v_c - v_u)


def sample_euler(velocity: Velocity, x: Tensor, sigmas: Tensor) -> Tensor:
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (s_next - s) * velocity(x, s)
    return x


def sample_heun(velocity: Velocity, x: Tensor, sigmas: Tensor) -> Tensor:
    """Heun's second-order method; the last step (to σ = 0) is plain Euler, as in k-diffusion."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = velocity(x, s)
        x_euler = x + (s_next - s) * d
        if s_next == 0:
            x = x_euler
        else:
            x = x + (s_next - s) * 0.5 * (d + velocity(x_euler, s_next))
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


@torch.no_grad()
def sample(
    model: DiT,
    labels: Tensor,
    noise: Tensor,
    steps: int,
    cfg: float,
    sampler: str = "euler",
    policy: CachePolicy | None = None,
    batched: Batching = True,
    shift: float = 1.0,
    sigmas: Tensor | None = None,
    calibrator: Calibrator | None = None,
    factors: FactorCache | None = None,
    recorder: StatsRecorder | None = None,
    memory: CacheMemory | None = None,
    timer: RoundTimer | None = None,
) -> tuple[Tensor, RunState | None]:
    """Sample `labels` from `noise`; with a policy, returns the run state (its stats) next to the samples. A
    calibrator corrects the values the policy reuses (or, in a reference run, observes the full ones). `factors`
    serve a policy with ICC; a `recorder` records the block Linears' channel statistics; `memory` places and caps the
    caches; a `timer` times the rounds (a fit's cost model)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {sorted(SAMPLERS)}")
    sigmas = flow_sigmas(steps, shift) if sigmas is None else sigmas
    run = None if policy is None else RunState(policy, sigmas.tolist(), len(model.blocks), calibrator, factors,
                                                      memory, timer)
    velocity = GuidedVelocity(model, labels, cfg, batched, run, recorder)
    with routed_linears(model, run.icc if run is not None and run.icc is not None else recorder):
        x = SAMPLERS[sampler](velocity, noise * sigmas[0].item(), sigmas)
    if recorder is not None:
        recorder.end_sample()
    if run is not None:
        run.finish()
    return x, run
