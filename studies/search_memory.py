"""The plan search's memory and time at Flux's size (issue 31): 57 blocks, 20/50/100 steps, FORA and Taylor-2.

Each setting runs `search` once, in a fresh Python process of its own, on synthetic Grams (a random walk per block,
so every step differs) with Δσ² weights, a 4× target and the squares aggregate. The process's peak resident memory
is read from the OS (`resource.getrusage`) before and after the search: the difference is what the search added
above everything loaded before it. The table also gives the search's own count of its tables' bytes
(`Searched.nbytes`, what a fit reports as `plan_search_bytes`), the bound it is refused against (`check_size`), and
what the dense table of before, one float64 table over (steps + 1)^history states per block, would take (by
arithmetic, not run: 44 GiB at 100 steps). The seconds are one run on whatever machine this is; they show the order
of the cost, not a benchmark.

    python studies/search_memory.py [--steps 20 50 100] [--json benchmarks/results/search_memory.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from calibrated_cache.calibration.reuse import ReuseForecaster
from calibrated_cache.calibration.search import Costs, check_size, search, step_weights
from calibrated_cache.calibration.taylor import TaylorForecaster
from calibrated_cache.testbed.bench import machine, provenance
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result

BLOCKS = 57  # Flux: 19 double-stream and 38 single-stream blocks
TARGET = 0.25
FORECASTERS = {"fora": 1, "taylor2": 3}  # the anchors each reads


def measure(steps: int, forecaster: str) -> dict:
    """One search in this process: its seconds, its tables' bytes, and how much it raised the peak RSS."""
    history = FORECASTERS[forecaster]
    method = ReuseForecaster() if forecaster == "fora" else TaylorForecaster(2)
    sigmas = torch.linspace(1, 0, steps + 1).tolist()
    grams = []
    for b in range(BLOCKS):
        x = torch.randn(steps, 64, generator=torch.Generator().manual_seed(b), dtype=torch.float64).cumsum(0)
        grams.append(x @ x.T)
    weights = [step_weights(sigmas)] * BLOCKS
    costs = Costs((1.0,) * BLOCKS, (0.01,) * BLOCKS, 0.5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    found = search(grams, weights, sigmas, costs, TARGET, method, history)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"steps": steps, "forecaster": forecaster, "history": history, "blocks": BLOCKS,
            "seconds": found.seconds, "tables_bytes": found.nbytes, "bound_bytes": check_size(steps, history),
            "rss_added_bytes": after - before, "rss_peak_bytes": after, "fraction": found.fraction,
            "dense_bytes": BLOCKS * (steps + 1) ** history * steps * 8}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}" if n < 2**30 else f"{n / 2**30:,.1f} Gi"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50, 100])
    p.add_argument("--forecasters", nargs="+", default=list(FORECASTERS), choices=list(FORECASTERS))
    p.add_argument("--json", type=Path)
    p.add_argument("--one", nargs=2, metavar=("STEPS", "FORECASTER"), help=argparse.SUPPRESS)  # the child process
    add_allow_dirty(p)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1])))
        return
    tree = committed(args.allow_dirty) if args.json else None
    rows = []
    print(f"plan search, {BLOCKS} blocks, target {TARGET} (4x); MiB unless Gi")
    print("| steps | forecaster | seconds | tables | bound | peak RSS added | dense before (arithmetic) |")
    print("|---|---|---|---|---|---|---|")
    for steps in args.steps:
        for forecaster in args.forecasters:
            child = subprocess.run([sys.executable, __file__, "--one", str(steps), forecaster], capture_output=True,
                                   text=True)
            if child.returncode:
                raise SystemExit(f"error: the search at {steps} steps with {forecaster} failed:\n{child.stderr}")
            row = json.loads(child.stdout.splitlines()[-1])
            rows.append(row)
            print(f"| {steps} | {forecaster} | {row['seconds']:.2f} | {mib(row['tables_bytes'])} | "
                  f"{mib(row['bound_bytes'])} | {mib(row['rss_added_bytes'])} | {mib(row['dense_bytes'])} |",
                  flush=True)
    if tree:
        write_result(args.json, {"study": "search_memory", "blocks": BLOCKS, "target": TARGET, "rows": rows,
                                 "machine": machine("cpu"), **provenance()}, tree)
        print(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()
