"""Blocks skipped together are cached as one summed residual (calibration/spans.py): the result is the block-by-block
one up to rounding, for less work and memory, and the span ends wherever the model's streams do not simply chain."""

from typing import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode

from calibrated_cache.calibration import CachePolicy, RunState
from calibrated_cache.testbed import sampling
from calibrated_cache.testbed.sampling import flow_sigmas, sample

Streams = dict[str, torch.Tensor]
STEPS = 12


class BlockByBlock(RunState):
    """The same run with spans turned off: every block caches its own residual."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.caches_spans = False


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0.0, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("forecaster,order", [("reuse", 1), ("taylor", 2), ("spectrum", 1)])
def test_blocks_skipped_together_give_the_block_by_block_result_from_one_cached_sum(random_dit, forecaster, order,
                                                                                     monkeypatch):
    policy = CachePolicy(interval=3, warmup_steps=1, forecaster=forecaster, order=order, granularity="block")
    labels, noise = torch.tensor([3, 1, 4]), torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    spanned, run = sample(random_dit, labels, noise, STEPS, 3.0, policy=policy)
    monkeypatch.setattr(sampling, "RunState", BlockByBlock)
    alone, run_alone = sample(random_dit, labels, noise, STEPS, 3.0, policy=policy)
    assert run.caches_spans and not run_alone.caches_spans
    assert close(spanned, alone) and not torch.equal(spanned, sample(random_dit, labels, noise, STEPS, 3.0)[0])
    assert run.stats.blocks_skipped == run_alone.stats.blocks_skipped > 0
    assert run.stats.compute_fraction <= run_alone.stats.compute_fraction
    assert run.stats.peak_cache_bytes * len(random_dit.blocks) == run_alone.stats.peak_cache_bytes  # one sum, not 8


@pytest.mark.parametrize("policy", [CachePolicy(interval=3, granularity="block", forecaster="foca"),
                                    CachePolicy(interval=3, granularity="block", goc=None, icc=None, mode="dynamic"),
                                    CachePolicy(interval=3)])
def test_spans_serve_block_granularity_with_weighted_forecasters_only(policy):
    run = RunState(policy, flow_sigmas(4).tolist(), 4)
    assert run.caches_spans == (policy.granularity == "block" and policy.forecaster != "foca")


def _block(i: int) -> Callable[[Streams, float], Streams]:
    """A block that moves each stream it returns by an amount that depends on the stream, the block and σ."""
    def run(s: Streams, sigma: float) -> Streams:
        return {k: v * (1 + 0.01 * (i + 1)) + sigma * (i + 1) * 0.1 for k, v in s.items() if k != "ctx"}
    return run


def drive(state_type: type[RunState], loop: Callable[..., Streams], blocks: int, policy: CachePolicy
          ) -> tuple[list[Streams], RunState]:
    """Sample-like rounds through a hand-written model loop; returns every round's output streams."""
    sigmas = flow_sigmas(STEPS).tolist()
    run = state_type(policy, sigmas, blocks)
    outs = []
    for sigma in sigmas[:-1]:
        call = run.call(sigma, ["cond"], torch.zeros(2, 4))
        streams = {"img": torch.ones(2, 6, 8), "txt": torch.ones(2, 3, 8), "ctx": torch.zeros(2, 2, 8)}
        out = {}
        call.model(lambda: out.update(loop(call, streams, sigma)) or torch.zeros(2, 4), 1.0, torch.zeros(2, 4))
        outs.append(out)
    return outs, run


POLICY = CachePolicy(interval=3, warmup_steps=1, forecaster="taylor", order=1, granularity="block")


def _same_outputs(loop: Callable[..., Streams], blocks: int, policy: CachePolicy = POLICY) -> RunState:
    spanned, run = drive(RunState, loop, blocks, policy)
    alone, run_alone = drive(BlockByBlock, loop, blocks, policy)
    for a, b in zip(spanned, alone):
        assert a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    assert run.stats.blocks_skipped == run_alone.stats.blocks_skipped > 0
    return run


def test_a_stream_changed_in_place_between_blocks_ends_the_span_there():
    """A ControlNet adds its residual to the hidden state in place between blocks: that step's addition must not be
    cached as part of a span, so the span learns to end before the block that follows it."""
    def loop(call, s: Streams, sigma: float) -> Streams:
        for i in range(4):
            s = {**s, **call.block(i, s, lambda i=i, s=s: _block(i)(s, sigma))}
            if i == 1:
                s["img"].add_(sigma * 3.0)  # the control residual: new at every step, computed or skipped
        return s

    run = _same_outputs(loop, 4)
    assert run.span_breaks == {2}
    assert sorted((s.first, s.last) for s in next(iter(run.groups.values())).spans_by_first.values()) == [(0, 1), (2, 3)]


def test_a_stream_a_block_drops_ends_its_span_and_is_dropped_when_skipped_too():
    """SD3's last joint block returns None for the text stream; later blocks carry the image stream alone, and every
    block reads a context stream it does not return."""
    def loop(call, s: Streams, sigma: float) -> Streams:
        for i in range(4):
            run = (lambda i=i, s=s: {**_block(i)(s, sigma), "txt": None}) if i == 1 else (
                lambda i=i, s=s: _block(i)(s, sigma))
            out = call.block(i, s, run)
            s = {**s, **out}
            if out.get("txt", 0) is None:
                s = {"img": s["img"], "ctx": s["ctx"]}
        return s

    run = _same_outputs(loop, 4)
    spans = next(iter(run.groups.values())).spans_by_first
    assert sorted((s.first, s.last, s.streams) for s in spans.values()) == [(0, 1, ("img",)), (2, 3, ("img",))]


def test_a_new_stream_between_segments_starts_a_new_span():
    """Flux: single blocks take cat(txt, img) as one longer stream, a new tensor, so the double blocks' span ends."""
    def loop(call, s: Streams, sigma: float) -> Streams:
        for i in range(2):
            s = {**s, **call.block(i, s, lambda i=i, s=s: _block(i)(s, sigma))}
        s = {"img": torch.cat([s["txt"], s["img"]], dim=1), "ctx": s["ctx"]}
        for i in range(2, 5):
            s = {**s, **call.block(i, s, lambda i=i, s=s: _block(i)(s, sigma))}
        return s

    run = _same_outputs(loop, 5)
    assert not run.span_breaks
    assert sorted((s.first, s.last) for s in next(iter(run.groups.values())).spans_by_first.values()) == [(0, 1), (2, 4)]


@pytest.mark.parametrize("inference", [False, True], ids=["no-grad", "inference-mode"])
def test_an_in_place_change_that_starts_mid_run_ends_the_span_there_too(inference):
    """A patch with a step range adds to the hidden state in place from the middle of the run on: under inference
    mode (no version counters, as ComfyUI's server samples) it must be seen as well, not cached into the span. (The
    spans formed before it end there and start again with fresh anchors: with reuse that changes nothing, with
    Taylor the first forecasts after it are of lower order than block by block's.)"""
    def loop(call, s: Streams, sigma: float) -> Streams:
        for i in range(4):
            s = {**s, **call.block(i, s, lambda i=i, s=s: _block(i)(s, sigma))}
            if i == 1 and sigma < 0.5:
                s["img"].add_(sigma * 3.0)
        return s

    fora = CachePolicy(interval=3, warmup_steps=1, granularity="block")
    with torch.inference_mode(inference):
        full, _ = drive(RunState, loop, 4, CachePolicy(interval=1, granularity="block"))
        spanned, run = drive(RunState, loop, 4, fora)
        alone, _ = drive(BlockByBlock, loop, 4, fora)

    def error(outs: list[Streams]) -> float:
        return sum((o["img"] - f["img"]).norm().item() for o, f in zip(outs, full))

    assert run.span_breaks == {2}
    # The change is seen in the call it starts in (by version counter, or under inference mode by fingerprint when
    # the call ends): the span residual that took it in is dropped before any step reads it, and its blocks are
    # computed at the next step. A residual that kept the change would add it twice at every skipped step.
    assert error(spanned) <= error(alone) * (1 + 1e-5) and error(alone) > 0


class HostWork(TorchFunctionMode):
    """Counts the tensor copies (`clone`) and the reads of device values by the host (each a sync on a GPU) made
    while it is active."""

    READS = {"equal", "allclose", "item", "tolist", "__bool__", "cpu", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.clones = self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.clones += name == "clone"
        self.reads += name in self.READS
        return func(*args, **(kwargs or {}))


def _computed_calls_under_inference_mode(blocks: int) -> tuple[list[tuple[int, int]], RunState]:
    """FORA in spans over `blocks` blocks under inference mode, a stream changed in place before block 2 from the
    middle of the run on; the (clones, host reads) of each computed call."""
    def loop(call, s: Streams, sigma: float) -> Streams:
        for i in range(blocks):
            s = {**s, **call.block(i, s, lambda i=i, s=s: _block(i)(s, sigma))}
            if i == 1 and sigma < 0.5:
                s["img"].add_(sigma * 3.0)
        return s

    sigmas = flow_sigmas(STEPS).tolist()
    counts = []
    with torch.inference_mode():
        run = RunState(CachePolicy(interval=3, warmup_steps=1, granularity="block"), sigmas, blocks)
        for sigma in sigmas[:-1]:
            call = run.call(sigma, ["cond"], torch.zeros(2, 4))
            streams = {"img": torch.ones(2, 6, 8), "txt": torch.ones(2, 3, 8), "ctx": torch.zeros(2, 2, 8)}
            with HostWork() as work:
                call.model(lambda: loop(call, streams, sigma) and torch.zeros(2, 4), 1.0, torch.zeros(2, 4))
            if not call.round.skip:
                counts.append((work.clones, work.reads))
    return counts, run


def test_under_inference_mode_a_computed_step_neither_copies_nor_waits_for_the_device_at_each_block():
    """ComfyUI samples in inference mode, where tensors have no version counters. A block's first computation copies
    its outputs and compares the copy (what an in-place change between blocks is checked with then); after it, a
    computed step copies only each span's inputs and reads the device once, whatever the number of blocks, and a
    change between blocks that starts mid-run is still seen there."""
    eight, run = _computed_calls_under_inference_mode(8)
    four, _ = _computed_calls_under_inference_mode(4)
    first, steady = eight[0], eight[1:]
    assert first[0] >= 8 and first[1] >= 7  # the first computation: a copy and a comparison per block
    assert len(steady) >= 3 and steady == four[1:]  # later ones: the same work for eight blocks as for four
    assert all(clones <= 4 and reads == 1 for clones, reads in steady)  # two streams of one or two spans; one read
    assert run.caches_spans and run.stats.blocks_skipped > 0 and run.span_breaks == {2}


@pytest.mark.parametrize("inference", [False, True], ids=["no-grad", "inference-mode"])
def test_one_element_moved_by_one_unit_in_the_last_place_mid_run_is_seen_too(inference):
    """The smallest in-place change between blocks, from the middle of the run on: one element to the next float, in
    rows that also hold an element a million times larger (a sum of the row's values would round the change away)."""
    def block(i: int, s: Streams, sigma: float) -> Streams:
        out = _block(i)(s, sigma)
        out["txt"][..., 0] = 1e6
        return out

    def loop(call, s: Streams, sigma: float) -> Streams:
        for i in range(4):
            s = {**s, **call.block(i, s, lambda i=i, s=s: block(i, s, sigma))}
            if i == 2 and sigma < 0.5:
                s["txt"][1, 2, 3] = torch.nextafter(s["txt"][1, 2, 3], torch.tensor(float("inf")))
        return s

    with torch.inference_mode(inference):
        _, run = drive(RunState, loop, 4, CachePolicy(interval=3, warmup_steps=1, granularity="block"))
    assert run.span_breaks == {3}
