"""ICC, increment-calibrated caching: between full steps, a Linear's output is its cached output plus a low-rank map of
its input's change, y ≈ y_cache + A·(B·(x − x_cache)), with A·B a channel-aware SVD of the layer's own weight
(methods reference §9.2). Everything between the Linears (attention softmax, activations, norms, gates) is recomputed
exactly on the calibrated values, so only the Linears' increments are approximated.

This module holds the parts that need no model: the channel statistics, the factorisation, and one Linear's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

EPS = 1e-6
ALPHA = 0.5  # weight = (normalised mean |activation|) ** ALPHA, as the official code
MAX_RATIO = 1000.0  # weights are floored at max / MAX_RATIO


@dataclass
class ChannelStats:
    """Per-channel activation magnitude of one side (input or output) of a Linear over calibration samples.

    Each sample contributes its mean |activation| over tokens, min-max normalised across channels, so that no sample
    dominates by its scale; the weights emphasise the channels that are large in most samples (the outliers that plain
    SVD lets the low-rank error hit hardest).
    """

    total: Tensor | None = None
    samples: int = 0

    def add(self, activations: Tensor) -> None:
        """`activations`: (batch, tokens, channels), or (batch, channels)."""
        a = activations.detach().float().abs()
        m = a.mean(dim=1) if a.dim() == 3 else a
        lo, hi = m.amin(dim=1, keepdim=True), m.amax(dim=1, keepdim=True)
        m = ((m - lo + EPS) / (hi - lo + EPS)).sum(dim=0).to("cpu", torch.float64)
        self.total = m if self.total is None else self.total + m
        self.samples += a.shape[0]

    def weights(self, alpha: float = ALPHA, max_ratio: float = MAX_RATIO) -> Tensor:
        if self.total is None:
            raise ValueError("no activations were recorded for this layer: run a calibration pass first")
        w = (self.total / self.samples).clamp_min(0.0) ** alpha
        return w.clamp_min(float(w.max()) / max_ratio).float()


@dataclass(frozen=True)
class Factors:
    """W ≈ A·B with A (out × r) and B (r × in), in float32."""

    a: Tensor
    b: Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def to(self, like: Tensor) -> "Factors":
        """On the device and in the dtype of `like` (the Linear's input), once per run rather than per call."""
        return Factors(self.a.to(like.device, like.dtype), self.b.to(like.device, like.dtype))


def factorize(weight: Tensor, rank: int, out_weights: Tensor | None = None,
              in_weights: Tensor | None = None) -> Factors:
    """The rank-`rank` A·B that minimises ‖diag(l)·(W − A·B)·diag(q)‖_F (l = out_weights, q = in_weights; plain SVD
    without them), computed in float32 on the weight's device from the weight as it is now (after any patches)."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}] for a {out_features}×{in_features} "
                         f"layer (got {rank})")
    l = torch.ones(out_features, device=w.device) if out_weights is None else out_weights.to(w.device).float() + EPS
    q = torch.ones(in_features, device=w.device) if in_weights is None else in_weights.to(w.device).float() + EPS
    u, s, vh = torch.linalg.svd(l[:, None] * w * q[None, :], full_matrices=False)
    return Factors((u[:, :rank] * s[:rank]) / l[:, None], vh[:rank] / q[None, :])


def increment_flops(factors: Factors, tokens: int) -> float:
    """Per sample: the two rank-r products and the input subtraction and output addition, counted honestly."""
    out_features, in_features = factors.a.shape[0], factors.b.shape[1]
    return float(tokens * (2 * factors.rank * (in_features + out_features) + in_features + out_features))


@dataclass
class LinearCache:
    """One Linear's input and output at the last full step, for one batch layout."""

    x: Tensor | None = None
    y: Tensor | None = None
    signature: tuple = field(default=())

    def record(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x.detach(), y.detach()
        self.signature = (x.shape, x.dtype, x.device)

    def ready(self, x: Tensor) -> bool:
        return self.x is not None and self.signature == (x.shape, x.dtype, x.device)

    def increment(self, x: Tensor, factors: Factors) -> Tensor:
        """y_cache + A·(B·(x − x_cache)); `factors` on x's device and in its dtype (`Factors.to`)."""
        a, b = factors.a, factors.b
        low = (x - self.x).reshape(-1, b.shape[1]) @ b.T
        return torch.addmm(self.y.reshape(-1, a.shape[0]), low, a.T).view(*x.shape[:-1], a.shape[0])
