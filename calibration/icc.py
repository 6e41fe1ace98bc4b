"""ICC, increment-calibrated caching: between full steps, a Linear's output is its cached output plus a low-rank map of
its input's change, y ≈ y_cache + A·(B·(x − x_cache)), with A·B a channel-aware SVD of the layer's own weight
(methods reference §9.2). Everything between the Linears (attention softmax, activations, norms, gates) is recomputed
exactly on the calibrated values, so only the Linears' increments are approximated.

A model adapter routes each Linear inside the blocks through `linear(layer, x, compute)` of the active target: a
`StatsRecorder` during calibration runs, or the run's `IccRun` while sampling. Only token-wise inputs (batch, tokens,
channels) take part; modulation Linears on the conditioning vector are computed exactly, as the official code does.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Hashable, Iterator, Protocol

import numpy as np
import torch
from torch import Tensor

from .batching import joined
from .errors import PolicyError
from .memory import CacheMemory

EPS = 1e-6
ALPHA = 0.5  # weight = (normalised mean |activation|) ** ALPHA, as the official code
MAX_RATIO = 1000.0  # weights are floored at max / MAX_RATIO
SVD_MODES = ("channel-aware", "plain")
ChannelTable = dict[str, tuple[Tensor, Tensor]]  # Linear key -> per-channel statistic of its (inputs, outputs)
log = logging.getLogger("calibrated_cache")


# Where ICC was measured no faster than computing the block (docs/methods.md, "The break-even"): its increments read and
# write every Linear's cached output, so small blocks cost more than the Linears they replace. Per device kind: the
# smallest block width and token rows × width at which it was measured faster. On the CPU, width 128 (the testbed)
# ran at 0.97–1.07× and width 256 with 64 token rows at 0.86–0.91×, width 256 with 256 rows or more at 1.01–1.16×;
# on a GPU the width-256 stack ran at 0.41–0.50× (launch-bound) and the Flux-width one (3072 × 4096) at 1.13–1.26×.
ICC_MIN_BLOCK = {"cpu": (256, 2**16), "cuda": (1024, 2**23)}
ICC_ANY_SIZE = "CALIBRATED_CACHE_ICC_ANY_SIZE"  # environment: "1" runs ICC on blocks of any size (for studies)


def icc_too_small(rows: int, width: int, device: str) -> str | None:
    """Why ICC would run slower than full computation on blocks of `rows` token rows (batch × tokens) of `width`
    channels, or None where it was measured faster. Devices other than the CPU follow the GPU's figures."""
    min_width, min_work = ICC_MIN_BLOCK["cpu" if device == "cpu" else "cuda"]
    if width >= min_width and rows * width >= min_work:
        return None
    return (f"ICC would run slower than full computation here: its increments read and write every Linear's cached "
            f"output, which costs more than the Linear itself on blocks this small ({rows} token rows of width "
            f"{width} on {device}; it was measured faster from width {min_width} and {min_work} token rows × width "
            f"on). Set icc_rank to 0: a reuse or forecast policy skips these blocks for less (set {ICC_ANY_SIZE}=1 "
            f"to run ICC anyway, e.g. to study it)")


@dataclass(frozen=True)
class IccSettings:
    """`rank`: the rank of every factor (capped at a layer's full rank, where the increment is exact). `svd`:
    "channel-aware" weighs the factorisation by the channel statistics of a prior file; "plain" needs none."""

    rank: int = 32
    svd: str = "channel-aware"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise PolicyError(f"ICC rank must be an integer >= 1 (got {self.rank!r}); higher ranks are closer to "
                              "full computation and cost more")
        if self.svd not in SVD_MODES:
            raise PolicyError(f"ICC svd must be one of {', '.join(SVD_MODES)} (got {self.svd!r})")

    @property
    def aware(self) -> bool:
        return self.svd == "channel-aware"

    def tag(self) -> str:
        return f"ICC{self.rank}" + ("" if self.aware else "plain")


def token_wise(x: Tensor) -> bool:
    """Inputs with a token axis; (batch, channels) modulation inputs are not cached."""
    return x.dim() >= 3 and x.shape[-2] > 1


def parallel_parts(out_features: int, hidden: int, mlp: int) -> tuple[int, ...] | None:
    """The parts of a parallel (single-stream) block's fused first Linear, factored separately: q, k and v of
    `hidden` outputs each, then the MLP input of `mlp` per part: one part (Flux), or the gate and the up projection of
    a gated MLP (Flux 2's SiLU-gated MLP, Ovis' gate and up halves: 3·hidden + 2·mlp). None for any other width: the
    Linear is then factored whole."""
    rest = out_features - 3 * hidden
    if hidden < 1 or mlp < 1 or rest < 1 or rest % mlp or rest // mlp > 2:
        return None
    return (hidden,) * 3 + (mlp,) * (rest // mlp)


@dataclass(frozen=True)
class IccLinear:
    """One Linear inside block `block`, named by its path in the block. `chunks` splits a fused output (q, k, v, …)
    into parts factored separately, as ICC factors q, k and v; `weight(like)` is the weight as the layer computes with
    it now (LoRA and other patches applied, dequantised), in `like`'s dtype and on its device."""

    block: int
    name: str
    weight: Callable[[Tensor], Tensor]
    chunks: tuple[int, ...] | None = None

    @cached_property
    def key(self) -> str:
        """Formatted once: it is looked up on every call of the Linear."""
        return f"{self.block}/{self.name}"


class LinearTarget(Protocol):
    def linear(self, layer: IccLinear, x: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor: ...


@dataclass
class ChannelStats:
    """Per-channel magnitude of one side (input or output) of a Linear over calibration samples.

    Each sample contributes its mean |value| over tokens, min-max normalised across channels, so that no sample
    dominates by its scale; the weights emphasise the channels that are large in most samples (the outliers that plain
    SVD lets the low-rank error hit hardest).
    """

    total: Tensor | None = None
    samples: int = 0

    def add(self, values: Tensor) -> None:
        """`values`: (batch, tokens, channels), or (batch, channels)."""
        a = values.detach().float().abs()
        m = a.flatten(1, -2).mean(dim=1) if a.dim() >= 3 else a
        lo, hi = m.amin(dim=1, keepdim=True), m.amax(dim=1, keepdim=True)
        m = ((m - lo + EPS) / (hi - lo + EPS)).sum(dim=0)  # kept on the device: no wait per call
        self.total = m if self.total is None else self.total + m
        self.samples += a.shape[0]

    def mean(self) -> Tensor:
        if self.total is None:
            raise ValueError("no activations were recorded for this layer: run a calibration pass first")
        return (self.total / self.samples).float().cpu()


def channel_weights(mean: Tensor, alpha: float = ALPHA, max_ratio: float = MAX_RATIO) -> Tensor:
    """(mean statistic) ** alpha, floored at max / max_ratio so that no channel is ignored."""
    w = mean.double().clamp_min(0.0) ** alpha
    return w.clamp_min(float(w.max()) / max_ratio).float()


STAT_SOURCES = ("delta_mag", "mag")


class StatsRecorder:
    """A LinearTarget for full-computation calibration runs: computes every Linear and records channel statistics of
    its input and output. Source "delta_mag" (the default; CD-SVD in the official code) takes how they change from one
    model call to the next: the increments are what the factors multiply, and on the testbed these weights beat both
    activation magnitudes ("mag", CA-SVD) and plain SVD (`python studies/icc_study.py`). Only up to
    `TOKENS` evenly spaced tokens are kept from one call to the next, in the activations' dtype (for Flux about 0.9 GiB
    with batched cond and uncond).

    `group` names the batch layout of the current call (e.g. which branches it holds), so that changes are taken
    between calls of the same layout when cond and uncond run as separate calls.
    """

    TOKENS = 64

    def __init__(self, source: str = "delta_mag") -> None:
        if source not in STAT_SOURCES:
            raise ValueError(f"statistics source must be one of {', '.join(STAT_SOURCES)} (got {source!r})")
        self.source = source
        self.layers: dict[str, tuple[ChannelStats, ChannelStats]] = {}
        self.group: Hashable = None
        self._previous: dict[tuple[str, Hashable], tuple[Tensor, Tensor]] = {}

    def linear(self, layer: IccLinear, x: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        y = compute(x)
        if not token_wise(x):
            return y
        stride = -(-x.shape[-2] // self.TOKENS)
        xs, ys = x.detach()[..., ::stride, :], y.detach()[..., ::stride, :]
        if self.source == "mag":
            self._add(layer.key, xs, ys)
            return y
        key = (layer.key, self.group)
        previous = self._previous.get(key)
        if previous is not None and previous[0].shape == xs.shape and previous[1].shape == ys.shape:
            self._add(layer.key, xs.float() - previous[0].float(), ys.float() - previous[1].float())
        self._previous[key] = (xs.clone(), ys.clone())
        return y

    def _add(self, key: str, inputs: Tensor, outputs: Tensor) -> None:
        stats = self.layers.setdefault(key, (ChannelStats(), ChannelStats()))
        stats[0].add(inputs)
        stats[1].add(outputs)

    def end_sample(self) -> None:
        """Between samples: a change is only taken within one sampling run."""
        self._previous.clear()

    def table(self) -> ChannelTable:
        return {key: (i.mean(), o.mean()) for key, (i, o) in self.layers.items()}

    def summary(self) -> dict[str, object]:
        """For the prior file's `icc_stats` metadata."""
        return {"source": self.source, "layers": len(self.layers), "alpha": ALPHA, "max_ratio": MAX_RATIO,
                "tokens_kept": self.TOKENS}


@dataclass(frozen=True)
class Factors:
    """W ≈ A·B with A (out × r) and B (r × in)."""

    a: Tensor
    b: Tensor


def factorize(weight: Tensor, rank: int, out_weights: Tensor | None = None,
              in_weights: Tensor | None = None) -> Factors:
    """The rank-`rank` A·B that minimises ‖diag(l)·(W − A·B)·diag(q)‖_F (l = out_weights, q = in_weights; plain SVD
    without them), computed in float32 on the weight's device from the weight as it is now (after any patches).

    The top singular subspace comes from an eigendecomposition of the smaller Gram matrix rather than a full SVD: the
    same minimiser, and one to two orders of magnitude faster on a GPU for the large rectangular MLP weights.
    """
    w = weight.detach().float()
    out_features, in_features = w.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}] for a {out_features}×{in_features} "
                         f"layer (got {rank})")
    l = torch.ones(out_features, device=w.device) if out_weights is None else out_weights.to(w.device).float() + EPS
    q = torch.ones(in_features, device=w.device) if in_weights is None else in_weights.to(w.device).float() + EPS
    scaled = l[:, None] * w * q[None, :]
    if in_features <= out_features:
        v = torch.linalg.eigh(scaled.T @ scaled).eigenvectors[:, -rank:]  # top right singular vectors
        a, b = scaled @ v, v.T
    else:
        u = torch.linalg.eigh(scaled @ scaled.T).eigenvectors[:, -rank:]  # top left singular vectors
        a, b = u, u.T @ scaled
    return Factors(a / l[:, None], b / q[None, :])


@dataclass(frozen=True)
class LayerFactors:
    """One Linear's factors, per output chunk, arranged for the increment: the B of every chunk stacked, so that the
    input is projected by one product; the A of each chunk maps its slice of the projection to its outputs."""

    b: Tensor  # (Σ ranks) × in
    a: tuple[Tensor, ...]  # per chunk: out_chunk × rank

    @classmethod
    def of(cls, parts: list[Factors], like: Tensor) -> "LayerFactors":
        return cls(torch.cat([f.b for f in parts]).to(like.device, like.dtype),
                   tuple(f.a.to(like.device, like.dtype) for f in parts))

    def project(self, x: Tensor) -> Tensor:
        """B·x per token row: what a full step keeps of the input, instead of the input itself."""
        return x.reshape(-1, self.b.shape[1]) @ self.b.T

    def project_flops(self, rows: int) -> float:
        return 2.0 * rows * self.b.numel()

    def increment_flops(self, rows: int) -> float:
        """The projection, its difference from the cached one, the A products and the output addition, per row."""
        out_features = sum(a.shape[0] for a in self.a)
        a_products = sum(2 * a.numel() for a in self.a)
        return self.project_flops(rows) + float(rows * (self.b.shape[0] + a_products + out_features))


def checksum(weight: Tensor) -> tuple[float, ...]:
    """Three full reductions of a weight: any patch (a LoRA, a merge, a new file) changes them."""
    w = weight.detach().float()
    probe = torch.cos(torch.arange(w.shape[1], device=w.device, dtype=torch.float32))
    ramp = torch.sin(torch.arange(w.shape[0], device=w.device, dtype=torch.float32) + 0.5)
    return tuple(torch.stack([w.sum(), w.square().sum(), (w @ probe) @ ramp]).double().tolist())


HeldFactors = tuple[tuple[np.ndarray, np.ndarray], ...]  # one Linear's (A, B) per output chunk, float32


def host_array(values: Tensor) -> np.ndarray:
    """A tensor's values as a host array of their own, viewing no tensor (float32)."""
    return values.detach().to("cpu", torch.float32).numpy().copy()


class FactorCache:
    """Low-rank factors per Linear, computed on first use from the weight as it is then, and kept across runs while
    the weight is unchanged (its checksum is compared at the start of every run): factorising once per model, not
    once per prompt, is what makes ICC affordable for large models.

    It outlives runs, so it holds host arrays, not tensors: factors and channel statistics. Each run moves the factors
    it uses to its device and drops them at its end, so nothing of ICC stays on the device between runs, where ComfyUI
    pages weights in and out and may unload the model."""

    def __init__(self, channels: ChannelTable | None = None) -> None:
        self.channels = None if channels is None else {
            key: (host_array(inputs), host_array(outputs)) for key, (inputs, outputs) in channels.items()}
        self._entries: dict[tuple, tuple[tuple, HeldFactors]] = {}
        self.factorized = 0  # layers factorised so far: tests and logs read it

    def factors(self, layer: IccLinear, like: Tensor, settings: IccSettings) -> LayerFactors:
        """The layer's factors on `like`'s device and in its dtype (an IccRun keeps them for its run)."""
        weight = layer.weight(like)
        key, identity = (layer.key, settings, like.dtype, like.device), (checksum(weight), tuple(weight.shape))
        known = self._entries.get(key)
        if known is None or known[0] != identity:
            parts = tuple((host_array(f.a), host_array(f.b)) for f in self._factorize(layer, weight, settings))
            known = self._entries[key] = (identity, parts)
            self.factorized += 1
        return LayerFactors.of([Factors(torch.from_numpy(a), torch.from_numpy(b)) for a, b in known[1]], like)

    def _factorize(self, layer: IccLinear, weight: Tensor, settings: IccSettings) -> list[Factors]:
        out_features, in_features = weight.shape
        chunks = layer.chunks or (out_features,)
        if sum(chunks) != out_features:
            raise ValueError(f"{layer.key}: output chunks {chunks} do not add up to the layer's {out_features} outputs")
        in_w = out_w = None
        if settings.aware:
            stats = (self.channels or {}).get(layer.key)
            if stats is None:
                raise ValueError(f"the channel statistics have no entry for Linear {layer.key}: it did not run "
                                 "during the calibration runs, or they were recorded on another model. Refit them "
                                 "for this model, or set ICC svd to plain.")
            in_w, out_w = (channel_weights(torch.from_numpy(side)) for side in stats)
            if in_w.numel() != in_features or out_w.numel() != out_features:
                raise ValueError(f"the channel statistics of Linear {layer.key} are for a {out_w.numel()}×"
                                 f"{in_w.numel()} layer, not {out_features}×{in_features}: the prior file belongs to "
                                 "another model. Refit it for this model, or set ICC svd to plain.")
        parts, start = [], 0
        for size in chunks:
            rows = slice(start, start + size)
            parts.append(factorize(weight[rows], min(settings.rank, size, in_features),
                                   None if out_w is None else out_w[rows], in_w))
            start += size
        return parts


@dataclass
class LinearCache:
    """One Linear at the last full step, for one branch: its input projected by B, and its output. The output is the
    layer's own tensor, not a copy (copying every Linear's output cost more than the increments saved on a GPU); a
    strided sample taken when the layer returned it checks, at the first increment of a run, that the model did not
    modify it in place since."""

    p: Tensor
    y: Tensor
    sample: Tensor

    @property
    def nbytes(self) -> int:
        return self.p.nbytes + self.y.nbytes + self.sample.nbytes


SAMPLE = 257  # elements of the cached output kept to detect in-place modification


def sampled(y: Tensor) -> Tensor:
    flat = y.reshape(-1)
    return flat[:: max(1, flat.numel() // SAMPLE)].clone()


def increment(x: Tensor, p_cache: Tensor, y_cache: Tensor, factors: LayerFactors) -> Tensor:
    """y_cache + A·(B·x − B·x_cache), per output chunk, written straight into the output's column slices."""
    low = torch.addmm(p_cache, x.reshape(-1, factors.b.shape[1]), factors.b.T, beta=-1)
    base = y_cache.reshape(low.shape[0], -1)
    if len(factors.a) == 1:
        out = torch.addmm(base, low, factors.a[0].T)
    else:
        out = torch.empty_like(base)
        rank = start = 0
        for a in factors.a:
            size, r = a.shape
            torch.addmm(base[:, start:start + size], low[:, rank:rank + r], a.T, out=out[:, start:start + size])
            start, rank = start + size, rank + r
    return out.view(*x.shape[:-1], out.shape[-1])


@dataclass
class Scope:
    """Where the Linears are now: the block running, its branches and chunk size, and whether it records or
    increments; `saved` collects the FLOPs per sample that increments saved against computing the Linears (negative
    on a full step: projecting the inputs for later increments costs). A full step's inputs wait in `pending` until
    the block has run, so that factorising and projecting stay outside anything measuring the block itself."""

    block: int
    branches: list[Hashable]
    chunk: int
    record: bool
    saved: float = 0.0
    seen: set[str] = field(default_factory=set)
    pending: list[tuple[IccLinear, Tensor, Tensor, Tensor, list[Tensor]]] = field(default_factory=list)


class IccRun:
    """ICC's state for one sampling run: each branch's cached Linear projections and outputs at the last full step."""

    def __init__(self, settings: IccSettings, factors: FactorCache, memory: CacheMemory | None = None) -> None:
        self.settings = settings
        self.memory = memory or CacheMemory()
        self.cache = factors
        self.entries: dict[tuple[Hashable, str], LinearCache] = {}
        self.factors: dict[str, LayerFactors] = {}  # checked against the weights once per run, then trusted
        self.checked: set[tuple[Hashable, str]] = set()
        self.exact: set[str] = set()  # layers ICC cannot serve in this run: computed exactly
        self.nbytes = 0
        self.scope: Scope | None = None

    @contextlib.contextmanager
    def running(self, block: int, branches: list[Hashable], chunk: int, record: bool,
                admit: Callable[[int], bool] | None = None) -> Iterator[Scope]:
        """Route the Linears of `block` while it runs: record them (a full step) or increment them (a skipped one).
        `admit(bytes)` says whether what a full step would store fits the memory limit; if not, nothing is stored."""
        outer, self.scope = self.scope, Scope(block, branches, chunk, record)
        try:
            yield self.scope
            scope = self.scope
        finally:
            self.scope = outer
        stored = []
        for layer, x, y, x_sample, y_samples in scope.pending:
            if not self._unchanged(layer.key, "input", x, x_sample):
                continue
            factors = self._factors(layer, x)
            scope.saved -= factors.project_flops(x.numel() // x.shape[-1]) / x.shape[0]
            stored.append((layer.key, factors.project(x), y, y_samples))
        size = sum(p.nbytes + y.nbytes + sum(s.nbytes for s in samples) for _, p, y, samples in stored)
        if stored and (admit is None or admit(size)):
            for key, p, y, samples in stored:
                self._store(scope, key, p, y, samples)

    def linear(self, layer: IccLinear, x: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        scope = self.scope
        if (scope is None or scope.block != layer.block or not token_wise(x) or layer.key in self.exact
                or x.shape[0] != scope.chunk * len(scope.branches)):
            return compute(x)
        if layer.key in scope.seen:  # called twice in one block: one cache per Linear cannot serve both calls
            self._give_up(layer.key, "is called more than once per block")
            return compute(x)
        scope.seen.add(layer.key)
        if scope.record:  # samples as the layer saw and returned them, to detect later in-place changes
            y = compute(x)
            kept = y.detach()
            scope.pending.append((layer, x.detach(), kept, sampled(x), [sampled(p) for p in kept.split(scope.chunk)]))
            return y
        cached = [self.entries.get((b, layer.key)) for b in scope.branches]
        if any(c is None or c.y.shape[:-1] != (scope.chunk, *x.shape[1:-1]) or c.y.dtype != x.dtype for c in cached):
            return compute(x)  # a Linear the last full step did not run like this (a new text length): exact
        if not all(self._unchanged(layer.key, b, c.y, c.sample) for b, c in zip(scope.branches, cached)):
            return compute(x)
        factors = self._factors(layer, x)
        rows = x.numel() // x.shape[-1]
        full = 2.0 * rows * x.shape[-1] * sum(a.shape[0] for a in factors.a)
        scope.saved += (full - factors.increment_flops(rows)) / x.shape[0]
        use = self.memory.use
        return increment(x, use(joined([c.p for c in cached]), x.device), use(joined([c.y for c in cached]), x.device),
                         factors)

    def _factors(self, layer: IccLinear, x: Tensor) -> LayerFactors:
        factors = self.factors.get(layer.key)
        if factors is None:
            factors = self.factors[layer.key] = self.cache.factors(layer, x, self.settings)
        return factors

    def _unchanged(self, key: str, side: Hashable, now: Tensor, sample: Tensor) -> bool:
        """Once per run, layer and side (its input, or a branch's output; it waits for the device): the tensor is as
        the layer saw or returned it (NaNs compare equal to themselves)."""
        if key in self.exact:
            return False
        if (side, key) in self.checked:
            return True
        self.checked.add((side, key))
        current = sampled(now)
        if bool(((current == sample) | (current.isnan() & sample.isnan())).all()):
            return True
        self._give_up(key, f"has its {'input' if side == 'input' else 'output'} modified in place by the model")
        return False

    def _give_up(self, key: str, why: str) -> None:
        self.exact.add(key)
        log.warning("calibrated_cache: Linear %s %s, so ICC cannot serve it; it is computed exactly in this run",
                    key, why)

    def _store(self, scope: Scope, key: str, p: Tensor, y: Tensor, samples: list[Tensor]) -> None:
        """With offload the outputs are copied away now, so they are checked for in-place changes now, not when used."""
        rows = p.shape[0] // len(scope.branches)
        if self.memory.moves(y):
            if not all(self._unchanged(key, b, ys, sample)
                       for b, ys, sample in zip(scope.branches, y.split(scope.chunk), samples)):
                return
            p, y = self.memory.keep(p), self.memory.keep(y)
        for b, ps, ys, sample in zip(scope.branches, p.split(rows), y.split(scope.chunk), samples):
            old = self.entries.get((b, key))
            self.nbytes -= 0 if old is None else old.nbytes
            entry = self.entries[(b, key)] = LinearCache(ps, ys, sample)
            self.nbytes += entry.nbytes

    def forget(self, branch: Hashable) -> None:
        """A branch whose input layout changed starts afresh."""
        for key in [k for k in self.entries if k[0] == branch]:
            self.nbytes -= self.entries.pop(key).nbytes

    def forget_block(self, block: int) -> int:
        """Release the caches of one block's Linears (it is computed every step from now on); returns their bytes."""
        prefix, released = f"{block}/", 0
        for key in [k for k in self.entries if k[1].startswith(prefix)]:
            released += self.entries.pop(key).nbytes
        self.nbytes -= released
        return released

    def clear(self) -> None:
        self.entries.clear()
        self.factors.clear()
        self.checked.clear()
        self.exact.clear()
        self.nbytes = 0
