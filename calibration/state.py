"""The state of one sampling run: its clock, its per-branch caches, the current round's decision, its statistics.

A *round* is one evaluation of the guided model at one σ: every conditioning branch (cond, uncond, …) is evaluated
once, batched in one model call or spread over several. Rounds are detected from the calls themselves (a new σ, or a
branch seen again), so Heun's two evaluations at one σ are two rounds. Each branch keeps its own caches; a branch
whose input changes shape, dtype or device starts afresh.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .batching import adjacent, joined
from .calibrator import Calibrator, Reused, Site
from .chain import chained
from .clock import StepClock
from .forecast import Forecaster
from .goc import GocCorrector
from .icc import FactorCache, IccRun, Scope
from .memory import CacheMemory
from .policy import CachePolicy, PolicyError
from .registry import make_forecaster
from .schedule import StepPlan
from .sites import gated_block, residual_block
from .stats import RunStats

SiteKey = tuple[int, str]
log = logging.getLogger("calibrated_cache")


@dataclass
class Round:
    index: int
    sigma: float
    step: int
    time: float
    skip: bool | None
    seen: set[Hashable] = field(default_factory=set)


@dataclass
class BranchCache:
    signature: tuple
    sites: dict[SiteKey, Forecaster] = field(default_factory=dict)
    ready: set[int] = field(default_factory=set)
    anchors: dict[int, tuple[float, int]] = field(default_factory=dict)  # block -> (σ, step) of its newest store
    probe_ref: Tensor | None = None


class RunState:
    """Created at the start of a sampling run and dropped at its end; nothing in it outlives the run."""

    def __init__(
        self, policy: CachePolicy, sigmas: Sequence[float], blocks: int, calibrator: Calibrator | None = None,
        factors: FactorCache | None = None, memory: CacheMemory | None = None,
    ) -> None:
        """`factors`: ICC's factor cache (it outlives runs; its channel statistics come from a prior file). `memory`:
        where the caches live and their cap."""
        if blocks < 1:
            raise PolicyError(f"the model has {blocks} blocks: there is nothing to cache")
        self.icc: IccRun | None = None
        self.memory = memory or CacheMemory()
        if policy.icc is not None:
            factors = factors or FactorCache()
            if policy.icc.aware and factors.channels is None:
                raise PolicyError("channel-aware ICC needs the channel statistics a prior file records: choose a "
                                  "prior file fitted on this model with Fit TCC Priors, or set ICC svd to plain")
            self.icc = IccRun(policy.icc, factors, self.memory)
        self.policy = policy
        self.blocks = blocks
        # A policy with GOC attached corrects first; a given calibrator (TCC priors or their fit) sees GOC's output.
        self.calibrator = chained(None if policy.goc is None else GocCorrector(policy.goc), calibrator)
        if self.calibrator is not None:
            self.calibrator.start()
        self.clock = StepClock(sigmas)
        self.plan = StepPlan(policy, self.clock.steps)
        self.always = set(range(policy.probe_blocks)) | set(range(blocks - policy.last_blocks, blocks))
        self.stats = RunStats(cache_offloaded=self.memory.offload, cache_limit_bytes=self.memory.limit)
        self.history = max(make_forecaster(policy).history, self.calibrator.anchors if self.calibrator else 0)
        self.reserved: dict[tuple[int, str], int] = {}  # bytes each cached site may reach, under a limit
        self.branches: dict[Hashable, BranchCache] = {}
        self.round: Round | None = None
        self._skips_in_row = 0
        self.site_costs: dict[tuple[int, int], dict[str, float]] = {}  # (block, tokens) -> FLOPs per site
        self.uncacheable: set[int] = set()
        self.layouts: dict[int, tuple[tuple[str, bool], ...]] = {}  # block outputs: (stream, has a residual)

    def call(
        self, sigma: float, branches: Sequence[Hashable], x: Tensor, roles: Sequence[str] | None = None
    ) -> "ModelCall":
        """Open one model call whose batch holds `branches` in order, in equal chunks of x's first dimension.

        `roles` name what each branch is ("cond", "uncond") for calibrators, whose priors outlive the run's branch
        identities; by default a branch is its own role.
        """
        if not branches or x.shape[0] % len(branches):
            raise ValueError(f"a batch of {x.shape[0]} cannot hold {len(branches)} equal branch chunks")
        sigma = float(sigma)
        r = self.round
        if r is None or sigma != r.sigma or any(b in r.seen for b in branches):
            r = self.round = self._new_round(sigma)
        r.seen.update(branches)
        chunk = x.shape[0] // len(branches)
        signature = (chunk, *x.shape[1:], x.dtype, x.device)
        for b in branches:
            cache = self.branches.get(b)
            if cache is None or cache.signature != signature:
                if cache is not None:
                    self.stats.add_cache_bytes(-sum(f.nbytes for f in cache.sites.values()))
                    if self.icc is not None:
                        held = self.icc.nbytes
                        self.icc.forget(b)
                        self.stats.add_cache_bytes(self.icc.nbytes - held)
                self.branches[b] = BranchCache(signature)
        self.stats.model_calls += 1
        roles = [str(b) for b in branches] if roles is None else [str(x) for x in roles]
        if len(roles) != len(branches):
            raise ValueError(f"{len(branches)} branches need {len(branches)} roles (got {len(roles)})")
        return ModelCall(self, r, list(branches), chunk, roles, x.device)

    def _new_round(self, sigma: float) -> Round:
        step = self.clock.step(sigma)
        time = self.clock.position(sigma) if self.policy.time_unit == "step" else sigma
        if self.policy.mode == "fixed":
            skip: bool | None = not self.plan.full[step]
        else:
            skip = None if self.plan.cacheable[step] else False
        if skip is False:
            self._skips_in_row = 0
        self.stats.rounds += 1
        self.stats.steps.add(step)
        return Round(self.stats.rounds - 1, sigma, step, time, skip)

    def decide(self, residual: Tensor, branch: Hashable) -> bool:
        """Dynamic policy: skip the round if the probe residual moved little since the last computed round."""
        ref = self.branches[branch].probe_ref
        skip = False
        if ref is not None and self._skips_in_row < self.policy.max_skips:
            change = (residual - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12)
            skip = bool(change < self.policy.threshold)
        self._skips_in_row = self._skips_in_row + 1 if skip else 0
        return skip

    def admit(self, block: int, name: str, nbytes: int) -> bool:
        """Whether a site of `block` may be cached: under a limit, its full size is reserved at its first store, and a
        block whose site would pass the limit is computed every step from then on (its caches are released)."""
        limit = self.memory.limit
        if limit is None or (block, name) in self.reserved:
            return True
        if sum(self.reserved.values()) + nbytes <= limit:
            self.reserved[(block, name)] = nbytes
            return True
        if not self.stats.blocks_over_limit:
            log.warning("calibrated_cache: the cache limit of %.1f MiB is reached at block %d; blocks that do not "
                        "fit are computed every step (raise the limit or enable offload for more speed)",
                        limit / 2**20, block)
        self.stats.blocks_over_limit += 1
        self.always.add(block)
        for key in [k for k in self.reserved if k[0] == block]:
            del self.reserved[key]
        for cache in self.branches.values():
            for key in [k for k in cache.sites if k[0] == block]:
                self.stats.add_cache_bytes(-cache.sites.pop(key).nbytes)
            cache.ready.discard(block)
        if self.icc is not None:
            self.stats.add_cache_bytes(-self.icc.forget_block(block))
        return False

    def finish(self) -> RunStats:
        """Release every cache; the statistics stay."""
        self.branches.clear()
        if self.icc is not None:
            self.icc.clear()
        self.stats.add_cache_bytes(-self.stats.cache_bytes)
        self.round = None
        return self.stats


class ModelCall:
    """One model call inside a round: decides per block, stores and forecasts site values per branch chunk.

    It is also a block runner for adaLN blocks that expose `sites(c)` (see `sites.py`): `call(i, block, h, c)`.
    """

    def __init__(self, state: RunState, round_: Round, branches: list[Hashable], chunk: int, roles: list[str],
                 device: torch.device) -> None:
        self.state = state
        self.device = device
        self.round = round_
        self.branches = branches
        self.roles = roles
        self.chunk = chunk
        self._stores = state.plan.may_skip_after(round_.step)
        self._probe_inputs: Mapping[str, Tensor] | None = None
        self._observed: set[int] = set()  # reference runs: blocks computed where the policy reuses
        self._icc_only = state.icc is not None and state.calibrator is None

    def computes(self, block: int) -> bool:
        reuses = not (block in self.state.always or not self.round.skip or block in self.state.uncacheable) and all(
            block in self.state.branches[b].ready for b in self.branches)
        calibrator = self.state.calibrator
        if calibrator is not None and calibrator.reference:
            if reuses:
                self._observed.add(block)
            return True
        return not reuses

    def sites(self, block: int, name: str) -> list[Site]:
        r, caches = self.round, self.state.branches
        return [Site(role, r.index, r.sigma, sigma, r.step - step, block, name, r.step)
                for role, b in zip(self.roles, self.branches) for sigma, step in [caches[b].anchors[block]]]

    def fits(self, block: int, name: str, like: Tensor) -> bool:
        """Whether every branch's cached value of a site has the shape of `like`'s chunks (a text stream can change
        length mid-run when ComfyUI batches conds differently); a site that does not fit is computed. ICC's Linears
        check their own caches."""
        if self._icc_only:
            return True
        shape = (self.chunk, *like.shape[1:])
        return all(self.state.branches[b].sites[(block, name)].values[-1].shape == shape for b in self.branches)

    def stores(self, block: int) -> bool:
        """Whether values computed now can serve a later skip (nothing is kept when none can), or are observed."""
        return (self._stores and block not in self.state.always) or block in self._observed

    def remember(self, block: int, name: str, value: Tensor) -> None:
        """Store a computed value; in a reference run, a value the policy would have reused is observed instead, so
        the caches hold exactly what the cached run's would."""
        if block in self._observed:
            for site, part in zip(self.sites(block, name), value.split(self.chunk)):
                self.state.calibrator.observe(site, part)
            return
        if not self.stores(block):
            return
        state, t = self.state, self.round.time
        if self._icc_only:  # ICC keeps its own caches: a stored residual would never be read
            for b in self.branches:
                state.branches[b].ready.add(block)
                state.branches[b].anchors[block] = (self.round.sigma, self.round.step)
            return
        if not state.admit(block, name, state.history * value.nbytes):
            return
        for b, part in zip(self.branches, state.memory.keep(value.detach()).split(self.chunk)):
            cache = state.branches[b]
            forecaster = cache.sites.get((block, name))
            if forecaster is None or forecaster.values[-1].shape != part.shape:
                if forecaster is not None:
                    state.stats.add_cache_bytes(-forecaster.nbytes)
                forecaster = cache.sites[(block, name)] = make_forecaster(state.policy)
                forecaster.history = state.history
            before = forecaster.nbytes
            forecaster.update(t, part)
            state.stats.add_cache_bytes(forecaster.nbytes - before)
            cache.ready.add(block)
            cache.anchors[block] = (self.round.sigma, self.round.step)

    @contextlib.contextmanager
    def linears(self, block: int, computed: bool, site: str = "block") -> Iterator[Scope | None]:
        """With ICC, while a site or block runs: its Linears record their inputs and outputs (computed, for later
        skips) or return increments from them (skipped). The scope's `saved` is what the increments saved."""
        icc = self.state.icc
        if icc is None or block in self.state.uncacheable or (computed and not self.stores(block)):
            yield None
            return
        held = icc.nbytes
        admit = (lambda size: self.state.admit(block, f"icc/{site}", size)) if computed else None
        with icc.running(block, self.branches, self.chunk, record=computed, admit=admit) as scope:
            yield scope
        self.state.stats.add_cache_bytes(icc.nbytes - held)

    def recall(self, block: int, name: str, truth: Callable[[], Tensor] | None = None,
               value: Tensor | None = None) -> tuple[Tensor, float]:
        """The value used in place of a site's computation for this call's batch (the forecast, or ICC's `value`,
        corrected by the run's calibrator if any), and the FLOPs spent on it per sample beyond producing `value`.
        `truth` computes the site (for fitting)."""
        value, flops = self._forecast(block, name) if value is None else (value, 0.0)
        calibrator = self.state.calibrator
        if calibrator is not None:
            reused = Reused(value, lambda: self._anchors(block, name), truth if calibrator.needs_truth else None)
            sites, held = self.sites(block, name), calibrator.nbytes
            calibrated = calibrator.calibrate(sites, reused)
            if calibrated is not value:  # a site without a prior comes back unchanged and costs nothing
                flops += calibrator.flops * value[: self.chunk].numel() / max(self.chunk, 1)
            calibrator.settle(sites, calibrated)
            self.state.stats.add_cache_bytes(calibrator.nbytes - held)
            value = calibrated
        return value, flops

    def _anchors(self, block: int, name: str) -> tuple[Tensor, Tensor, list[float]] | None:
        """The newest and previous anchors of a site for the batch (without copies when the branches were stored
        from one batched call), and each branch's staleness ratio (t − t_newest) / (t_newest − t_previous)."""
        t = self.round.time
        forecasters = [self.state.branches[b].sites[(block, name)] for b in self.branches]
        if any(len(f.times) < 2 for f in forecasters):
            return None
        scales = [(t - f.times[-1]) / (f.times[-1] - f.times[-2]) for f in forecasters]
        use, device = self.state.memory.use, self.device
        newest, previous = (use(joined([f.values[j] for f in forecasters]), device) for j in (-1, -2))
        return newest, previous, scales

    def _forecast(self, block: int, name: str) -> tuple[Tensor, float]:
        """The forecast of a site for this call's batch, and the FLOPs the forecast spent per sample.

        When the branches were stored from one batched call and are recalled in the same order, their anchors are
        adjacent slices of the same tensors: the forecast then runs once on the whole batch, with no concatenation.
        """
        t = self.round.time
        forecasters = [self.state.branches[b].sites[(block, name)] for b in self.branches]
        first = forecasters[0]
        flops = first.predict_flops(t) / max(self.chunk, 1)
        if len(forecasters) == 1:
            return first.predict(t, self._on_device(first.values)), flops
        if all(f.times == first.times for f in forecasters):
            whole = [adjacent([f.values[j] for f in forecasters]) for j in range(len(first.values))]
            if all(v is not None for v in whole):
                return first.predict(t, self._on_device(whole)), flops
        return torch.cat([f.predict(t, self._on_device(f.values)) for f in forecasters]), flops

    def _on_device(self, values: list[Tensor]) -> list[Tensor]:
        """Anchors where the model computes (they are elsewhere only when offloaded)."""
        memory = self.state.memory
        return [memory.use(v, self.device) for v in values] if memory.offload else values

    def account(self, block: int, computed: bool, full_flops: float, spent_flops: float, sites: int) -> None:
        stats, n = self.state.stats, self.chunk * len(self.branches)
        stats.flops_full += full_flops * n
        stats.flops_computed += spent_flops * n
        if computed:
            stats.blocks_computed += len(self.branches)
            stats.sites_computed += sites * len(self.branches)
        else:
            stats.blocks_skipped += len(self.branches)
            stats.sites_skipped += sites * len(self.branches)

    def enter(self, block: int, inputs: Mapping[str, Tensor]) -> None:
        if block == 0 and self.state.policy.mode == "dynamic":
            self._probe_inputs = {k: v.clone() for k, v in inputs.items()}

    def leave(self, block: int, outputs: Mapping[str, Tensor]) -> None:
        """After the last probe block: the dynamic policy decides the round and refreshes references."""
        state = self.state
        if self._probe_inputs is None or block != state.policy.probe_blocks - 1:
            return
        probe, self._probe_inputs = self._probe_inputs, None
        # Streams change shape across segments (Flux single blocks take cat(txt, img)); only like-for-like counts.
        keys = [k for k, v in outputs.items() if v is not None and k in probe and v.shape == probe[k].shape]
        if not keys:
            return
        residual = torch.cat([(outputs[k] - probe[k]).flatten(1) for k in keys], dim=1)
        parts = residual.split(self.chunk)
        if self.round.skip is None:
            self.round.skip = state.decide(parts[0], self.branches[0])
        if not self.round.skip:
            for b, part in zip(self.branches, parts):
                state.branches[b].probe_ref = part

    @torch.compiler.disable  # a compiled testbed DiT: the engine stays out of its graphs (compile blocks instead)
    def __call__(self, index: int, block, h: Tensor, c: Tensor) -> Tensor:
        flops = self.site_flops(index, block, h.shape[1])
        if self.state.policy.granularity == "module":
            return gated_block(self, index, block.sites(c), h, flops)
        return residual_block(self, index, {"x": h}, lambda: {"x": block(h, c)}, sum(flops.values()) or 1.0)["x"]

    def site_flops(self, index: int, block, tokens: int) -> dict[str, float]:
        """Per-sample FLOPs by site when the block reports them (`site_flops(tokens)`), else equal weights."""
        key = (index, tokens)
        known = self.state.site_costs.get(key)
        if known is None:
            report = getattr(block, "site_flops", None)
            known = self.state.site_costs[key] = report(tokens) if report is not None else {}
        return known
