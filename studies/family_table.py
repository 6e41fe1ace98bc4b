"""Every family's tiny model of the ComfyUI tier (real ComfyUI classes, random weights) through the pack: exactness at
interval 1, and FORA and Taylor-2 at interval 3 after one warm-up step (20 Euler steps, cfg 2): compute fraction,
skipped blocks, rel_l2 against full computation, the wall speedup of FORA (median of paired, interleaved ratios), full
computation at FORA's share of the steps (the honest floor: its rel_l2 and wall speedup, timed in the same rounds),
and whether the family's blocks may be cached in spans. The families are those of the ComfyUI it runs on: on 0.8.0 also
the ones ComfyUI added by then (tests/comfyui/tiny_models_2026.py). The family tables of docs/families.md come from it.

    COMFYUI_PATH=… python studies/family_table.py [--repeats 3] [--json benchmarks/results/families.json]
    (ComfyUI 0.8.0: --json benchmarks/results/families_080.json)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "comfyui"))

from tiny_models import FAMILIES, load_pack, run_sampler, session_of  # noqa: E402  (boots ComfyUI)
import tiny_models_2026  # noqa: E402

import comfyui_version  # noqa: E402  (the ComfyUI checkout's, first on sys.path)
import torch  # noqa: E402
from calibrated_cache.testbed.bench import machine, provenance  # noqa: E402
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result  # noqa: E402

POLICY = dict(mode="fixed", forecaster="reuse", interval=3, warmup_steps=1, start=0.0, end=1.0, first_blocks=0,
              last_blocks=0, threshold=0.1, max_skips=3, order=2, time_unit="step", foca_lambda=1.0)
STEPS = 20
ALL_FAMILIES = {**FAMILIES, **{name: tiny_models_2026.FAMILIES[name] for name in tiny_models_2026.available()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(ALL_FAMILIES), choices=list(ALL_FAMILIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    torch.set_num_threads(1)  # as the ComfyUI tier: stable timings on a shared 2-core machine
    policy_node, apply_node = load_pack()

    def patched(model, **settings):
        return apply_node.execute(model, policy_node.execute(**{**POLICY, **settings}).result[0]).result[0]

    rows = []
    print(f"{'family':<22} {'exact':>5} {'compute':>7} {'skipped':>7} {'fora rel_l2':>11} {'taylor2 rel_l2':>14} "
          f"{'wall speedup':>22} {'spans':>5} {'fewer steps: rel_l2, speedup':>28}")
    for family in args.families:
        model, positive, negative, latent = ALL_FAMILIES[family]()

        def sample(m, steps: int = STEPS):  # one tensor: LTX-2's video and audio parts flattened and joined
            return tiny_models_2026.flat(run_sampler(m, positive, negative, latent, steps=steps, cfg=2.0))

        full = sample(model)
        exact = bool(torch.equal(sample(patched(model, interval=1)), full))
        fora, taylor = patched(model), patched(model, forecaster="taylor")
        fora_out, taylor_out = sample(fora), sample(taylor)
        report, pack_family = session_of(fora).last_report, session_of(fora).family
        fewer = max(2, round(STEPS * report["compute_fraction"]))  # full computation at FORA's cost
        fewer_out = sample(model, fewer)
        times: dict[str, list[float]] = {"full": [], "fora": [], "fewer": []}
        for _ in range(args.repeats):
            for name, m, steps in (("full", model, STEPS), ("fora", fora, STEPS), ("fewer", model, fewer)):
                start = time.perf_counter()
                sample(m, steps)
                times[name].append(time.perf_counter() - start)
        ratios = [f / c for f, c in zip(times["full"], times["fora"])]
        fewer_ratios = [f / c for f, c in zip(times["full"], times["fewer"])]
        row = {"family": family, "pack_family": report["family"], "exact_at_interval_1": exact,
               "compute_fraction": report["compute_fraction"], "blocks_skipped": report["blocks_skipped"],
               "blocks_computed": report["blocks_computed"],
               "fora_rel_l2": ((fora_out - full).norm() / full.norm()).item(),
               "taylor2_rel_l2": ((taylor_out - full).norm() / full.norm()).item(),
               "wall_speedup": statistics.median(ratios), "spread": [min(ratios), max(ratios)],
               "full_s": statistics.median(times["full"]), "spans": pack_family.chained, "fewer_steps": fewer,
               "fewer_rel_l2": ((fewer_out - full).norm() / full.norm()).item(),
               "fewer_wall_speedup": statistics.median(fewer_ratios)}
        rows.append(row)
        print(f"{family:<22} {'yes' if exact else 'NO':>5} {row['compute_fraction']:>7.3f} {row['blocks_skipped']:>7} "
              f"{row['fora_rel_l2']:>11.4f} {row['taylor2_rel_l2']:>14.4f} {row['wall_speedup']:>6.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}x) {'yes' if row['spans'] else 'no':>5} "
              f"{fewer:>3}: {row['fewer_rel_l2']:.4f}, {row['fewer_wall_speedup']:.2f}x", flush=True)
    if tree:
        command = "COMFYUI_PATH=… python " + " ".join(sys.argv)
        write_result(args.json, {"study": "families", "steps": STEPS, "command": command, "machine": machine("cpu"),
                                 "comfyui": comfyui_version.__version__, **provenance(), "rows": rows}, tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
