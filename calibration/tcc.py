"""TCC, Trajectory-Consistent Calibration: offline, site-local priors that correct each value the policy reuses, fitted
in sampling order on a cache-side trajectory that already carries every earlier prior.

Every prior is per channel (the last dimension) and applied as at most two fused multiply-adds:

    ĥ = a ⊙ h̃ + g ⊙ Δ + b

h̃ is the value the policy uses (reuse or forecast), Δ the increment between the site's two newest computed values
scaled to the current staleness (zero while there is one). The variants differ in what they fit:

* "drift" (default): a = 1; least squares of (g, b) against the site recomputed on the current cache-side input. It
  learns, per site and channel, how much of the recent drift continues and how stale values are biased.
* "trend": least squares of (a, g, b) against the same target; a < 1 shrinks values toward the channel mean, which
  lowers the error per site but blurs samples.
* "mm": moment matching to the full trajectory, the published design: a = clamp(sd_f / (sd_c + ε), 0.5, 2),
  b = μ_f − a·μ_c, g = 0, with μ, sd the moments over tokens and batch.

docs/methods.md, "TCC", gives the measurements behind the default. What makes a fit trajectory-consistent is `TccFit`'s order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch
from torch import Tensor

from .calibrator import Calibrator, Reused, Site

VARIANTS = ("drift", "trend", "mm")
EPS = 1e-6
RIDGE = 1e-6
SCALE_RANGE = (0.5, 2.0)
SiteKey = tuple[str, int, int, str]  # role, round, block, site name
FLOPS = 6.0  # per element: at most three fused multiply-adds (see `correct`), counted as honest compute


def site_key(site: Site) -> SiteKey:
    return site.role, site.round, site.block, site.name


def _rows(x: Tensor) -> Tensor:
    """Values as (rows, channels) in float32, so products of half-precision activations cannot overflow."""
    return x.detach().reshape(-1, x.shape[-1]).float()


def _host(x: Tensor) -> Tensor:
    """A per-channel reduction (taken on the device in float32) accumulated on the CPU in float64, which every
    backend supports there (MPS has no float64)."""
    return x.detach().to("cpu", torch.float64)


@dataclass
class SitePrior:
    """One site's correction, and where in the schedule it was fitted (for transfer to other schedules)."""

    a: Tensor
    g: Tensor
    b: Tensor
    sigma: float
    anchor_sigma: float
    stale_steps: int
    before: float = float("nan")  # mean squared error of h̃ against the target on the calibration set
    after: float = float("nan")  # the same for ĥ
    uses_g: bool = field(init=False)  # known on the CPU, so applying priors never asks a GPU

    def __post_init__(self) -> None:
        self.a, self.g, self.b = (t.detach().to("cpu", torch.float32) for t in (self.a, self.g, self.b))
        self.uses_g = bool(self.g.any())

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.a, self.g, self.b))


@dataclass
class LeastSquares:
    """Per-channel normal equations of the variant's regression, accumulated in float64 on the CPU over any number
    of batches.

    "drift" regresses y − h̃ on (Δ, 1), keeping a = 1; "trend" regresses y on (h̃, Δ, 1).
    """

    variant: str
    gram: Tensor | None = None  # (C, k, k)
    cross: Tensor | None = None  # (C, k)
    yy: Tensor | None = None  # (C,)
    count: int = 0

    def add(self, value: Tensor, increment: Tensor | None, target: Tensor) -> None:
        h, y = _rows(value), _rows(target)
        d = _rows(increment) if increment is not None else torch.zeros_like(h)
        y, cols = (y - h, [d]) if self.variant == "drift" else (y, [h, d])
        cols.append(torch.ones_like(h))
        k = len(cols)
        gram = h.new_empty((h.shape[1], k, k))
        for i in range(k):
            for j in range(i, k):
                gram[:, i, j] = gram[:, j, i] = (cols[i] * cols[j]).sum(0)
        gram, cross = _host(gram), _host(torch.stack([(u * y).sum(0) for u in cols], -1))
        yy = _host(y.square().sum(0))
        if self.gram is None:
            self.gram, self.cross, self.yy = gram, cross, yy
        else:
            self.gram += gram
            self.cross += cross
            self.yy += yy
        self.count += h.shape[0]

    def solve(self, site: Site, errors: bool = True) -> SitePrior:
        """The prior; `errors`: with the fit's error before and after on everything added (NaN without: the
        sequential fit solves at every site visit, and only the final priors report their errors)."""
        k = self.gram.shape[-1]
        ridge = RIDGE * self.gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        eye = torch.eye(k, dtype=self.gram.dtype, device=self.gram.device)
        beta = torch.linalg.solve(self.gram + ridge[:, None, None] * eye, self.cross.unsqueeze(-1)).squeeze(-1)
        unchanged = torch.zeros_like(beta)  # the coefficients of h̃ itself, for the error before calibration
        if self.variant == "drift":
            a, g = torch.ones_like(beta[:, 0]), beta[:, 0]
        else:
            unchanged[:, 0] = 1.0
            a, g = beta[:, 0], beta[:, 1]
        before, after = (self._mse(unchanged), self._mse(beta)) if errors else (float("nan"), float("nan"))
        return SitePrior(a.float(), g.float(), beta[:, -1].float(), site.sigma, site.anchor_sigma, site.stale_steps,
                         before, after)

    def _mse(self, beta: Tensor) -> float:
        """Mean squared error of the fit `beta` over everything added, from the sufficient statistics alone."""
        sse = self.yy - 2 * (beta * self.cross).sum(-1) + torch.einsum("ci,cij,cj->c", beta, self.gram, beta)
        return float(sse.sum().clamp_min(0.0) / (self.count * beta.shape[0]))


@dataclass
class Moments:
    """Per-channel mean and variance, streamed in float64 on the CPU."""

    sum: Tensor | None = None
    sumsq: Tensor | None = None
    count: int = 0

    def add(self, x: Tensor) -> None:
        rows = _rows(x)
        s, q = _host(rows.sum(0)), _host(rows.square().sum(0))
        if self.sum is None:
            self.sum, self.sumsq = s, q
        else:
            self.sum += s
            self.sumsq += q
        self.count += rows.shape[0]

    def mean_std(self) -> tuple[Tensor, Tensor]:
        mean = self.sum / self.count
        return mean.float(), (self.sumsq / self.count - mean.square()).clamp_min(0.0).sqrt().float()


@dataclass
class MomentMatch:
    """The "mm" fit: moments of h̃ on the cache side against the moments of the target, the site recomputed on the
    cache-side input (given to `add`), or in the full-trajectory ablation the moments a reference run observed."""

    full: Moments = field(default_factory=Moments)
    cache: Moments = field(default_factory=Moments)

    def add(self, value: Tensor, increment: Tensor | None, target: Tensor | None) -> None:
        self.cache.add(value)
        if target is not None:
            self.full.add(target)

    def solve(self, site: Site, errors: bool = True) -> SitePrior:
        mu_c, sd_c = self.cache.mean_std()
        mu_f, sd_f = self.full.mean_std()
        a = (sd_f / (sd_c + EPS)).clamp(*SCALE_RANGE)
        return SitePrior(a, torch.zeros_like(a), mu_f - a * mu_c, site.sigma, site.anchor_sigma, site.stale_steps)


@dataclass
class Stacked:
    """The priors of a model call's chunks, stacked to broadcast over the batch: (chunks, 1, …, 1, channels)."""

    a: Tensor
    b: Tensor
    g: Tensor | None  # None when no chunk's prior uses the increment


def stack(priors: list[SitePrior | None], like: Tensor) -> Stacked | None:
    """None when no chunk has a prior; chunks without one get the identity."""
    if all(p is None for p in priors):
        return None
    channels = like.shape[-1]
    for p in priors:
        if p is not None and p.a.shape != (channels,):
            raise ValueError(f"a prior has {p.a.shape[0]} channels but the model's value has {channels}: "
                             "the priors belong to another model; choose priors fitted for it, or refit them")
    view = (len(priors),) + (1,) * (like.dim() - 1) + (channels,)

    def stacked(name: str, fill: float) -> Tensor:
        rows = [like.new_full((channels,), fill) if p is None else getattr(p, name).to(like) for p in priors]
        return torch.stack(rows).view(view)

    uses_g = any(p is not None and p.uses_g for p in priors)
    return Stacked(stacked("a", 1.0), stacked("b", 0.0), stacked("g", 0.0) if uses_g else None)


def correct(reused: Reused, priors: Stacked | None) -> Tensor:
    """ĥ = a ⊙ h̃ + g ⊙ Δ + b for each chunk, in at most three fused passes; `reused.value` is left untouched."""
    if priors is None:
        return reused.value
    chunks = reused.value.unflatten(0, (priors.a.shape[0], reused.value.shape[0] // priors.a.shape[0]))
    out = torch.addcmul(priors.b, chunks, priors.a)
    anchors = reused.anchors() if priors.g is not None else None
    if anchors is not None:  # g ⊙ k(newest − previous) as two in-place passes, with k folded into the small g
        newest, previous, scales = anchors
        if all(k == scales[0] for k in scales):
            gain = priors.g * scales[0]
        else:
            gain = priors.g * torch.tensor(scales, dtype=priors.g.dtype, device=priors.g.device).view(
                -1, *(1,) * (priors.g.dim() - 1))
        out.addcmul_(newest.unflatten(0, chunks.shape[:2]), gain)
        out.addcmul_(previous.unflatten(0, chunks.shape[:2]), gain, value=-1.0)
    return out.flatten(0, 1)


class TccPriors(Calibrator):
    """Fitted priors. On the schedule they were fitted for, each reuse site finds its own prior (same round, σ and
    anchor σ). Elsewhere (another step count or sampler) a site gets the prior interpolated over σ between the fitted
    sites of the same block, site name, role and steps since the anchor (the k-th reuse after a computation has its
    own drift), with its staleness terms rescaled to the actual gap:
    a = 1 + α·gap, b = β·gap with α = (a − 1)/gap and β = b/gap interpolated; g multiplies an increment that is
    already scaled to the staleness, so it is interpolated as is. `priors.validate` decides up front whether a
    schedule is close enough for this to be sound.
    """

    flops = FLOPS

    def __init__(self, priors: dict[SiteKey, SitePrior], variant: str) -> None:
        check_variant(variant)
        self.priors = priors
        self.variant = variant
        self.anchors = 2 if any(p.uses_g for p in priors.values()) else 1  # the drift term needs the previous anchor
        self._lines: dict[tuple[str, int, str, int], list[SitePrior]] = {}
        for (role, _, block, name), prior in priors.items():
            self._lines.setdefault((role, block, name, prior.stale_steps), []).append(prior)
        for line in self._lines.values():
            line.sort(key=lambda p: p.sigma)
        self._stacked: dict[tuple, Stacked | None] = {}

    def lookup(self, site: Site) -> SitePrior | None:
        """The site's own prior on the fitted schedule, else one interpolated from its neighbours."""
        prior = self.priors.get(site_key(site))
        if prior is None or not (_close(prior.sigma, site.sigma) and _close(prior.anchor_sigma, site.anchor_sigma)):
            prior = self._interpolate(site)
        return prior

    def _interpolate(self, site: Site) -> SitePrior | None:
        line = self._lines.get((site.role, site.block, site.name, site.stale_steps))
        gap = site.anchor_sigma - site.sigma
        if not line or gap <= 0:
            return None
        upper = next((i for i, p in enumerate(line) if p.sigma >= site.sigma), len(line) - 1)
        lo, hi = line[max(upper - 1, 0)], line[upper]
        w = 0.0 if hi.sigma == lo.sigma else min(max((site.sigma - lo.sigma) / (hi.sigma - lo.sigma), 0.0), 1.0)

        def per_gap(p: SitePrior) -> tuple[Tensor, Tensor]:
            fitted_gap = max(p.anchor_sigma - p.sigma, 1e-12)
            return (p.a - 1) / fitted_gap, p.b / fitted_gap

        (alpha_lo, beta_lo), (alpha_hi, beta_hi) = per_gap(lo), per_gap(hi)
        alpha, beta = torch.lerp(alpha_lo, alpha_hi, w), torch.lerp(beta_lo, beta_hi, w)
        return SitePrior(1 + alpha * gap, torch.lerp(lo.g, hi.g, w), beta * gap, site.sigma, site.anchor_sigma,
                         site.stale_steps)

    def calibrate(self, sites: list[Site], reused: Reused) -> Tensor:
        """The stacked priors of a site group are moved to the device once and kept for later runs on the same
        schedule, so a correction costs only its multiply-adds; runs on ever new schedules cannot grow the cache past
        a few prior sets."""
        value = reused.value
        key = (tuple(sites), value.dim(), value.device, value.dtype)
        if key not in self._stacked:
            if len(self._stacked) > 4 * len(self.priors):
                self._stacked.clear()
            self._stacked[key] = stack([self.lookup(s) for s in sites], value)
        return correct(reused, self._stacked[key])


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-3)


class TccFit(Calibrator):
    """Fits TCC priors over runs of the cached policy on the calibration requests.

    Every variant compares with the site recomputed on the cache-side input, offered by the engine, so one fitting run
    per request suffices. `full_trajectory` (an ablation of "mm") takes mm's target moments from a `reference` run
    (full computation) first instead: the published wording, which costs a second run per request and measured no
    better (docs/methods.md, "TCC"). In the cache-side runs:

    * `sequential` (the trajectory-consistent fit): each site's prior is estimated from everything seen there so far
      and applied at once, so every later site is fitted on a trajectory that already carries it;
    * otherwise the priors of the previous round stay fixed (none before the first `end_round`: the one-shot
      ablation, fitted on one uncalibrated cached trajectory) while fresh statistics are collected, and `end_round`
      re-estimates them all. Rounds are how a calibration set larger than one batch converges.
    """

    flops = FLOPS

    def __init__(self, variant: str = "drift", sequential: bool = True, full_trajectory: bool = False) -> None:
        check_variant(variant)
        if full_trajectory and variant != "mm":
            raise ValueError(f"only moment matching can take its targets from the full trajectory, not {variant!r}")
        self.variant = variant
        self.sequential = sequential
        self.reference = full_trajectory
        self.needs_truth = not full_trajectory
        self.anchors = 1 if variant == "mm" else 2
        self.full: dict[SiteKey, Moments] = {}
        self.stats: dict[SiteKey, LeastSquares | MomentMatch] = {}
        self.seen: dict[SiteKey, Site] = {}
        self._frozen: TccPriors | None = None

    def observe(self, site: Site, value: Tensor) -> None:
        self.full.setdefault(site_key(site), Moments()).add(value)

    def end_reference(self) -> None:
        if not self.full:
            raise ValueError("the reference run met no site where the policy reuses: there is nothing to calibrate")
        self.reference = False

    def calibrate(self, sites: list[Site], reused: Reused) -> Tensor:
        if self.reference:
            raise RuntimeError("a reference run computes every block; it never asks for calibration")
        value, chunk = reused.value, reused.value.shape[0] // len(sites)
        increment = None if self.variant == "mm" else reused.increment()
        truth = reused.truth() if self.needs_truth else None
        applied: list[SitePrior | None] = []
        for i, site in enumerate(sites):
            part = slice(i * chunk, (i + 1) * chunk)
            stats = self._stats(site)
            if stats is None:
                applied.append(None)
                continue
            stats.add(value[part], None if increment is None else increment[part], None if truth is None else truth[part])
            self.seen[site_key(site)] = site
            if self.sequential:
                applied.append(stats.solve(site, errors=False))
            else:
                applied.append(None if self._frozen is None else self._frozen.lookup(site))
        return correct(reused, stack(applied, value))

    def _stats(self, site: Site) -> LeastSquares | MomentMatch | None:
        key = site_key(site)
        stats = self.stats.get(key)
        if stats is None:
            if self.variant == "mm":
                if self.full and key not in self.full:  # the reference run never reached this site: no target
                    return None
                stats = MomentMatch(self.full[key]) if self.full else MomentMatch()
            else:
                stats = LeastSquares(self.variant)
            self.stats[key] = stats
        return stats

    def end_round(self) -> None:
        """Freeze the priors fitted so far (applied, unchanged, through the next round) and collect afresh."""
        self._frozen = self.priors()
        self.stats = {}
        self.sequential = False

    def priors(self) -> TccPriors:
        """The priors estimated from the statistics of the current round."""
        return TccPriors({k: s.solve(self.seen[k]) for k, s in self.stats.items()}, self.variant)


def resolve_variant(variant: str, forecaster: str) -> str:
    """"auto" picks what the benchmark found best: drift on reuse (FORA), which it turns into a learned forecast;
    moment matching on a forecaster, whose forecast drift would only replace."""
    if variant == "auto":
        return "drift" if forecaster == "reuse" else "mm"
    check_variant(variant)
    return variant


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"TCC variant must be one of {', '.join(VARIANTS)} (got {variant!r})")
