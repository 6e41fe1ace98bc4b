"""Variants of a plan's forecaster measured for issue 21 and not kept (docs/methods.md, "Searched plans"):
least-squares forecaster weights, and TCC priors of every variant on TaylorSeer plans.

Least-squares weights: the weights of the last 1–3 anchors at every filled-in step, fitted by least squares on the
Grams a recording run keeps (`calibration/trajectories.py`) over the calibration requests (noise seed 1), shared by all
blocks (so spans still hold). TCC: priors of each variant (drift, trend, mm) fitted on the same calibration requests.
Everything is scored on the evaluation requests (seed 0): rel_l2 against full computation. The plans are the searched
4× and 6× plans of `benchmarks/results/plans.json` and uniform intervals 3, 4 and 6.

    python studies/plan_variants.py [--samples 64] [--fit-samples 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from calibrated_cache.calibration import CachePolicy, registry
from calibrated_cache.calibration.forecast import WeightedForecaster
from calibrated_cache.calibration.plan import BlockPlan
from calibrated_cache.calibration.speed_fit import plan_policy, uniform_row
from calibrated_cache.calibration.trajectories import TrajectoryRecorder
from calibrated_cache.testbed.bench import machine, provenance
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result
from calibrated_cache.testbed.evaluate import bench_inputs
from calibrated_cache.testbed.fit_priors import fit_testbed
from calibrated_cache.testbed.metrics import rel_l2
from calibrated_cache.testbed.sampling import flow_sigmas, sample
from calibrated_cache.testbed.weights import load_dit

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "plans.json"


class FittedWeights(WeightedForecaster):
    """Weights looked up by (anchor steps, step) in a table fitted for one plan."""

    history = 3

    def __init__(self, table: dict[tuple[tuple[int, ...], int], list[float]], keep: int) -> None:
        super().__init__(keep)
        self.table = table

    def weights(self, times: list[float], t: float) -> list[float]:
        return self.table[(tuple(round(a) for a in times), round(t))]


def fit_table(gram: np.ndarray, row: str, used: int) -> dict[tuple[tuple[int, ...], int], list[float]]:
    """Per filled-in step of `row`, the least-squares weights of its newest `used` anchors, keyed as the run asks."""
    computed = [s for s, c in enumerate(row) if c == "1"]
    table = {}
    for s, c in enumerate(row):
        if c == "1":
            continue
        kept = [a for a in computed if a < s][-FittedWeights.history:]
        anchors = kept[-used:]
        w = np.linalg.solve(gram[np.ix_(anchors, anchors)], gram[anchors, s])
        table[(tuple(kept), s)] = [0.0] * (len(kept) - len(anchors)) + [float(x) for x in w]
    return table


@contextmanager
def fitted_forecaster(table):
    """The study's forecaster in place of TaylorSeer's while a run builds its forecasters (the pack has no such
    method: this is a measurement of one)."""
    original = registry.BUILDERS["taylor"]
    registry.BUILDERS["taylor"] = lambda policy, keep, span: FittedWeights(table, keep)
    try:
        yield
    finally:
        registry.BUILDERS["taylor"] = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--fit-samples", type=int, default=32)
    p.add_argument("--json", type=Path)
    add_allow_dirty(p)
    args = p.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    model, meta = load_dit()
    steps, cfg = int(meta["bench_steps"]), float(meta["bench_cfg"])
    sigmas = flow_sigmas(steps)
    blocks = len(model.blocks)
    labels, noise = bench_inputs(model, args.samples, 0)
    fit_labels, fit_noise = bench_inputs(model, args.fit_samples, 1)
    full, _ = sample(model, labels, noise, steps, cfg, sigmas=sigmas)
    base = CachePolicy(granularity="block")
    recorder = TrajectoryRecorder(steps)
    once = BlockPlan(tuple(sigmas.tolist()), ("1" + "0" * (steps - 1),) * blocks)
    sample(model, fit_labels, fit_noise, steps, cfg, policy=plan_policy(base, once), sigmas=sigmas, calibrator=recorder)
    grams = recorder.grams()
    gram = sum((g / g.trace() for g in grams.values())).numpy()  # blocks weighed alike

    plans = {f"searched {row['target']:g}x": row["picture"].splitlines()[-1].split()[-1]
             for row in json.loads(RESULTS.read_text())["rows"] if row["target"] in (4, 6)}
    plans = {name: pic.replace("#", "1").replace(".", "0") for name, pic in plans.items()}
    plans.update({f"interval {n}": uniform_row(steps, n) for n in (3, 4, 6)})
    rows = []
    for name, row in plans.items():
        plan = BlockPlan(tuple(sigmas.tolist()), (row,) * blocks)
        result = {"plan": name, "row": row}
        for label, forecaster, order in (("fora", "reuse", 1), ("taylor1", "taylor", 1), ("taylor2", "taylor", 2)):
            out, _ = sample(model, labels, noise, steps, cfg, policy=plan_policy(base, plan, forecaster, order),
                            sigmas=sigmas)
            result[label] = rel_l2(out, full)
        for used in (1, 2, 3):
            with fitted_forecaster(fit_table(gram, row, used)):
                out, _ = sample(model, labels, noise, steps, cfg, policy=plan_policy(base, plan, "taylor", 2),
                                sigmas=sigmas)
            result[f"fitted, {used} anchors"] = rel_l2(out, full)
        for label, order in (("taylor1", 1), ("taylor2", 2)):
            policy = plan_policy(base, plan, "taylor", order)
            for variant in ("drift", "trend", "mm"):
                priors, _ = fit_testbed(model, policy, args.fit_samples, steps, cfg, variant=variant, held_out=0)
                out, _ = sample(model, labels, noise, steps, cfg, policy=policy, sigmas=sigmas, calibrator=priors)
                result[f"{label}+{variant}"] = rel_l2(out, full)
        rows.append(result)
    columns = [k for k in rows[0] if k not in ("plan", "row")]
    print("| plan | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for r in rows:
        print(f"| {r['plan']} | " + " | ".join(f"{r[c]:.4f}" for c in columns) + " |")
    if tree:
        write_result(args.json, {"command": "python studies/plan_variants.py " + " ".join(sys.argv[1:]),
                                 **provenance(), "machine": machine("cpu"), "rows": rows}, tree, indent=1)


if __name__ == "__main__":
    main()
