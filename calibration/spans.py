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

Whether a block's outputs were modified before the next block took them is checked at every computed block, without
stopping the device: a tensor's version counter tells at no cost; inference tensors (ComfyUI samples in inference
mode) have none, so a block's first computation in the run keeps a copy of its outputs (a modification seen then
leaves the span its exact residual), and later computations compare fingerprints of the outputs on the device, the
flags read once when the model call ends (one sync a call, not one a block). A span found then to have taken in a
modification is forgotten, so no later step reads its residual, and its blocks are computed at the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    """A span being computed: its first block's inputs as given, and the newest block's outputs as returned, with what
    tells whether they were modified in place since: by stream, its version, its copy (marked None) or its
    fingerprint (inference tensors)."""

    first: int
    last: int
    kept: dict[str, Tensor]
    out: dict[str, Tensor] = field(default_factory=dict)
    marks: dict[str, int | Tensor | None] = field(default_factory=dict)
    layout: tuple[tuple[str, bool], ...] = ()
    copy: dict[str, Tensor] | None = None

    def extend(self, block: int, outputs: Mapping[str, Tensor | None], copy: bool) -> None:
        """`copy`: keep a copy of the outputs, which tells exactly whether the model changes them in place before the
        next block where version counters cannot (inference tensors), and keeps the span's residual if it does."""
        self.last = block
        self.out = {k: v for k, v in outputs.items() if v is not None}
        self.layout = tuple((k, v is not None) for k, v in outputs.items())
        self.copy = {k: v.clone() for k, v in self.out.items()} if copy else None
        self.marks = {k: _mark(v, copy) for k, v in self.out.items()}

    def intact(self, checks: list[tuple[int, Tensor]]) -> bool:
        """Whether the outputs are still what the last block returned (nothing modified them in place since), as far
        as the host knows now: by version counter, or for inference tensors by their copy (a device sync, on a block's
        first computation only). Otherwise an inference tensor's fingerprint is compared on the device with the one
        taken when the block returned, and the flag is added to `checks` under the block that follows, to be read when
        the model call ends; until then the stream counts as intact."""
        for k, v in self.out.items():
            mark = self.marks[k]
            if mark is None:
                if not torch.equal(v, self.copy[k]):
                    return False
            elif isinstance(mark, Tensor):
                checks.append((self.last + 1, torch.ne(_fingerprint(v), mark).any()))
            elif v._version != mark:
                return False
        return True

    def residuals(self, intact: bool) -> dict[str, Tensor]:
        """`intact`: what `intact()` said just now (the comparison is not repeated)."""
        out = self.out if intact or self.copy is None else self.copy
        return {k: out[k] - self.kept[k] for k in out}


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(value: Tensor) -> Tensor:
    """The sums along the last dimension of the value's bit pattern, in integers that wrap around (computed on the
    device, in any order alike): a change to one element of a row changes its sum, whatever its size; changes to
    several elements of a row go unseen only if their bit differences cancel to a multiple of 2^bits, in every row
    they touch."""
    bits = value.view(_BITS[value.element_size()])
    return bits.sum(dim=-1, dtype=bits.dtype)


def _mark(value: Tensor, copied: bool) -> int | Tensor | None:
    """What `OpenSpan.intact` compares a stream with later: its version, else (an inference tensor) nothing where it
    was copied, its fingerprint where not."""
    if not value.is_inference():
        return value._version
    return None if copied else _fingerprint(value)


class SpannedBlocks:
    """The block entry of one model call when its run caches spans."""

    def __init__(self, call: "ModelCall") -> None:
        self.call = call
        self.open: OpenSpan | None = None
        self.skipping: Span | None = None
        self.checks: list[tuple[int, Tensor]] = []  # (block, device flag: the streams it took had been modified)

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
            span = call.cache.spans_by_first.get(index)
            if span is not None and self._skips(span, inputs):
                outputs = self._filled(span, inputs, cost)
            else:
                outputs = self._computed(index, inputs, run, cost)
        call.leave(index, outputs)
        return outputs

    def finish(self) -> None:
        """The model call ended: a span still open ends with it, and the call's checks are read."""
        if self.open is not None:
            self._commit(self.open)
            self.open = None
        self._settle()

    def _settle(self) -> None:
        """Read the call's fingerprint checks, all at once (one device sync). Where block b took outputs of block
        b − 1 that had been modified in place, the span holding b − 1 cached a residual that includes the
        modification: it is forgotten before any step reads it, so its blocks are computed at the next step, and
        spans end before b from then on."""
        if not self.checks:
            return
        blocks = [block for block, _ in self.checks]
        changed = torch.stack([flag for _, flag in self.checks]).tolist()
        self.checks = []
        for block, modified in zip(blocks, changed):
            if modified:
                self.call.state.span_breaks.add(block)
                self._forget(block - 1, block - 1)

    # --- skipping -------------------------------------------------------------------------------------------------

    def _skips(self, span: Span, inputs: Mapping[str, Tensor]) -> bool:
        call = self.call
        return (not any(call.decision.computes[span.first:span.last + 1]) and {k for k, _ in span.layout} <= set(inputs)
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
        intact = open_ is not None and open_.intact(self.checks)
        joins = intact and self._continues(open_, index, inputs)
        so_far: dict[str, Tensor] | None = None
        if open_ is not None and not joins:
            self._commit(open_, intact=intact)
            self.open = open_ = None
        elif open_ is not None and state.layouts.get(index) is None:  # a block not seen yet may not join after all
            so_far = open_.residuals(intact=True)
        eligible = self._eligible(index)
        known = state.layouts.get(index)
        # A block not seen yet may be followed by an in-place change: copy its outputs, so that the span keeps its
        # residual if it is (later computations of the block are checked by version or fingerprint).
        copy = known is None
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
            open_ = self.open = OpenSpan(index, index, kept)
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
        `intact`: whether they are untouched, where the caller knows (each comparison of copies is a device sync;
        a fingerprint compared on the device counts as intact until `_settle` reads it)."""
        call = self.call
        if residuals is None:
            intact = open_.intact(self.checks) if intact is None else intact
            if not intact:
                call.state.span_breaks.add(open_.last + 1)
                if open_.copy is None:
                    self._forget(open_.first, open_.last)
                    return
            residuals = open_.residuals(intact)
        span = Span(open_.first, open_.last, open_.layout)
        cache = call.cache
        if cache.spans_by_first.get(span.first) != span:
            self._forget(span.first, span.last)
            cache.spans_by_first[span.first] = span
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
        for start, span in list(cache.spans_by_first.items()):
            if span.first <= last and first <= span.last:
                del cache.spans_by_first[start]
                self.call.state.drop_span(cache, span)
