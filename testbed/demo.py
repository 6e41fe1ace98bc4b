"""The pack's main job on the embedded testbed: sample with and without caching, compare, and draw the result."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..calibration import CachePolicy
from .evaluate import bench_inputs, score
from .font import GLYPH_H, draw_text, text_width
from .metrics import psnr, rel_l2
from .png import image_grid, write_png
from .progress import Progress
from .sampling import sample
from .weights import load_classifier, load_dit

DEMO_POLICY = CachePolicy(interval=4, warmup_steps=0, forecaster="taylor", order=2)
PAIRS = 5
SCALE, FONT = 6, 2  # pixels per digit pixel, font scale


class DemoError(ValueError):
    """A demo setting that cannot work (e.g. an unwritable output folder); the message says what to do."""


def paired_speedup(full: Callable[[], Any], cached: Callable[[], Any], pairs: int = PAIRS,
                   done: Callable[[], None] = lambda: None) -> tuple[float, list[float]]:
    """Median of full/cached wall-time ratios over `pairs` pairs, after one warm-up of each; the order within a pair
    alternates, so that a slow phase of the machine weighs on both sides alike. `done()` follows every run, untimed."""
    full(), done(), cached(), done()
    ratios = []
    for i in range(pairs):
        order = (full, cached) if i % 2 == 0 else (cached, full)
        times = {}
        for fn in order:
            start = time.perf_counter()
            fn()
            times[fn] = time.perf_counter() - start
            done()
        ratios.append(times[full] / times[cached])
    return statistics.median(ratios), ratios


def difference_gain(diff: Tensor) -> int:
    """The power of two that stretches the largest |difference| closest to the full [-1, 1] range, at most ×256."""
    top = float(diff.abs().max())
    return 1 if top <= 0 else 2 ** max(0, min(8, math.floor(math.log2(2.0 / top))))


def run_demo(out_dir: str | Path, samples: int = 20, policy: CachePolicy = DEMO_POLICY) -> dict[str, Any]:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".demo_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DemoError(f"cannot write the demo picture to {out} ({err.strerror or err}): choose a writable folder "
                        "with --out") from None
    model, meta = load_dit()
    classifier, _ = load_classifier()
    steps, cfg = int(meta["bench_steps"]), float(meta["bench_cfg"])
    labels, noise = bench_inputs(model, samples, seed=1)
    progress = Progress(2 + 2 * (1 + PAIRS), "demo")  # the two compared runs, then the timed ones
    try:
        full, _ = sample(model, labels, noise, steps, cfg)
        progress.advance(1, "full computation")
        cached, run = sample(model, labels, noise, steps, cfg, policy=policy)
        progress.advance(1, f"cached {policy.tag()}")
        speedup, ratios = paired_speedup(lambda: sample(model, labels, noise, steps, cfg),
                                         lambda: sample(model, labels, noise, steps, cfg, policy=policy),
                                         done=lambda: progress.advance(1, "timing full against cached"))
    finally:
        progress.close()
    stats = run.stats
    figures = {
        "policy": policy.tag(),
        "samples": samples,
        "steps": steps,
        "cfg": cfg,
        "wall_speedup": speedup,
        "wall_ratios": ratios,
        "compute_fraction": stats.compute_fraction,
        "ideal_speedup": stats.estimated_speedup,
        "rel_l2": rel_l2(cached, full),
        "psnr": psnr(cached, full),
        "accuracy_full": score(classifier, full, labels)["accuracy"],
        "accuracy_cached": score(classifier, cached, labels)["accuracy"],
    }
    diff = cached - full
    gain = difference_gain(diff)
    figures["difference_gain"] = gain
    grid = write_png(picture(full, cached, diff, gain, figures), out / "demo_grid.png")
    print(f"testbed DiT, {samples} digits, {steps} Euler steps, cfg {cfg:g}")
    print(f"full computation  accuracy {figures['accuracy_full']:.2f}")
    print(f"{policy.tag():<17} accuracy {figures['accuracy_cached']:.2f}   wall speedup {speedup:.2f}x (median of "
          f"{PAIRS} interleaved pairs, {min(ratios):.2f}-{max(ratios):.2f}x), ideal {stats.estimated_speedup:.2f}x")
    print(f"  {stats.summary()}")
    print(f"  rel_l2 vs full {figures['rel_l2']:.4f}, PSNR {figures['psnr']:.1f} dB")
    print(f"picture: {grid} (rows: full computation, cached, |cached - full| x{gain}: white = "
          f"{2 / gain:.3g} on the [-1, 1] pixel scale)")
    figures["picture"] = str(grid)
    return figures


def picture(full: Tensor, cached: Tensor, diff: Tensor, gain: int, f: dict[str, Any]) -> Tensor:
    """The three rows of digits with a title, row labels, the difference's scale bar and the run's figures."""
    line = (GLYPH_H + 4) * FONT
    rows = [("full computation", full), (f"cached {f['policy']}", cached),
            (f"|difference| x{gain}", diff.abs() * gain * 2 - 1)]  # black = none, white = 2/gain
    label_w = max(text_width(label, FONT) for label, _ in rows) + 10 * FONT
    grid = image_grid([images for _, images in rows], scale=SCALE)
    notes = [
        f"compute fraction {f['compute_fraction']:.3f} (ideal {f['ideal_speedup']:.2f}x)  wall speedup "
        f"{f['wall_speedup']:.2f}x (median of {len(f['wall_ratios'])} interleaved pairs)",
        f"rel_l2 {f['rel_l2']:.4f}  psnr {f['psnr']:.1f} db  accuracy {f['accuracy_full']:.2f} full, "
        f"{f['accuracy_cached']:.2f} cached",
    ]
    title = f"calibrated_cache demo: testbed dit, {f['samples']} digits, {f['steps']} euler steps, cfg {f['cfg']:g}"
    bar_h = 3 * FONT * 2
    width = max(label_w + grid.shape[1], text_width(title, FONT), *(text_width(n, FONT) for n in notes)) + 8 * FONT
    height = line * (2 + len(notes)) + grid.shape[0] + bar_h + line
    canvas = torch.full((height, width), 255, dtype=torch.uint8)
    draw_text(canvas, title, 4 * FONT, 2 * FONT, FONT)
    top = line + FONT * 2
    canvas[top:top + grid.shape[0], label_w:label_w + grid.shape[1]] = grid
    cell = grid.shape[0] // len(rows)
    for i, (label, _) in enumerate(rows):
        draw_text(canvas, label, 4 * FONT, top + i * cell + (cell - GLYPH_H * FONT) // 2, FONT)
    # scale bar of the difference row: black (no difference) to white (2/gain on the pixel scale)
    y = top + grid.shape[0] + FONT * 2
    ramp_w = grid.shape[1] // 3
    canvas[y:y + bar_h // 2, label_w:label_w + ramp_w] = torch.linspace(0, 255, ramp_w).round().to(torch.uint8)
    canvas[y:y + bar_h // 2, label_w] = 0
    draw_text(canvas, "0", label_w, y + bar_h // 2 + FONT, FONT)
    end = f"{2 / gain:.3g}"
    draw_text(canvas, end, label_w + ramp_w - text_width(end, FONT), y + bar_h // 2 + FONT, FONT)
    draw_text(canvas, "scale", 4 * FONT, y, FONT)
    draw_text(canvas, "|difference| on the [-1, 1] pixel scale", label_w + ramp_w + 6 * FONT, y, FONT)
    y += bar_h + line
    for note in notes:
        draw_text(canvas, note, 4 * FONT, y, FONT)
        y += line
    return canvas
