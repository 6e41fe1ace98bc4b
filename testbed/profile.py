"""Where a cached run's time goes, on the testbed (`python -m calibrated_cache profile`): the blocks the run computes,
the pack's own work on computed and on skipped block calls (storing, forecasting, calibrating, bookkeeping), the model's
work outside its blocks (embedders, final layer), and the sampler's (guidance, the update).

The timing wraps the model from outside, the same way for every version of the engine: each block call the runner
serves is timed whole, and inside it the block's own work (its modulation and its sites' functions: what computing it
costs); the pack's work is the difference, which includes the two elementwise operations that add each gated site to
the hidden state. The model's forward is timed whole, and the sampling run. A timer costs about 0.2 µs.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..calibration import CachePolicy
from .evaluate import bench_inputs
from .model import DiT
from .progress import Progress
from .sampling import sample
from .weights import load_dit

PARTS = ("computed blocks", "pack, computed calls", "pack, skipped calls", "outside the blocks", "sampler")


@dataclass
class Breakdown:
    """Seconds by part of one sampling run, and the block calls behind them."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    computed_calls: int = 0
    skipped_calls: int = 0
    total: float = 0.0

    def per_call_us(self, part: str, calls: int) -> float:
        return 1e6 * self.seconds[part] / calls if calls else 0.0


class Timer:
    """Wraps the testbed DiT: its forward, the runner it is given, and its blocks: a block computed by itself is timed
    whole; through a runner, its modulation (`sites(c)`) and each site's function, which is what computing it costs."""

    def __init__(self, model: DiT) -> None:
        self.model = model
        self.breakdown = Breakdown()
        self._inside = 0.0  # block time inside the current block call
        self._depth = 0  # timers nest (a block's forward calls its sites): only the outermost one counts

    @contextmanager
    def installed(self) -> Iterator["Timer"]:
        model = self.model
        for block in model.blocks:
            block.forward = self._timed(block.forward)
            block.sites = self._sites(block.sites)
        forward = model.forward
        model.forward = self._forward(forward)
        try:
            yield self
        finally:
            del model.forward
            for block in model.blocks:
                del block.forward, block.sites

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if not self._depth:
                    self._inside += time.perf_counter() - start
        return timed

    def _sites(self, sites: Callable) -> Callable:
        return self._timed(lambda c: [(name, gate, self._timed(branch)) for name, gate, branch in sites(c)])

    def _forward(self, forward: Callable) -> Callable:
        def timed(x, t, y, runner=None):
            start = time.perf_counter()
            blocks = [0.0]
            wrapped = None if runner is None else self._runner(runner, blocks)
            self._inside = 0.0
            out = forward(x, t, y, wrapped)
            if runner is None:  # full computation: every block call is the block itself
                blocks[0] = self._inside
                self.breakdown.seconds["computed blocks"] += self._inside
                self.breakdown.computed_calls += len(self.model.blocks)
            self._inside = 0.0
            self.breakdown.seconds["outside the blocks"] += time.perf_counter() - start - blocks[0]
            return out
        return timed

    def _runner(self, runner: Callable, blocks: list[float]) -> Callable:
        def timed(index, block, h, c):
            before_stats = _skipped(runner)
            self._inside = 0.0
            start = time.perf_counter()
            out = runner(index, block, h, c)
            elapsed = time.perf_counter() - start
            inside, self._inside = self._inside, 0.0
            blocks[0] += elapsed
            skipped = _skipped(runner) > before_stats
            b = self.breakdown
            b.seconds["computed blocks"] += inside
            b.seconds["pack, skipped calls" if skipped else "pack, computed calls"] += elapsed - inside
            if skipped:
                b.skipped_calls += 1
            else:
                b.computed_calls += 1
            return out
        return timed


def _skipped(runner: Any) -> int:
    """Skipped block evaluations so far in the runner's run (ModelCall.state.stats in every engine version)."""
    return runner.state.stats.blocks_skipped


def profile_run(model: DiT, policy: CachePolicy | None, samples: int, steps: int, cfg: float,
                seed: int = 0) -> Breakdown:
    labels, noise = bench_inputs(model, samples, seed)
    timer = Timer(model)
    with timer.installed(), torch.no_grad():
        start = time.perf_counter()
        sample(model, labels, noise, steps, cfg, policy=policy)
        total = time.perf_counter() - start
    b = timer.breakdown
    b.total = total
    b.seconds["sampler"] = total - sum(v for k, v in b.seconds.items() if k != "sampler")
    return b


def median_breakdown(runs: list[Breakdown]) -> Breakdown:
    """Part by part, the median over repeated runs (each run interleaved with the others' configurations)."""
    out = Breakdown(computed_calls=runs[0].computed_calls, skipped_calls=runs[0].skipped_calls)
    for part in PARTS:
        out.seconds[part] = statistics.median(r.seconds[part] for r in runs)
    out.total = statistics.median(r.total for r in runs)
    return out


def profile(policies: dict[str, CachePolicy | None], samples: int = 256, repeats: int = 3,
            steps: int | None = None) -> dict[str, Breakdown]:
    """Each configuration profiled `repeats` times, the configurations interleaved, after one warm-up run each."""
    model, meta = load_dit()
    steps, cfg = steps or int(meta["bench_steps"]), float(meta["bench_cfg"])
    progress = Progress(len(policies) * (1 + repeats), "profile")
    try:
        for name, policy in policies.items():
            profile_run(model, policy, samples, steps, cfg)
            progress.advance(1, f"warm-up {name}")
        runs: dict[str, list[Breakdown]] = {name: [] for name in policies}
        for _ in range(repeats):
            for name, policy in policies.items():
                runs[name].append(profile_run(model, policy, samples, steps, cfg))
                progress.advance(1, name)
    finally:
        progress.close()
    return {name: median_breakdown(r) for name, r in runs.items()}


def format_breakdown(results: dict[str, Breakdown]) -> str:
    lines = [f"{'config':<18} {'total_s':>8} " + " ".join(f"{p:>20}" for p in PARTS)
             + f" {'pack/skipped call':>18} {'block compute/call':>19}"]
    for name, b in results.items():
        shares = " ".join(f"{b.seconds[p]:>9.3f} s {b.seconds[p] / b.total:>6.1%}" for p in PARTS)
        per_block = b.per_call_us("computed blocks", b.computed_calls)
        per_skip = b.per_call_us("pack, skipped calls", b.skipped_calls)
        lines.append(f"{name:<18} {b.total:>8.3f} {shares} {per_skip:>15.0f} µs {per_block:>16.0f} µs")
    return "\n".join(lines)
