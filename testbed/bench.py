"""Benchmark: quality of every policy and forecaster at matched compute fractions on the trained testbed, and wall
speedup against the ideal 1/compute_fraction on a larger compute-bound block stack. Prints tables and writes JSON.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable

import torch
from torch import Tensor

from .. import __version__
from ..calibration import CachePolicy
from ..calibration.calibrator import Calibrator
from ..calibration.goc import GocSettings
from ..calibration.icc import FactorCache, IccSettings, icc_too_small
from ..calibration.fitting import FitRun, fit_tcc
from ..calibration.tcc import TccPriors
from ..priors import check_schedule
from .evaluate import bench_inputs, score
from .fit_priors import fit_testbed, record_channels
from .metrics import psnr, rel_l2
from .progress import Progress
from .results import read_tree, write_json  # noqa: F401  (write_json: tests import it from here)
from .model import DiT, DiTConfig
from .sampling import flow_sigmas, sample
from .weights import load_classifier, load_dit

SCHEMA = "calibrated_cache.bench/5"
INTERVALS = {0.5: 2, 0.33: 3, 0.25: 4, 0.17: 6}  # the corrected methods' (TCC, GOC, ICC) and the dynamic policy's targets
FORECAST_INTERVALS = {0.5: 2, 0.33: 3, 0.25: 4, 0.2: 5, 0.17: 6, 0.125: 8}  # every forecaster, down to 1 step in 8
MAX_SKIPS = 16  # lets the dynamic policy reach the lowest target fraction; its threshold does the rest


@dataclass(frozen=True)
class Method:
    name: str
    params: dict[str, Any]
    policy: CachePolicy | None
    target: float | None = None
    tcc: dict[str, Any] | None = None  # fit_testbed settings: TCC priors are fitted on calibration seeds, then applied


CALIBRATION_SAMPLES = 64
FORECASTERS = (("fora", {"forecaster": "reuse"}),
               ("taylor1", {"forecaster": "taylor", "order": 1}),
               ("taylor2", {"forecaster": "taylor", "order": 2}),
               ("foca", {"forecaster": "foca"}),
               ("spectrum", {"forecaster": "spectrum"}),
               ("dmd", {"forecaster": "dmd"}))
TCC_ROWS = (("fora+tcc", {"forecaster": "reuse"}, {}),
            ("taylor+tcc", {"forecaster": "taylor", "order": 1}, {}),
            ("fora+tcc-oneshot", {"forecaster": "reuse"}, {"sequential": False}))


def fixed_methods() -> list[Method]:
    """FORA, TaylorSeer (orders 1, 2), FoCa, and the peers Spectrum and DMD, with FoCa + TCC beside them, on one
    schedule per target, so their fractions match exactly."""
    methods = []
    for target, n in FORECAST_INTERVALS.items():
        for name, extra in FORECASTERS:
            methods.append(Method(name, {"interval": n, **extra}, CachePolicy(interval=n, warmup_steps=0, **extra),
                                  target))
        foca = {"forecaster": "foca"}
        methods.append(Method("foca+tcc", {"interval": n, **foca}, CachePolicy(interval=n, warmup_steps=0, **foca),
                              target, {}))
    return methods


def tcc_methods(targets: tuple[float, ...]) -> list[Method]:
    """Each base method with TCC priors (variant "auto": drift on FORA, mm on forecasters), and the one-shot ablation
    (all priors estimated from one uncalibrated cached trajectory), at the same schedules as the rows without
    priors."""
    return [Method(name, {"interval": INTERVALS[t], **extra, **fit}, CachePolicy(interval=INTERVALS[t], warmup_steps=0,
                                                                                    **extra), t, fit)
            for t in targets for name, extra, fit in TCC_ROWS]


GOC_ROWS = (("fora+goc", GocSettings(), None),
            ("fora+goc-noinflection", GocSettings(inflection="off"), None),
            ("fora+goc+tcc", GocSettings(), {}))


def goc_methods(targets: tuple[float, ...]) -> list[Method]:
    """FORA with the GOC Corrector at its defaults (weight 0.8, online inflection detection), with plain gradient
    propagation, and with TCC priors fitted with GOC active."""
    return corrected_methods("goc", GOC_ROWS, targets)


ICC_RANKS = (16, 32)
ICC_ROWS = tuple((f"icc-r{r}", IccSettings(r), None) for r in ICC_RANKS) + (
    ("icc-plain-svd", IccSettings(ICC_RANKS[-1], "plain"), None),
    ("icc+tcc", IccSettings(ICC_RANKS[-1]), {}))


def icc_methods(targets: tuple[float, ...]) -> list[Method]:
    """ICC at two ranks (channel-aware, statistics from the calibration seeds), the plain-SVD ablation at the higher
    rank, and that rank with TCC priors fitted on ICC's output; every row at FORA's refresh schedule."""
    return corrected_methods("icc", ICC_ROWS, targets)


def corrected_methods(field: str, rows: tuple, targets: tuple[float, ...]) -> list[Method]:
    """FORA at each target's interval with the policy's `field` (goc or icc) set as each row says."""
    return [Method(name, {"interval": INTERVALS[t], field: settings.tag()},
                   CachePolicy(interval=INTERVALS[t], warmup_steps=0, **{field: settings}), t, fit)
            for t in targets for name, settings, fit in rows]


def tcc_ablation_methods() -> list[Method]:
    """The prior's form at N=3 on each base: drift, trend and moment matching (the published design), mm's targets
    from the site recomputed on the cache side (ours) or from a full-computation reference run (mm-full)."""
    methods = []
    forms = {"drift": {"variant": "drift"}, "trend": {"variant": "trend"}, "mm": {"variant": "mm"},
             "mm-full": {"variant": "mm", "full_trajectory": True}}
    for name, extra in (("fora+tcc", {"forecaster": "reuse"}), ("taylor+tcc", {"forecaster": "taylor", "order": 1}),
                        ("foca+tcc", {"forecaster": "foca"})):
        policy = CachePolicy(interval=3, warmup_steps=0, **extra)
        methods += [Method(f"{name}-{form}", {"interval": 3, **extra, "variant": form}, policy, 0.33, fit)
                    for form, fit in forms.items()]
    return methods


def ablation_methods() -> list[Method]:
    """The design choices docs/methods.md justifies, all at FORA N=4's schedule: FoCa's relaxation (λ = 0 is the anchored
    first-order form of earlier releases) and time unit, Taylor's order and time unit, and module-level (pre-gate, G3)
    against block-level (residual, G2) sites."""
    variants: list[tuple[str, dict[str, Any]]] = [
        (f"foca-lambda{lam:g}" if lam else "foca-anchored", {"forecaster": "foca", "foca_lambda": lam})
        for lam in (0.0, 0.5, 1.0)
    ]
    variants += [("foca", {"forecaster": "foca", "time_unit": "sigma"})]
    variants += [(f"taylor{k}", {"forecaster": "taylor", "order": k, "time_unit": u}) for k in (1, 2, 3)
                 for u in ("step", "sigma")]
    variants += [(f"{name}-block", {**extra, "granularity": "block"}) for name, extra in (
        ("fora", {"forecaster": "reuse"}), ("taylor2", {"forecaster": "taylor", "order": 2}),
        ("foca", {"forecaster": "foca"}))]
    methods = [Method(name, {"interval": 4, **extra}, CachePolicy(interval=4, warmup_steps=0, **extra), 0.25)
               for name, extra in variants]
    methods += [Method("foca-anchored", {"interval": n, "forecaster": "foca", "foca_lambda": 0.0},
                       CachePolicy(interval=n, warmup_steps=0, forecaster="foca", foca_lambda=0.0), target)
                for target, n in FORECAST_INTERVALS.items() if n != 4]
    return methods


def granularity_methods() -> list[Method]:
    """Block by block against whole steps, at equal compute: the blocks' residuals (G2, what ComfyUI's DiT loops
    expose) against the model's output (G1) on steps that skip every block."""
    return [Method(f"{name}-{granularity}", {"interval": n, **extra, "granularity": granularity},
                   CachePolicy(interval=n, warmup_steps=0, granularity=granularity, **extra), target)
            for target, n in INTERVALS.items() for granularity in ("block", "step")
            for name, extra in (("fora", {"forecaster": "reuse"}), ("taylor2", {"forecaster": "taylor", "order": 2}),
                                ("foca", {"forecaster": "foca"}))]


SHIFT = 3.0  # a schedule whose σ steps are far from even, as SD3's and Flux's shifted schedules


def schedule_methods() -> list[Method]:
    """The time unit on a non-uniform σ schedule: forecasting in step index or in σ, at N = 4 and 6."""
    return [Method(name, {"interval": n, **extra}, CachePolicy(interval=n, warmup_steps=0, **extra), target)
            for target, n in ((0.25, 4), (0.17, 6))
            for name, extra in (("fora", {"forecaster": "reuse"}),
                                ("taylor2", {"forecaster": "taylor", "order": 2}),
                                ("taylor2", {"forecaster": "taylor", "order": 2, "time_unit": "sigma"}),
                                ("foca", {"forecaster": "foca"}),
                                ("foca", {"forecaster": "foca", "time_unit": "sigma"}))]


def calibrate_threshold(run: Callable[[CachePolicy], float], target: float, iters: int) -> float:
    """Bisect (in log space) the dynamic threshold whose compute fraction on a calibration subset meets `target`."""
    lo, hi = 1e-3, 10.0
    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        if run(CachePolicy(mode="dynamic", threshold=mid, max_skips=MAX_SKIPS, warmup_steps=1)) > target:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def dynamic_methods(
    model: DiT, labels: Tensor, noise: Tensor, steps: int, cfg: float, shift: float, iters: int
) -> list[Method]:
    """First-Block-Cache style rows, each threshold tuned on the first 32 requests to match a target fraction."""

    def fraction(policy: CachePolicy) -> float:
        _, run = sample(model, labels[:32], noise[:32], steps, cfg, policy=policy, shift=shift)
        return run.stats.compute_fraction

    methods = []
    for target in INTERVALS:
        threshold = calibrate_threshold(fraction, target, iters)
        policy = CachePolicy(mode="dynamic", threshold=threshold, max_skips=MAX_SKIPS, warmup_steps=1)
        methods.append(Method("fbcache", {"threshold": round(threshold, 4), "max_skips": MAX_SKIPS}, policy, target))
    return methods


def quality_methods(quick: bool) -> list[Method]:
    """The quality table's rows after full computation, but for the dynamic rows (tuned on the model, after the fixed
    ones)."""
    methods = [Method("engine-all", {"interval": 1}, CachePolicy(interval=1))] + fixed_methods()
    methods += tcc_methods((0.5, 0.33) if quick else tuple(INTERVALS))
    methods += goc_methods((0.5, 0.33) if quick else tuple(INTERVALS))
    return methods + icc_methods((0.5,) if quick else (0.5, 0.33))


def fewer_steps(steps: int, intervals) -> list[tuple[int, int]]:
    """(interval, steps) of full computation at about each interval's cost, steps/interval (at least 2, below
    `steps`): the honest floor every caching row is compared with, full computation at the same cost."""
    return [(n, min(steps - 1, max(2, round(steps / n)))) for n in intervals]


def planned_rows(quick: bool, skip_quality: bool, skip_speed: bool = False) -> int:
    """The rows a run measures, for its progress bar: quality (with the dynamic rows, the ablation and the transfer
    table as one) and speed (full computation counted as a row: it is timed as often as each configuration)."""
    quality = len(quality_methods(quick)) + len(INTERVALS) + 1  # the fewer-steps rows as one
    if not quick:
        quality += len(ablation_methods()) + len(tcc_ablation_methods()) + len(schedule_methods()) + 1
        quality += len(granularity_methods())
    return (0 if skip_quality else quality) + (0 if skip_speed else SPEED_ROWS)


def quality_section(samples: int, quick: bool, shift: float, progress: Progress | None = None) -> dict[str, Any]:
    """Each row is timed once: its wall time is informative only; the speed section carries the speed claims."""
    model, meta = load_dit()
    classifier, _ = load_classifier()
    steps, cfg = int(meta["bench_steps"]), float(meta["bench_cfg"])
    labels, noise = bench_inputs(model, samples)

    calibration = CALIBRATION_SAMPLES // 2 if quick else CALIBRATION_SAMPLES
    channels, _ = record_channels(model, calibration, steps, cfg, shift)

    shared = FactorCache(channels)

    def factors(policy: CachePolicy | None) -> FactorCache | None:
        """ICC's statistics come from the calibration seeds, as TCC's priors do; factors are kept across rows."""
        return shared if policy is not None and policy.icc is not None else None

    def run(policy: CachePolicy | None, priors: TccPriors | None = None, shift: float = shift) -> tuple[Tensor, Any]:
        return sample(model, labels, noise, steps, cfg, policy=policy, shift=shift, calibrator=priors,
                      factors=factors(policy))

    full, _ = run(None)
    static = quality_methods(quick)
    fixed = 1 + len(fixed_methods())
    methods = static[:fixed] + dynamic_methods(model, labels, noise, steps, cfg, shift, 6 if quick else 9)
    methods += static[fixed:]

    def rows_for(methods: list[Method], full: Tensor = full, shift: float = shift) -> list[dict[str, Any]]:
        rows = []
        for m in methods:
            priors, fit_s = None, None
            if m.tcc is not None:
                start = time.perf_counter()
                priors, _ = fit_testbed(model, m.policy, calibration, steps, cfg, shift=shift,
                                        factors=factors(m.policy), held_out=0, **m.tcc)
                fit_s = time.perf_counter() - start
            x, state = run(m.policy, priors, shift)
            rows.append(row_for(m, x, full, state.stats.compute_fraction, classifier, labels))
            if fit_s is not None:
                rows[-1]["fit_s"] = fit_s
            if progress is not None:
                progress.advance(1, f"{m.name} {','.join(f'{k}={v}' for k, v in m.params.items())}")
        return rows

    full_row = row_for(Method("full", {}, None), full, full, 1.0, classifier, labels)
    fewer = [row_for(Method("fewer-steps", {"interval": n, "steps": k}, None, k / steps),
                     sample(model, labels, noise, k, cfg, shift=shift)[0], full, k / steps, classifier, labels)
             for n, k in fewer_steps(steps, FORECAST_INTERVALS.values())]
    if progress is not None:
        progress.advance(1, "full computation at fewer steps")
    return {"config": {"samples": samples, "steps": steps, "cfg": cfg, "sampler": "euler", "shift": shift, "seed": 0,
                       "model": meta["config"]},
            "rows": [full_row, *rows_for(methods), *fewer],
            "ablation": [] if quick else rows_for(ablation_methods() + tcc_ablation_methods()),
            "granularity": [] if quick else rows_for(granularity_methods()),
            "schedule": None if quick else {"shift": SHIFT, "rows": rows_for(schedule_methods(), run(None, shift=SHIFT)[0],
                                                                          SHIFT)},
            "transfer": None if quick else transfer_section(model, classifier, cfg, shift, progress=progress)}


def transfer_section(model: DiT, classifier, cfg: float, shift: float, samples: int = 128,
                     progress: Progress | None = None) -> dict[str, Any]:
    """TCC priors fitted on 20 steps, applied at 20, 25 and 30 steps (interpolated over σ), against no priors and
    against priors refitted at each step count; FORA N=3 on `samples` benchmark requests."""
    policy = CachePolicy(interval=3, warmup_steps=0)
    labels, noise = bench_inputs(model, samples)
    fitted, meta = fit_testbed(model, policy, CALIBRATION_SAMPLES, 20, cfg, shift=shift, held_out=0)
    rows = []
    for steps in (20, 25, 30):
        sigmas = flow_sigmas(steps, shift)
        note = check_schedule(meta, policy, sigmas.tolist(), "the 20-step priors")
        full, _ = sample(model, labels, noise, steps, cfg, sigmas=sigmas)
        candidates: list[tuple[str, TccPriors | None]] = [("fora", None), ("fora+tcc@20", fitted)]
        if steps != 20:
            candidates.append((f"fora+tcc@{steps}", fit_testbed(model, policy, CALIBRATION_SAMPLES, steps, cfg,
                                                                shift=shift, held_out=0)[0]))
        for name, priors in candidates:
            x, state = sample(model, labels, noise, steps, cfg, policy=policy, sigmas=sigmas, calibrator=priors)
            rows.append({"steps": steps, "method": name, "compute_fraction": state.stats.compute_fraction,
                         "rel_l2": rel_l2(x, full), "fd": score(classifier, x, labels)["fd"],
                         "interpolated": priors is fitted and note is not None})
    if progress is not None:
        progress.advance(1, "transfer of priors to other step counts")
    return {"config": {"policy": policy.tag(), "fitted_steps": 20, "samples": samples}, "rows": rows}


def row_for(m: Method, x: Tensor, full: Tensor, fraction: float, classifier, labels) -> dict:
    """Quality only: the speed section carries every wall figure, paired."""
    quality = score(classifier, x, labels)
    return {
        "method": m.name,
        "params": m.params,
        "tag": m.policy.tag() if m.policy else "full",
        "target_fraction": m.target,
        "compute_fraction": fraction,
        "rel_l2": rel_l2(x, full),
        "psnr": None if torch.equal(x, full) else psnr(x, full),
        "bit_identical": bool(torch.equal(x, full)),
        "fd": quality["fd"],
        "accuracy": quality["accuracy"],
    }


def speed_config(quick: bool, flux: bool) -> tuple[DiTConfig, int, int]:
    """(block stack, batch, steps): compute-bound on the CPU (1024 tokens), or Flux-sized (C = 3072, 4096 tokens) on
    a GPU. With few tokens a cached step is dominated by streaming the adaLN weights, which FLOPs do not show."""
    if flux:
        return DiTConfig(image_size=128, channels=16, patch=2, width=3072, depth=8, heads=24), 1, 28
    if quick:
        return DiTConfig(image_size=32, patch=2, width=256, depth=8, heads=4), 1, 12
    return DiTConfig(image_size=64, patch=2, width=256, depth=12, heads=4), 1, 12


SPEED_INTERVALS = (2, 3, 4, 6)  # compute fractions about 0.5, 0.33, 0.25 and 0.17


def speed_policies(width: int) -> list[tuple[str, dict[str, Any], CachePolicy]]:
    """The speed table's configurations: FORA and Taylor-2 at each interval, module by module (adaLN sites), block by
    block (whole-block residuals, cached in spans: ComfyUI's granularity) and whole steps; the other
    forecasters, TCC priors, GOC and ICC at interval 4 (ICC at 2 and 3, where it is meant to be used)."""
    rows: list[tuple[str, dict[str, Any], CachePolicy]] = [("engine-all", {"interval": 1}, CachePolicy(interval=1))]
    for n in SPEED_INTERVALS:
        for name, extra in (("fora", {"forecaster": "reuse"}), ("taylor2", {"forecaster": "taylor", "order": 2})):
            rows.append((name, {"interval": n, **extra}, CachePolicy(interval=n, warmup_steps=0, **extra)))
            rows.append((f"{name}-block", {"interval": n, **extra, "granularity": "block"},
                         CachePolicy(interval=n, warmup_steps=0, granularity="block", **extra)))
            rows.append((f"{name}-step", {"interval": n, **extra, "granularity": "step"},
                         CachePolicy(interval=n, warmup_steps=0, granularity="step", **extra)))
    for name, forecaster in (("foca", "foca"), ("spectrum", "spectrum"), ("dmd", "dmd")):
        rows.append((name, {"interval": 4, "forecaster": forecaster},
                     CachePolicy(interval=4, warmup_steps=0, forecaster=forecaster)))
    fora = CachePolicy(interval=4, warmup_steps=0)
    rows.append(("fora+tcc", {"interval": 4, "variant": "drift"}, fora))
    rows.append(("fora+goc", {"interval": 4, "goc": GocSettings().tag()}, replace(fora, goc=GocSettings())))
    for n in (2, 3):  # plain SVD: the random stack has no calibration statistics
        for icc in (IccSettings(width // 24, "plain"), IccSettings(width // 8, "plain")):
            rows.append(("icc", {"interval": n, "icc": icc.tag()}, CachePolicy(interval=n, warmup_steps=0, icc=icc)))
    return rows


SPEED_ROWS = (len(speed_policies(256)) + 1 + len(SPEED_INTERVALS)) * 2  # full, each config, fewer steps; two models


def paired_times(runs: dict[str, Callable[[], Any]], repeats: int,
                 on_run: Callable[[str], None] = lambda name: None) -> dict[str, list[float]]:
    """Wall times of every configuration, `repeats` rounds, the configurations interleaved within each round (after
    one warm-up each), so that a slow phase of the machine weighs on every configuration of a round alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            on_run(name)
    return times


def speed_rows(model: DiT, labels: Tensor, noise: Tensor, steps: int, cfg: float, device: str, repeats: int,
               progress: Progress | None = None) -> list[dict[str, Any]]:
    """Full computation against each configuration: the median over rounds of full/config wall-time ratios (paired
    within a round), their spread, and the share of the ideal speedup 1/compute fraction they reach."""
    factor_cache = FactorCache()  # kept across runs, as a ComfyUI session keeps it: factorised on the warm-up run
    priors: TccPriors | None = None

    def run(policy: CachePolicy | None, calibrator: TccPriors | None = None) -> tuple[Tensor, Any]:
        out = sample(model, labels, noise, steps, cfg, policy=policy, calibrator=calibrator, factors=factor_cache)
        if device != "cpu":
            torch.cuda.synchronize()
        return out

    configs = speed_policies(model.config.width)
    fora = CachePolicy(interval=4, warmup_steps=0)

    def advance(name: str) -> None:
        """Each configuration (and full computation) is one row of the bar, run once to warm up and `repeats` times
        timed: the bar moves with every run, since the rows' figures only come after the last round."""
        if progress is not None:
            progress.advance(1 / (repeats + 1), f"speed: {name}")

    def calibration_run(calibrator: Calibrator | None, step: FitRun) -> Tensor:
        return sample(model, labels, noise, steps, cfg, policy=fora if step.cached else None, calibrator=calibrator)[0]

    priors, _ = fit_tcc(calibration_run, held_out=False)  # on the timed request itself: only its cost matters here
    runs: dict[str, Callable[[], Any]] = {"full": lambda: run(None)}
    run(None)
    advance("full")
    first: dict[str, tuple[float, int]] = {}
    states: dict[str, Any] = {}
    for name, params, policy in configs:
        key = f"{name} {params}"
        calibrator = priors if name == "fora+tcc" else None
        runs[key] = (lambda policy=policy, calibrator=calibrator, key=key:
                     states.__setitem__(key, run(policy, calibrator)))
        before = factor_cache.factorized
        start = time.perf_counter()
        runs[key]()  # the warm-up; a first ICC run at a new rank factorises every Linear
        if factor_cache.factorized > before:
            first[key] = (time.perf_counter() - start, factor_cache.factorized - before)
        advance(key)
    fewer = sorted({k for _, k in fewer_steps(steps, SPEED_INTERVALS)}, reverse=True)
    for k in fewer:  # full computation at fewer steps, timed beside the rest
        runs[f"fewer {k}"] = lambda k=k: sample(model, labels, noise, k, cfg)
        runs[f"fewer {k}"]()
        advance(f"full computation, {k} steps")
    full_out = run(None)[0]
    times = paired_times(runs, repeats, advance)
    rows = []
    for name, params, policy in configs:
        key = f"{name} {params}"
        out, state = states[key]
        ratios = [f / c for f, c in zip(times["full"], times[key])]
        fraction = state.stats.compute_fraction
        speedup = statistics.median(ratios)
        row = {"method": name, "params": params, "compute_fraction": fraction, "ideal_speedup": 1 / fraction,
               "wall_speedup": speedup, "spread": [min(ratios), max(ratios)], "share_of_ideal": speedup * fraction,
               "peak_cache_bytes": state.stats.peak_cache_bytes}
        if policy.computes_everything():
            row["bit_identical"] = bool(torch.equal(out, full_out))
        if key in first:
            row["factorize_s"], row["factorized"] = first[key]
        if policy.icc is not None:  # CFG doubles the batch: the rows a block call sees
            rows_per_call = 2 * labels.shape[0] * model.config.tokens
            row["node_refuses"] = icc_too_small(rows_per_call, model.config.width, device) is not None
        rows.append(row)
    for k in fewer:
        ratios = [f / c for f, c in zip(times["full"], times[f"fewer {k}"])]
        speedup = statistics.median(ratios)
        rows.append({"method": "fewer-steps", "params": {"steps": k}, "compute_fraction": k / steps,
                     "ideal_speedup": steps / k, "wall_speedup": speedup, "spread": [min(ratios), max(ratios)],
                     "share_of_ideal": speedup * k / steps, "peak_cache_bytes": 0})
    return rows


def speed_section(quick: bool, flux: bool, device: str, repeats: int, samples: int,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Paired wall speedups on two models: the trained testbed at the quality section's batch, and a larger random
    block stack where the blocks dominate (Flux-sized on a GPU)."""
    sections = {}
    if not flux:
        model, meta = load_dit()
        steps, cfg = int(meta["bench_steps"]), float(meta["bench_cfg"])
        labels, noise = bench_inputs(model, samples)
        sections["testbed"] = {"config": {"samples": samples, "steps": steps, "cfg": cfg, "batch": samples,
                                          "tokens": model.config.tokens, "width": model.config.width,
                                          "depth": model.config.depth, "device": "cpu", "dtype": "torch.float32"},
                               "rows": speed_rows(model, labels, noise, steps, cfg, "cpu", repeats, progress)}
    model, labels, noise, steps = speed_stack(quick, flux, device)
    config, batch, dtype = model.config, noise.shape[0], noise.dtype
    sections["stack"] = {"config": {**config.to_dict(), "batch": batch, "steps": steps, "cfg": 4.0, "dtype": str(dtype),
                                    "device": device, "tokens": config.tokens},
                         "rows": speed_rows(model, labels, noise, steps, 4.0, device, repeats, progress)}
    return {"repeats": repeats, **sections}


def speed_stack(quick: bool, flux: bool, device: str) -> tuple[DiT, torch.Tensor, torch.Tensor, int]:
    """The speed section's random block stack (bf16 on a GPU), its labels and noise, and its steps."""
    config, batch, steps = speed_config(quick, flux)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model = DiT(config).to(device, dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    noise = torch.randn(batch, config.channels, config.image_size, config.image_size, device=device, dtype=dtype)
    return model, labels, noise, steps


def provenance() -> dict[str, Any]:
    """When and from which code a report was measured, so a table in the docs can say so."""
    tree = read_tree()
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": tree.commit,
            "dirty": tree.dirty if tree.commit else None}


def machine(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device}
    if device != "cpu":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_benchmark(quick: bool = False, samples: int | None = None, flux: bool = False, device: str | None = None,
                  skip_quality: bool = False, shift: float = 1.0, skip_speed: bool = False) -> dict[str, Any]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if flux and device == "cpu":
        raise SystemExit("--flux needs a GPU: a Flux-sized block stack takes hours on a CPU")
    report: dict[str, Any] = {"schema": SCHEMA, "version": __version__, "quick": quick, "machine": machine(device),
                              **provenance()}
    if skip_quality and skip_speed:
        raise SystemExit("--skip-quality and --skip-speed leave nothing to run: drop one of them")
    progress = Progress(planned_rows(quick, skip_quality, skip_speed), "bench")
    samples = samples or (64 if quick else 256)
    try:
        if not skip_quality:
            report["quality"] = quality_section(samples, quick, shift, progress)
        if not skip_speed:
            report["speed"] = speed_section(quick, flux, device, 2 if quick else 5, samples, progress)
    finally:
        progress.close()
    return report


def format_tables(report: dict[str, Any]) -> str:
    changes = "+changes" if report.get("dirty") else ""
    lines = [f"machine: {report['machine']['processor']}, {report['machine']['cpu_count']} cpus, "
             f"torch {report['machine']['torch']}, device {report['machine']['device']}; measured "
             f"{report.get('date', '?')} on commit {report.get('commit') or '?'}{changes}"]
    if "quality" in report:
        c = report["quality"]["config"]
        lines += ["", f"quality: {c['samples']} samples, {c['steps']} Euler steps (shift {c['shift']}), cfg {c['cfg']}"]
        lines += _quality_table(report["quality"]["rows"])
        if report["quality"]["ablation"]:
            lines += ["", "ablation at FORA N=4's schedule (TCC prior forms at N=3; foca-anchored at every interval)"]
            lines += _quality_table(report["quality"]["ablation"])
        if report["quality"].get("granularity"):
            lines += ["", "block by block (G2) against whole steps (G1), at equal compute"]
            lines += _quality_table(report["quality"]["granularity"])
        if report["quality"].get("schedule"):
            lines += ["", f"time unit on a non-uniform schedule (shift {report['quality']['schedule']['shift']:g})"]
            lines += _quality_table(report["quality"]["schedule"]["rows"])
        if report["quality"].get("transfer"):
            t = report["quality"]["transfer"]
            lines += ["", f"TCC priors fitted on {t['config']['fitted_steps']} steps, {t['config']['policy']}, "
                          f"{t['config']['samples']} samples",
                      f"{'steps':>5} {'method':<14} {'compute':>7} {'rel_l2':>7} {'fd':>7}"]
            lines += [f"{r['steps']:>5} {r['method']:<14} {r['compute_fraction']:>7.3f} {r['rel_l2']:>7.4f} "
                      f"{r['fd']:>7.3f}" for r in t["rows"]]
    s = report.get("speed", {})
    for name in ("testbed", "stack"):
        if name not in s:
            continue
        c = s[name]["config"]
        lines += ["", f"speed, {name}: width {c['width']}, depth {c['depth']}, {c['tokens']} tokens, batch "
                      f"{c['batch']} (+CFG), {c['steps']} steps, {c['dtype']} on {c['device']}; median of "
                      f"{s['repeats']} paired, interleaved ratios to full computation (min-max)",
                  f"{'method':<14} {'params':<34} {'compute':>7} {'ideal':>7} {'wall speedup':>21} {'share':>5} "
                  f"{'cache_MiB':>9}"]
        for r in s[name]["rows"]:
            params = ",".join(f"{k}={v}" for k, v in r["params"].items() if k != "forecaster")
            low, high = r["spread"]
            method = r["method"] + ("*" if r.get("node_refuses") else "")
            lines.append(f"{method:<14} {params:<34.34} {r['compute_fraction']:>7.3f} {r['ideal_speedup']:>6.2f}x "
                         f"{r['wall_speedup']:>6.2f}x ({low:.2f}-{high:.2f}x) {r['share_of_ideal']:>5.2f} "
                         f"{r['peak_cache_bytes'] / 2**20:>9.1f}")
        if any(r.get("node_refuses") for r in s[name]["rows"]):
            lines.append("* ICC on blocks this small: Apply Calibrated Cache refuses it (slower than computing)")
        factorised = [r for r in s[name]["rows"] if "factorize_s" in r]
        if factorised:
            lines.append("icc first runs, factorising every Linear: " + ", ".join(
                f"{r['params']['icc']} {r['factorized']} layers {r['factorize_s']:.2f} s" for r in factorised))
    return "\n".join(lines)


def _quality_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'method':<21} {'params':<40} {'target':>6} {'compute':>7} {'rel_l2':>7} {'psnr':>6} {'fd':>7} "
             f"{'acc':>6}"]
    for r in rows:
        params = ",".join(f"{k}={v}" for k, v in r["params"].items() if k != "forecaster")
        target = "" if r["target_fraction"] is None else f"{r['target_fraction']:.2f}"
        lines.append(f"{r['method']:<21} {params:<40.40} {target:>6} {r['compute_fraction']:>7.3f} "
                     f"{r['rel_l2']:>7.4f} {_num(r['psnr']):>6} {r['fd']:>7.3f} {r['accuracy']:>6.3f}")
    return lines


def _num(value: float | None) -> str:
    return "exact" if value is None else f"{value:.1f}"
