"""Fit TCC priors on the testbed and save them with full provenance (`python -m calibrated_cache fit-priors`)."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor

from .. import __version__
from ..calibration import CachePolicy, RunStats
from ..calibration.calibrator import Calibrator
from ..calibration.icc import ChannelTable, FactorCache, StatsRecorder
from ..calibration.fitting import FIT, FitRun, fit_plan, fit_tcc
from ..calibration.speed_fit import FORECASTERS, SpeedFit, fit_for_speed
from ..calibration.step_costs import RoundTimer
from ..calibration.tcc import TccPriors, resolve_variant
from ..priors import model_fingerprint
from .evaluate import bench_inputs
from .model import DiT
from .sampling import flow_sigmas, sample

CALIBRATION_SEED = 1  # disjoint from the benchmark's seed 0
HELD_OUT_SEED = 2  # the fit's own held-out requests: disjoint from both
HELD_OUT = 16


def dit_fingerprint(model: DiT, name: str = "testbed dit") -> dict[str, str]:
    return {**model_fingerprint(model.state_dict(), "testbed-dit"), "name": name}


def record_channels(model: DiT, samples: int, steps: int, cfg: float, shift: float = 1.0,
                    seed: int = CALIBRATION_SEED, source: str = "delta_mag",
                    sampler: str = "euler") -> tuple[ChannelTable, dict[str, Any]]:
    """ICC's channel statistics from full computation of `samples` calibration requests, and their summary."""
    labels, noise = bench_inputs(model, samples, seed)
    recorder = StatsRecorder(source)
    sample(model, labels, noise, steps, cfg, sampler=sampler, shift=shift, recorder=recorder)
    return recorder.table(), {**recorder.summary(), "samples": samples, "seeds": [seed]}


def fit_requests(policy: CachePolicy, variant: str, samples: int, held_out: int, verify: bool = False,
                 rounds: int = 1, statistics: bool | None = None) -> int:
    """How many requests `fit_testbed` samples in all (its progress bar's total)."""
    statistics = policy.icc is not None if statistics is None else statistics
    plan = fit_plan(resolve_variant(variant, policy.forecaster), rounds, held_out > 0, verify, statistics)
    return sum(samples if step.part == FIT else held_out for step in plan)


def fit_testbed(model: DiT, policy: CachePolicy, samples: int, steps: int, cfg: float, sampler: str = "euler",
                shift: float = 1.0, variant: str = "auto", sequential: bool = True, rounds: int = 1,
                batch: int | None = None, seed: int = CALIBRATION_SEED, factors: FactorCache | None = None,
                held_out: int = HELD_OUT, verify: bool = False,
                recorder: StatsRecorder | None = None, progress: Callable[[int, str], None] | None = None,
                full_trajectory: bool = False) -> tuple[TccPriors, dict[str, Any]]:
    """Priors for `policy` fitted on `samples` balanced requests (noise seed `seed`), and their metadata, whose report
    gives the error on `held_out` other requests (noise seed HELD_OUT_SEED; 0: not measured) and, with `verify`, on the
    fitted ones. A policy with ICC is fitted on ICC's output, with `factors`, or else with factors from the channel
    statistics that `recorder` records in the fit's first run (a full computation first, for such a policy).
    `progress(requests, purpose)` is told of every batch sampled. `full_trajectory`: mm's ablation (see TccFit)."""
    parts = requests(model, samples, seed, held_out)
    sigmas = flow_sigmas(steps, shift)
    current = {"factors": factors}

    def run(calibrator: Calibrator | None, step: FitRun) -> Tensor:
        labels, noise = parts[step.part]
        size = batch or len(labels)
        parts_out = []
        for i in range(0, len(labels), size):
            parts_out.append(sample(model, labels[i:i + size], noise[i:i + size], steps, cfg, sampler=sampler,
                                    policy=policy if step.cached else None, sigmas=sigmas, calibrator=calibrator,
                                    factors=current["factors"], recorder=recorder if step.records else None)[0])
            if progress is not None:
                progress(len(parts_out[-1]), step.purpose)
        out = torch.cat(parts_out)
        if step.records and recorder is not None and factors is None:
            current["factors"] = FactorCache(recorder.table())
        return out

    statistics = policy.icc is not None and factors is None
    if statistics and recorder is None:
        raise ValueError("a policy with ICC needs `factors`, or a `recorder` for the channel statistics")
    priors, report = fit_tcc(run, resolve_variant(variant, policy.forecaster), sequential, rounds, held_out > 0, verify,
                             statistics, full_trajectory)
    meta = prior_meta(model, policy, sigmas, sampler, shift, cfg, samples, seed, held_out, report)
    if recorder is not None:
        meta["icc_stats"] = {**recorder.summary(), "samples": samples, "seeds": [seed]}
    return priors, meta


def fit_testbed_speed(model: DiT, base: CachePolicy, speedup: float, samples: int, steps: int, cfg: float,
                      sampler: str = "euler", shift: float = 1.0, variant: str = "auto", seed: int = CALIBRATION_SEED,
                      held_out: int = HELD_OUT, tcc: bool = True,
                      forecasters: tuple[tuple[str, int], ...] = FORECASTERS,
                      progress: Callable[[int, str], None] | None = None, timed: bool = False
                      ) -> tuple[SpeedFit, dict[str, Any]]:
    """A searched plan, its forecaster and TCC priors for `speedup` (`calibration/speed_fit.py`) on `samples`
    calibration requests, with the report's held-out figures on `held_out` other requests; and the prior metadata.
    `timed`: the speedup is wall-clock on this machine (the fit times its runs); else a compute fraction, which
    keeps the testbed's tables the same on every machine."""
    parts = requests(model, samples, seed, held_out)
    sigmas = flow_sigmas(steps, shift)
    timer = RoundTimer() if timed else None

    def run(policy: CachePolicy | None, calibrator: Calibrator | None, part: str) -> tuple[Tensor, RunStats | None]:
        labels, noise = parts[part]
        out, state = sample(model, labels, noise, steps, cfg, sampler=sampler, policy=policy, sigmas=sigmas,
                            calibrator=calibrator, timer=timer)
        if progress is not None:
            progress(len(labels), part)
        return out, state.stats if state is not None else None

    start = time.perf_counter()
    def fewer_steps(k: int) -> Tensor:
        labels, noise = parts["held_out"]
        return sample(model, labels, noise, k, cfg, sampler=sampler, sigmas=flow_sigmas(k, shift))[0]

    fitted = fit_for_speed(run, base, sigmas.tolist(), len(model.blocks), speedup, forecasters, variant, tcc,
                           held_out > 0, timer=timer, fewer_steps=fewer_steps if timed else None)
    fitted.report = {**fitted.report, "fit_s": time.perf_counter() - start}
    return fitted, prior_meta(model, fitted.policy, sigmas, sampler, shift, cfg, samples, seed, held_out, fitted.report)


def requests(model: DiT, samples: int, seed: int, held_out: int) -> dict[str, tuple[Tensor, Tensor]]:
    """The fit's requests (noise seed `seed`) and, when `held_out`, the held-out ones (HELD_OUT_SEED), by part."""
    parts = {FIT: bench_inputs(model, samples, seed)}
    if held_out:
        parts["held_out"] = bench_inputs(model, held_out, HELD_OUT_SEED)
    return parts


def prior_meta(model: DiT, policy: CachePolicy, sigmas: Tensor, sampler: str, shift: float, cfg: float, samples: int,
               seed: int, held_out: int, report: dict[str, Any]) -> dict[str, Any]:
    """A testbed fit's provenance, as its prior file records it."""
    meta = {"model": dit_fingerprint(model), "policy": policy.to_dict(), "policy_tag": policy.tag(),
            "sigmas": sigmas.tolist(), "steps": len(sigmas) - 1, "sampler": sampler,
            "scheduler": f"flow_shift_{shift:g}", "cfg": cfg, "samples": samples, "seeds": [seed],
            "pack_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "report": report}
    if held_out:
        meta.update(held_out=held_out, held_out_seeds=[HELD_OUT_SEED])
    return meta
