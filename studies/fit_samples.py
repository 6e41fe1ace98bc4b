"""How many calibration requests a TCC fit needs: held-out error against the number of requests fitted on, on the
testbed (each request one 8×8 digit, 16 tokens), with the fit's in-sample error beside it.

    python studies/fit_samples.py [--counts 1 2 4 8 16 32 64 128] [--held-out 256] [--json out.json]

Priors are fitted on the first n calibration requests (noise seed 1) and evaluated on held-out benchmark requests
(noise seed 0); FORA N=3 with drift priors (the node's reuse default) and Taylor-2 N=3 with mm priors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from calibrated_cache.calibration import CachePolicy
from calibrated_cache.testbed.bench import machine, provenance
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result
from calibrated_cache.testbed.evaluate import bench_inputs
from calibrated_cache.testbed.fit_priors import fit_testbed
from calibrated_cache.testbed.metrics import rel_l2
from calibrated_cache.testbed.sampling import sample
from calibrated_cache.testbed.weights import load_dit

POLICIES = {"fora N=3 + drift": CachePolicy(interval=3, warmup_steps=0),
            "taylor2 N=3 + mm": CachePolicy(interval=3, warmup_steps=0, forecaster="taylor", order=2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    model, meta = load_dit()
    steps, cfg = int(meta["bench_steps"]), float(meta["bench_cfg"])
    labels, noise = bench_inputs(model, args.held_out, 0)
    full, _ = sample(model, labels, noise, steps, cfg)
    rows = []
    print(f"{'policy':<18} {'fitted on':>9} {'held-out':>9} {'in-sample':>9} {'no priors':>9} {'fit_s':>6}")
    for name, policy in POLICIES.items():
        plain = rel_l2(sample(model, labels, noise, steps, cfg, policy=policy)[0], full)
        for n in args.counts:
            start = time.perf_counter()
            priors, fit_meta = fit_testbed(model, policy, n, steps, cfg, held_out=0, verify=True)
            fit_s = time.perf_counter() - start
            held_out = rel_l2(sample(model, labels, noise, steps, cfg, policy=policy, calibrator=priors)[0], full)
            row = {"policy": name, "samples": n, "held_out": held_out, "in_sample": fit_meta["report"]["in_sample_after"],
                   "in_sample_before": fit_meta["report"]["in_sample_before"], "no_priors": plain, "fit_s": fit_s}
            rows.append(row)
            print(f"{name:<18} {n:>9} {held_out:>9.4f} {row['in_sample']:>9.4f} {plain:>9.4f} {fit_s:>6.1f}",
                  flush=True)
    if tree:
        write_result(args.json, {"steps": steps, "cfg": cfg, "held_out": args.held_out,
                                 "command": "python " + " ".join(sys.argv), "machine": machine("cpu"), **provenance(),
                                 "rows": rows}, tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
