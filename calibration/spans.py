"""Contiguous blocks skipped as one (block granularity, nothing calibrating, a weighted forecaster).

When a run's skipped blocks are filled in by a weighted sum of anchors (FORA, TaylorSeer, Spectrum) and nothing
corrects a block's value on its own, skipping blocks i..j one by one adds j − i + 1 forecasts to the hidden state,
and the same weights apply to every block: the sum of the forecasts is the forecast of the blocks' summed residual.
A *span* caches that sum as one site, so a skipped step pays one multiply-add per stream instead of one per block
and the cache holds one residual per span instead of one per block; the result is the same up to rounding.

On a computed call the summed residual is the span's last output minus its first input, which holds only while
each block's input is the previous block's output, untouched: a span ends where that chain breaks (the model changed
a stream between blocks, e.g. a ControlNet residual added in place) or where a block's output streams differ from
its input's (a segment boundary, a dropped stream). A chain found modified in place is remembered as a break, so the
span ends before it from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .call import ModelCall, Outputs


@dataclass(frozen=True)
class Span:
    """Blocks first..last; `layout` is the last block's output: (stream, has a residual), a stream it drops is None
    (SD3's last joint block drops the text stream)."""

    first: int
    last: int
    layout: tuple[tuple[str, bool], ...]

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(k for k, has in self.layout if has)

    def site(self, stream: str) -> str:
        return f"span.{stream}"


@dataclass
class OpenSpan:
    """A span being computed: its first block's inputs as given, and the newest block's outputs as returned."""

    first: int
    last: int
    kept: dict[str, Tensor]
    out: dict[str, Tensor]
    versions: dict[str, int]
    layout: tuple[tuple[str, bool], ...] = ()
    copy: dict[str, Tensor] | None = None

    def extend(self, block: int, outputs: Mapping[str, Tensor | None], copy: bool) -> None:
        """`copy`: keep a copy of the outputs, which tells whether the model changes them in place before the next
        block where version counters cannot (inference tensors), and keeps the span's residual if it does."""
        self.last = block
        self.out = {k: v for k, v in outputs.items() if v is not None}
        self.versions = {k: _version(v) for k, v in self.out.items()}
        self.layout = tuple((k, v is not None) for k, v in outputs.items())
        self.copy = {k: v.clone() for k, v in self.out.items()} if copy else None

    def intact(self) -> bool:
        """Whether the outputs are still what the last block returned (nothing modified them in place since).
        Inference tensors (ComfyUI samples in inference mode) have no version counter: they are copied on every
        computed call and compared with the copy, so a change that starts mid-run or touches one branch group only
        is seen too."""
        if self.copy is not None and any(v.is_inference() for v in self.out.values()):
            return all(torch.equal(v, self.copy[k]) for k, v in self.out.items())
        return all(_version(v) == self.versions[k] for k, v in self.out.items())

    def residuals(self, intact: bool) -> dict[str, Tensor]:
        """`intact`: what `intact()` said just now (the comparison is not repeated)."""
        out = self.out if intact or self.copy is None else self.copy
        return {k: out[k] - self.kept[k] for k in out}


def _version(value: Tensor) -> int:
    return -1 if value.is_inference() else value._version


class SpannedBlocks:
    """The block entry of one model call when its run caches spans."""

    def __init__(self, call: "ModelCall") -> None:
        self.call = call
        self.open: OpenSpan | None = None
        self.skipping: Span | None = None

    def block(self, index: int, inputs: Mapping[str, Tensor], run: Callable[[], "Outputs"],
              cost: Callable[[], float]) -> dict[str, Tensor | None]:
        call = self.call
        call.enter(index, inputs)
        span = self.skipping
        if span is not None and span.first < index <= span.last:  # filled in by the span's first block
            last = index == span.last
            if last:
                self.skipping = None
            outputs: dict[str, Tensor | None] = {k: inputs[k] if has or not last else None for k, has in span.layout}
            call.account(index, False, cost(), 0.0, len(outputs))
        else:
            self.skipping = None
            span = call.cache.spans.get(index)
            if span is not None and self._skips(span, inputs):
                outputs = self._filled(span, inputs, cost)
            else:
                outputs = self._computed(index, inputs, run, cost)
        call.leave(index, outputs)
        return outputs

    def finish(self) -> None:
        """The model call ended: a span still open ends with it."""
        if self.open is not None:
            self._commit(self.open)
            self.open = None

    # --- skipping -------------------------------------------------------------------------------------------------

    def _skips(self, span: Span, inputs: Mapping[str, Tensor]) -> bool:
        call, state = self.call, self.call.state
        return (state.skips(call.round, span.first) and {k for k, _ in span.layout} <= set(inputs)
                and span.first not in state.always
                and all(b in call.cache.ready for b in range(span.first, span.last + 1))
                and all(call.fits(span.first, span.site(k), inputs[k]) for k in span.streams))

    def _filled(self, span: Span, inputs: Mapping[str, Tensor], cost: Callable[[], float]
                ) -> dict[str, Tensor | None]:
        call = self.call
        outputs: dict[str, Tensor | None] = {}
        spent = 0.0
        alone = span.last == span.first  # else a stream the last block drops passes through until then
        for k, has in span.layout:
            outputs[k], flops = call.recall(span.first, span.site(k), base=inputs[k]) if has else (
                None if alone else inputs[k], 0.0)
            spent += flops
        self.skipping = None if alone else span
        call.account(span.first, False, cost(), spent, len(outputs))
        return outputs

    # --- computing ------------------------------------------------------------------------------------------------

    def _computed(self, index: int, inputs: Mapping[str, Tensor], run: Callable[[], "Outputs"],
                  cost: Callable[[], float]) -> dict[str, Tensor | None]:
        call, state = self.call, self.call.state
        open_ = self.open
        intact = open_ is not None and open_.intact()
        joins = intact and self._continues(open_, index, inputs)
        so_far: dict[str, Tensor] | None = None
        if open_ is not None and not joins:
            self._commit(open_, intact=intact)
            self.open = open_ = None
        elif open_ is not None and state.layouts.get(index) is None:  # a block not seen yet may not join after all
            so_far = open_.residuals(intact=True)
        eligible = self._eligible(index)
        known = state.layouts.get(index)
        # A block not seen yet may be followed by an in-place change: copy its outputs (as always for inference
        # tensors, whose changes nothing else reveals).
        copy = known is None or any(v.is_inference() for v in inputs.values())
        carried = [k for k in inputs if known is None or any(k == s for s, _ in known)]
        kept = {k: inputs[k].clone() for k in carried} if eligible and not joins else {}
        outputs = dict(run())
        streams = [k for k, v in outputs.items() if v is not None and k in inputs and v.shape == inputs[k].shape]
        if any(v is not None and k not in streams for k, v in outputs.items()):
            state.uncacheable.add(index)
        state.layouts[index] = tuple((k, k in streams) for k in outputs)
        # Streams a block does not return are context it only reads; one it drops (returns None for) ends a span.
        clean = index not in state.uncacheable and set(outputs) <= set(kept if kept else inputs) and all(
            k in streams or v is None for k, v in outputs.items())
        ends = any(v is None for v in outputs.values())
        if open_ is not None:
            if clean and set(outputs) == set(open_.out):
                open_.extend(index, outputs, copy)
            else:
                self._commit(open_, so_far, intact=True)
                self.open = open_ = None
        elif eligible and clean:
            open_ = self.open = OpenSpan(index, index, kept, {}, {})
            open_.extend(index, outputs, copy)
        full = cost()
        call.account(index, True, full, full, max(len(streams), 1))
        if open_ is not None and (ends or index == state.blocks - 1 or index + 1 in state.span_breaks):
            self._commit(open_, intact=True)  # just returned by the block: nothing ran since
            self.open = None
        return outputs

    def _eligible(self, index: int) -> bool:
        state = self.call.state
        return self.call.stores(index) and index not in state.uncacheable

    def _continues(self, open_: OpenSpan, index: int, inputs: Mapping[str, Tensor]) -> bool:
        """The block takes exactly what the span's last block returned (the caller checked it is untouched), and is
        known to return the same streams (or is not known yet)."""
        layout = self.call.state.layouts.get(index)
        return (index == open_.last + 1 and index not in self.call.state.span_breaks and self._eligible(index)
                and all(k in inputs and inputs[k] is v for k, v in open_.out.items())
                and (layout is None or {k for k, _ in layout} == set(open_.out)))

    def _commit(self, open_: OpenSpan, residuals: dict[str, Tensor] | None = None, intact: bool | None = None
                ) -> None:
        """Store the span's summed residual. If its outputs were modified in place since, the span ends before the
        block that follows from then on; its residual is kept if the outputs were copied, else lost for this call.
        `intact`: whether they are untouched, where the caller knows (each comparison of copies is a device sync)."""
        call = self.call
        if residuals is None:
            intact = open_.intact() if intact is None else intact
            if not intact:
                call.state.span_breaks.add(open_.last + 1)
                if open_.copy is None:
                    self._forget(open_.first, open_.last)
                    return
            residuals = open_.residuals(intact)
        span = Span(open_.first, open_.last, open_.layout)
        cache = call.cache
        if cache.spans.get(span.first) != span:
            self._forget(span.first, span.last)
            cache.spans[span.first] = span
        state = call.state
        for k, value in residuals.items():
            call.remember(span.first, span.site(k), value)
        if span.first in state.always:  # over the cache limit: the span's blocks are computed, all of them
            rest = set(range(span.first + 1, span.last + 1)) - state.always
            state.always.update(rest)
            state.stats.blocks_over_limit += len(rest)
            self._forget(span.first, span.last)
        elif span.first in cache.ready:
            cache.ready.update(range(span.first, span.last + 1))

    def _forget(self, first: int, last: int) -> None:
        """Drop every span that overlaps blocks first..last, with its cached values."""
        cache = self.call.cache
        for start, span in list(cache.spans.items()):
            if span.first <= last and first <= span.last:
                del cache.spans[start]
                self.call.state.drop_span(cache, span)
