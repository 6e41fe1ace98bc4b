"""Per-family compute fraction and CPU wall speedup of the pack inside a real ComfyUI, on the tiny test models.

    COMFYUI_PATH=/path/to/ComfyUI python tests/comfyui/speed_report.py [--steps 20] [--json out.json]

Each family runs full computation and FORA N=3 (no warm-up) through `comfy.sample`, each twice, best time kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import FAMILIES, load_pack, run_sampler  # noqa: E402  (importing it boots ComfyUI in CPU mode)

from calibrated_cache.testbed.bench import timed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    policy_node, apply_node = load_pack()
    settings = dict(mode="fixed", forecaster="reuse", interval=args.interval, warmup_steps=0, start=0.0, end=1.0,
                    first_blocks=0, last_blocks=0, threshold=0.1, max_skips=3, order=2, time_unit="step",
                    foca_lambda=1.0)
    rows = []
    print(f"{'family':<12} {'compute':>8} {'ideal':>7} {'full_s':>7} {'cached_s':>8} {'speedup':>8} {'rel_diff':>8}")
    for name, build in FAMILIES.items():
        model, positive, negative, latent = build()
        policy = policy_node.execute(**settings).result[0]
        cached_model = apply_node.execute(model, policy).result[0]

        def sample(m):
            return lambda: run_sampler(m, positive, negative, latent, steps=args.steps, cfg=2.0)

        run_sampler(model, positive, negative, latent, steps=2, cfg=2.0)
        full, full_s = timed(sample(model), 2)
        cached, cached_s = timed(sample(cached_model), 2)
        report = cached_model.wrappers["outer_sample"]["calibrated_cache"][0].__self__.last_report
        row = {"family": name, "compute_fraction": report["compute_fraction"], "full_s": full_s,
               "cached_s": cached_s, "wall_speedup": full_s / cached_s,
               "ideal_speedup": 1 / report["compute_fraction"],
               "rel_diff": ((cached - full).norm() / full.norm()).item()}
        rows.append(row)
        print(f"{name:<12} {row['compute_fraction']:>8.3f} {row['ideal_speedup']:>6.2f}x {full_s:>7.2f} "
              f"{cached_s:>8.2f} {row['wall_speedup']:>7.2f}x {row['rel_diff']:>8.4f}")
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "interval": args.interval, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
