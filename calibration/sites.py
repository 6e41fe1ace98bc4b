"""Running one block through the cache, at the two granularities the engine supports.

* `gated_block` (G3): an adaLN block given as ordered sites (name, gate, pre-gate function). Computed sites run
  their function; skipped ones are forecast; the gates are always the current step's. This is the granularity FORA,
  TaylorSeer, GOC, TCC and ICC use.
* `residual_block` (G2): any block, as a function from input streams to output streams. The cached value of each
  stream is its residual (output − input); a skipped block returns input + forecast residual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .state import ModelCall

Site = tuple[str, Tensor, Callable[[Tensor], Tensor]]


def gated_block(call: "ModelCall", index: int, sites: Sequence[Site], h: Tensor, flops: Mapping[str, float]) -> Tensor:
    """`flops` gives per-sample FLOPs by site name, plus "modulation" for the always-computed adaLN part."""
    call.enter(index, {"x": h})
    compute = call.computes(index)
    spent = full = flops.get("modulation", 0.0)
    icc = call.state.icc is not None
    for name, gate, branch in sites:
        cost = flops.get(name, 1.0)
        full += cost
        if compute:
            with call.linears(index, True, name) as scope:
                value = branch(h)
            call.remember(index, name, value)
            spent += cost - (scope.saved if scope is not None else 0.0)  # ICC's projection of the inputs counts
            h = h + gate * value  # exactly the block's own arithmetic, so computing everything is bit-identical
        else:
            if icc:  # the site runs with its Linears' increments: only their saving is not spent
                with call.linears(index, False, name) as scope:
                    value = branch(h)
                spent += cost - scope.saved
                value, extra = call.recall(index, name, lambda: branch(h), value)
            else:
                value, extra = call.recall(index, name, lambda: branch(h))
            spent += extra
            h = torch.addcmul(h, gate, value)
    call.account(index, compute, full, spent, len(sites))
    call.leave(index, {"x": h})
    return h


def residual_block(
    call: "ModelCall",
    index: int,
    inputs: Mapping[str, Tensor],
    run: Callable[[], Mapping[str, Tensor | None]],
    flops: float | Callable[[], float] = 1.0,
) -> dict[str, Tensor | None]:
    """`run` computes the block; inputs may be modified in place by it, so they are copied first when cached.

    Output streams that are None (e.g. SD3's last joint block drops its text stream) stay None on skipped steps. A
    block whose output has a stream that is not input + residual cannot be skipped and is always computed.
    `flops` may be a callable, read after the block ran (so a cost can be measured on the first computation).
    """
    call.enter(index, inputs)
    layout = call.state.layouts.get(index)
    cached_streams = [k for k, cached in layout if cached] if layout is not None else list(inputs)

    def cost() -> float:
        return flops() if callable(flops) else flops

    if call.computes(index) or not all(
        k in inputs and call.fits(index, f"residual.{k}", inputs[k]) for k in cached_streams
    ):
        kept = {k: inputs[k].clone() for k in cached_streams if k in inputs} if call.stores(index) else {}
        with call.linears(index, True) as scope:
            outputs = dict(run())
        streams = [k for k, v in outputs.items() if v is not None and k in inputs and v.shape == inputs[k].shape]
        if any(v is not None and k not in streams for k, v in outputs.items()):
            call.state.uncacheable.add(index)
        call.state.layouts[index] = tuple((k, k in streams) for k in outputs)
        for k in streams:
            if k in kept:
                call.remember(index, f"residual.{k}", outputs[k] - kept[k])
        full = cost()
        call.account(index, True, full, full - (scope.saved if scope is not None else 0.0), max(len(streams), 1))
    elif call.state.icc is not None:
        outputs = _incremented(call, index, inputs, run, cached_streams, cost())
    else:
        outputs, spent = {}, 0.0
        truth = _truth(call, inputs, run)
        for k, cached in call.state.layouts[index]:
            if cached:
                residual, forecast_flops = call.recall(index, f"residual.{k}", truth and (lambda k=k: truth()[k]))
                outputs[k] = inputs[k] + residual
                spent += forecast_flops
            else:
                outputs[k] = None
        call.account(index, False, cost(), spent, len(outputs))
    call.leave(index, outputs)
    return outputs


def _incremented(call: "ModelCall", index: int, inputs: Mapping[str, Tensor],
                 run: Callable[[], Mapping[str, Tensor | None]], cached_streams: list[str],
                 cost: float) -> dict[str, Tensor | None]:
    """ICC: the block runs with its Linears' increments; a calibrator then corrects the residuals it produced."""
    calibrated = call.state.calibrator is not None
    kept = {k: inputs[k].clone() for k in cached_streams} if calibrated else {}
    with call.linears(index, False) as scope:
        outputs = dict(run())
    spent = cost - scope.saved
    if calibrated:
        residuals = {k: outputs[k] - kept[k] for k in cached_streams}
        for k, v in kept.items():  # the block may have updated its inputs in place; the truth needs them as given
            inputs[k].copy_(v)
        truth = _truth(call, inputs, run)
        for k in cached_streams:
            residual, extra = call.recall(index, f"residual.{k}", truth and (lambda k=k: truth()[k]), residuals[k])
            outputs[k] = kept[k] + residual
            spent += extra
    call.account(index, False, cost, spent, len(outputs))
    return outputs


def _truth(call: "ModelCall", inputs: Mapping[str, Tensor], run: Callable[[], Mapping[str, Tensor | None]]):
    """For fitting calibrators: the residuals the block would produce now, computed once on first request and on
    copies, since a block may modify its inputs in place."""
    calibrator = call.state.calibrator
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
