"""The pack's main job on the embedded testbed: sample with and without caching, compare, and draw the result."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..calibration import CachePolicy
from .evaluate import bench_inputs, score
from .metrics import psnr, rel_l2
from .png import image_grid, write_png
from .sampling import sample
from .weights import load_classifier, load_dit

DEMO_POLICY = CachePolicy(interval=4, warmup_steps=0, forecaster="taylor", order=2)


def run_demo(out_dir: str | Path, samples: int = 20, policy: CachePolicy = DEMO_POLICY) -> dict[str, float]:
    model, meta = load_dit()
    classifier, _ = load_classifier()
    steps, cfg = int(meta["bench_steps"]), float(meta["bench_cfg"])
    labels, noise = bench_inputs(model, samples, seed=1)
    sample(model, labels, noise, steps, cfg)  # warm-up, so the timings compare like with like
    start = time.perf_counter()
    full, _ = sample(model, labels, noise, steps, cfg)
    full_s = time.perf_counter() - start
    start = time.perf_counter()
    cached, run = sample(model, labels, noise, steps, cfg, policy=policy)
    cached_s = time.perf_counter() - start
    diff = ((cached - full).abs() * 4 - 1).clamp(-1, 1)  # |difference| × 2 on the [-1, 1] scale, black = none
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = write_png(image_grid([full, cached, diff]), out / "demo_grid.png")
    figures = {
        "policy": policy.tag(),
        "steps": steps,
        "cfg": cfg,
        "full_s": full_s,
        "cached_s": cached_s,
        "wall_speedup": full_s / cached_s,
        "compute_fraction": run.stats.compute_fraction,
        "rel_l2": rel_l2(cached, full),
        "psnr": psnr(cached, full),
        "accuracy_full": score(classifier, full, labels)["accuracy"],
        "accuracy_cached": score(classifier, cached, labels)["accuracy"],
    }
    print(f"testbed DiT, {samples} digits, {steps} Euler steps, cfg {cfg}")
    print(f"full computation : {full_s:6.3f} s   accuracy {figures['accuracy_full']:.2f}")
    print(f"{policy.tag():<17}: {cached_s:6.3f} s   accuracy {figures['accuracy_cached']:.2f}   "
          f"wall speedup {figures['wall_speedup']:.2f}x")
    print(f"  {run.stats.summary()}")
    print(f"  rel_l2 vs full {figures['rel_l2']:.4f}, PSNR {figures['psnr']:.1f} dB")
    print(f"grid (rows: full, cached, |difference| x2): {grid}")
    return figures
