"""Fit TCC Priors: calibrate a fixed cache policy on a model, and save the priors with their provenance so that Apply
Calibrated Cache can load them.

Of its calibration seeds, the last `held_out` are held out. The fit runs the cached policy once on each fitting seed,
recomputing every reused block to fit against (so each costs about one full sampling); then it measures the error
against full computation without and with the priors on the held-out seeds, which the priors never saw (one full and
two cached samplings each). `verify` measures the in-sample error too (a target speedup always does). The full
computation runs on a clone of the unpatched input model, the cached ones on a clone patched exactly as Apply
Calibrated Cache patches it, with the same sigmas in every run. ICC's channel statistics are recorded on the first
fitting seed. One progress bar covers all runs; its callback is also where an interrupt stops the fit. The file is
written once, atomically, at the end, so an interrupted or failed fit leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io, ui
from torch import Tensor

from .. import __version__
from ..calibration import CachePolicy, PolicyError, RunStats
from ..calibration.calibrator import Calibrator
from ..calibration.icc import SVD_MODES, FactorCache, StatsRecorder
from ..calibration.fitting import FIT, HELD_OUT, FitRun, fit_plan, fit_tcc
from ..calibration.search import SLACK
from ..calibration.speed_fit import MIXED, WHOLE_STEP, SpeedFit, fit_for_speed, fit_runs, priors_verdict
from ..calibration.step_costs import RoundTimer
from ..calibration.tcc import VARIANTS, resolve_variant
from ..priors import save_priors
from . import folders
from .apply_node import MAX_RANK, WrappersMP, block_policy, patch_model, with_icc
from .device_timing import device_sync, timing_record
from .fitted import FittedPriors, TccPriorsType, comfyui_version, fingerprint
from .linears import record_linears
from .policy_node import CATEGORY, CachePolicyType
from .session import KEY, CacheSession, send_event

log = logging.getLogger("calibrated_cache")
BESIDE, IN_FOLDER = "beside checkpoint", "cache_priors folder"
FIT_EVENT = "calibrated_cache.fit"
PROGRESS_EVERY_S = 0.25  # the page redraws the node on each event; every step would flood it on fast models
SHORTFALL = 0.9  # a measured wall speedup below this share of the target is reported as missing it
DEFAULT_SAMPLES = 3  # 2 fitting seeds and 1 held out: docs/methods.md, "How many calibration seeds"


def check_fittable(model: ModelPatcher, policy: CachePolicy) -> None:
    """TCC fits one prior per step the policy reuses, on the full model: it needs such steps, fixed in advance."""
    if policy.mode != "fixed":
        raise ValueError("Fit TCC Priors needs a fixed-interval policy: a dynamic policy reuses different steps for "
                         "every prompt, so no prior can be fitted for them. Set the Cache Policy mode to fixed.")
    if policy.computes_everything():
        raise ValueError("Fit TCC Priors needs a policy that reuses: interval 1 computes every step, so there is "
                         "nothing to calibrate. Set the Cache Policy interval to 2 or more.")
    check_unpatched(model)


def check_unpatched(model: ModelPatcher) -> None:
    if model.get_wrappers(WrappersMP.OUTER_SAMPLE, KEY):
        raise ValueError("the model given to Fit TCC Priors already went through Apply Calibrated Cache, so its full "
                         "computation would be cached too. Connect the model from before Apply Calibrated Cache.")


def prior_meta(model: ModelPatcher, family: str, checkpoint: str, policy: CachePolicy, sigmas: Tensor, steps: int,
               sampler_name: str, scheduler: str, cfg: float, seeds: dict[str, list[int]], report: dict) -> dict:
    """A fit's provenance, as its prior file records it."""
    identity = fingerprint(model, family)
    if checkpoint != folders.NONE:
        identity["name"] = checkpoint
    return {"model": identity, "policy": policy.to_dict(), "policy_tag": policy.tag(),
            "sigmas": sigmas.flatten().tolist(), "steps": steps, "sampler": sampler_name, "scheduler": scheduler,
            "cfg": cfg, "samples": len(seeds[FIT]), "seeds": seeds[FIT], "held_out": len(seeds[HELD_OUT]),
            "held_out_seeds": seeds[HELD_OUT], "pack_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "report": report,
            **({"comfyui_version": comfyui} if (comfyui := comfyui_version()) else {})}


def sigmas_for(model: ModelPatcher, sampler_name: str, scheduler: str, steps: int) -> Tensor:
    """The sigmas KSampler samples these settings with (some samplers drop the penultimate one)."""
    return comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                   scheduler=scheduler, denoise=1.0, model_options=model.model_options).sigmas


class Recording:
    """Whether the sampling run now going records ICC's channel statistics (the fit's first run over its fitting
    seeds, which computes every block); both clones route their block Linears through `target`."""

    def __init__(self, recorder: StatsRecorder) -> None:
        self.recorder, self.on = recorder, False

    def target(self) -> StatsRecorder | None:
        return self.recorder if self.on else None


@dataclass
class CalibrationRuns:
    """`fit_tcc`'s run: samples the seeds of one part (fitting or held-out) fully or cached on the patched clone, one
    seed at a time, so memory stays that of one sampling. A policy with ICC uses the statistics recorded before."""

    model: ModelPatcher
    clone: ModelPatcher
    session: CacheSession
    positive: list
    negative: list
    latent: dict
    sigmas: Tensor
    cfg: float
    sampler_name: str
    scheduler: str
    seeds: dict[str, list[int]]  # part -> seeds
    plan: list[FitRun]  # the runs fit_tcc will make: the progress bar spans them all
    recording: Recording
    node_id: str | None = None

    def __post_init__(self) -> None:
        self.image = comfy.sample.fix_empty_latent_channels(self.model, self.latent["samples"])
        self.total = sum(len(self.seeds[step.part]) for step in self.plan) * (len(self.sigmas) - 1)
        self.progress = comfy.utils.ProgressBar(self.total)
        self.done, self.calls, self.seed, self.phase = 0, 0, -1, ""
        self.full_seconds: float | None = None  # one full-computation sampling of one seed: the fit's unit of cost
        self.started = self.sent = time.monotonic()

    def __call__(self, calibrator: Calibrator | None, step: FitRun) -> Tensor:
        self.session.calibrator = calibrator
        self.phase = f"{step.purpose} ({'held-out seeds' if step.part == HELD_OUT else 'fitting seeds'})"
        self.calls += 1
        start, out = time.monotonic(), []
        for i, seed in enumerate(self.seeds[step.part]):
            # ICC's channel statistics: one seed's run gives every Linear thousands of token changes per step
            self.recording.on = step.records and i == 0
            try:
                out.append(as_rows(self._sample(self.clone if step.cached else self.model, seed)))
            finally:
                self.recording.on = False
        if step.part == HELD_OUT and not step.cached:
            self.full_seconds = (time.monotonic() - start) / len(self.seeds[step.part])
        if step.records and self.session.policy.icc is not None:
            self.session.factors = FactorCache(self.recording.recorder.table())
        return torch.cat(out)

    def fewer_steps(self, steps: int) -> Tensor:
        """Full computation of the held-out seeds at `steps` steps of the same sampler and scheduler: the honest floor
        a policy is compared with at its measured speed."""
        sigmas = sigmas_for(self.model, self.sampler_name, self.scheduler, steps)
        return torch.cat([as_rows(self._sample(self.model, seed, sigmas)) for seed in self.seeds[HELD_OUT]])

    def _sample(self, model: ModelPatcher, seed: int, sigmas: Tensor | None = None) -> Tensor:
        self.seed = seed
        sigmas = self.sigmas if sigmas is None else sigmas
        noise = comfy.sample.prepare_noise(self.image, seed, self.latent.get("batch_index"))
        return comfy.sample.sample(model, noise, len(sigmas) - 1, self.cfg, self.sampler_name, self.scheduler,
                                   self.positive, self.negative, self.image, noise_mask=self.latent.get("noise_mask"),
                                   sigmas=sigmas, callback=self._step, disable_pbar=True, seed=seed)

    def _step(self, step: int, denoised: Tensor, x: Tensor, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()  # scripts have no progress hook to do it
        self.progress.update(1)
        self.done += 1
        now = time.monotonic()
        if now - self.sent >= PROGRESS_EVERY_S or step == 0 or self.done == self.total:
            self.sent = now
            elapsed = now - self.started
            send_event(FIT_EVENT, {"node": self.node_id, "phase": self.phase, "run": self.calls,
                                   "runs": len(self.plan), "seed": self.seed, "done": self.done, "total": self.total,
                                   "elapsed_s": elapsed, "eta_s": elapsed * (self.total - self.done) / self.done})


def as_rows(latent: Tensor) -> Tensor:
    """One row per sample: a nested latent (LTX-2's video and audio) has its parts flattened side by side, so the
    fit's error counts both."""
    if getattr(latent, "is_nested", False):
        return torch.cat([part.flatten(1) for part in latent.unbind()], dim=1)
    return latent


def split_seeds(seed: int, samples: int, held_out: int) -> dict[str, list[int]]:
    """seed, seed + 1, … (torch seeds are 64-bit): the last `held_out` are held out, the rest fitted on."""
    if not 1 <= held_out < samples:
        raise ValueError(f"Fit TCC Priors holds out {held_out} of its {samples} seeds, and needs at least one seed to "
                         "fit on and one to measure on: set held_out between 1 and samples - 1")
    seeds = [(seed + i) % 2**64 for i in range(samples)]
    return {FIT: seeds[:-held_out], HELD_OUT: seeds[-held_out:]}


def report_text(report: dict, variant: str, tag: str, seeds: dict[str, list[int]], path: str,
                cost: float | None) -> str:
    lines = [f"TCC priors ({variant}) for {tag}: {report['sites']} sites, fitted on seeds {seed_list(seeds[FIT])}",
             f"held-out seeds {seed_list(seeds[HELD_OUT])}: error against full computation (rel L2) "
             + change_text(report["held_out_before"], report["held_out_after"])]
    if "in_sample_before" in report:
        lines.append(f"fitting seeds (optimistic): {change_text(report['in_sample_before'], report['in_sample_after'])}")
    if not gained(report):
        lines.append(NO_GAIN)
    if cost is not None:
        lines.append(f"the fit cost {cost:.1f} full samplings of one seed")
    return "\n".join(lines + [f"saved to {path}"])


NO_GAIN = ("these priors did not lower the error on seeds they never saw: sample without them (leave Apply's priors "
           "empty); with a reuse (FORA) policy, drift priors usually gain most (docs/methods.md, TCC)")


def gained(report: dict) -> bool:
    """Whether the priors lowered the error on the held-out seeds."""
    return report["held_out_after"] < report["held_out_before"]


def change_text(before: float, after: float) -> str:
    change = f" ({after / before - 1:+.0%})" if before > 0 else ""
    return f"{before:.4f} without priors, {after:.4f} with priors{change}"


def seed_list(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds)) if len(seeds) <= 4 else f"{seeds[0]}-{seeds[-1]}"


class FitTccPriorsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibratedCache_FitTCCPriors",
            display_name="Fit TCC Priors",
            category=CATEGORY,
            description="Calibrates a fixed cache policy on this model: fits a per-channel correction for every value "
                        "the policy reuses (TCC) on a few seeds, measures it on a held-out seed, and saves it as a "
                        ".tcc.safetensors file for Apply Calibrated Cache. Costs about one sampling per seed; runs "
                        "again only when its inputs change.",
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate, from before Apply Calibrated Cache "
                                                "(LoRAs applied as you will sample)."),
                CachePolicyType.Input("policy", tooltip="A fixed-interval Cache Policy that reuses (interval 2 or "
                                                        "more); connect the same one to Apply Calibrated Cache."),
                io.Conditioning.Input("positive", tooltip="A typical prompt; priors carry over to other prompts."),
                io.Conditioning.Input("negative", tooltip="The negative prompt you will sample with."),
                io.Latent.Input("latent", tooltip="An empty latent of the size you will sample."),
                io.Int.Input("samples", default=DEFAULT_SAMPLES, min=2, max=64,
                             tooltip="Calibration seeds (seed, seed + 1, ...): the priors are fitted on all but the "
                                     "last held_out of them, and their error is measured on those. More fit better; "
                                     "each fitting seed costs about one sampling."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="The first calibration seed (fixed: a new seed would refit on every queue)."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="The steps you will sample with; other step counts get interpolated priors."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The cfg you will sample with."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The sampler you will sample with."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="The scheduler you will sample with."),
                io.Combo.Input("variant", options=["auto", *VARIANTS], default="auto",
                               tooltip="auto: drift with reuse, mm with taylor/foca (what the benchmark found "
                                       "best); with a target speedup, each variant is fitted and the best on the "
                                       "fitting seeds kept. drift: corrects the bias and continuing drift of "
                                       "reused values. trend: also rescales them (lower error per block, softer "
                                       "images). mm: matches their mean and spread to full computation (the "
                                       "published TCC)."),
                io.Combo.Input("checkpoint", options=[folders.NONE, *folders.checkpoints()],
                               tooltip="The model's file: names the prior file, and the folder beside it. none: "
                                       "the file is named model.<policy>.tcc.safetensors."),
                io.Combo.Input("save_to", options=[BESIDE, IN_FOLDER], default=IN_FOLDER,
                               tooltip="Beside the checkpoint (when that folder is writable) or in the first "
                                       "cache_priors folder (models/cache_priors, or one in extra_model_paths.yaml)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing prior file of the same name."),
                io.Int.Input("icc_rank", default=0, min=0, max=MAX_RANK, optional=True,
                             tooltip="Fit the priors for ICC at this rank (set the same on Apply Calibrated Cache). "
                                     "0: without ICC. Every file records ICC's channel statistics either way."),
                io.Combo.Input("icc_svd", options=list(SVD_MODES), default=SVD_MODES[0], optional=True,
                               tooltip="ICC's factorisation while fitting; set the same on Apply Calibrated Cache."),
                io.Int.Input("held_out", default=1, min=1, max=63, optional=True,
                             tooltip="How many of the samples seeds are held out: not fitted on, the fit's error "
                                     "is measured on them (full computation and two cached samplings each)."),
                io.Boolean.Input("verify", default=False, optional=True,
                                 tooltip="Also measure the error on the fitting seeds (optimistic: the priors were "
                                         "fitted there); three more samplings per fitting seed. With a target "
                                         "speedup it is always measured, whatever this says: it chooses the TCC "
                                         "variant and whether the priors are kept (the report says so)."),
                io.Float.Input("target_speedup", default=0.0, min=0.0, max=100.0, step=0.5, optional=True,
                               tooltip="0: fit priors for the connected policy. Above 1: make sampling this many "
                                       "times faster by the clock on this machine: the fit times its own runs, "
                                       "chooses among searched block plans, whole-step forecasts and plans mixing "
                                       "them step by step, fits the "
                                       "priors, then measures the speedup reached and full computation with fewer "
                                       "steps on the held-out seed. Apply Calibrated Cache then needs only the "
                                       "file. Costs about 37–60 samplings of one seed, and up to 16 more for the "
                                       "timing runs."),
            ],
            outputs=[TccPriorsType.Output(display_name="priors"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: ModelPatcher, policy: CachePolicy, positive: list, negative: list, latent: dict,
                samples: int, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, variant: str,
                checkpoint: str, save_to: str, overwrite: bool, icc_rank: int = 0, icc_svd: str = SVD_MODES[0],
                held_out: int = 1, verify: bool = False, target_speedup: float = 0.0) -> io.NodeOutput:
        policy = block_policy(with_icc(policy, icc_rank, icc_svd))
        if target_speedup:
            return fit_for_target(cls, model, policy, positive, negative, latent, samples, seed, steps, cfg,
                                  sampler_name, scheduler, variant, checkpoint, save_to, overwrite, held_out,
                                  target_speedup, verify)
        check_fittable(model, policy)
        seeds = split_seeds(seed, samples, held_out)
        variant = resolve_variant(variant, policy.forecaster)
        path = folders.target_path(checkpoint, policy.tag(), save_to == BESIDE)
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{path} already exists. Enable overwrite to refit it, or rename the existing file to "
                             "keep it.")
        clone, session = patch_model(model, policy)
        recording = Recording(StatsRecorder())
        full = model.clone()
        record_linears(full, session.blocks, recording.recorder, recording.target)
        if policy.icc is None:  # its fitting runs compute every block: they record; ICC's need statistics first
            record_linears(clone, session.blocks, recording.recorder, recording.target)
        sigmas = sigmas_for(model, sampler_name, scheduler, steps)
        node_id = getattr(cls.hidden, "unique_id", None)
        statistics = policy.icc is not None
        runs = CalibrationRuns(full, clone, session, positive, negative, latent, sigmas, cfg, sampler_name, scheduler,
                               seeds, fit_plan(variant, 1, True, verify, statistics), recording, node_id)
        priors, report = fit_tcc(runs, variant, verify=verify, statistics=statistics)
        elapsed = time.monotonic() - runs.started
        cost = elapsed / runs.full_seconds if runs.full_seconds else None
        report = {**report, "fit_s": elapsed, **({"fit_cost_samplings": cost} if cost is not None else {})}
        fitted = seeds[FIT]
        meta = {**prior_meta(model, session.family.name, checkpoint, policy, sigmas, steps, sampler_name, scheduler,
                             cfg, seeds, report),
                "icc_stats": {**recording.recorder.summary(), "samples": 1, "seeds": fitted[:1]}}
        save_priors(path, priors, meta, recording.recorder.table())
        text = report_text(report, variant, policy.tag(), seeds, path, cost)
        if not gained(report):
            log.warning("calibrated_cache: Fit TCC Priors for %s: %s", policy.tag(), NO_GAIN)
        send_event(FIT_EVENT, {"node": node_id, "finished": True, "error_on": "held-out",
                               "error_before": report["held_out_before"], "error_after": report["held_out_after"],
                               "in_sample_before": report.get("in_sample_before"),
                               "in_sample_after": report.get("in_sample_after"), "fitted_seeds": fitted,
                               "held_out_seeds": seeds[HELD_OUT], "sites": report["sites"], "path": path,
                               "elapsed_s": elapsed, "cost_samplings": cost})
        return io.NodeOutput(FittedPriors.output(priors, meta, path, recording.recorder.table()), text,
                             ui=ui.PreviewText(text))


def fit_for_target(cls, model: ModelPatcher, base: CachePolicy, positive: list, negative: list, latent: dict,
                   samples: int, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, variant: str,
                   checkpoint: str, save_to: str, overwrite: bool, held_out: int, speedup: float,
                   verify: bool = False) -> io.NodeOutput:
    """Fit TCC Priors with a target speedup: the plan search (calibration/speed_fit.py) on the fitting seeds, the
    priors for the plan it chooses, its error on the held-out seeds; one file whose policy is the plan, with the
    priors only where they helped (else the plan alone). The fitting seeds' error is measured whatever `verify`
    says (it decides the variant and the priors); the text says so when verify is off."""
    if speedup <= 1:
        raise ValueError(f"target_speedup must be above 1 (got {speedup:g}); 0 fits priors for the connected policy")
    if base.icc is not None or base.goc is not None:
        raise ValueError("a target speedup chooses the schedule and forecaster itself, without ICC or GOC: set "
                         "icc_rank to 0 and connect a Cache Policy without a GOC Corrector")
    check_unpatched(model)
    seeds = split_seeds(seed, samples, held_out)
    # named after the target, not the plan (known only at the end), so an existing file is refused before the fit
    path = folders.target_path(checkpoint, f"SPEEDUP{speedup:g}_{block_policy(base).tag().split('_')[-1]}",
                               save_to == BESIDE)
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists. Enable overwrite to refit it, or rename the existing file to "
                         "keep it.")
    sigmas = sigmas_for(model, sampler_name, scheduler, steps)
    clone, session = patch_model(model, block_policy(base))
    session.timer = RoundTimer(sync=device_sync(model.load_device))
    node_id = getattr(cls.hidden, "unique_id", None)
    schedule = [FitRun(part, cached, "plan search")
                for part, cached in fit_runs(held_out=True, variant=variant, timed=True)]
    runs = CalibrationRuns(model.clone(), clone, session, positive, negative, latent, sigmas, cfg, sampler_name,
                           scheduler, seeds, schedule, Recording(StatsRecorder()), node_id)

    def run(policy: CachePolicy | None, calibrator: Calibrator | None, part: str) -> tuple[Tensor, RunStats | None]:
        if policy is not None:
            session.policy = block_policy(policy)
        out = runs(calibrator, FitRun(part, policy is not None, "plan search" if part == FIT else "held-out"))
        return out, session.last_stats if policy is not None else None

    try:
        fitted = fit_for_speed(run, base, sigmas.flatten().tolist(), len(session.blocks), speedup,
                               variant=variant, timer=session.timer, fewer_steps=runs.fewer_steps)
    except PolicyError as err:
        raise ValueError(str(err)) from None
    policy = fitted.policy
    elapsed = time.monotonic() - runs.started
    cost = elapsed / runs.full_seconds if runs.full_seconds else None
    report = {**fitted.report, "fit_s": elapsed, **({"fit_cost_samplings": cost} if cost is not None else {})}
    fitted_seeds = seeds[FIT]
    meta = {**prior_meta(model, session.family.name, checkpoint, policy, sigmas, steps, sampler_name, scheduler, cfg,
                         seeds, report),
            **({"timing": timing_record(model.load_device, report)} if "cost_full_step_s" in report else {})}
    save_priors(path, fitted.priors, meta)
    text = target_text(fitted, speedup, seeds, path, cost, verify)
    send_event(FIT_EVENT, {"node": node_id, "finished": True, "error_on": "held-out",
                           "error_before": report["held_out_before"], "error_after": report["held_out_after"],
                           "fitted_seeds": fitted_seeds, "held_out_seeds": seeds[HELD_OUT],
                           "sites": report["sites"], "path": path, "elapsed_s": elapsed, "cost_samplings": cost,
                           "plan": policy.plan.picture() if policy.plan is not None else policy.tag(),
                           "fraction_predicted": report["plan_predicted_fraction"],
                           "speedup_measured": report.get("plan_measured_speedup"),
                           "fraction_measured": report["plan_calibration_fraction"],
                           "fraction_file": report["plan_file_fraction"], "priors_kept": bool(report["plan_priors"])})
    return io.NodeOutput(FittedPriors.output(fitted.priors, meta, path), text, ui=ui.PreviewText(text))


MIX_KEYS = ("plan_steps_computed", "plan_steps_blocks_filled", "plan_steps_forecast_whole")


def target_text(fitted: SpeedFit, speedup: float, seeds: dict[str, list[int]], path: str, cost: float | None,
                verify: bool) -> str:
    """The node's report of a speed fit: the policy it chose for the wall-clock target, its predicted and measured
    wall speedup (and a plain word where the measurement falls short), the candidates, the cost model, the search's
    cost, and what the file holds, priors or the policy alone, and why."""
    report, policy = fitted.report, fitted.policy
    whole, mixed = bool(report["plan_whole_steps"]), bool(report.get("plan_mixed"))
    kind = ("whole steps forecast, no block plan" if whole else
            "searched plan mixing whole-step forecasts and block fills" if mixed else "searched block plan")
    measured = report.get("plan_measured_speedup")
    clock = "wall-clock on this machine" if report.get("plan_wall_timed") else "in FLOPs (too few steps to time)"
    lines = [
        f"chosen for {speedup:g}x {clock}: {policy.tag()} "
        f"({kind}), predicted "
        f"{1 / report['plan_predicted_fraction']:.2f}x, compute fraction {report['plan_file_fraction']:.3f}"]
    if measured is not None:
        low, high = report["plan_measured_speedup_low"], report["plan_measured_speedup_high"]
        lines.append(f"measured {measured:.2f}x (paired runs {low:.2f}-{high:.2f}x) against full computation on the "
                     f"held-out seeds")
        if measured < SHORTFALL * speedup:
            keeps = math.floor(10 * measured) / 10
            lines.append(f"BELOW the target: the policy the fit chose within its cost model measured {measured:.2f}x "
                         "here; " + (f"a target of at most {keeps:g} is one this machine keeps" if keeps > 1 else
                                     "caching gains this model nothing on this machine: sample without it"))
    if "fewer_steps" in report:
        k, floor, own = int(report["fewer_steps"]), report["fewer_steps_error"], report["plan_held_out_error"]
        lines.append(f"full computation at {k} steps takes about the same time: rel L2 {floor:.4f} on the held-out "
                     f"seeds against this policy's {own:.4f}"
                     + (f"; FEWER STEPS DO AS WELL OR BETTER here: sample {k} steps without the cache"
                        if floor <= own else ""))
    if "plan_steps_computed" in report:
        lines.append(f"of {sum(int(report[k]) for k in MIX_KEYS)} steps: {int(report['plan_steps_computed'])} "
                     f"compute every block, {int(report['plan_steps_blocks_filled'])} fill blocks in, "
                     f"{int(report['plan_steps_forecast_whole'])} forecast the model's output whole")
    if policy.plan is not None:
        lines.append(policy.plan.picture() + ("\n('-': the model's output forecast whole)" if mixed else ""))
    names = {WHOLE_STEP: "whole steps", MIXED: "mixed"}
    lines += [f"candidate {c.policy.tag()} ({names.get(c.aggregate, 'block plan')}): "
              f"predicted {1 / c.fraction:.2f}x, rel L2 {c.error:.4f} on the fitting seeds" for c in fitted.candidates]
    if "cost_outside_s" in report:
        lines.append(f"cost model from {int(report['cost_rounds'])} timed steps, per sample: outside the blocks "
                     f"{report['cost_outside_s'] * 1e3:.3g} ms, computed blocks {report['cost_per_gflop_s'] * 1e3:.3g} "
                     f"ms/GFLOP, forecasts {report['cost_per_fill_gflop_s'] * 1e3:.3g} ms/GFLOP"
                     + (f", a step forecast whole {report['cost_whole_step_s'] * 1e3:.3g} ms"
                        if "cost_whole_step_s" in report else ""))
    if not whole and not mixed:
        lines.append(f"refined by {int(report['plan_refine_runs'])} runs: rel L2 {report['plan_searched_error']:.4f} "
                     f"-> {report['plan_calibration_error']:.4f} on the fitting seeds")
    lines += [f"search {report['plan_search_s']:.2f} s and {report['plan_search_bytes'] / 2**20:.1f} MiB of tables, "
              f"{int(report['plan_runs'])} samplings of the fitting and held-out seeds",
              *(f"not searched: {note}" for note in fitted.skipped)]
    # the verdict says what the file holds, where a fixed policy's fit would advise leaving Apply's priors empty
    fit = [line for line in report_text(report, fitted.priors.variant, policy.tag(), seeds, path, cost).splitlines()
           if line != NO_GAIN]
    tail = [line for line in fit if line.startswith(("the fit cost", "saved to"))]
    lines += [line for line in fit if line not in tail] + [priors_verdict(report, fitted.priors.variant)]
    if not verify:
        lines.append("verify is off, but a target speedup measures the fitting seeds anyway: their error chooses the "
                     "TCC variant and whether the priors are kept")
    return "\n".join(lines + tail)
