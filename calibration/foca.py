"""FoCa, forecast then calibrate: each cached site is the solution of a feature ODE dF/dt = g(F, t), and skipped
steps integrate that ODE one step at a time, from the site's previous value (computed or already forecast), with a
BDF2 predictor and a Heun (trapezoidal) corrector.

The vector field is estimated at the newest computed step c from the last three anchors, and every step is anchored
to it, so the integration does not compound its own errors:

    g(F) = ġ_c + λα (F − F_c)

α ≤ 0 is the site's rate of relaxation along its trajectory, per row (one sample of one branch): the two newest secant
slopes s₁ = (F_c − F_{c−1})/h₁ and s₂ = (F_{c−1} − F_{c−2})/h₂ shrink by r = <s₁, s₂>/<s₂, s₂> over the (h₁ + h₂)/2
between their midpoints, so α = ln(r)/((h₁ + h₂)/2) for 0 < r < 1, and 0 otherwise (a trajectory that speeds up,
turns or reverses is not relaxing). ġ_c is the slope at t_c: the BDF2 slope (the derivative of the parabola through
the three newest anchors, for any spacing), or on a relaxing row the exponentially fitted slope of the two newest.
Both are exact for a feature relaxing exponentially toward a state, which is then integrated as the exponential it
is, bounded however long the horizon, where a polynomial from one anchor diverges; one that moves steadily (α = 0) is
extrapolated linearly with the BDF2 slope. One step from t_n to t_{n+1} (h, and ω = h / h_prev for the
variable-step BDF2 coefficients; a = λα):

    predict:  (1 − β a) F* = a₁ F_n − a₂ F_{n−1} + β (ġ_c − a F_c)       a₁ = (1+ω)²/(1+2ω), a₂ = ω²/(1+2ω),
                                                                           β = h (1+ω)/(1+2ω)
    correct:  F_{n+1} = F_n + h/2 · (g(F_n) + g(F*))

BDF2 is implicit; on the linear field it is solved exactly (the division), so it is A-stable for every a ≤ 0. The first
step after an anchor starts from the two newest anchors. λ (the policy's `foca_lambda`) scales the relaxation the
field keeps; λ = 0 integrates the constant field of the BDF2 slope, which is the first-order forecast that earlier
releases of this pack called FoCa (kept as the benchmark's `foca-anchored` ablation). The paper's own equations are
not public; README, "FoCa: our design and why", gives the measurements behind this form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .forecast import Fetch, Forecaster, same_time

PREDICT_FLOPS = 9.0  # per element: three multiply-adds, the constant term, the division
CORRECT_FLOPS = 6.0  # g at two points and the trapezoid
ANCHOR_FLOPS = 16.0  # at each new anchor: the slopes, the secants and the two reductions behind α


class FocaForecaster(Forecaster):
    history = 3

    def __init__(self, relaxation: float = 1.0, keep: int = 1) -> None:
        super().__init__(keep)
        self.relaxation = relaxation
        self.slope: Tensor | None = None  # ġ_c
        self.rate: Tensor | None = None  # α per row, shaped to broadcast
        self.trajectory: list[tuple[float, Tensor]] = []  # the two newest points, computed or forecast

    def anchored(self) -> None:
        """Derive ġ_c and α from the newest anchors; the trajectory restarts from the two newest."""
        self.slope = self.rate = None
        self.trajectory = list(zip(self.times[-2:], self.values[-2:]))

    def _field(self, fetch: Fetch) -> None:
        """ġ_c and α, derived on the first forecast after an anchor (where the anchors are fetched anyway)."""
        times, values = self.times[-3:], [fetch(v) for v in self.values[-3:]]
        if len(times) == 2:
            self.slope = (values[1] - values[0]) / (times[1] - times[0])
            self.rate = None
            return
        (t0, t1, t2), (f0, f1, f2) = times, values
        h1, h2 = t2 - t1, t1 - t0
        self.slope = (f2 * ((2 * h1 + h2) / (h1 * (h1 + h2))) - f1 * ((h1 + h2) / (h1 * h2))
                      + f0 * (h1 / (h2 * (h1 + h2))))
        if self.relaxation == 0.0:
            self.rate = None
            return
        secant = (f2 - f1) / h1
        s1, s2 = secant.flatten(1).double(), ((f1 - f0) / h2).flatten(1).double()
        ratio = (s1 * s2).sum(1) / (s2 * s2).sum(1).clamp_min(1e-300)
        relaxing = (ratio > 0) & (ratio < 1)
        alpha = torch.where(relaxing, ratio.clamp_min(1e-300).log() / ((h1 + h2) / 2), torch.zeros_like(ratio))
        # On a relaxing row the slope consistent with that relaxation and the two newest anchors is the exponentially
        # fitted one, αh₁/(1 − e^{−αh₁}) times the newest secant: the parabola's slope misjudges a curve that long
        # anchor gaps sample coarsely. Both agree to first order in αh₁.
        x = alpha * h1
        fitted = torch.where(relaxing, x / torch.where(relaxing, 1 - torch.exp(-x), torch.ones_like(x)),
                             torch.ones_like(x))
        shape = (-1,) + (1,) * (self.slope.dim() - 1)
        self.slope = torch.where(relaxing.view(shape), secant * fitted.to(secant.dtype).view(shape), self.slope)
        self.rate = (self.relaxation * alpha).to(self.slope.dtype).view(shape)

    def forecast(self, t: float, fetch: Fetch) -> Tensor:
        if len(self.times) == 1:
            return fetch(self.values[-1])
        if self.slope is None:
            self._field(fetch)
        (t_prev, f_prev), (t_n, f_n) = self.trajectory
        if same_time(t, t_n):
            return fetch(f_n)
        f_prev, f_n = fetch(f_prev), fetch(f_n)
        h, h_prev = t - t_n, t_n - t_prev
        omega = h / h_prev
        a1, a2, beta = (1 + omega) ** 2 / (1 + 2 * omega), omega**2 / (1 + 2 * omega), h * (1 + omega) / (1 + 2 * omega)
        if self.rate is None:  # a constant field: both stages are exact, and the corrector alone gives the step
            out = torch.add(f_n, self.slope, alpha=h)
        else:
            anchor, alpha = fetch(self.values[-1]), self.rate
            drive = self.slope - alpha * anchor  # g(F) = drive + α F
            predicted = (f_n * a1 - f_prev * a2 + drive * beta) / (1 - beta * alpha)
            out = f_n + (drive * 2 + alpha * (f_n + predicted)) * (h / 2)
        self.trajectory = [(t_n, f_n), (t, out)]
        return out

    def flops(self, t: float) -> float:
        if len(self.times) == 1:
            return 0.0
        per_step = 2.0 if self.relaxation == 0.0 or len(self.times) == 2 else PREDICT_FLOPS + CORRECT_FLOPS
        derived = ANCHOR_FLOPS if self.slope is None else 0.0  # charged to the first forecast after an anchor
        return per_step + derived

    def tensors(self) -> list[Tensor]:
        held = list(self.values) + [v for _, v in self.trajectory]
        return held + [x for x in (self.slope, self.rate) if x is not None]
