"""Searched plans on the ComfyUI benchmark model (the trained scenes Flux, euler 20 steps or `--steps`) against
uniform policies and ComfyUI's LazyCache at target speedups 2, 3, 4 and 6 (issue 21), through the nodes as a user
wires them.

For each target: Fit TCC Priors with `target_speedup` on the benchmark's calibration prompts and seeds (3 seeds: 2
fitted, 1 held out), then Apply Calibrated Cache with only its priors. Against it, on the evaluation prompts and seed
(disjoint from every fit): FORA, TaylorSeer 1 and 2, FoCa, Spectrum and DMD at interval round(target) with warm-up 0
and 1, FORA and Taylor-2 with TCC priors of each variant fitted by the node on the same calibration prompts, the
dynamic policy and LazyCache with thresholds tuned on the calibration prompts to the plan's measured compute fraction.
"best uniform" is the lowest rel_l2 among uniform rows whose compute fraction is at most 5% above the plan's.

    COMFYUI_PATH=… python studies/scenes_plans.py [--prompts 32] [--targets 2 3 4 6] [--steps 20] [--json benchmarks/results/scenes_plans.json]

At 20 steps no uniform interval spends as little as 1/3 or 1/6 of the compute (intervals 3 and 6 compute 7 and 4 of
the 20 steps); at 30 steps interval 3 computes 10 and interval 6 computes 5, which puts uniform policies beside the
plan at 3× and near it at 6×.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scenes.bench import (CAL_SEED, Config, Harness, Setting, format_row, quality,  # noqa: E402
                                     tune)
from comfy_extras.nodes_easycache import LazyCacheNode  # noqa: E402

from calibrated_cache.calibration.tcc import VARIANTS  # noqa: E402
from calibrated_cache.testbed.bench import machine, provenance  # noqa: E402
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result  # noqa: E402

UNIFORM = {"fora": {}, "taylor1": {"forecaster": "taylor", "order": 1}, "taylor2": {"forecaster": "taylor", "order": 2},
           "foca": {"forecaster": "foca"}, "spectrum": {"forecaster": "spectrum"}, "dmd": {"forecaster": "dmd"}}


def fit(h: Harness, setting: Setting, policy, variant: str = "auto", **extra):
    positive, negative, latent = h.cal
    return h.fit_node.execute(h.model, policy, positive, negative, latent, samples=3, seed=CAL_SEED,
                              steps=setting.steps, cfg=2.0, sampler_name=setting.sampler, scheduler="simple",
                              variant=variant, checkpoint="none", save_to="cache_priors folder", overwrite=True,
                              **extra).result[:2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--targets", type=float, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    setting = Setting("euler", args.steps)
    h = Harness(args.prompts, 16)
    result = {"command": "COMFYUI_PATH=… python studies/scenes_plans.py " + " ".join(sys.argv[1:]),
              "machine": machine("cpu"), **provenance(), "prompts": args.prompts, "targets": []}

    def log(message: str) -> None:
        print(message, flush=True)

    for target in args.targets:
        start = time.perf_counter()
        priors, text = fit(h, setting, h.policy(), target_speedup=target)
        fit_s = time.perf_counter() - start
        log(f"{target:g}x: fitted in {fit_s:.1f} s\n{text}")
        plan_model = h.apply(None, priors=priors)
        interval = max(2, round(target))
        configs = [Config("plan+tcc", {"target_speedup": target}, 1 / target, plan_model)]
        for name, extra in UNIFORM.items():
            for warmup in (0, 1):
                configs.append(Config(name, {"interval": interval, "warmup": warmup, **extra}, 1 / target,
                                      h.apply(h.policy(interval=interval, warmup_steps=warmup, **extra))))
        for name, extra in (("fora+tcc", {}), ("taylor2+tcc", UNIFORM["taylor2"])):
            for warmup in (0, 1):
                for variant in VARIANTS:
                    policy = h.policy(interval=interval, warmup_steps=warmup, **extra)
                    fitted, _ = fit(h, setting, policy, variant)
                    configs.append(Config(f"{name} {variant}", {"interval": interval, "warmup": warmup, **extra},
                                          1 / target, h.apply(policy, priors=fitted)))
        for config in configs:
            config.fraction = (lambda m=config.model: h.report(m)["compute_fraction"])
        plan_fraction = priors.meta["report"]["plan_calibration_fraction"]

        def pack_fraction(model) -> float:
            h.sample(model, setting, h.cal, CAL_SEED)
            return h.report(model)["compute_fraction"]

        full_calls = h.counted(h.model, setting, h.cal, CAL_SEED, per_prompt=True)[1]

        def lazy_fraction(threshold: float) -> float:
            model = LazyCacheNode.execute(h.model, threshold, 0.15, 0.95, False).result[0]
            return h.counted(model, setting, h.cal, CAL_SEED, per_prompt=True)[1] / full_calls

        dynamic = tune(lambda t: pack_fraction(h.apply(h.policy(mode="dynamic", threshold=t, max_skips=8))),
                       plan_fraction, 0.005, 2.0, 7)
        lazy = tune(lazy_fraction, plan_fraction, 0.005, 3.0, 7)
        model = h.apply(h.policy(mode="dynamic", threshold=dynamic, max_skips=8))
        configs.append(Config("fbcache", {"threshold": round(dynamic, 4)}, 1 / target, model,
                              lambda m=model: h.report(m)["compute_fraction"]))
        configs.append(Config("lazycache", {"reuse_threshold": round(lazy, 4)}, 1 / target,
                              LazyCacheNode.execute(h.model, lazy, 0.15, 0.95, False).result[0], per_prompt=True))
        rows = quality(h, setting, configs, log)
        plan = rows[1]
        limit = 1.05 * plan["compute_fraction"]
        uniform = [r for r in rows[2:] if r["method"] not in ("fbcache", "lazycache") and r["compute_fraction"] <= limit]
        best = min(uniform, key=lambda r: r["rel_l2"]) if uniform else None
        log(f"  plan {plan['rel_l2']:.4f} at {plan['compute_fraction']:.3f}; best uniform "
            + (format_row(best) if best else "none within 5% of its compute"))
        result["targets"].append({"target": target, "fit_s": fit_s, "fit_report": priors.meta["report"],
                                  "plan": priors.meta["policy_tag"], "rows": rows, "best_uniform": best})
    if tree:
        write_result(args.json, result, tree, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
