"""One model call of a run: whether it and each of its blocks is computed or filled in, and the storing, forecasting,
calibrating and accounting that goes with either. The call enters through `model`, its blocks through one method per
granularity:

* `model` (G1, and the accounting of every granularity): the whole model call. At a whole step (granularity step, or
  a plan's whole steps) it returns the forecast of the model's output, so nothing of the model runs; otherwise the
  model runs, and what it computes outside its blocks (embedders, final layer) counts as computed, so that compute
  fractions compare with whole-model caches. A plan's whole steps forecast from the outputs of the steps that computed
  every block.
* `block` (G2): any block, as a function from input streams to output streams. The cached value of each stream is its
  residual (output − input); a skipped block returns input + filled-in residual. ComfyUI's DiT loops expose this.
* `gated` (G3): an adaLN block given as ordered sites (name, gate, pre-gate function). Computed sites run their
  function; skipped ones are filled in; the gates are always the current step's.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Hashable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .calibrator import Reused, Site
from .icc import Scope
from .registry import make_forecaster
from .spans import SpannedBlocks

if TYPE_CHECKING:
    from .rounds import Decision, Round
    from .state import GroupCache, RunState

GatedSite = tuple[str, Tensor, Callable[[Tensor], Tensor]]
Outputs = Mapping[str, Tensor | None]
OUTPUT = (-1, "output")  # the model output's site (step granularity); its priors and tracks name it block 0


def _identity(value: Tensor) -> Tensor:
    return value


class ModelCall:
    """It is also a block runner for adaLN blocks that expose `sites(c)`: `call(i, block, h, c)`."""

    def __init__(self, state: "RunState", round_: "Round", branches: list[Hashable], cache: "GroupCache", chunk: int,
                 roles: list[str], device: torch.device, decision: "Decision") -> None:
        self.state = state
        self.round = round_
        self.decision = decision  # the round decider's: which blocks this call computes
        self.branches = branches
        self.cache = cache
        self.chunk = chunk
        self.roles = roles
        self.device = device
        memory = state.memory
        self.fetch = (lambda value: memory.use(value, device)) if memory.offload else _identity
        self._stores = state.plan.may_skip_after(round_.step)
        self._probe_inputs: Mapping[str, Tensor] | None = None
        self._observed: set[int] = set()  # reference runs: blocks computed where the policy reuses
        self._icc_only = state.icc is not None and state.calibrator is None
        self._step = state.policy.granularity == "step"
        self._keeps_output = state.plan.keeps_output  # plans: only fully computed steps' outputs are anchors
        self._records_output = state.calibrator is not None and state.calibrator.records_output
        self._spans = SpannedBlocks(self) if state.caches_spans else None
        self.block_flops = 0.0  # per sample: what the blocks of this call would cost, computed or not

    @property
    def caches_output(self) -> bool:
        """Whether this call's model output is cached or recorded: `compute` must then return it in the units a
        whole-step forecast extrapolates (see `model`)."""
        return self._step or self._keeps_output or self._records_output

    # --- the entries ----------------------------------------------------------------------------------------------

    def model(self, compute: Callable[[], Tensor], flops: float | Callable[[], float], like: Tensor
              ) -> tuple[Tensor, bool]:
        """One whole model call. `compute` runs the model and returns the value this call caches with step
        granularity (whatever the caller makes of the model's output: the testbed its velocity, ComfyUI the output in
        noise units), shaped as `like`; it runs the blocks through this call, but with step granularity as the plain
        model (no block is skipped one by one then). `flops` is what a whole call costs per sample (a callable is read
        after the model ran, so it can be measured on the first call). Returns the value, and whether it was computed
        (else forecast)."""
        cost = flops if callable(flops) else (lambda: flops)
        block, name = OUTPUT
        if self.round.whole and self._skips_model(like):
            truth = compute if self.state.calibrator is not None and self.state.calibrator.needs_truth else None
            value, spent = self.recall(block, name, truth)
            self.account(None, False, cost(), spent, 1)
            return value, False
        self.block_flops = 0.0
        value = compute()
        if self._spans is not None:
            self._spans.finish()
        if self._step:
            self.remember(block, name, value)
            full = cost()
            self.account(None, True, full, full, 1)
        else:  # the blocks accounted for themselves; the rest of the model was computed
            if block in self._observed or (self._keeps_output and not self.round.skip):
                self.remember(block, name, value)
            elif self._records_output:
                r = self.round
                self.state.calibrator.anchor([Site(role, r.index, r.sigma, r.sigma, 0, block, name, r.step)
                                              for role in self.roles], list(value.split(self.chunk)))
            self.state.stats.outside_flops = max(cost() - self.block_flops, 0.0)
            outside = self.state.stats.outside_flops * self.chunk * len(self.branches)
            self.state.stats.flops_full += outside
            self.state.stats.flops_computed += outside
        return value, True

    def _skips_model(self, like: Tensor) -> bool:
        """A whole step: the output is cached for this group and shape. A reference run computes the model there and
        observes its output."""
        block, name = OUTPUT
        if not (block in self.cache.ready and self.fits(block, name, like)):
            return False
        calibrator = self.state.calibrator
        if calibrator is not None and calibrator.reference:
            self._observed.add(block)
            return False
        return True

    def block(self, index: int, inputs: Mapping[str, Tensor], run: Callable[[], Outputs],
              flops: float | Callable[[], float] = 1.0) -> dict[str, Tensor | None]:
        """`run` computes the block; inputs may be modified in place by it, so they are copied first when cached.

        Output streams that are None (e.g. SD3's last joint block drops its text stream) stay None on skipped steps. A
        block whose output has a stream that is not input + residual cannot be skipped and is always computed.
        `flops` may be a callable, read after the block ran (so a cost can be measured on the first computation).
        A run that caches spans of blocks (`spans.py`) serves the block there.
        """
        cost = flops if callable(flops) else (lambda: flops)
        if self._spans is not None:
            return self._spans.block(index, inputs, run, cost)
        self.enter(index, inputs)
        layout = self.state.layouts.get(index)
        cached = [k for k, has in layout if has] if layout is not None else list(inputs)
        if self.computes(index) or not all(k in inputs and self.fits(index, f"residual.{k}", inputs[k])
                                           for k in cached):
            outputs = self._computed(index, inputs, run, cached, cost)
        elif self.state.icc is not None:
            outputs = self._incremented(index, inputs, run, cached, cost())
        else:
            outputs, spent = {}, 0.0
            truth = self._truth(inputs, run)
            for k, has in self.state.layouts[index]:
                if has:
                    outputs[k], extra = self.recall(index, f"residual.{k}", truth and (lambda k=k: truth()[k]),
                                                    base=inputs[k])
                    spent += extra
                else:
                    outputs[k] = None
            self.account(index, False, cost(), spent, len(outputs))
        self.leave(index, outputs)
        return outputs

    def gated(self, index: int, sites: Sequence[GatedSite], h: Tensor, flops: Mapping[str, float]) -> Tensor:
        """`flops` gives per-sample FLOPs by site name, plus "modulation" for the always-computed adaLN part."""
        self.enter(index, {"x": h})
        compute = self.computes(index)
        spent = full = flops.get("modulation", 0.0)
        icc = self.state.icc is not None
        for name, gate, branch in sites:
            cost = flops.get(name, 1.0)
            full += cost
            if compute:
                with self.linears(index, True, name) as scope:
                    value = branch(h)
                self.remember(index, name, value)
                spent += cost - (scope.saved if scope is not None else 0.0)  # ICC's projection of the inputs counts
                h = h + gate * value  # exactly the block's own arithmetic, so computing everything is bit-identical
            else:
                value = None
                if icc:  # the site runs with its Linears' increments: only their saving is not spent
                    with self.linears(index, False, name) as scope:
                        value = branch(h)
                    spent += cost - scope.saved
                h, extra = self.recall(index, name, lambda h=h: branch(h), value, base=h, gate=gate)
                spent += extra
        self.account(index, compute, full, spent, len(sites))
        self.leave(index, {"x": h})
        return h

    @torch.compiler.disable  # a compiled testbed DiT: the engine stays out of its graphs (compile blocks instead)
    def __call__(self, index: int, block, h: Tensor, c: Tensor) -> Tensor:
        flops = self.site_flops(index, block, h.shape[1])
        if self.state.policy.granularity == "module":
            return self.gated(index, block.sites(c), h, flops)
        return self.block(index, {"x": h}, lambda: {"x": block(h, c)}, sum(flops.values()) or 1.0)["x"]

    def site_flops(self, index: int, block, tokens: int) -> dict[str, float]:
        """Per-sample FLOPs by site when the block reports them (`site_flops(tokens)`), else equal weights."""
        key = (index, tokens)
        known = self.state.site_costs.get(key)
        if known is None:
            report = getattr(block, "site_flops", None)
            known = self.state.site_costs[key] = report(tokens) if report is not None else {}
        return known

    # --- deciding and storing -------------------------------------------------------------------------------------

    def computes(self, block: int) -> bool:
        """Whether a block is computed in this call (with step granularity, always: whole steps are skipped)."""
        if self._step:
            return True
        reuses = not self.decision.computes[block]
        calibrator = self.state.calibrator
        if calibrator is not None and calibrator.reference:
            if reuses:
                self._observed.add(block)
            return True
        return not reuses

    def fits(self, block: int, name: str, like: Tensor) -> bool:
        """Whether the cached value of a site has `like`'s shape (a text stream can change length mid-run when ComfyUI
        batches conds differently); a site that does not fit is computed. ICC's Linears check their own caches."""
        return self._icc_only or self.cache.sites[(block, name)].shape == like.shape

    def stores(self, block: int) -> bool:
        """Whether values computed now can serve a later skip (nothing is kept when none can), or are observed. With
        step granularity blocks are never skipped one by one, so only the model's output is kept."""
        if self._step:
            return (self._stores and block == OUTPUT[0]) or block in self._observed
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
        state, cache = self.state, self.cache
        if state.calibrator is not None and state.calibrator.records_anchors:
            r = self.round
            state.calibrator.anchor([Site(role, r.index, r.sigma, r.sigma, 0, max(block, 0), name, r.step)
                                     for role in self.roles], list(value.split(self.chunk)))
        if not self._icc_only:  # ICC keeps its own caches: a stored residual would never be read
            if not state.admit(block, name, state.history * value.nbytes):
                return
            forecaster = cache.sites.get((block, name))
            if forecaster is None or forecaster.shape != value.shape:
                if forecaster is not None:
                    state.stats.add_cache_bytes(-forecaster.nbytes)
                forecaster = cache.sites[(block, name)] = make_forecaster(state.policy, state.history, state.time_range)
                before = 0
            else:
                before = forecaster.nbytes
            forecaster.update(self.round.time, state.memory.keep(value.detach()))
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

    # --- filling in -------------------------------------------------------------------------------------------------

    def sites(self, block: int, name: str) -> list[Site]:
        r = self.round
        sigma, step = self.cache.anchors[block]
        index = max(block, 0)  # the output's site is named block 0 in prior files (its own name keeps it apart)
        return [Site(role, r.index, r.sigma, sigma, r.step - step, index, name, r.step) for role in self.roles]

    def recall(self, block: int, name: str, truth: Callable[[], Tensor] | None = None, value: Tensor | None = None,
               base: Tensor | None = None, gate: Tensor | None = None) -> tuple[Tensor, float]:
        """The value used in place of a site's computation for this call's batch (the forecast, or ICC's `value`,
        corrected by the run's calibrator if any), and the FLOPs spent on it per sample beyond producing `value`.
        With `base`, what is returned is base + value (times `gate`): without a calibrator in between, a weighted
        forecast writes it into one new tensor. `truth` computes the site (for fitting)."""
        calibrator = self.state.calibrator
        if calibrator is None and value is None and base is not None:
            forecaster, t = self.cache.sites[(block, name)], self.round.time
            flops = self._flops(forecaster, t)
            return self._held(forecaster, lambda: forecaster.forecast_onto(t, self.fetch, base, gate)), flops
        value, flops = self._forecast(block, name) if value is None else (value, 0.0)
        if calibrator is not None:
            reused = Reused(value, lambda: self._anchors(block, name), truth if calibrator.needs_truth else None)
            sites, held = self.sites(block, name), calibrator.nbytes
            calibrated = calibrator.calibrate(sites, reused)
            if calibrated is not value:  # a site without a prior comes back unchanged and costs nothing
                flops += calibrator.flops * value[: self.chunk].numel() / max(self.chunk, 1)
            calibrator.settle(sites, calibrated)
            self.state.stats.add_cache_bytes(calibrator.nbytes - held)
            value = calibrated
        if base is None:
            return value, flops
        return (base + value if gate is None else torch.addcmul(base, gate, value)), flops

    def _forecast(self, block: int, name: str) -> tuple[Tensor, float]:
        """The forecast of a site for this call's batch, and the FLOPs it spent per sample."""
        forecaster, t = self.cache.sites[(block, name)], self.round.time
        flops = self._flops(forecaster, t)
        return self._held(forecaster, lambda: forecaster.forecast(t, self.fetch)), flops

    def _flops(self, forecaster, t: float) -> float:
        """Per sample, counted before the forecast runs: a method's work at a new anchor is charged to the first
        forecast after it."""
        return forecaster.flops(t) * forecaster.numel / (self.chunk * len(self.branches))

    def _held(self, forecaster, forecast: Callable[[], Tensor]) -> Tensor:
        """Run a forecast, counting what the forecaster keeps of it (an integrator keeps its own forecasts)."""
        if not forecaster.keeps_forecasts:
            return forecast()
        held = forecaster.nbytes
        value = forecast()
        self.state.stats.add_cache_bytes(forecaster.nbytes - held)
        return value

    def _anchors(self, block: int, name: str) -> tuple[Tensor, Tensor, list[float]] | None:
        """The newest and previous computed values of a site for the batch, and each chunk's staleness ratio
        (t − t_newest) / (t_newest − t_previous)."""
        forecaster = self.cache.sites[(block, name)]
        times = forecaster.times
        if len(times) < 2:
            return None
        scale = (self.round.time - times[-1]) / (times[-1] - times[-2])
        return self.fetch(forecaster.values[-1]), self.fetch(forecaster.values[-2]), [scale] * len(self.branches)

    def _computed(self, index: int, inputs: Mapping[str, Tensor], run: Callable[[], Outputs], cached: list[str],
                  cost: Callable[[], float]) -> dict[str, Tensor | None]:
        kept = {k: inputs[k].clone() for k in cached if k in inputs} if self.stores(index) else {}
        with self.linears(index, True) as scope:
            outputs = dict(run())
        streams = [k for k, v in outputs.items() if v is not None and k in inputs and v.shape == inputs[k].shape]
        if any(v is not None and k not in streams for k, v in outputs.items()):
            self.state.uncacheable.add(index)
        self.state.layouts[index] = tuple((k, k in streams) for k in outputs)
        for k in streams:
            if k in kept:
                self.remember(index, f"residual.{k}", outputs[k] - kept[k])
        full = cost()
        self.account(index, True, full, full - (scope.saved if scope is not None else 0.0), max(len(streams), 1))
        return outputs

    def _incremented(self, index: int, inputs: Mapping[str, Tensor], run: Callable[[], Outputs], cached: list[str],
                     cost: float) -> dict[str, Tensor | None]:
        """ICC: the block runs with its Linears' increments; a calibrator then corrects the residuals it produced."""
        calibrated = self.state.calibrator is not None
        kept = {k: inputs[k].clone() for k in cached} if calibrated else {}
        with self.linears(index, False) as scope:
            outputs = dict(run())
        spent = cost - scope.saved
        if calibrated:
            residuals = {k: outputs[k] - kept[k] for k in cached}
            for k, v in kept.items():  # the block may have updated its inputs in place; the truth needs them as given
                inputs[k].copy_(v)
            truth = self._truth(inputs, run)
            for k in cached:
                residual, extra = self.recall(index, f"residual.{k}", truth and (lambda k=k: truth()[k]), residuals[k])
                outputs[k] = kept[k] + residual
                spent += extra
        self.account(index, False, cost, spent, len(outputs))
        return outputs

    def _truth(self, inputs: Mapping[str, Tensor], run: Callable[[], Outputs]):
        """For fitting calibrators: the residuals the block would produce now, computed once on first request and on
        copies, since a block may modify its inputs in place."""
        calibrator = self.state.calibrator
        if calibrator is None or not calibrator.needs_truth:
            return None
        done: dict[str, Tensor] = {}

        def residuals() -> dict[str, Tensor]:
            if not done:
                kept = {k: v.clone() for k, v in inputs.items()}
                outputs = run()
                done.update({k: outputs[k] - kept[k] for k in kept if outputs.get(k) is not None})
                for k, v in kept.items():
                    inputs[k].copy_(v)
            return done

        return residuals

    # --- accounting and the dynamic policy ------------------------------------------------------------------------

    def account(self, block: int | None, computed: bool, full_flops: float, spent_flops: float, sites: int) -> None:
        """`block` None: a whole model call with step granularity, which computes or skips every block."""
        stats, n, branches = self.state.stats, self.chunk * len(self.branches), len(self.branches)
        stats.flops_full += full_flops * n
        stats.flops_computed += spent_flops * n
        if computed:
            stats.flops_blocks += full_flops * n
        else:
            stats.flops_filled += spent_flops * n
            stats.calls_skipped += block is None
        if block is not None:  # a plan search reads what a block costs computed, and filled in
            self.block_flops += full_flops
            stats.block_flops[block] = full_flops
            if not computed:
                stats.skipped_flops[block] = spent_flops
        blocks = self.state.blocks if block is None else 1
        if computed:
            stats.blocks_computed += blocks * branches
            stats.sites_computed += sites * branches
        else:
            stats.blocks_skipped += blocks * branches
            stats.sites_skipped += sites * branches

    def enter(self, block: int, inputs: Mapping[str, Tensor]) -> None:
        if block == 0 and self.state.policy.mode == "dynamic":
            self._probe_inputs = {k: v.clone() for k, v in inputs.items()}

    def leave(self, block: int, outputs: Mapping[str, Tensor | None]) -> None:
        """After the last probe block: the dynamic policy decides the round and refreshes references."""
        state = self.state
        if self._probe_inputs is None or block != state.policy.probe_blocks - 1:
            return
        probe, self._probe_inputs = self._probe_inputs, None
        # Streams change shape across segments (Flux single blocks take cat(txt, img)); only like-for-like counts.
        keys = [k for k, v in outputs.items() if v is not None and k in probe and v.shape == probe[k].shape]
        if not keys:
            return
        # Each stream, branch and image on its own (image and text, cond and uncond, one image of a batch): a small
        # or single change must not drown in steady ones, so the round skips only if every one is steady.
        residuals = [(outputs[k] - probe[k]).split(self.chunk) for k in keys]
        parts = [tuple(r[i] for r in residuals) for i in range(len(self.branches))]
        if self.round.skip is False:
            state.decider.refresh(self.branches, parts)
        else:
            self.round, self.decision = state.decider.probe(self.round, self.branches, parts, self.cache.ready)
