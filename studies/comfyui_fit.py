"""Fit TCC Priors inside a real ComfyUI, on the tiny models of the ComfyUI tier: what a fit costs, and how its
held-out error falls with the number of seeds it is fitted on.

    COMFYUI_PATH=/path/to/ComfyUI python studies/comfyui_fit.py cost [--steps 20] [--json out.json]
    COMFYUI_PATH=/path/to/ComfyUI python studies/comfyui_fit.py seeds [--family Wan] [--json out.json]

`cost`: for every family, Fit TCC Priors at its defaults (3 seeds: 2 fitted, 1 held out) for the Cache Policy's defaults (Taylor-2,
interval 3, warm-up 1) and for FORA at interval 3, timed against one full-computation sampling of one seed (median of
3): the fit's cost in samplings. It only passes the inputs every version of the node has, so the same command
measures an older checkout of the pack (run it from that checkout).
`seeds`: FORA N=3 with drift priors fitted on 1 to 6 seeds, evaluated on 4 other seeds (100-103).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "comfyui"))

from tiny_models import FAMILIES, comfyui_nodes, load_pack, run_sampler  # noqa: E402  (importing it boots ComfyUI)

from calibrated_cache.testbed.bench import machine, provenance  # noqa: E402
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result  # noqa: E402

POLICY = dict(mode="fixed", forecaster="taylor", interval=3, warmup_steps=1, start=0.0, end=1.0, first_blocks=0,
              last_blocks=0, threshold=0.1, max_skips=3, order=2, time_unit="step", foca_lambda=1.0)
FORA = {**POLICY, "forecaster": "reuse"}
FIT = dict(seed=0, cfg=2.0, sampler_name="euler", scheduler="simple", variant="auto", checkpoint="none",
           save_to="cache_priors folder", overwrite=True)
EVALUATION_SEEDS = (100, 101, 102, 103)


def nodes():
    import folder_paths

    load_pack()
    folder_paths.folder_names_and_paths["cache_priors"] = ([tempfile.mkdtemp()], {".safetensors"})
    return tuple(comfyui_nodes().NODE_CLASS_MAPPINGS[f"CalibratedCache_{n}"] for n in ("CachePolicy", "Apply",
                                                                                     "FitTCCPriors"))


def rel_l2(x, ref) -> float:
    return float((x - ref).flatten(1).norm(dim=1).div(ref.flatten(1).norm(dim=1)).mean())


def cost(args: argparse.Namespace) -> list[dict]:
    policy_node, _, fit_node = nodes()
    rows = []
    print(f"{'family':<12} {'policy':<16} {'full_s':>7} {'fit_s':>7} {'samplings':>9}")
    for family, build in FAMILIES.items():
        model, positive, negative, latent = build()
        run_sampler(model, positive, negative, latent, steps=2, cfg=2.0)
        times = []
        for seed in range(3):
            start = time.perf_counter()
            run_sampler(model, positive, negative, latent, steps=args.steps, cfg=2.0, seed=seed)
            times.append(time.perf_counter() - start)
        full_s = statistics.median(times)
        for name, settings in (("taylor2 (default)", POLICY), ("fora", FORA)):
            policy = policy_node.execute(**settings).result[0]
            start = time.perf_counter()
            fit_node.execute(model, policy, positive, negative, {"samples": latent}, samples=args.samples,
                             steps=args.steps, **FIT)
            fit_s = time.perf_counter() - start
            rows.append({"family": family, "policy": name, "full_s": full_s, "fit_s": fit_s,
                         "samplings": fit_s / full_s})
            print(f"{family:<12} {name:<16} {full_s:>7.3f} {fit_s:>7.2f} {fit_s / full_s:>9.1f}", flush=True)
    return rows


def seeds(args: argparse.Namespace) -> list[dict]:
    policy_node, apply_node, fit_node = nodes()
    model, positive, negative, latent = FAMILIES[args.family]()
    policy = policy_node.execute(**FORA).result[0]
    cached = apply_node.execute(model, policy).result[0]
    full = {s: run_sampler(model, positive, negative, latent, steps=args.steps, cfg=2.0, seed=s) for s in EVALUATION_SEEDS}
    plain = statistics.mean(rel_l2(run_sampler(cached, positive, negative, latent, steps=args.steps, cfg=2.0, seed=s),
                                   full[s]) for s in EVALUATION_SEEDS)
    rows = []
    print(f"{args.family}, FORA N=3 + drift, {args.steps} steps; error on seeds {EVALUATION_SEEDS}")
    print(f"{'fitted on':>9} {'held-out':>9} {'own held-out seed':>17} {'no priors':>9}")
    for n in range(1, 7):
        priors = fit_node.execute(model, policy, positive, negative, {"samples": latent}, samples=n + 1,
                                  steps=args.steps, **{**FIT, "variant": "drift"}).result[0]
        calibrated = apply_node.execute(model, policy, priors=priors).result[0]
        error = statistics.mean(rel_l2(run_sampler(calibrated, positive, negative, latent, steps=args.steps, cfg=2.0,
                                                   seed=s), full[s]) for s in EVALUATION_SEEDS)
        own = priors.meta["report"]["held_out_after"]
        rows.append({"family": args.family, "seeds": n, "held_out": error, "fit_held_out": own, "no_priors": plain})
        print(f"{n:>9} {error:>9.4f} {own:>17.4f} {plain:>9.4f}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=("cost", "seeds"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--family", default="Wan", choices=list(FAMILIES))
    parser.add_argument("--samples", type=int, default=3, help="cost: the fit's samples (its default: 3)")
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    rows = cost(args) if args.study == "cost" else seeds(args)
    if tree:
        command = "COMFYUI_PATH=… python " + " ".join(sys.argv)
        write_result(args.json, {"study": args.study, "steps": args.steps, "command": command,
                                 "machine": machine("cpu"), **provenance(), "rows": rows}, tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
