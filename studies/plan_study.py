"""Searched plans against hand-set uniform policies and the dynamic policy, at target speedups 2, 3, 4 and 6 (issue 21).

For each target: `fit_testbed_speed` searches a plan, its forecaster and TCC priors on `--fit-samples` calibration
requests (noise seed 1; its own held-out report on seed 2). Every config is then scored on `--samples` evaluation
requests (noise seed 0, which no fit saw): rel_l2 against full computation, FD of the classifier features, measured
compute fraction. Uniform policies: FORA, TaylorSeer 1 and 2, FoCa, Spectrum and DMD at interval round(target)
(warm-up 0 and, with `--warmups 0 1`, 1), block (G2) and module (G3) granularity, FORA, TaylorSeer and FoCa also with
TCC priors of each variant (drift, trend, mm) fitted on the same calibration requests; "best uniform" is the lowest
rel_l2 among those whose measured fraction is at most 5% above the plan's. The dynamic policy's threshold is chosen on
the calibration requests to land nearest the target fraction. Also: the rank correlation of the search model's
predicted error with the measured one over every searched candidate.

    python studies/plan_study.py [--samples 64] [--fit-samples 32] [--json benchmarks/results/plans.json]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from calibrated_cache.calibration import CachePolicy
from calibrated_cache.calibration.speed_fit import rank_correlation
from calibrated_cache.calibration.tcc import VARIANTS
from calibrated_cache.testbed.bench import machine, provenance
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result
from calibrated_cache.testbed.evaluate import bench_inputs, score
from calibrated_cache.testbed.fit_priors import fit_testbed, fit_testbed_speed
from calibrated_cache.testbed.metrics import rel_l2
from calibrated_cache.testbed.sampling import flow_sigmas, sample
from calibrated_cache.testbed.weights import load_classifier, load_dit

TARGETS = (2, 3, 4, 6)
UNIFORM = {"fora": ("reuse", 1), "taylor1": ("taylor", 1), "taylor2": ("taylor", 2), "foca": ("foca", 1),
           "spectrum": ("spectrum", 1), "dmd": ("dmd", 1)}
THRESHOLDS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--fit-samples", type=int, default=32)
    p.add_argument("--targets", type=float, nargs="+", default=TARGETS)
    p.add_argument("--warmups", type=int, nargs="+", default=[0])
    p.add_argument("--json", type=Path)
    add_allow_dirty(p)
    args = p.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    model, meta = load_dit()
    classifier, _ = load_classifier()
    steps, cfg = int(meta["bench_steps"]), float(meta["bench_cfg"])
    sigmas = flow_sigmas(steps)
    labels, noise = bench_inputs(model, args.samples, 0)
    fit_labels, fit_noise = bench_inputs(model, args.fit_samples, 1)
    full, _ = sample(model, labels, noise, steps, cfg, sigmas=sigmas)
    fit_full, _ = sample(model, fit_labels, fit_noise, steps, cfg, sigmas=sigmas)

    def evaluate(policy: CachePolicy, priors=None) -> dict:
        out, run = sample(model, labels, noise, steps, cfg, policy=policy, sigmas=sigmas, calibrator=priors)
        return {"rel_l2": rel_l2(out, full), "fd": score(classifier, out, labels)["fd"],
                "fraction": run.stats.compute_fraction}

    rows, predicted, measured = [], [], []
    for target in args.targets:
        start = time.perf_counter()
        fitted, _ = fit_testbed_speed(model, CachePolicy(granularity="block"), target, args.fit_samples, steps, cfg)
        fit_s = time.perf_counter() - start
        kept = fitted.priors if fitted.priors.priors else None  # priors that did not help on the fit are dropped
        plan = {"config": f"searched plan {fitted.policy.tag()}", "priors_kept": kept is not None,
                **evaluate(fitted.policy), "with_tcc": evaluate(fitted.policy, kept)}
        for c in fitted.candidates:
            predicted.append(c.predicted)
            measured.append(c.error ** 2)
        interval = max(2, round(target))
        uniform = []
        for name, (forecaster, order) in UNIFORM.items():
            for granularity in ("block", "module"):
                for warmup in args.warmups:
                    policy = CachePolicy(interval=interval, warmup_steps=warmup, forecaster=forecaster, order=order,
                                         granularity=granularity)
                    row = {"config": policy.tag(), **evaluate(policy), "with_tcc": {}}
                    if forecaster in ("reuse", "taylor", "foca"):
                        for variant in VARIANTS:
                            priors, _ = fit_testbed(model, policy, args.fit_samples, steps, cfg, variant=variant,
                                                    held_out=0)
                            row["with_tcc"][variant] = evaluate(policy, priors)
                    uniform.append(row)
        limit = 1.05 * min(plan["fraction"], plan["with_tcc"]["fraction"])
        eligible = []
        for r in uniform:
            variants = [("", r)] + [(f" +TCC {variant}", v) for variant, v in r["with_tcc"].items()]
            eligible += [(r["config"] + tcc, v) for tcc, v in variants if v["fraction"] <= limit]
        best = min(eligible, key=lambda x: x[1]["rel_l2"]) if eligible else None
        dynamic = _dynamic(model, fit_labels, fit_noise, fit_full, steps, cfg, sigmas, 1 / target)
        row = {"target": target, "fit_s": fit_s, "search_s": fitted.report["plan_search_s"],
               "fit_runs": fitted.report["plan_runs"], "plan": plan, "picture": fitted.policy.plan.picture(),
               "best_uniform": {"config": best[0], **best[1]} if best else None, "uniform": uniform,
               "dynamic": {"config": dynamic.tag(), **evaluate(dynamic)}, "report": fitted.report}
        rows.append(row)
        print(_line(row), flush=True)
    result = {"command": "python studies/plan_study.py " + " ".join(sys.argv[1:]), **provenance(),
              "machine": machine("cpu"), "samples": args.samples,
              "fit_samples": args.fit_samples, "rows": rows,
              "rank_correlation": rank_correlation(predicted, measured)}
    print(f"rank correlation of predicted and measured error over {len(predicted)} searched candidates: "
          f"{result['rank_correlation']:.2f}")
    if tree:
        write_result(args.json, result, tree, indent=1)


def _dynamic(model, labels, noise, full, steps, cfg, sigmas, fraction) -> CachePolicy:
    """The dynamic policy (block granularity, FORA) whose threshold lands nearest `fraction` on calibration requests."""
    best = None
    for threshold in THRESHOLDS:
        policy = CachePolicy(mode="dynamic", threshold=threshold, max_skips=8, granularity="block")
        _, run = sample(model, labels, noise, steps, cfg, policy=policy, sigmas=sigmas)
        gap = abs(math.log(run.stats.compute_fraction / fraction))
        if best is None or gap < best[0]:
            best = (gap, policy)
    return best[1]


def _line(row: dict) -> str:
    plan, best, dyn = row["plan"], row["best_uniform"], row["dynamic"]
    uni = f"{best['config']} {best['rel_l2']:.4f} (fraction {best['fraction']:.3f})" if best else "none"
    return (f"{row['target']:g}x: plan {plan['rel_l2']:.4f} / as fitted (priors {'kept' if plan['priors_kept'] else 'dropped'}) "
            f"{plan['with_tcc']['rel_l2']:.4f} at "
            f"{plan['fraction']:.3f}; best uniform {uni}; dynamic {dyn['rel_l2']:.4f} at {dyn['fraction']:.3f}; "
            f"fit {row['fit_s']:.1f} s, search {row['search_s']:.2f} s, {row['fit_runs']} runs")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
