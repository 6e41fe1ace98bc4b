"""The hooks one Apply Calibrated Cache node registers on its model clone, and the state they share.

A `CacheSession` is created at node time and holds only configuration until a sampler runs. Its OUTER_SAMPLE wrapper
creates the run's `RunState` and drops it in `finally`, so every queue item, every sampler and every re-queue of a
cached graph starts clean. PREDICT_NOISE and CALC_COND_BATCH mark the primary batch of each model evaluation, so
auxiliary passes (Skip Layer Guidance) run uncached. APPLY_MODEL (called by every family) opens the engine's
`ModelCall` with σ and the cond uuids of the batch, each named by its role ("cond", "uncond"), since priors outlive
the uuids; the block hooks read it. Block hooks are plain closures, because ComfyUI deep-copies `model_options` on every
clone and must not copy the session with them.

A session may carry a calibrator: TCC priors from a file (checked against each run's schedule before it samples), or
the fit that Fit TCC Priors sets for each of its runs. It holds no tensors between runs (newer ComfyUI pages weights in
and out and moves what patches hold): priors and ICC's factors are kept as host arrays, and each run builds its
corrector and caches on the compute device and drops them at its end.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable

import comfy.patcher_extension
import torch

from ..calibration import CacheMemory, CachePolicy, ModelCall, PolicyError, RunState, RunStats
from ..calibration.calibrator import Calibrator
from ..calibration.consensus import Consensus, RankDivergence
from ..calibration.icc import ICC_ANY_SIZE, FactorCache, LinearTarget, icc_too_small
from ..calibration.step_costs import RoundTimer
from .device_timing import timing_note
from ..priors import PriorMismatch, check_schedule, run_warnings
from .compiled import BlockRunner, block_compiler
from .families import BlockSite, Family, UnsupportedModel
from .flops import FlopCounter
from .fitted import HeldPriors
from .schedules import sampler_name, scheduler_name

log = logging.getLogger("calibrated_cache")
KEY = "calibrated_cache"
STREAMS = ("img", "txt")
HAS_PREDICT_NOISE = hasattr(comfy.patcher_extension.WrappersMP, "PREDICT_NOISE")
ROLES = {0: "cond", 1: "uncond"}  # ComfyUI's cond_or_uncond entries


def _has_control(guider) -> bool:
    """Whether a ControlNet is attached to the conditioning: it adds to the hidden state in place between blocks,
    so blocks are cached one by one (a span's summed residual would take the addition in)."""
    conds = getattr(guider, "conds", None) or {}
    return any(isinstance(c, dict) and c.get("control") is not None for entries in conds.values() for c in entries)


class CacheSession:
    def __init__(self, policy: CachePolicy, family: Family, blocks: list[BlockSite], node_id: str | None = None,
                 priors: HeldPriors | None = None, factors: FactorCache | None = None,
                 memory: CacheMemory | None = None):
        self.policy = policy
        self.memory = memory
        self.factors = factors  # ICC's factors: they outlive runs while the weights are unchanged
        self.priors = priors
        self.calibrator: Calibrator | None = None  # Fit TCC Priors sets it per run; runs with priors build their own
        self.timer: RoundTimer | None = None  # a fit for a target speedup times the rounds of its runs
        self.device: torch.device | None = None  # where the run with priors samples (their timing's device)
        self.family = family
        self.blocks = blocks
        self.node_id = node_id
        self.run: RunState | None = None
        self.call: ModelCall | None = None
        self.primary = True
        self._evaluation_open = False
        self._block_flops: dict[tuple, float] = {}
        self._model_flops: dict[tuple, float] = {}  # per sample, by input shape: the whole diffusion model
        self._inside: float | None = None  # while the model's cost is measured: FLOPs counted inside its blocks
        self.hooked = 0
        self.last_report: dict[str, Any] | None = None
        self.last_stats: RunStats | None = None  # the last cached run's (a plan search reads its costs)
        self.prior_check: str | None = None  # what Apply Calibrated Cache verified of the priors against the model
        self.prior_notes: list[str] = []  # how this run differs from the fit's settings
        self.notes: list[str] = []  # what Apply Calibrated Cache set aside (a connected policy a plan replaced)
        self.compiled: BlockRunner | None = None  # runs a computed block compiled, under TorchCompileModel
        self.plain: set[int] = set()  # this run's blocks that gave no stream to cache, so ran plainly
        self.ranks: Callable[[], Consensus] = Consensus  # the ranks a run agrees with (Raylight: its process group)
        self.decisions: list[tuple] | None = None  # when a list, runs append their decisions (to compare ranks)
        self.prior_digest: str | None = None  # the applied prior file's hash, TCC priors or ICC statistics alike

    def outer_sample(self, executor, *args, **kwargs):
        guider, sigmas = executor.class_obj, args[3]
        if self.run is not None:  # a sampler nested inside this run's model calls: run it uncached
            outer, self.run = self.run, None
            try:
                return executor(*args, **kwargs)
            finally:
                self.run = outer
        if guider.model_options.get("context_handler") is not None:
            return self._uncached("context windows are active", lambda: executor(*args, **kwargs))
        schedule = sigmas.flatten().tolist()
        calibrator = self.calibrator if self.priors is None else self.priors.calibrator()  # this run's own
        try:
            run = RunState(self.policy, schedule, len(self.blocks), calibrator, self.factors, self.memory, self.timer,
                           self.ranks())
        except PolicyError as err:  # settings this model cannot take (a plan for another block count): the fix
            raise ValueError(f"calibrated_cache: {err}") from None
        except ValueError as err:  # FlipSigmas (ascending) or SplitSigmas leaving one sigma: nothing to fix
            reason = f"this sampler's schedule cannot be cached ({err})"
            return self._uncached(reason, lambda: executor(*args, **kwargs))
        run.decider.log = self.decisions
        if self.prior_digest is not None:  # every GPU of the model must read the same file (one collective per run)
            try:
                run.consensus.same("prior files", self.prior_digest)
            except RankDivergence as err:
                raise ValueError(str(err)) from None
        if run.caches_spans and (not self.family.chained or _has_control(guider)):
            run.end_spans()
        self.prior_notes = []
        if self.priors is not None:
            cfg = getattr(guider, "cfg", None)  # CFGGuider's; other guiders have none to compare
            self._check_priors(guider, schedule, cfg if isinstance(cfg, (int, float)) else None, args[2])
        self.run, self.hooked, self.compiled, self.plain = run, 0, block_compiler(guider.model_options), set()
        start = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            stats = self.run.finish()
            self.run = self.call = self.compiled = None
            self._report(stats, time.perf_counter() - start)

    def _uncached(self, reason: str, sample: Callable[[], Any]) -> Any:
        """Sample without the cache, and say so as a warning in the log and in the run report (the node's panel): a
        user who sees no speedup must not have to find the console line."""
        log.warning("calibrated_cache: %s; this run is not cached", reason)
        start = time.perf_counter()
        try:
            return sample()
        finally:
            self.last_report = {**self._report_head(), "prior_notes": [], "uncached": reason,
                                "wall_s": time.perf_counter() - start}
            send_event("calibrated_cache.stats", self.last_report)

    def _check_priors(self, guider, schedule: list[float], cfg: float | None, sampler) -> None:
        """Refuse a run the priors cannot serve before it samples; say so (in the log and the run report) when they
        only transfer approximately: another schedule, cfg, sampler or scheduler than the fit's."""
        meta, name = self.priors.meta, self.priors.name
        try:
            note = check_schedule(meta, self.policy, schedule, name)
        except PriorMismatch as err:
            raise ValueError(str(err)) from None
        used = sampler_name(sampler)
        scheduler = scheduler_name(guider.model_patcher.get_model_object("model_sampling"), schedule, used)
        self.device = guider.model_patcher.load_device
        timed = timing_note(meta, self.device)
        self.prior_notes = ([note] if note else []) + run_warnings(meta, cfg=cfg, sampler=used,
                                                                   scheduler=scheduler) + ([timed] if timed else [])
        for warning in self.prior_notes:
            log.warning("calibrated_cache: %s", warning)

    def linear_target(self) -> LinearTarget | None:
        """Where the block Linears go: the run's ICC state while a run is cached, else straight through."""
        run = self.run
        return None if run is None else run.icc

    def predict_noise(self, executor, *args, **kwargs):
        self._evaluation_open = True
        try:
            return executor(*args, **kwargs)
        finally:
            self._evaluation_open = False

    def calc_cond_batch(self, executor, *args, **kwargs):
        """The first batch of an evaluation is primary; later ones (SLG and similar) must not touch the caches."""
        previous, self.primary = self.primary, self._evaluation_open or not HAS_PREDICT_NOISE
        self._evaluation_open = False
        try:
            return executor(*args, **kwargs)
        finally:
            self.primary = previous

    def apply_model(self, executor, *args, **kwargs):
        x, sigma = args[0], args[1]
        options = kwargs.get("transformer_options") or (args[5] if len(args) > 5 else {})
        previous = self.call
        self.call = None
        if self.run is None or not self.primary:
            try:
                return executor(*args, **kwargs)
            finally:
                self.call = previous
        # uuids are stable per cond entry; older ComfyUI lacks them, so chunk position keeps entries apart
        kinds = options.get("cond_or_uncond") or [0]
        branches = list(options.get("uuids") or enumerate(kinds))
        roles = [ROLES.get(k, str(k)) for k in kinds] if len(kinds) == len(branches) else [str(b) for b in branches]
        control = kwargs.get("control", args[4] if len(args) > 4 else None)
        if control is not None and self.run.caches_spans:  # a control the conditioning did not show (another pack's)
            log.info("calibrated_cache: a ControlNet adds to the blocks' outputs in place; blocks are cached one by "
                     "one from here on in this run instead of as spans")
            self.run.end_spans()
        own = self._own_branches(len(branches), x.shape[0])
        try:
            call = self.call = self.run.call(float(sigma.flatten()[0]), branches[own], x[own], roles[own])
            return self._model(call, x, sigma, lambda: executor(*args, **kwargs), own)
        except RankDivergence as err:  # the GPUs of a Raylight model diverged: one message, not a deep traceback
            raise ValueError(str(err)) from None
        finally:
            self.call = previous

    def _own_branches(self, branches: int, batch: int) -> slice:
        """The branches this rank's blocks evaluate: all of them, or under Raylight's CFG parallelism its share (its
        forward is handed that share of the batch, and the outputs are gathered after it)."""
        rank, parts = self.run.consensus.branch_part
        if parts == 1:
            return slice(None)
        if branches != parts or batch != branches:  # Raylight splits a batch of exactly one image per GPU
            raise ValueError(f"calibrated_cache: CFG parallelism over {parts} GPUs needs a batch of {parts} branches "
                             f"of one image each (this one holds {batch} images of {branches} branches): set the batch "
                             "size to 1 and cfg above 1, or turn CFG parallelism off in Raylight")
        return slice(rank, rank + 1)

    def _model(self, call: ModelCall, x: torch.Tensor, sigma: torch.Tensor, run: Callable[[], torch.Tensor],
               own: slice = slice(None)):
        """The model call through the engine. With step granularity its cached value is the output in noise units,
        (x − denoised)/σ: ε for ε-prediction models, the velocity for flow models, which is what varies smoothly along
        the trajectory; a forecast step returns x − σ·value, and nothing of the model runs. Otherwise the model runs
        (its blocks through the block hooks), and what it computes outside them counts toward the compute fraction.
        The model's FLOPs are measured on its first call for a shape. Under CFG parallelism (`own`: this rank's
        branches) the model computes and gathers every branch, this rank caches its own, and a whole step gathers the
        ranks' forecasts."""
        step, units = self.policy.granularity == "step", call.caches_output
        scale = sigma.reshape(-1, *(1,) * (x.dim() - 1)).to(x.dtype)
        mine = x[own]
        key = tuple(x.shape[1:])
        measure = key not in self._model_flops
        denoised: list[torch.Tensor] = []

        def value() -> torch.Tensor:
            if step:
                self.call = None  # whole steps: the blocks run plainly, not through the engine
            try:
                if measure:
                    self._inside = 0.0
                    with FlopCounter() as counter:
                        denoised.append(run())
                    # the blocks count at their plain cost, not at what ran through the engine (ICC's projections)
                    outside = (counter.get_total_flops() - self._inside) / mine.shape[0]
                    self._model_flops[key] = max(outside + call.block_flops, 1.0)
                else:
                    denoised.append(run())
            finally:
                self.call, self._inside = call, None
            return ((x - denoised[-1]) / scale)[own] if units else denoised[-1][own]

        out, computed = call.model(value, lambda: self._model_flops.get(key, 1.0), mine)
        return denoised[-1] if computed else x - scale * self.run.consensus.gather(out)

    def plain_block(self, site: BlockSite, args: dict) -> None:
        """A hooked block that passed no tensor stream the pack can cache runs as it is; the log says so once a run."""
        if not self.plain:
            given = ", ".join(f"{k}: {type(v).__name__}" for k, v in args.items() if k != "transformer_options")
            log.warning("calibrated_cache: block %d of %s passed no stream the pack can cache (its arguments: %s); "
                        "such blocks run uncached in this run. Please report the model so it can be supported.",
                        site.index, self.family.name, given)
        self.plain.add(site.index)

    @torch.compiler.disable
    def cached_block(self, site: BlockSite, streams: dict[str, torch.Tensor], run: Callable[[], dict]) -> dict:
        """Run one block through the engine; its FLOPs are measured on its first computation for a shape (eagerly:
        the counter sees no ops inside a compiled graph), later computations run compiled when the model is."""
        self.hooked += 1
        if self.hooked == 1 and self.policy.icc is not None:
            self._refuse_small_icc(streams)
        if self._inside is not None:  # the model's cost is being measured: take out what runs through the engine
            with FlopCounter() as counter:
                out = self._cached_block(site, streams, run)
            self._inside += counter.get_total_flops()
            return out
        return self._cached_block(site, streams, run)

    def _cached_block(self, site: BlockSite, streams: dict[str, torch.Tensor], run: Callable[[], dict]) -> dict:
        key = (site.index, tuple((k, *v.shape[1:]) for k, v in streams.items()))
        cost = self._block_flops.get(key)
        if cost is not None:
            compiled = self.compiled
            return self.call.block(site.index, streams, run if compiled is None else lambda: compiled(run), cost)
        batch = next(iter(streams.values())).shape[0]

        def measured() -> dict:
            with FlopCounter() as counter:
                out = run()
            self._block_flops[key] = max(counter.get_total_flops() / batch, 1.0)
            return out

        return self.call.block(site.index, streams, measured, lambda: self._block_flops.get(key, 1.0))

    def _refuse_small_icc(self, streams: dict[str, torch.Tensor]) -> None:
        """ICC pays off only on blocks large enough: refuse it, with the fix, where it was measured slower."""
        widest = max(streams.values(), key=lambda v: v.numel())
        rows, width = widest.numel() // widest.shape[-1], widest.shape[-1]
        reason = icc_too_small(rows, width, widest.device.type)
        if reason is not None and os.environ.get(ICC_ANY_SIZE) != "1":
            raise ValueError(f"calibrated_cache: {reason}")

    def _report(self, stats: RunStats, wall: float) -> None:
        if self.hooked == 0 and not self.plain and self.policy.granularity != "step":  # step: blocks run plainly
            log.warning("calibrated_cache: no %s block ran through the cache in this run; nothing was skipped. "
                        "Another node may have replaced the blocks after Apply Calibrated Cache.", self.family.name)
        priors = self.priors.name if self.priors is not None else None
        self.last_stats = stats
        self.last_report = {**self._report_head(), "prior_notes": self.prior_notes, "uncached": None, "wall_s": wall,
                            **stats.to_dict()}
        log.info("calibrated_cache [%s] %s: %s, wall %.2f s%s", self.policy.tag(), self.family.name, stats.summary(),
                 wall, f", priors {priors}" if priors else "")
        send_event("calibrated_cache.stats", self.last_report)

    def _report_head(self) -> dict[str, Any]:
        """What every run report starts with: the node, its model and settings, and what the node set aside."""
        return {"node": self.node_id, "family": self.family.name, "policy": self.policy.tag(),
                "priors": self.priors.name if self.priors is not None else None, "prior_check": self.prior_check,
                "notes": list(self.notes)}


def dit_patch(session: CacheSession, site: BlockSite, previous: Callable | None) -> Callable:
    """A `patches_replace["dit"]` entry; it calls a patch another node set earlier on the same block, if any."""
    packed = site.segment.packed

    def patch(args: dict, extra: dict) -> dict:
        def run() -> dict:
            return previous(args, extra) if previous is not None else extra["original_block"](args)

        if session.call is None:
            return run()
        if packed:
            return _packed_block(session, site, args, run)
        streams = {k: args[k] for k in STREAMS if isinstance(args.get(k), torch.Tensor)}
        if not streams:
            session.plain_block(site, args)
            return run()
        return session.cached_block(site, streams, run)

    return patch


def _packed_block(session: CacheSession, site: BlockSite, args: dict, run: Callable[[], dict]) -> dict:
    """A block whose "img" is a tuple of streams (LTX-2: video and audio, of different lengths), each cached on its
    own and returned as a tuple again. An empty stream (LTX-2 sampled without audio) has nothing to cache and passes
    through as given."""
    names, items = site.segment.packed, args.get("img")
    tensors = isinstance(items, (tuple, list)) and len(items) == len(names) and \
        all(isinstance(v, torch.Tensor) for v in items)
    streams = {k: v for k, v in zip(names, items) if v.numel()} if tensors else {}
    if not streams:
        session.plain_block(site, args)
        return run()

    def unpacked() -> dict:
        return {k: v for k, v in zip(names, run()["img"]) if k in streams}

    out = session.cached_block(site, streams, unpacked)
    return {"img": tuple(out.get(k, v) for k, v in zip(names, items))}


def forward_patch(session: CacheSession, site: BlockSite, original: Callable) -> Callable:
    """An object patch of a block's `forward` for families without block replacement. The streams are the keyword
    arguments the segment names (returned as a tuple in that order, HiDream), else the block's first tensor argument,
    positional or (ACE-Step) keyword. A block of the generic fallback that does not return a tensor of its input's
    shape stops the run with a clear message rather than cache it wrongly."""
    names = site.segment.kwargs

    def forward(*args, **kwargs):
        if session.call is None:
            return original(*args, **kwargs)
        if names:
            streams = {k: kwargs[k] for k in names}
        else:
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if not isinstance(x, torch.Tensor):
                raise UnsupportedModel(
                    f"block {site.position} of {session.family.name} takes no tensor to cache (its arguments: "
                    f"{', '.join(kwargs) or 'none'}). Remove Apply Calibrated Cache for this model.")
            streams = {"x": x}

        def run() -> dict:
            out = original(*args, **kwargs)
            if names:
                return dict(zip(names, out if isinstance(out, tuple) else (out,)))
            if session.family.fallback and not (isinstance(out, torch.Tensor) and out.shape == x.shape):
                raise UnsupportedModel(
                    f"the generic fallback hooked the blocks of {session.family.name}, but block {site.position} "
                    f"returns {type(out).__name__} {tuple(getattr(out, 'shape', ()))} for an input of shape "
                    f"{tuple(x.shape)}, so it cannot be cached. Remove Apply Calibrated Cache for this model.")
            return {"x": out}

        out = session.cached_block(site, streams, run)
        return tuple(out[k] for k in names) if len(names) > 1 else out[names[0] if names else "x"]

    return forward


def send_event(event: str, data: dict) -> None:
    """Broadcast to the browser when a server runs (ComfyUI's `server` module is then loaded); scripts and tests have
    none, and importing it there would be attempted anew, and fail, on every event."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        instance.send_sync(event, data)
