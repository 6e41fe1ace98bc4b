"""Fit TCC Priors: calibrate a fixed cache policy on a model by sampling a few seeds fully and through the cache, and
save the priors with their provenance so that Apply Calibrated Cache can load them.

The fit samples the unpatched input model for full computation and a clone patched exactly as Apply Calibrated Cache
patches it for the cached runs, with the same seeds and sigmas in every run. One progress bar covers all runs; its
callback is also where an interrupt stops the fit. The file is written once, atomically, at the end, so an
interrupted or failed fit leaves nothing behind.
"""

from __future__ import annotations

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
from ..calibration import CachePolicy
from ..calibration.calibrator import Calibrator
from ..calibration.icc import SVD_MODES, FactorCache, StatsRecorder
from ..calibration.tcc import VARIANTS, fit_runs, fit_tcc, resolve_variant
from ..priors import save_priors
from . import folders
from .apply_node import MAX_RANK, WrappersMP, block_policy, patch_model, with_icc
from .fitted import FittedPriors, TccPriorsType, fingerprint
from .linears import recording_clone
from .policy_node import CATEGORY, CachePolicyType
from .session import KEY, CacheSession, send_event

BESIDE, IN_FOLDER = "beside checkpoint", "cache_priors folder"
FIT_EVENT = "calibrated_cache.fit"
PROGRESS_EVERY_S = 0.25  # the page redraws the node on each event; every step would flood it on fast models


def check_fittable(model: ModelPatcher, policy: CachePolicy) -> None:
    """TCC fits one prior per step the policy reuses, on the full model: it needs such steps, fixed in advance."""
    if policy.mode != "fixed":
        raise ValueError("Fit TCC Priors needs a fixed-interval policy: a dynamic policy reuses different steps for "
                         "every prompt, so no prior can be fitted for them. Set the Cache Policy mode to fixed.")
    if policy.computes_everything():
        raise ValueError("Fit TCC Priors needs a policy that reuses: interval 1 computes every step, so there is "
                         "nothing to calibrate. Set the Cache Policy interval to 2 or more.")
    if model.get_wrappers(WrappersMP.OUTER_SAMPLE, KEY):
        raise ValueError("the model given to Fit TCC Priors already went through Apply Calibrated Cache, so its full "
                         "computation would be cached too. Connect the model from before Apply Calibrated Cache.")


def sigmas_for(model: ModelPatcher, sampler_name: str, scheduler: str, steps: int) -> Tensor:
    """The sigmas KSampler samples these settings with (some samplers drop the penultimate one)."""
    return comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                   scheduler=scheduler, denoise=1.0, model_options=model.model_options).sigmas


@dataclass
class CalibrationRuns:
    """`fit_tcc`'s run: samples every calibration seed, fully (on a clone of the input model that records ICC's channel
    statistics) or cached on the patched clone. ICC in the cached runs uses the statistics of the full runs before."""

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
    seeds: list[int]
    runs: int  # how many times fit_tcc will call this: the progress bar spans them all
    recorder: StatsRecorder
    node_id: str | None = None

    def __post_init__(self) -> None:
        self.image = comfy.sample.fix_empty_latent_channels(self.model, self.latent["samples"])
        self.total = self.runs * len(self.seeds) * (len(self.sigmas) - 1)
        self.progress = comfy.utils.ProgressBar(self.total)
        self.done, self.calls, self.seed, self.phase = 0, 0, self.seeds[0], ""
        self.started = self.sent = time.monotonic()

    def __call__(self, calibrator: Calibrator | None, cached: bool) -> Tensor:
        self.session.calibrator = calibrator
        self.phase = fit_phase(self.calls, self.runs, cached)
        self.calls += 1
        out = torch.cat([self._sample(self.clone if cached else self.model, seed) for seed in self.seeds])
        if not cached:
            self.session.factors = FactorCache(self.recorder.table())
        return out

    def _sample(self, model: ModelPatcher, seed: int) -> Tensor:
        self.seed = seed
        noise = comfy.sample.prepare_noise(self.image, seed, self.latent.get("batch_index"))
        return comfy.sample.sample(model, noise, len(self.sigmas) - 1, self.cfg, self.sampler_name, self.scheduler,
                                   self.positive, self.negative, self.image, noise_mask=self.latent.get("noise_mask"),
                                   sigmas=self.sigmas, callback=self._step, disable_pbar=True, seed=seed)

    def _step(self, step: int, denoised: Tensor, x: Tensor, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()  # scripts have no progress hook to do it
        self.progress.update(1)
        self.done += 1
        now = time.monotonic()
        if now - self.sent >= PROGRESS_EVERY_S or step == 0 or self.done == self.total:
            self.sent = now
            elapsed = now - self.started
            send_event(FIT_EVENT, {"node": self.node_id, "phase": self.phase, "run": self.calls, "runs": self.runs,
                                   "seed": self.seed, "done": self.done, "total": self.total, "elapsed_s": elapsed,
                                   "eta_s": elapsed * (self.total - self.done) / self.done})


def fit_phase(call: int, runs: int, cached: bool) -> str:
    """What fit_tcc's `call`-th sampling run is for (its order: full, cached, fitting runs, cached with priors)."""
    if not cached:
        return "full computation"
    if call == 1:
        return "cached, without priors"
    return "cached, with the fitted priors" if call == runs - 1 else "fitting"


def report_text(report: dict, variant: str, tag: str, samples: int, path: str) -> str:
    before, after = report["rel_l2_before"], report["rel_l2_after"]
    change = f" ({after / before - 1:+.0%})" if before > 0 else ""
    return (f"TCC priors ({variant}) for {tag}: {report['sites']} sites\n"
            f"error against full computation (rel L2, mean over {samples} calibration samples): "
            f"{before:.4f} without priors, {after:.4f} with priors{change}\n"
            f"saved to {path}")


class FitTccPriorsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibratedCache_FitTCCPriors",
            display_name="Fit TCC Priors",
            category=CATEGORY,
            description="Calibrates a fixed cache policy on this model: samples a few seeds with full computation and "
                        "through the cache, fits a per-channel correction for every value the policy reuses (TCC), "
                        "and saves it as a .tcc.safetensors file for Apply Calibrated Cache. Costs a few samplings "
                        "per seed; runs again only when its inputs change.",
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate, from before Apply Calibrated Cache "
                                                "(LoRAs applied as you will sample)."),
                CachePolicyType.Input("policy", tooltip="A fixed-interval Cache Policy that reuses (interval 2 or "
                                                        "more); connect the same one to Apply Calibrated Cache."),
                io.Conditioning.Input("positive", tooltip="A typical prompt; priors carry over to other prompts."),
                io.Conditioning.Input("negative", tooltip="The negative prompt you will sample with."),
                io.Latent.Input("latent", tooltip="An empty latent of the size you will sample."),
                io.Int.Input("samples", default=4, min=1, max=64,
                             tooltip="Calibration seeds (seed, seed + 1, ...). More fit better and cost more."),
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
                               tooltip="auto: drift with reuse, mm with taylor/foca (what the benchmark found best). "
                                       "drift: corrects the bias and continuing drift of reused values. "
                                       "trend: also rescales them (lower error per block, softer images). mm: "
                                       "matches their mean and spread to full computation (the published TCC)."),
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
            ],
            outputs=[TccPriorsType.Output(display_name="priors"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: ModelPatcher, policy: CachePolicy, positive: list, negative: list, latent: dict,
                samples: int, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, variant: str,
                checkpoint: str, save_to: str, overwrite: bool, icc_rank: int = 0,
                icc_svd: str = SVD_MODES[0]) -> io.NodeOutput:
        policy = block_policy(with_icc(policy, icc_rank, icc_svd))
        check_fittable(model, policy)
        variant = resolve_variant(variant, policy.forecaster)
        path = folders.target_path(checkpoint, policy.tag(), save_to == BESIDE)
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{path} already exists. Enable overwrite to refit it, or rename the existing file to "
                             "keep it.")
        clone, session = patch_model(model, policy)
        recorder = StatsRecorder()
        identity = fingerprint(model, session.family.name)
        if checkpoint != folders.NONE:
            identity["name"] = checkpoint
        sigmas = sigmas_for(model, sampler_name, scheduler, steps)
        seeds = [(seed + i) % 2**64 for i in range(samples)]  # torch seeds are 64-bit
        node_id = getattr(cls.hidden, "unique_id", None)
        runs = CalibrationRuns(recording_clone(model, session.blocks, recorder), clone, session, positive, negative,
                               latent, sigmas, cfg, sampler_name, scheduler, seeds, fit_runs(variant, 1), recorder,
                               node_id)
        priors, report = fit_tcc(runs, variant)
        channels = recorder.table()
        meta = {"model": identity, "policy": policy.to_dict(), "policy_tag": policy.tag(),
                "sigmas": sigmas.flatten().tolist(), "steps": steps, "sampler": sampler_name,
                "scheduler": scheduler, "cfg": cfg, "samples": samples, "seeds": seeds, "pack_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "report": report, "icc_stats": {**recorder.summary(), "samples": samples, "seeds": seeds}}
        save_priors(path, priors, meta, channels)
        text = report_text(report, variant, policy.tag(), samples, path)
        send_event(FIT_EVENT, {"node": node_id, "finished": True, "error_before": report["rel_l2_before"],
                               "error_after": report["rel_l2_after"], "sites": report["sites"], "path": path,
                               "elapsed_s": time.monotonic() - runs.started})
        return io.NodeOutput(FittedPriors(priors, meta, path, channels), text, ui=ui.PreviewText(text))
