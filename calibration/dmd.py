"""DMD, dynamic mode decomposition (Schmid 2010), as cache-dit v1.5's DMD calibrator forecasts with it (vipshop/
cache-dit, `calibrators/dmd.py`, Apache-2.0): a site's newest computed values are snapshots of a linear system,
Y_{j+1} ≈ A·Y_j, whose modes and eigenvalues forecast it at any horizon, Y(k) = Re Σ_i φ_i λ_i^k b_i.

As cache-dit: a window of the 6 newest snapshots, of which the longest uniformly spaced tail is used when it holds at
least 4 (the horizon k counts that spacing); the exact DMD of that tail per row (one sample of one branch), rank
truncated where a singular value is below 1e-4 of the largest, 1e-8 added to the singular values it divides by, b by
least squares on the newest snapshot; TaylorSeer order 1 while fewer than 4 snapshots are uniformly spaced; the newest
snapshot itself when the fit is degenerate or the forecast not finite. The decomposition is computed from the snapshots' Gram
matrix (the method of snapshots, an exact reformulation of the SVD cache-dit takes), in float64 as cache-dit does, and
the forecast is written as a real combination of the snapshots, Re(Φ(λ^k ⊙ b)) = X'·Re(M(λ^k ⊙ b)) with Φ = X'M,
so memory stays that of the snapshots: no d×r mode matrix is kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .forecast import Fetch, Forecaster, same_time

WINDOW, MINIMUM, CUTOFF, RIDGE = 6, 4, 1e-4, 1e-8


class DmdForecaster(Forecaster):
    history = WINDOW

    def __init__(self, keep: int = 1) -> None:
        super().__init__(keep)
        self._fit: tuple[tuple, tuple[Tensor, Tensor, Tensor] | None] | None = None  # (window key, (M, λ, b))

    def _tail(self) -> tuple[int, float]:
        """How many of the newest anchors are uniformly spaced, and their spacing."""
        times = self.times[-WINDOW:]
        if len(times) < 2:
            return len(times), 0.0
        spacing, n = times[-1] - times[-2], 2
        while n < len(times) and math.isclose(times[-n] - times[-n - 1], spacing, rel_tol=1e-6, abs_tol=1e-9):
            n += 1
        return n, spacing

    def forecast(self, t: float, fetch: Fetch) -> Tensor:
        newest = fetch(self.values[-1])
        if len(self.times) == 1 or same_time(t, self.times[-1]):
            return newest
        n, spacing = self._tail()
        if n < MINIMUM:  # TaylorSeer order 1
            previous = fetch(self.values[-2])
            return torch.add(newest, newest - previous, alpha=(t - self.times[-1]) / (self.times[-1] - self.times[-2]))
        anchors = [fetch(v) for v in self.values[-n:]]
        key = (tuple(self.times[-n:]), id(self.values[-1]))
        if self._fit is None or self._fit[0] != key:  # once per window: later skips reuse the decomposition
            self._fit = (key, fit(torch.stack(anchors).flatten(2)))
        modes = self._fit[1]
        if modes is None:
            return newest
        m, evals, b = modes
        coefficients = torch.einsum("rjm,rm->rj", m, evals ** ((t - self.times[-1]) / spacing) * b).real
        coefficients = coefficients.to(newest.dtype).view(-1, *([1] * (newest.dim() - 1)), n - 1)
        out = coefficients[..., 0] * anchors[1]
        for j, anchor in enumerate(anchors[2:], start=1):
            out.addcmul_(coefficients[..., j], anchor)
        return torch.where(torch.isfinite(out).all(), out, newest)  # no wait on the device: a select

    def flops(self, t: float) -> float:
        n, _ = self._tail()
        if len(self.times) == 1:
            return 0.0
        if n < MINIMUM:
            return 3.0
        fitted = self._fit is not None and self._fit[0] == (tuple(self.times[-n:]), id(self.values[-1]))
        gram = 0.0 if fitted else n * (n + 1)  # the Gram matrix, once per window
        return gram + 2.0 * (n - 1)


def fit(snapshots: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(M, λ, b) per row from snapshots (n, rows, d): the modes are Φ = X'M with X' the snapshots 1…n−1."""
    s = snapshots.double()
    gram = torch.einsum("ird,jrd->rij", s, s)  # (rows, n, n)
    x_x, x_xp, xp_xp = gram[:, :-1, :-1], gram[:, :-1, 1:], gram[:, 1:, 1:]
    squared, v = torch.linalg.eigh(x_x)  # ascending: the squared singular values of X, and its right vectors
    squared, v = squared.flip(-1).clamp_min(0.0), v.flip(-1)
    sigma = squared.sqrt()
    kept = sigma > sigma[:, :1] * CUTOFF
    inverse = torch.where(kept, 1.0 / sigma.clamp_min(1e-300), torch.zeros_like(sigma))
    ridged = torch.where(kept, 1.0 / (sigma + RIDGE), torch.zeros_like(sigma))
    # Ã = U_rᴴ X' V_r S⁻¹ with U_r = X V_r S⁻¹: only inner products of snapshots are needed
    reduced = inverse[:, :, None] * (v.mT @ x_xp @ v) * ridged[:, None, :]
    try:
        evals, w = torch.linalg.eig(reduced.to(torch.complex128))
    except RuntimeError:
        return None
    m = (v * ridged[:, None, :]).to(torch.complex128) @ w  # Φ = X' V_r S⁻¹ W = X' M
    # b: least squares of Φ b = y (the newest snapshot, X'’s last column), through X'ᴴX'
    last = torch.zeros(xp_xp.shape[-1], dtype=torch.complex128)
    last[-1] = 1.0
    g = xp_xp.to(torch.complex128)
    normal = m.mH @ g @ m
    normal = normal + 1e-12 * normal.diagonal(dim1=-2, dim2=-1).abs().amax(-1)[:, None, None].clamp_min(1e-300) * \
        torch.eye(normal.shape[-1], dtype=torch.complex128)
    try:
        b = torch.linalg.solve(normal, m.mH @ (g @ last)[..., None])[..., 0]
    except RuntimeError:
        return None
    if not bool(torch.isfinite(evals).all() and torch.isfinite(b).all() and torch.isfinite(m).all()):
        return None
    return m, evals, b
