"""GOC, Gradient-Optimized Cache: push a reused value along the "gradient" between the site's newest computed value
and the value it used just before, Â = c + w·k·(c − u)/m, except where the feature trajectory turns (an inflection).

In an alternating schedule u is the previous cached step's value *as used*, GOC's own push included, so the
gradient is "recomputed minus cached-as-used" and feeds the cache's own error back (the official code's rule, methods
reference §8.2). k = (σ_c − σ)/(σ_u − σ_c) scales it to the current gap, capped at 1, and m is how many steps u was
stale (1 in alternating schedules, where the rule is the official one). The official queue instead pushes each
cached step from the one before; from interval 3 on that feeds the error back with a growing gain and diverges, and
without m the push overshoots at long intervals (docs/methods.md, "GOC": the measurements, `studies/goc_study.py`).

Inflections ("auto") are detected online, per sample, from values the run computes anyway: when a site gets a new
computed value c₂, the turn of its trajectory is cos(c₂ − c₁, c₁ − c₀); below `threshold` the trajectory reversed and
the push is dropped until the next computed value. The mask stays a tensor, so detection never waits on a GPU. "off"
pushes everywhere (plain gradient propagation); "manual" drops the push at the listed steps (0 = first step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .calibrator import Calibrator, Reused, Site
from .consensus import Consensus
from .errors import PolicyError

INFLECTION_MODES = ("auto", "off", "manual")
MAX_WEIGHT = 2.0


@dataclass(frozen=True)
class GocSettings:
    """What the GOC Corrector node attaches to a cache policy."""

    weight: float = 0.8
    inflection: str = "auto"
    threshold: float = 0.0
    steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0 < self.weight <= MAX_WEIGHT:
            raise PolicyError(f"GOC weight must be in (0, {MAX_WEIGHT}] (got {self.weight!r}); 0.8 is the default, "
                              "weights above 1 amplify the cache error they feed back")
        if self.inflection not in INFLECTION_MODES:
            raise PolicyError(f"GOC inflection must be one of {', '.join(INFLECTION_MODES)} (got {self.inflection!r})")
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
            raise PolicyError(f"GOC threshold is a cosine and must be in [-1, 1] (got {threshold!r}); 0 marks a "
                              "reversal of direction as an inflection")
        steps = tuple(self.steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
            raise PolicyError(f"GOC inflection steps must be step numbers >= 0 (got {list(steps)})")
        if self.inflection == "manual" and not steps:
            raise PolicyError("GOC inflection 'manual' needs the steps where the correction is off, e.g. '9, 17'; "
                              "use 'off' to correct at every step")
        # Settings a mode ignores are dropped, so that equal behaviour means equal settings and tags.
        object.__setattr__(self, "threshold", float(threshold) if self.inflection == "auto" else 0.0)
        object.__setattr__(self, "steps", tuple(sorted(set(steps))) if self.inflection == "manual" else ())

    def tag(self) -> str:
        """E.g. `GOC0.8` (auto), `GOC0.8plain`, `GOC1.2s9+17`, `GOC0.5s0to23`, `GOC0.8t0.2`: part of the policy's
        identity, and of prior file names (so only characters every file system accepts)."""
        mode = {"auto": "", "off": "plain", "manual": "s" + _runs(self.steps)}[self.inflection]
        threshold = f"t{self.threshold:g}" if self.threshold != 0.0 else ""
        return f"GOC{self.weight:g}{mode}{threshold}"


def _runs(steps: tuple[int, ...]) -> str:
    """Sorted steps with runs of three or more written `atob`, so a long list still makes a short file name."""
    parts, start = [], 0
    for i in range(1, len(steps) + 1):
        if i == len(steps) or steps[i] != steps[i - 1] + 1:
            a, b = steps[start], steps[i - 1]
            parts += [f"{a}to{b}"] if b - a >= 2 else [str(x) for x in steps[start:i]]
            start = i
    return "+".join(parts)


def parse_steps(text: str) -> tuple[int, ...]:
    """'9, 17' or '9 17' as steps; a clear error for anything else (node input)."""
    parts = text.replace(",", " ").split()
    if not all(p.isascii() and p.isdecimal() for p in parts):
        raise PolicyError(f"GOC inflection steps must be whole step numbers separated by commas, e.g. '9, 17' "
                          f"(got {text!r})")
    return tuple(int(p) for p in parts)


@dataclass(frozen=True)
class Used:
    """A value a cached round used, at which σ, and how many steps after the computation it came from."""

    sigma: float
    stale_steps: int
    value: Tensor


@dataclass
class Track:
    """One site's memory for the batch of one branch combination."""

    anchor: tuple[float, ...] = ()
    signature: tuple = ()
    computed: Tensor | None = None  # auto only: the newest computed value, for the next turn
    increment: Tensor | None = None
    steady: Tensor | None = None  # per sample: 1 while the trajectory kept its direction at the last computation
    last: Used | None = None  # the value used at the newest cached round
    before: Used | None = None  # the value used at the last cached round before `computed`

    def nbytes(self) -> int:
        """An upper bound of what the track keeps alive beyond the policy's cache: every storage it holds, once. The
        storage of the newest computed value is the cache's own until the next computation replaces it there."""
        held = [self.computed, self.increment] + [used.value for used in (self.last, self.before) if used is not None]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held if t is not None}
        return sum(storages.values())


class GocCorrector(Calibrator):
    """Corrects FORA's reused values; the engine creates one per run, so nothing leaks between queue items."""

    flops = 3.0  # a subtraction and a multiply-add per value element (inflection detection is once per computation)

    def __init__(self, settings: GocSettings, consensus: Consensus | None = None) -> None:
        """`consensus`: where the tokens are sharded over several ranks, a turn's sums run over all of them."""
        self.settings = settings
        self.consensus = consensus or Consensus()
        self._tracks: dict[tuple, Track] = {}
        self.nbytes = 0

    def start(self) -> None:
        self._tracks, self.nbytes = {}, 0

    def forget(self, roles: tuple[str, ...]) -> None:
        for key in [k for k in self._tracks if set(k[0]) & set(roles)]:
            self.nbytes -= self._tracks.pop(key).nbytes()

    def calibrate(self, sites: list[Site], reused: Reused) -> Tensor:
        track = self._tracks.setdefault(track_key(sites), Track())
        anchor = tuple(s.anchor_sigma for s in sites)
        if anchor != track.anchor:
            held = track.nbytes()
            self._computed(track, anchor, reused.value)
            self.nbytes += track.nbytes() - held
        settings, site = self.settings, sites[0]
        if track.before is None or (settings.inflection == "manual" and site.step in settings.steps):
            return reused.value
        gain = self.gain(track.before, max(anchor), site)
        if gain == 0.0:
            return reused.value
        c, u = reused.value, track.before.value  # FORA reuses the newest computed value
        if settings.inflection != "auto":
            return torch.add(c, c - u, alpha=gain)
        if track.steady is None:  # no turn measured yet: too early to trust a direction
            return reused.value
        return c + (c - u) * (track.steady * gain)

    def gain(self, before: Used, computed_sigma: float, site: Site) -> float:
        """w·k/m: the push per unit of gradient at this site (0 where there is no gap to take a gradient over)."""
        gap = before.sigma - computed_sigma
        if gap <= 0:  # Heun evaluates twice at one σ
            return 0.0
        k = min((computed_sigma - site.sigma) / gap, 1.0)
        return self.settings.weight * k / max(before.stale_steps, 1)

    def settle(self, sites: list[Site], value: Tensor) -> None:
        track = self._tracks.get(track_key(sites))
        if track is not None:
            held = track.nbytes()
            track.last = Used(sites[0].sigma, sites[0].stale_steps, value)
            self.nbytes += track.nbytes() - held

    def _computed(self, track: Track, anchor: tuple[float, ...], value: Tensor) -> None:
        """A new computed value (FORA reuses the newest one): measure the turn, and take the gradient from it."""
        signature = (value.shape, value.dtype, value.device)
        if track.signature == signature:
            if track.computed is not None:
                increment = (value - track.computed).flatten(1)
                if track.increment is not None:
                    turn = self._cosine(increment.float(), track.increment.float())
                    shape = (-1, *(1,) * (value.dim() - 1))
                    track.steady = (turn >= self.settings.threshold).to(value.dtype).view(shape)
                track.increment = increment
            track.before = track.last
        else:  # the first computation, or a branch whose input changed shape, dtype or device: start afresh
            track.computed = track.increment = track.steady = track.before = None
        track.anchor, track.signature, track.last = anchor, signature, None
        if self.settings.inflection == "auto":
            track.computed = value

    def _cosine(self, a: Tensor, b: Tensor) -> Tensor:
        """Per sample, cos(a, b) over every token, on however many ranks the tokens are sharded."""
        if not self.consensus.shards_tokens:
            return torch.nn.functional.cosine_similarity(a, b, dim=1)
        sums = self.consensus.total(torch.stack([(a * b).sum(1), a.square().sum(1), b.square().sum(1)]))
        return sums[0] / (sums[1].sqrt() * sums[2].sqrt()).clamp_min(1e-8)


def track_key(sites: list[Site]) -> tuple:
    """A track per site and branch combination: the batch's chunks are corrected together, in one operation."""
    site = sites[0]
    return tuple(s.role for s in sites), site.block, site.name
