"""The state of one sampling run: its clock, its caches, the current round's decision, its statistics.

A *round* is one evaluation of the guided model at one σ: every conditioning branch (cond, uncond, …) is evaluated
once, batched in one model call or spread over several. Rounds are detected from the calls themselves (a new σ, or a
branch seen again), so Heun's two evaluations at one σ are two rounds. Caches are kept per *group*: the branches of a
model call, in order. ComfyUI batches cond and uncond the same way through a run, so a group's values are stored as the
call's own tensors and forecast in one operation; every forecaster works per row, so a group forecasts each branch
exactly as it would alone. A group whose input changes shape, dtype or device starts afresh, and so do the groups a
branch leaves and joins when ComfyUI switches between batched and split calls (it decides by the memory it finds
free): their values predate the branch's newest computation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Hashable, Sequence

from torch import Tensor

from .calibrator import Calibrator
from .call import ModelCall
from .chain import chained
from .clock import StepClock
from .consensus import Consensus
from .forecast import Forecaster, WeightedForecaster
from .goc import GocCorrector
from .icc import FactorCache, IccRun
from .memory import CacheMemory
from .policy import CachePolicy, PolicyError
from .registry import history, make_forecaster
from .rounds import Round, RoundDecider
from .schedule import StepPlan
from .spans import Span
from .stats import RunStats
from .step_costs import RoundTimer

SiteKey = tuple[int, str]
Group = tuple[Hashable, ...]
log = logging.getLogger("calibrated_cache")


@dataclass
class GroupCache:
    signature: tuple
    sites: dict[SiteKey, Forecaster] = field(default_factory=dict)
    ready: set[int] = field(default_factory=set)  # blocks whose sites hold values a skip can use
    anchors: dict[int, tuple[float, int]] = field(default_factory=dict)  # block -> (σ, step) of its newest store
    spans_by_first: dict[int, Span] = field(default_factory=dict)  # first block -> the span of blocks cached as one

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.sites.values())


class RunState:
    """Created at the start of a sampling run and dropped at its end; nothing in it outlives the run."""

    def __init__(
        self, policy: CachePolicy, sigmas: Sequence[float], blocks: int, calibrator: Calibrator | None = None,
        factors: FactorCache | None = None, memory: CacheMemory | None = None, timer: RoundTimer | None = None,
        consensus: Consensus | None = None,
    ) -> None:
        """`factors`: ICC's factor cache (it outlives runs; its channel statistics come from a prior file). `memory`:
        where the caches live and their cap. `timer`: times each round for a fit's cost model (runs without a
        calibrator only: a calibrator's own work is not the plan's). `consensus`: the ranks this model runs on
        together (multi-GPU sequence or CFG parallelism), which every data-dependent decision is agreed with."""
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
        self.timer = timer if calibrator is None else None
        # A policy with GOC attached corrects first; a given calibrator (TCC priors or their fit) sees GOC's output.
        self.consensus = consensus or Consensus()
        goc = None if policy.goc is None else GocCorrector(policy.goc, self.consensus)
        self.calibrator = chained(goc, calibrator)
        if self.calibrator is not None:
            self.calibrator.start()
        self.clock = StepClock(sigmas)
        self.plan = StepPlan(policy, self.clock.steps, self.clock.sigmas)
        if policy.plan is not None and policy.plan.blocks != blocks:
            raise PolicyError(f"the policy's plan was searched for a model with {policy.plan.blocks} blocks; this "
                              f"model has {blocks}: fit a plan for this model (Fit TCC Priors with a target speedup)")
        self.time_range = (0.0, float(self.clock.steps)) if policy.time_unit == "step" else (
            float(self.clock.sigmas[-1]), float(self.clock.sigmas[0]))
        self.decider = RoundDecider(policy, self.clock, self.plan, blocks, self.consensus, self.memory.limit is not None,
                                    self.release)
        self.always, self.uncacheable = self.decider.always, self.decider.uncacheable
        self.stats = RunStats(cache_offloaded=self.memory.offload, cache_limit_bytes=self.memory.limit)
        self.history = max(history(policy), self.calibrator.anchors if self.calibrator else 0)
        self.reserved: dict[tuple[int, str], int] = {}  # bytes each cached site may reach, under a limit
        self.groups: dict[Group, GroupCache] = {}
        self.homes: dict[Hashable, Group] = {}  # each branch's group at its newest call
        self.round: Round | None = None
        self.site_costs: dict[tuple[int, int], dict[str, float]] = {}  # (block, tokens) -> FLOPs per site
        self.layouts: dict[int, tuple[tuple[str, bool], ...]] = {}  # block outputs: (stream, has a residual)
        # Blocks are cached in spans when nothing needs a block's own value: see spans.py.
        self.caches_spans = policy.granularity == "block" and self.calibrator is None and self.icc is None and \
            isinstance(make_forecaster(policy), WeightedForecaster)
        # blocks before which the model changes a stream in place, or (plan mode) whose computed steps differ from the
        # previous block's: a span's blocks are skipped together
        self.span_breaks: set[int] = set()
        if self.plan.blocks is not None:
            self.span_breaks = {b for b in range(1, blocks) if any(step[b] != step[b - 1] for step in self.plan.blocks)}

    def call(self, sigma: float, branches: Sequence[Hashable], x: Tensor, roles: Sequence[str] | None = None
             ) -> ModelCall:
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
        group = tuple(branches)
        chunk = x.shape[0] // len(branches)
        signature = (chunk, *x.shape[1:], x.dtype, x.device)
        roles = [str(b) for b in branches] if roles is None else [str(x) for x in roles]
        if len(roles) != len(branches):
            raise ValueError(f"{len(branches)} branches need {len(branches)} roles (got {len(roles)})")
        self._regroup(group, roles)
        cache = self.groups.get(group)
        if cache is None or cache.signature != signature:
            if cache is not None:
                self._drop_group(group, forget_icc=True)
            cache = self.groups[group] = GroupCache(signature)
        self.stats.model_calls += 1
        self.stats.evaluations += x.shape[0]
        decision = self.decider.call(r, group, cache.ready)
        return ModelCall(self, r, list(branches), cache, chunk, roles, x.device, decision)

    def _regroup(self, group: Group, roles: Sequence[str]) -> None:
        """ComfyUI batches cond and uncond by the memory it finds free, so a run may switch between batched and split
        calls at any step. A group's values are only as new as the last call of that group: once one of its branches
        is computed in another group they are stale, so the groups a branch leaves and the group it joins start
        afresh (computed until they have anchors again)."""
        left = {self.homes[b] for b in group if self.homes.get(b, group) != group}
        for b in group:
            self.homes[b] = group
        if not left:
            return
        if not self.stats.regroupings:
            log.warning("calibrated_cache: ComfyUI changed how it batches the conditionings mid-run (free memory "
                        "decides it); caches of the regrouped branches restart, so this run computes more than "
                        "planned. Freeing memory or a smaller batch keeps the batching steady.")
        self.stats.regroupings += 1
        for stale in left | {group}:
            if stale in self.groups:
                self._drop_group(stale, forget_icc=False)
        if not self.groups:  # sites are reserved at their group's size: the next group reserves its own
            self.reserved.clear()
        if self.calibrator is not None:
            held = self.calibrator.nbytes
            self.calibrator.forget(tuple(roles))
            self.stats.add_cache_bytes(self.calibrator.nbytes - held)

    def _drop_group(self, group: Group, forget_icc: bool) -> None:
        """Release a group's cache; ICC's per-branch values too when the input layout changed (`forget_icc`), not
        when the branches only moved to another call (ICC keeps them per branch, fresh from wherever computed)."""
        cache = self.groups.pop(group)
        self.stats.add_cache_bytes(-cache.nbytes)
        if forget_icc and self.icc is not None:
            held = self.icc.nbytes
            for b in group:
                self.icc.forget(b)
            self.stats.add_cache_bytes(self.icc.nbytes - held)

    def end_spans(self) -> None:
        """Cache block by block from here on: the host said it changes streams between blocks in place (a
        ControlNet's residuals), which a span's summed residual would take in. The spans' values are dropped."""
        if not self.caches_spans:
            return
        self.caches_spans = False
        for cache in self.groups.values():
            for span in cache.spans_by_first.values():
                self.drop_span(cache, span)
            cache.spans_by_first.clear()

    def drop_span(self, cache: GroupCache, span: Span) -> None:
        """Release a span's cached values and reservations; its blocks are no longer ready to skip."""
        for k in span.streams:
            key = (span.first, span.site(k))
            self.reserved.pop(key, None)
            forecaster = cache.sites.pop(key, None)
            if forecaster is not None:
                self.stats.add_cache_bytes(-forecaster.nbytes)
        cache.ready.difference_update(range(span.first, span.last + 1))

    def _new_round(self, sigma: float) -> Round:
        if self.timer is not None:
            self.timer.mark(self.stats, step_run=self.policy.granularity == "step")
        r = self.decider.open(sigma)
        self.stats.rounds += 1
        self.stats.steps.add(r.step)
        return r

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
        self.decider.refuse(block)
        self.release(block)
        return False

    def release(self, block: int) -> None:
        """Drop a block's caches: it is computed every step from now on (over the memory cap on some rank)."""
        for key in [k for k in self.reserved if k[0] == block]:
            del self.reserved[key]
        for cache in self.groups.values():
            for key in [k for k in cache.sites if k[0] == block]:
                self.stats.add_cache_bytes(-cache.sites.pop(key).nbytes)
            cache.ready.discard(block)
        if self.icc is not None:
            self.stats.add_cache_bytes(-self.icc.forget_block(block))

    def finish(self) -> RunStats:
        """Release every cache; the statistics stay."""
        if self.timer is not None:
            self.timer.mark(self.stats, last=True)
        self.groups.clear()
        self.homes.clear()
        self.decider.probe_refs.clear()
        if self.icc is not None:
            self.icc.clear()
        self.stats.add_cache_bytes(-self.stats.cache_bytes)
        self.round = None
        return self.stats
