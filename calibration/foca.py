"""FoCa, forecast then calibrate (Zheng et al., arXiv 2508.16211): each cached site is the solution of a feature ODE
dF/dt = g(F, t), and skipped steps integrate that ODE one step at a time, from the site's previous value (computed or
already forecast), where TaylorSeer extrapolates a polynomial from the anchors.

The paper forecasts with a BDF2 predictor and calibrates with a Heun (explicit trapezoidal) corrector, g estimated from
differences of cached features as its public descriptions read it. Ours keeps the integration and deviates in the field
and the corrector, so it is our method under the paper's name (docs/methods.md, "FoCa", has the reasons and
measurements): a field that does not depend on F integrates to a polynomial, Taylor again, and on a field that does, the
explicit corrector is unstable.

The field is linear in F, estimated at the newest computed step c from the last three anchors, and every step is
anchored to it, so the integration does not compound its own errors:

    g(F) = ġ_c + λα (F − F_c)

α ≤ 0 is the site's rate of relaxation along its trajectory, per row (one sample of one branch): the two newest secant
slopes s₁ = (F_c − F_{c−1})/h₁ and s₂ = (F_{c−1} − F_{c−2})/h₂ shrink by r = <s₁, s₂>/<s₂, s₂> over the (h₁ + h₂)/2
between their midpoints, so α = ln(r)/((h₁ + h₂)/2) for 0 < r < 1, and 0 otherwise (a trajectory that speeds up,
turns or reverses is not relaxing). r is measured from secants rounded to the features' dtype, so a ratio under that
dtype's eps is rounding, not a rate: r is clamped to it, which bounds α by ln(1/eps)/((h₁ + h₂)/2) as r → 0⁺. ġ_c is
the slope at t_c: the BDF2 slope (the derivative of the parabola through the three newest anchors, for any spacing),
or on a relaxing row the exponentially fitted slope of the two newest. Both are exact for a feature relaxing
exponentially toward a state, which is then integrated as the decay it is, bounded however long the horizon, where a
polynomial from one anchor diverges; one that moves steadily (α = 0) is extrapolated linearly with the BDF2 slope.

One step from t_n to t_{n+1} = t_n + h is the trapezoidal corrector solved implicitly, the fixed point that iterating
Heun's corrector from the BDF2 prediction converges to; on the linear field that is one division (z = hλα):

    F_{n+1} = F_n + h/2 · (g(F_n) + g(F_{n+1}))   ⇔   F_{n+1} − F_c = A (F_n − F_c) + B ġ_c,
    A = (1 + z/2)/(1 − z/2),  B = h/(1 − z/2)

|A| ≤ 1 for every z ≤ 0 (A-stable): the forecast never moves further from the state the row relaxes toward than the
newest anchor is, where the explicit Heun corrector's recurrence grows by 1.30 a step at z = −3 and 4.9 at −10. The
BDF2 prediction, only the iteration's starting point, drops out, and the step needs no older point. A, 1 − A and B
are bounded, so no term grows with the rate (g's constant ġ_c − λαF_c can overflow half precision). The first step
after an anchor starts from it. λ (the policy's `foca_lambda`) scales the relaxation the field keeps; λ = 0
integrates the constant field of the BDF2 slope, the first-order forecast that earlier releases of this pack called
FoCa (kept as the benchmark's `foca-anchored` ablation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .forecast import Fetch, Forecaster, same_time

STEP_FLOPS = 5.0  # per element and step from a forecast: A·F_n + (1 − A)·F_c + B·ġ_c, a multiply and two multiply-adds
FIRST_STEP_FLOPS = 2.0  # from the anchor itself (F_n = F_c), or on a constant field: one multiply-add
ANCHOR_FLOPS = 10.0  # at each new anchor: the two differences, two dot products, and the slope's two multiply-adds


class FocaForecaster(Forecaster):
    history = 3
    keeps_forecasts = True

    def __init__(self, relaxation: float = 1.0, keep: int = 1) -> None:
        super().__init__(keep)
        self.relaxation = relaxation
        self.slope: Tensor | None = None  # ġ_c, the field at the newest anchor
        self.rate: Tensor | None = None  # a = λα per row, float64, shaped to broadcast; None on a constant field
        self.trajectory: tuple[float, Tensor] | None = None  # the newest point, computed or forecast

    def anchored(self) -> None:
        """A new anchor: the field is derived again (on the next forecast) and the trajectory restarts from it."""
        self.slope = self.rate = None
        self.trajectory = (self.times[-1], self.values[-1])

    def _field(self, fetch: Fetch) -> None:
        """The field at the newest anchor, from the last three: with s₁, s₂ the two newest secants and w = h₁/(h₁+h₂),
        the BDF2 slope is s₁(1 + w) − s₂w; on a relaxing row the exponentially fitted slope is s₁·αh₁/(1 − e^{−αh₁})."""
        times, values = self.times[-3:], [fetch(v) for v in self.values[-3:]]
        if len(times) == 2:
            self.slope = (values[1] - values[0]).div_(times[1] - times[0])
            return
        (t0, t1, t2), (f0, f1, f2) = times, values
        h1, h2 = t2 - t1, t1 - t0
        d1, d2 = torch.sub(f2, f1), torch.sub(f1, f0)  # the secants are d/h; the h fold into the coefficients
        w = h1 / (h1 + h2)
        if self.relaxation == 0.0:
            self.slope = d1.mul_((1 + w) / h1).add_(d2, alpha=-w / h2)
            return
        rows = d1.shape[0]
        flat1, flat2 = d1.reshape(rows, -1), d2.reshape(rows, -1)
        cross = torch.linalg.vecdot(flat1, flat2).double()
        norm = torch.linalg.vecdot(flat2, flat2).double().clamp_min(1e-300)
        ratio = cross / norm * (h2 / h1)  # <s₁, s₂> / <s₂, s₂>
        relaxing = (ratio > 0) & (ratio < 1)
        floor = torch.finfo(d1.dtype).eps  # under it, the ratio is the secants' rounding
        alpha = torch.where(relaxing, ratio.clamp_min(floor).log() / ((h1 + h2) / 2), torch.zeros_like(ratio))
        x = alpha * h1
        fitted = x / torch.where(relaxing, 1 - torch.exp(-x), torch.ones_like(x))
        shape = (-1,) + (1,) * (d1.dim() - 1)
        p = torch.where(relaxing, fitted, torch.full_like(fitted, 1 + w)) / h1
        q = torch.where(relaxing, torch.zeros_like(fitted), torch.full_like(fitted, -w)) / h2
        self.rate = (self.relaxation * alpha).view(shape)
        self.slope = d1.mul_(p.to(d1.dtype).view(shape)).addcmul_(d2, q.to(d1.dtype).view(shape))

    def forecast(self, t: float, fetch: Fetch) -> Tensor:
        """One implicit trapezoidal step from the trajectory's newest point: F_c + A(F_n − F_c) + B·ġ_c, with A and B
        per row (A = 1, B = h on a constant field)."""
        if len(self.times) == 1:
            return fetch(self.values[-1])
        if self.slope is None:
            self._field(fetch)
        t_n, f_n = self.trajectory
        if same_time(t, t_n):
            return fetch(f_n)
        h, f_n = t - t_n, fetch(f_n)
        if self.rate is None:  # a constant field: the step is F_n + h·ġ_c, exact
            out = torch.add(f_n, self.slope, alpha=h)
        else:
            z = self.rate * h  # float64; A, 1 − A and B are formed there and rounded once
            damping, pull, push = ((1 + z / 2) / (1 - z / 2), -z / (1 - z / 2), h / (1 - z / 2))
            push = push.to(f_n.dtype)
            if same_time(t_n, self.times[-1]):  # from the anchor: F_n − F_c = 0
                out = torch.addcmul(f_n, self.slope, push)
            else:
                out = torch.mul(f_n, damping.to(f_n.dtype)).addcmul_(fetch(self.values[-1]), pull.to(f_n.dtype))
                out.addcmul_(self.slope, push)
        self.trajectory = (t, out)
        return out

    def flops(self, t: float) -> float:
        if len(self.times) == 1:
            return 0.0
        constant = self.relaxation == 0.0 or len(self.times) == 2
        from_anchor = same_time(self.trajectory[0], self.times[-1])
        per_step = FIRST_STEP_FLOPS if constant or from_anchor else STEP_FLOPS
        derived = ANCHOR_FLOPS if self.slope is None else 0.0  # charged to the first forecast after an anchor
        return per_step + derived

    def tensors(self) -> list[Tensor]:
        newest = [self.trajectory[1]] if self.trajectory is not None else []
        return list(self.values) + newest + [x for x in (self.slope, self.rate) if x is not None]
