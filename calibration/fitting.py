"""The TCC fitting procedure: which sampling runs on which requests, and the report of what the priors achieve.

Calibration requests are split in two parts. The priors are fitted on the `fit` part only: one cache-side fitting run
per round (the engine recomputes each reused site there, so a fitting run costs about one full sampling). The `held_out` part measures what the priors do on requests they
were not fitted on: full computation, the cached run without priors and with them. `verify` adds the same three runs
on the fit part (the in-sample error, which is optimistic). So by default a fit over F fitting requests and H held-out
ones costs F fitting runs + H full runs + 2H cached runs. ICC's channel statistics are recorded in the first run over
the fit requests, which computes every block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from torch import Tensor

from .calibrator import Calibrator
from .tcc import TccFit, TccPriors

FIT, HELD_OUT = "fit", "held_out"
STATISTICS, REFERENCE, FITTING = "channel statistics (full computation)", "reference (full computation)", "fitting"
FULL, BEFORE, AFTER = "full computation", "cached, without priors", "cached, with the fitted priors"


@dataclass(frozen=True)
class FitRun:
    """One sampling run of a fit: over which part of the requests, whether through the cache, and what for.

    `records`: the run in which ICC's channel statistics are recorded, the first run over the fit requests. It
    computes every block at every step: full computation, the reference, or a fitting run, which recomputes each
    reused block.
    """

    part: str
    cached: bool
    purpose: str
    records: bool = False


SampleRun = Callable[[Calibrator | None, FitRun], Tensor]


def fit_plan(variant: str, rounds: int = 1, held_out: bool = True, verify: bool = False, statistics: bool = False,
             full_trajectory: bool = False) -> list[FitRun]:
    """The runs `fit_tcc` makes, in order (progress bars and cost estimates read it). `statistics`: a first full
    computation records ICC's channel statistics, for a policy whose fitting runs need ICC's factors already;
    `full_trajectory`: mm's ablation, whose targets come from a reference run."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 (got {rounds})")
    plan = [FitRun(FIT, False, STATISTICS)] if statistics else []
    plan += [FitRun(FIT, True, REFERENCE)] if full_trajectory else []
    plan += [FitRun(FIT, True, FITTING)] * rounds
    plan[0] = replace(plan[0], records=True)
    for part, wanted in ((HELD_OUT, held_out), (FIT, verify)):
        if wanted:
            plan += [FitRun(part, False, FULL), FitRun(part, True, BEFORE), FitRun(part, True, AFTER)]
    return plan


def fit_tcc(run: SampleRun, variant: str = "drift", sequential: bool = True, rounds: int = 1, held_out: bool = True,
            verify: bool = False, statistics: bool = False, full_trajectory: bool = False) -> tuple[TccPriors, dict]:
    """Fit TCC priors on the fit requests and report their effect.

    `run(calibrator, step)` samples every request of `step.part` (in as many batches as it likes) and returns the final
    latents: with full computation when `step.cached` is false, else through the policy with `calibrator`. The report
    gives the relative L2 error against full computation without and with the priors on the held-out requests
    (`held_out_before`, `held_out_after`) and, with `verify`, on the fit requests (`in_sample_*`).
    """
    fit = TccFit(variant, sequential, full_trajectory)
    priors: TccPriors | None = None
    out: dict[tuple[str, str], Tensor] = {}
    fitted_rounds = 0
    for step in fit_plan(variant, rounds, held_out, verify, statistics, full_trajectory):
        if step.purpose == STATISTICS:
            run(None, step)
        elif step.purpose == REFERENCE:
            run(fit, step)
            fit.end_reference()
        elif step.purpose == FITTING:
            if fitted_rounds:
                fit.end_round()
            run(fit, step)
            fitted_rounds += 1
        else:
            if priors is None:
                priors = finished(fit)
            out[(step.part, step.purpose)] = run(priors if step.purpose == AFTER else None, step)
    priors = priors or finished(fit)
    report: dict = {"sites": len(priors.priors), "rounds": rounds, "sequential": sequential}
    for part, name in ((HELD_OUT, "held_out"), (FIT, "in_sample")):
        if (part, FULL) in out:
            full = out[(part, FULL)]
            report[f"{name}_before"] = rel_l2(out[(part, BEFORE)], full)
            report[f"{name}_after"] = rel_l2(out[(part, AFTER)], full)
    return priors, report


def finished(fit: TccFit) -> TccPriors:
    """The fitted priors, refused when there are none or they are not finite."""
    priors = fit.priors()
    if not priors.priors:
        raise ValueError("the policy reused nothing on the calibration runs: there is nothing to calibrate")
    broken = [k for k, p in priors.priors.items() if not p.finite()]
    if broken:
        raise ValueError(f"the fit produced non-finite priors at {len(broken)} sites (first: {broken[0]}); the model's "
                         "values overflow there. Try another variant, or fit in a higher precision.")
    return priors


def rel_l2(x: Tensor, ref: Tensor) -> float:
    """Mean over samples of ||x − ref|| / ||ref||, as the benchmark reports it."""
    d, r = (x.float() - ref.float()).flatten(1), ref.float().flatten(1)
    return float((d.norm(dim=1) / r.norm(dim=1).clamp_min(1e-12)).mean())
