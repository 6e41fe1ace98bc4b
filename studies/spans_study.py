"""Spans against block-by-block caching on the testbed: the measurement behind `calibration/spans.py`.

Block granularity (whole-block residuals, ComfyUI's) with FORA and Taylor-2 at intervals 2, 3, 4 and 6, cached in
spans (the engine's default there) and block by block (the engine before spans, kept as a RunState subclass here), and
module granularity (adaLN sites) for reference. For each: the paired, interleaved wall speedup against full
computation (median of `--repeats` ratios, with their range) and its share of the ideal speedup, the rel_l2 between
spans and block by block, the peak cache; and the profile breakdown (testbed/profile.py) of both at interval 4.

    python studies/spans_study.py [--samples 256] [--repeats 5] [--json benchmarks/results/spans.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from calibrated_cache.calibration import CachePolicy, RunState
from calibrated_cache.testbed import sampling
from calibrated_cache.testbed.bench import machine, provenance
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result
from calibrated_cache.testbed.evaluate import bench_inputs
from calibrated_cache.testbed.metrics import rel_l2
from calibrated_cache.testbed.profile import PARTS, format_breakdown, median_breakdown, profile_run
from calibrated_cache.testbed.weights import load_dit

INTERVALS = (2, 3, 4, 6)
FORECASTERS = {"fora": {"forecaster": "reuse"}, "taylor2": {"forecaster": "taylor", "order": 2}}


class BlockByBlock(RunState):
    """Every block caches its own residual: the engine's block path before spans."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.caches_spans = False


def run(model, labels, noise, steps, cfg, policy, state_type=RunState):
    sampling.RunState = state_type
    try:
        return sampling.sample(model, labels, noise, steps, cfg, policy=policy)
    finally:
        sampling.RunState = RunState


def configs() -> dict[str, tuple[CachePolicy, type]]:
    out: dict[str, tuple[CachePolicy, type]] = {}
    for n in INTERVALS:
        for name, extra in FORECASTERS.items():
            block = CachePolicy(interval=n, warmup_steps=0, granularity="block", **extra)
            out[f"{name} N={n} spans"] = (block, RunState)
            out[f"{name} N={n} block-by-block"] = (block, BlockByBlock)
            out[f"{name} N={n} module"] = (CachePolicy(interval=n, warmup_steps=0, **extra), RunState)
    return out


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    model, meta = load_dit()
    steps, cfg = int(meta["bench_steps"]), float(meta["bench_cfg"])
    labels, noise = bench_inputs(model, args.samples)
    table = configs()
    outputs, states = {}, {}
    for name, (policy, state_type) in table.items():  # warm-up, and the outputs compared
        outputs[name], states[name] = run(model, labels, noise, steps, cfg, policy, state_type)
    run(model, labels, noise, steps, cfg, None)
    times: dict[str, list[float]] = {name: [] for name in ["full", *table]}
    for _ in range(args.repeats):
        for name in times:
            policy, state_type = table.get(name, (None, RunState))
            start = time.perf_counter()
            run(model, labels, noise, steps, cfg, policy, state_type)
            times[name].append(time.perf_counter() - start)
    rows = []
    print(f"testbed, {args.samples} samples (+CFG), {steps} steps; median of {args.repeats} paired, interleaved ratios")
    print(f"{'config':<28} {'compute':>7} {'ideal':>6} {'wall speedup':>21} {'share':>6} {'cache MiB':>9} "
          f"{'rel_l2 vs block-by-block':>24}")
    for name, (policy, _) in table.items():
        ratios = [f / c for f, c in zip(times["full"], times[name])]
        stats = states[name].stats
        speedup = statistics.median(ratios)
        twin = name.replace("spans", "block-by-block")
        row = {"config": name, "compute_fraction": stats.compute_fraction, "ideal": 1 / stats.compute_fraction,
               "wall_speedup": speedup, "spread": [min(ratios), max(ratios)],
               "share_of_ideal": speedup * stats.compute_fraction, "peak_cache_bytes": stats.peak_cache_bytes,
               "rel_l2_vs_block_by_block": rel_l2(outputs[name], outputs[twin]) if twin != name else None}
        rows.append(row)
        diff = "" if row["rel_l2_vs_block_by_block"] is None else f"{row['rel_l2_vs_block_by_block']:.1e}"
        print(f"{name:<28} {row['compute_fraction']:>7.3f} {row['ideal']:>6.2f} {speedup:>6.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}x) {row['share_of_ideal']:>6.2f} "
              f"{row['peak_cache_bytes'] / 2**20:>9.1f} {diff:>24}")
    profiled = {"full": (None, RunState), **{k: v for k, v in table.items() if "N=4" in k}}
    breakdowns: dict[str, list] = {name: [] for name in profiled}
    for _ in range(3):
        for name, (policy, state_type) in profiled.items():
            sampling.RunState = state_type
            try:
                breakdowns[name].append(profile_run(model, policy, args.samples, steps, cfg))
            finally:
                sampling.RunState = RunState
    medians = {name: median_breakdown(b) for name, b in breakdowns.items()}
    print("\nwhere the time goes, interval 4 (medians of 3 interleaved runs)")
    print(format_breakdown(medians))
    if tree:
        report = {"study": "spans", "command": "python studies/spans_study.py " + " ".join(sys.argv[1:]),
                  **provenance(), "machine": machine("cpu"),
                  "samples": args.samples, "steps": steps, "repeats": args.repeats, "rows": rows,
                  "profile": {name: {"total_s": b.total, "seconds": {p: b.seconds[p] for p in PARTS},
                                     "computed_calls": b.computed_calls, "skipped_calls": b.skipped_calls}
                              for name, b in medians.items()}}
        write_result(args.json, report, tree, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
