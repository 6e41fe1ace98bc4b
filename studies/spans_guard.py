"""What a computed step costs with spans under inference mode, as ComfyUI samples: the measurement behind the in-place
guard of `calibration/spans.py` (issue 31, item 7).

On the compute-bound stack of the speed benchmark (`testbed/bench.py`, `speed_stack`), full computation and FORA at
interval 3 with block granularity (cached in spans) run under `torch.inference_mode`, interleaved, `--repeats`
rounds after one warm-up each. Every model call of full computation is timed, and every call of the spans run whose
round computes, but each run's first (a block's first computation in a run is checked with copies, in every engine
version); a round's figure is the ratio of their medians (spans' computed call / full call), paired within the round,
and the table gives the median of those ratios with their range. What the ratio has over 1 is what the pack
adds to a computed step: the copy of each span's inputs, the stored residuals, the guard against in-place changes,
the bookkeeping.

    python studies/spans_guard.py [--repeats 5] [--device cpu|cuda] [--flux] [--json out.json]

The "before" figure: the same measurement against the commit before the guard's change (e48fd4f), whose
`testbed/bench.py` has no `speed_stack`, so the stack is built there as its speed section builds it (same config,
seed and initialisation).

`--flux` times a Flux-sized stack (GPU only); `--quick` a small stack, to try the script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from calibrated_cache.calibration import CachePolicy
from calibrated_cache.testbed.bench import machine, provenance, speed_stack
from calibrated_cache.testbed.model import DiT
from calibrated_cache.testbed.sampling import sample

POLICY = CachePolicy(interval=3, warmup_steps=0, granularity="block")
CFG = 4.0  # the speed benchmark's, on this stack


def computed_calls(model: DiT, labels: torch.Tensor, noise: torch.Tensor, steps: int, policy: CachePolicy | None,
                   device: str) -> list[float]:
    """Seconds of each model call whose round computes (every call of full computation) but the first, in one run
    sampled under inference mode; on a GPU each call is timed from an idle device to an idle device."""
    times: list[float] = []
    forward = model.forward

    def timed(x, t, y, runner=None):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = forward(x, t, y, runner)
        if device != "cpu":
            torch.cuda.synchronize()
        if runner is None or not runner.round.skip:
            times.append(time.perf_counter() - start)
        return out

    model.forward = timed
    try:
        with torch.inference_mode():
            sample(model, labels, noise, steps, CFG, policy=policy)
    finally:
        del model.forward
    return times[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--flux", action="store_true", help="a Flux-sized stack (GPU only)")
    parser.add_argument("--quick", action="store_true", help="a small stack, to try the script")
    parser.add_argument("--json", help="also write the report here (a committed tree, or --allow-dirty)")
    parser.add_argument("--allow-dirty", action="store_true", help="with --json: record the uncommitted diff")
    args = parser.parse_args()
    if args.flux and args.device == "cpu":
        raise SystemExit("--flux needs a GPU (--device cuda)")
    tree = None
    if args.json:  # imported here: older trees, which this script also measures, have no results module
        from calibrated_cache.testbed.results import committed
        tree = committed(args.allow_dirty)
    model, labels, noise, steps = speed_stack(args.quick, args.flux, args.device)
    configs = {"full": None, "spans": POLICY}
    for policy in configs.values():  # warm-up
        computed_calls(model, labels, noise, steps, policy, args.device)
    medians: dict[str, list[float]] = {name: [] for name in configs}
    calls: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, policy in configs.items():
            times = computed_calls(model, labels, noise, steps, policy, args.device)
            medians[name].append(statistics.median(times))
            calls[name] = len(times)
    ratios = [s / f for s, f in zip(medians["spans"], medians["full"])]
    rows = [{"config": name, "policy": None if policy is None else policy.tag(), "computed_calls_per_run": calls[name],
             "median_call_s": statistics.median(medians[name]), "round_medians_s": medians[name]}
            for name, policy in configs.items()]
    config = model.config
    print(f"stack width {config.width}, depth {config.depth}, {config.tokens} tokens, batch {labels.shape[0]} with "
          f"CFG, {steps} steps, {args.device}, inference mode; {args.repeats} interleaved rounds")
    print(f"{'config':<8} {'calls/run':>9} {'median computed call':>21}")
    for row in rows:
        print(f"{row['config']:<8} {row['computed_calls_per_run']:>9} {1e3 * row['median_call_s']:>18.2f} ms")
    print(f"spans' computed call / full call: {statistics.median(ratios):.4f} "
          f"({min(ratios):.4f}-{max(ratios):.4f}), paired by round")
    if tree is not None:
        from calibrated_cache.testbed.results import write_result
        report = {"study": "spans_guard", "command": "python studies/spans_guard.py " + " ".join(sys.argv[1:]),
                  **provenance(), "machine": machine(args.device), "steps": steps, "cfg": CFG,
                  "stack": {**config.to_dict(), "batch": labels.shape[0], "tokens": config.tokens},
                  "repeats": args.repeats, "rows": rows, "ratio_median": statistics.median(ratios),
                  "ratio_spread": [min(ratios), max(ratios)]}
        write_result(args.json, report, tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
