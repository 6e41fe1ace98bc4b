"""Wall-clock targets in a real ComfyUI, issue 33: Fit TCC Priors with `target_speedup` S, timed on this machine,
against the best uniform block-level and whole-step policies and full computation with fewer steps, all at the same
measured wall time. Two models (`--model`): the trained scenes Flux of the ComfyUI benchmark (rel_l2, adherence, FD),
and the small SD3-class model the issue was measured on (3 joint blocks, an 8×8 latent, batch 10, random weights:
rel_l2 only; its calibration and evaluation conditionings and seeds differ).

For each target, the fit runs on the benchmark's calibration prompts and seeds (3 seeds: 2 fitted, 1 held out) and
Apply Calibrated Cache samples with its file alone. On the evaluation prompts and seed (disjoint from every fit), once
per step count: FORA and Taylor-2 block by block and Taylor-2 whole-step, each at intervals 2-8 with one warm-up step,
and full computation at every step count below `--steps`. Speed: every config against full computation, interleaved,
the median of `--repeats` paired ratios. Quality against full computation at `--steps`: rel_l2, adherence, FD.

For each target the table gives the fit's measured speedup and its ratio to S, its error, and beside it the lowest
rel_l2 among uniform block policies, among whole-step policies and among fewer-step runs whose measured speedup is
at least the fit's (`EQUAL`: within 3% below it counts as the same time).

    COMFYUI_PATH=… python studies/wall_targets.py [--model flux|sd3] [--steps 20] [--targets 2 3 4 6] [--prompts 32]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks.scenes.bench import CAL_SEED, EVAL_SEED, Harness, Setting  # noqa: E402
from benchmarks.scenes.evaluator import adherence, frechet, read  # noqa: E402
from comfyui_speed import SMALL_SD3  # noqa: E402  (registers the small SD3 among the tiny models)
from tiny_models import FAMILIES, comfyui_nodes, load_pack, make_inputs  # noqa: E402

import comfy.utils  # noqa: E402
import torch  # noqa: E402

from calibrated_cache.testbed.bench import machine, provenance  # noqa: E402
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result  # noqa: E402

INTERVALS = range(2, 9)
EQUAL = 0.97  # a config at least this share of the fit's measured speedup counts as the same wall time
KINDS = {"fora": {}, "taylor2": {"forecaster": "taylor", "order": 2},
         "taylor2-step": {"forecaster": "taylor", "order": 2, "granularity": "step"}}


class SmallSD3(Harness):
    """The small SD3-class model in the scenes harness (its nodes, policies and reports); no image reader (quality is
    rel_l2 alone)."""

    reader = None

    def __init__(self) -> None:
        import folder_paths

        load_pack()
        comfy.utils.PROGRESS_BAR_ENABLED = False
        folder_paths.folder_names_and_paths["cache_priors"] = ([tempfile.mkdtemp(prefix="sd3_priors_")],
                                                               {".safetensors"})
        self.nodes = comfyui_nodes()
        mapping = self.nodes.NODE_CLASS_MAPPINGS
        self.policy_node, self.apply_node = mapping["CalibratedCache_CachePolicy"], mapping["CalibratedCache_Apply"]
        self.fit_node = mapping["CalibratedCache_FitTCCPriors"]
        self.model, positive, negative, latent = FAMILIES[SMALL_SD3]()
        self.eval = positive, negative, {"samples": latent}
        positive, negative, latent = make_inputs(SMALL_SD3, seed=1)  # another conditioning for the fits
        self.cal = positive, negative, {"samples": latent}

    def sample(self, model, setting: Setting, inputs, seed: int) -> torch.Tensor:
        positive, negative, latent = inputs
        return self.nodes.KSampler().sample(model, seed, setting.steps, 2.0, setting.sampler, "simple", positive,
                                            negative, latent)[0]["samples"]


def timed(h: Harness, setting: Setting, models: dict[str, tuple[Any, int]], repeats: int) -> dict[str, list[float]]:
    """Paired, interleaved: each repeat samples full computation and then every config once; the ratios per config."""
    ratios: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        start = time.perf_counter()
        h.sample(h.model, setting, h.eval, EVAL_SEED)
        full = time.perf_counter() - start
        for name, (model, steps) in models.items():
            start = time.perf_counter()
            h.sample(model, Setting(setting.sampler, steps), h.eval, EVAL_SEED)
            ratios[name].append(full / (time.perf_counter() - start))
    return ratios


def scored(h: Harness, x, full, params: dict[str, Any], ratios: list[float], fraction: float) -> dict[str, Any]:
    rel = float(((x - full).flatten(1).norm(dim=1) / full.flatten(1).norm(dim=1)).mean())
    images = {} if h.reader is None else {"adherence": adherence(h.reader, x, h.eval_specs),
                                          "fd": frechet(read(h.reader, x)[2], h.real_mean, h.real_cov)}
    return {**params, "rel_l2": rel, "compute_fraction": fraction, **images,
            "wall_speedup": statistics.median(ratios), "spread": [min(ratios), max(ratios)]}


def best_at(rows: list[dict[str, Any]], speedup: float) -> dict[str, Any] | None:
    """The lowest rel_l2 among rows at least as fast as `speedup` (within EQUAL)."""
    fast = [r for r in rows if r["wall_speedup"] >= EQUAL * speedup]
    return min(fast, key=lambda r: r["rel_l2"]) if fast else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("flux", "sd3"), default="flux")
    parser.add_argument("--prompts", type=int, default=32, help="scenes Flux: evaluation prompts")
    parser.add_argument("--targets", type=float, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    setting = Setting("euler", args.steps)
    h = Harness(args.prompts, 16) if args.model == "flux" else SmallSD3()
    full = h.sample(h.model, setting, h.eval, EVAL_SEED)
    log = lambda message: print(message, flush=True)  # noqa: E731

    uniform = {f"{kind} N{n}": (h.apply(h.policy(interval=n, warmup_steps=1, **extra)), args.steps)
               for kind, extra in KINDS.items() for n in INTERVALS}
    # fewer steps down from about half the steps: the targets start at 2x
    fewer = {f"full {k} steps": (h.model, k) for k in range(2, args.steps if args.steps <= 30 else args.steps // 2 + 3)}
    ratios = timed(h, setting, {**uniform, **fewer}, args.repeats)
    baseline: dict[str, list[dict[str, Any]]] = {"block": [], "whole-step": [], "fewer steps": []}
    for name, (model, steps) in {**uniform, **fewer}.items():
        x = h.sample(model, Setting(setting.sampler, steps), h.eval, EVAL_SEED)
        kind, _, n = name.partition(" ")
        if model is h.model:
            row = scored(h, x, full, {"config": name, "steps": steps}, ratios[name], steps / args.steps)
            baseline["fewer steps"].append(row)
        else:
            row = scored(h, x, full, {"config": name, "interval": int(n[1:])}, ratios[name],
                         h.report(model)["compute_fraction"])
            baseline["whole-step" if kind.endswith("-step") else "block"].append(row)
        log(f"{name:<18} {row['wall_speedup']:.2f}x  rel_l2 {row['rel_l2']:.4f}  fraction {row['compute_fraction']:.3f}")

    result: dict[str, Any] = {"command": "COMFYUI_PATH=… python studies/wall_targets.py " + " ".join(sys.argv[1:]),
                              "machine": machine("cpu"), **provenance(), "model": args.model,
                              "prompts": args.prompts if args.model == "flux" else None, "steps": args.steps,
                              "baseline": baseline, "targets": []}
    for target in args.targets:
        positive, negative, latent = h.cal
        start = time.perf_counter()
        priors, text = h.fit_node.execute(h.model, h.policy(), positive, negative, latent, samples=3, seed=CAL_SEED,
                                          steps=args.steps, cfg=2.0, sampler_name=setting.sampler,
                                          scheduler="simple", variant="auto", checkpoint="none",
                                          save_to="cache_priors folder", overwrite=True,
                                          target_speedup=target).result[:2]
        fit_s = time.perf_counter() - start
        log(f"{target:g}x: fitted in {fit_s:.1f} s\n{text}")
        model = h.apply(None, priors=priors)
        plan_ratios = timed(h, setting, {"fit": (model, args.steps)}, args.repeats)["fit"]
        x = h.sample(model, setting, h.eval, EVAL_SEED)
        report = priors.meta["report"]
        mix = {k: report.get(k) for k in ("plan_steps_computed", "plan_steps_blocks_filled",
                                          "plan_steps_forecast_whole")}
        row = scored(h, x, full, {"config": priors.meta["policy_tag"],
                                  "granularity": priors.meta["policy"]["granularity"], **mix}, plan_ratios,
                     h.report(model)["compute_fraction"])
        entry = {"target": target, "fit_s": fit_s, "fit_report": report, "fit": row,
                 "ratio_to_target": row["wall_speedup"] / target,
                 **{f"best {kind}": best_at(rows, row["wall_speedup"]) for kind, rows in baseline.items()}}
        result["targets"].append(entry)
        log(f"  fit {row['wall_speedup']:.2f}x ({entry['ratio_to_target']:.2f} of {target:g}x) rel_l2 "
            f"{row['rel_l2']:.4f}; " + "; ".join(
                f"{kind} {best['config']} {best['wall_speedup']:.2f}x {best['rel_l2']:.4f}" if best else f"{kind} none"
                for kind in baseline for best in [entry[f"best {kind}"]]))
    if tree:
        write_result(args.json, result, tree, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
