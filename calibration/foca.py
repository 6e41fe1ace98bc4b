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
not public; docs/methods.md, "FoCa", gives the measurements behind this form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .forecast import Fetch, Forecaster, same_time

STEP_FLOPS = 6.0  # per element and step: predictor and corrector fold into three multiply-adds (see `forecast`)
ANCHOR_FLOPS = 12.0  # at each new anchor: the two differences, two dot products, and the field's three multiply-adds


class FocaForecaster(Forecaster):
    history = 3
    keeps_forecasts = True

    def __init__(self, relaxation: float = 1.0, keep: int = 1) -> None:
        super().__init__(keep)
        self.relaxation = relaxation
        self.drive: Tensor | None = None  # g(F) = drive + a·F, i.e. drive = ġ_c − a·F_c
        self.rate: Tensor | None = None  # a = λα per row, shaped to broadcast; None where the field is constant
        self.trajectory: list[tuple[float, Tensor]] = []  # the two newest points, computed or forecast

    def anchored(self) -> None:
        """A new anchor: the field is derived again (on the next forecast) and the trajectory restarts from the two
        newest anchors."""
        self.drive = self.rate = None
        self.trajectory = list(zip(self.times[-2:], self.values[-2:]))

    def _field(self, fetch: Fetch) -> None:
        """The field at the newest anchor, from the last three: with s₁, s₂ the two newest secants and w = h₁/(h₁+h₂),
        the BDF2 slope is s₁(1 + w) − s₂w; on a relaxing row the exponentially fitted slope is s₁·αh₁/(1 − e^{−αh₁})."""
        times, values = self.times[-3:], [fetch(v) for v in self.values[-3:]]
        if len(times) == 2:
            self.drive = (values[1] - values[0]).div_(times[1] - times[0])
            return
        (t0, t1, t2), (f0, f1, f2) = times, values
        h1, h2 = t2 - t1, t1 - t0
        d1, d2 = torch.sub(f2, f1), torch.sub(f1, f0)  # the secants are d/h; the h fold into the coefficients
        w = h1 / (h1 + h2)
        if self.relaxation == 0.0:
            self.drive = d1.mul_((1 + w) / h1).add_(d2, alpha=-w / h2)
            return
        rows = d1.shape[0]
        flat1, flat2 = d1.reshape(rows, -1), d2.reshape(rows, -1)
        cross = torch.linalg.vecdot(flat1, flat2).double()
        norm = torch.linalg.vecdot(flat2, flat2).double().clamp_min(1e-300)
        ratio = cross / norm * (h2 / h1)  # <s₁, s₂> / <s₂, s₂>
        relaxing = (ratio > 0) & (ratio < 1)
        alpha = torch.where(relaxing, ratio.clamp_min(1e-300).log() / ((h1 + h2) / 2), torch.zeros_like(ratio))
        x = alpha * h1
        fitted = x / torch.where(relaxing, 1 - torch.exp(-x), torch.ones_like(x))
        shape = (-1,) + (1,) * (d1.dim() - 1)
        p = torch.where(relaxing, fitted, torch.full_like(fitted, 1 + w)) / h1
        q = torch.where(relaxing, torch.zeros_like(fitted), torch.full_like(fitted, -w)) / h2
        self.rate = (self.relaxation * alpha).to(d1.dtype).view(shape)
        self.drive = d1.mul_(p.to(d1.dtype).view(shape)).addcmul_(d2, q.to(d1.dtype).view(shape))
        self.drive.addcmul_(f2, self.rate, value=-1.0)

    def forecast(self, t: float, fetch: Fetch) -> Tensor:
        """One predictor-corrector step from the trajectory's newest point. Both stages are linear in F_n, F_{n−1}
        and the drive, with per-row coefficients, so the step is out = A·F_n + B·F_{n−1} + C·drive:
        F* = (a₁F_n − a₂F_{n−1} + β·drive)/(1 − βa) and out = F_n + h/2·(2·drive + a(F_n + F*))."""
        if len(self.times) == 1:
            return fetch(self.values[-1])
        if self.drive is None:
            self._field(fetch)
        (t_prev, f_prev), (t_n, f_n) = self.trajectory
        if same_time(t, t_n):
            return fetch(f_n)
        f_prev, f_n = fetch(f_prev), fetch(f_n)
        h, h_prev = t - t_n, t_n - t_prev
        omega = h / h_prev
        a1, a2, beta = (1 + omega) ** 2 / (1 + 2 * omega), omega**2 / (1 + 2 * omega), h * (1 + omega) / (1 + 2 * omega)
        if self.rate is None:  # a constant field: both stages are exact, and the step is F_n + h·drive
            out = torch.add(f_n, self.drive, alpha=h)
        else:
            a = self.rate
            half = a * (h / 2)
            scale = half / (1 - beta * a)
            out = torch.mul(f_n, 1 + half + scale * a1)
            out.addcmul_(f_prev, scale, value=-a2).addcmul_(self.drive, h + scale * beta)
        self.trajectory = [(t_n, f_n), (t, out)]
        return out

    def flops(self, t: float) -> float:
        if len(self.times) == 1:
            return 0.0
        per_step = 2.0 if self.relaxation == 0.0 or len(self.times) == 2 else STEP_FLOPS
        derived = ANCHOR_FLOPS if self.drive is None else 0.0  # charged to the first forecast after an anchor
        return per_step + derived

    def tensors(self) -> list[Tensor]:
        held = list(self.values) + [v for _, v in self.trajectory]
        return held + [x for x in (self.drive, self.rate) if x is not None]
