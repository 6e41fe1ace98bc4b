"""Spectrum (Han et al., CVPR 2026, arXiv 2603.01623; code hanjq17/Spectrum, MIT): a site's features as functions of
time, fitted online by ridge regression on Chebyshev polynomials T₀…T_M over a window of the K newest computed
values, and evaluated at the skipped step.

As the official code: M = 4, K = 10, ridge λ = 0.1 (its configuration's), and time mapped affinely onto τ ∈ [−1, 1]
over the whole run (the code maps steps 0…50 of its 50-step runs; here the run's own span in the policy's time unit).
The fit is per element, so it is linear in the anchors: its weights x*ᵀ(XᵀX + λI)⁻¹Xᵀ depend on the times alone and
the forecast is one weighted sum over the window. The official pipelines compute 5 warm-up steps before the first
skip; here a site with a single anchor reuses it instead of evaluating a degree-4 fit through one point.
"""

from __future__ import annotations

import torch

from .forecast import WeightedForecaster

DEGREE, WINDOW, RIDGE = 4, 10, 0.1


def chebyshev(taus: torch.Tensor, degree: int) -> torch.Tensor:
    """T₀(τ) … T_degree(τ) as columns, by the recurrence T_{m+1} = 2τT_m − T_{m−1}."""
    columns = [torch.ones_like(taus), taus]
    while len(columns) <= degree:
        columns.append(2 * taus * columns[-1] - columns[-2])
    return torch.stack(columns[: degree + 1], dim=-1)


class SpectrumForecaster(WeightedForecaster):
    history = WINDOW

    def __init__(self, span: tuple[float, float], keep: int = 1) -> None:
        super().__init__(keep)
        self.span = span

    def _tau(self, t: torch.Tensor) -> torch.Tensor:
        start, end = self.span
        return (t - (start + end) / 2) * (2.0 / (end - start)) if end != start else torch.zeros_like(t)

    def weights(self, times: list[float], t: float) -> list[float]:
        if len(times) == 1:
            return [1.0]
        used = times[-WINDOW:]
        x = chebyshev(self._tau(torch.tensor(used, dtype=torch.float64)), DEGREE)
        x_star = chebyshev(self._tau(torch.tensor([t], dtype=torch.float64)), DEGREE)
        gram = x.T @ x + RIDGE * torch.eye(DEGREE + 1, dtype=torch.float64)
        return [0.0] * (len(times) - len(used)) + (x_star @ torch.linalg.solve(gram, x.T)).flatten().tolist()
