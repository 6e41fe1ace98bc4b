"""Fit TCC priors on the testbed and save them with full provenance (`python -m calibrated_cache fit-priors`)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..calibration import CachePolicy
from ..calibration.calibrator import Calibrator
from ..calibration.icc import ChannelTable, FactorCache, StatsRecorder
from ..calibration.tcc import TccPriors, fit_tcc, resolve_variant
from ..priors import model_fingerprint
from .evaluate import bench_inputs
from .model import DiT
from .sampling import flow_sigmas, sample

CALIBRATION_SEED = 1  # disjoint from the benchmark's seed 0


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


def fit_testbed(model: DiT, policy: CachePolicy, samples: int, steps: int, cfg: float, sampler: str = "euler",
                shift: float = 1.0, variant: str = "auto", sequential: bool = True, rounds: int = 1,
                batch: int | None = None, seed: int = CALIBRATION_SEED,
                factors: FactorCache | None = None) -> tuple[TccPriors, dict[str, Any]]:
    """Priors for `policy` fitted on `samples` balanced requests (noise seed `seed`), and their metadata. A policy
    with ICC is fitted on ICC's output (`factors` carry the channel statistics)."""
    labels, noise = bench_inputs(model, samples, seed)
    sigmas = flow_sigmas(steps, shift)
    size = batch or samples

    def run(calibrator: Calibrator | None, cached: bool) -> Tensor:
        parts = [sample(model, labels[i:i + size], noise[i:i + size], steps, cfg, sampler=sampler,
                        policy=policy if cached else None, sigmas=sigmas, calibrator=calibrator, factors=factors)[0]
                 for i in range(0, samples, size)]
        return torch.cat(parts)

    priors, report = fit_tcc(run, resolve_variant(variant, policy.forecaster), sequential, rounds)
    meta = {"model": dit_fingerprint(model), "policy": policy.to_dict(), "policy_tag": policy.tag(),
            "sigmas": sigmas.tolist(), "steps": steps, "sampler": sampler, "scheduler": f"flow_shift_{shift:g}",
            "cfg": cfg, "samples": samples, "seeds": [seed], "pack_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "report": report}
    return priors, meta

