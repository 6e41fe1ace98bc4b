"""Whether a prior file fits the model, policy and schedule of a run: refuse what cannot work, warn on what may.

Priors belong to one model and one policy. Another step count or schedule is accepted when every step the policy
reuses lies within the σ range the priors were fitted on and its staleness is within a factor of three of the
fitted one: `TccPriors` then interpolates over σ (see calibration/tcc.py). Anything further is refused: refit.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..calibration.policy import CachePolicy
from ..calibration.schedule import StepPlan

MAX_GAP_RATIO = 3.0


class PriorMismatch(ValueError):
    """Priors that do not belong to this run; the message names both sides and the fix."""


def describe_model(fp: dict[str, Any]) -> str:
    name = f"{fp['name']}, " if fp.get("name") else ""
    return f"{name}{fp.get('family', '?')} architecture {fp.get('architecture', '?')} weights {fp.get('weights', '?')}"


IDENTITY = ("family", "architecture", "weights", "patches")


def check_model(meta: dict[str, Any], model: dict[str, Any], file: str, parts: tuple[str, ...] = IDENTITY,
                comfyui: str | None = None) -> None:
    """`parts`: which parts of the identity must match (ICC's channel statistics only need the architecture).
    `comfyui`: the running ComfyUI's version. ComfyUI versions can load one checkpoint into other tensors (0.8 loads
    scaled-fp8 files as quantized weights, under other names), so a file fitted on another version whose identity
    no longer matches is told to refit on this ComfyUI rather than to look for another model's priors."""
    fitted = meta["model"]
    keys = [k for k in parts if fitted.get(k) != model.get(k)]
    if not keys:
        return
    sides = (f"({describe_model(fitted)}); the selected model is {describe_model(model)} (differs in "
             f"{', '.join(keys)})")
    fitted_on = meta.get("comfyui_version")
    if comfyui and fitted_on and fitted_on != comfyui:
        raise PriorMismatch(f"{file} was fitted on ComfyUI {fitted_on} {sides}. This is ComfyUI {comfyui}, which can "
                            "load the same checkpoint into other tensors, so the model's identity no longer matches: "
                            "refit on this ComfyUI with Fit TCC Priors (or choose priors fitted for this model here).")
    unknown = "" if fitted_on or not comfyui else (
        f" If it was fitted on a ComfyUI other than this {comfyui} (the file does not record which), refit on this "
        "ComfyUI: ComfyUI versions can load the same checkpoint into other tensors.")
    raise PriorMismatch(f"{file} was fitted for another model {sides}. Choose priors fitted for this model, or fit new "
                        f"ones with Fit TCC Priors.{unknown}")


def check_policy(meta: dict[str, Any], policy: CachePolicy, file: str) -> None:
    if meta["policy_tag"] != policy.tag():
        raise PriorMismatch(f"{file} was fitted for cache policy {meta['policy_tag']}; this run uses {policy.tag()}. "
                            "Connect the same Cache Policy settings, or refit the priors for this policy.")
    if policy.mode == "dynamic":
        raise PriorMismatch("TCC priors need a fixed-interval policy: a dynamic policy reuses different steps for "
                            "every prompt. Set the Cache Policy mode to fixed.")


def reuse_sites(policy: CachePolicy, sigmas: Sequence[float]) -> list[tuple[float, float, int]]:
    """(σ, staleness gap in σ, steps since the anchor) of every step the policy reuses on this schedule."""
    plan = StepPlan(policy, len(sigmas) - 1, sigmas)
    rows = [plan.full] if plan.blocks is None else [[step[b] for step in plan.blocks] for b in range(len(plan.blocks[0]))]
    sites = []
    for row in rows:  # a searched plan: each block has its own anchors
        anchor = None
        for s, full in enumerate(row):
            if full:
                anchor = s
            elif anchor is not None:
                sites.append((sigmas[s], sigmas[anchor] - sigmas[s], s - anchor))
    return sites


def check_schedule(meta: dict[str, Any], policy: CachePolicy, sigmas: Sequence[float], file: str) -> str | None:
    """None when the schedule is the fitted one; a note when priors transfer by σ interpolation; raises otherwise."""
    fitted_sigmas = [float(s) for s in meta["sigmas"]]
    run = [float(s) for s in sigmas]
    if len(run) == len(fitted_sigmas) and all(abs(a - b) <= 1e-5 * max(abs(a), 1e-3) for a, b in zip(run, fitted_sigmas)):
        return None
    fitted = reuse_sites(policy, fitted_sigmas)
    if not fitted:
        raise PriorMismatch(f"{file} holds no reuse step for this policy on its own schedule: refit the priors")
    spacing = max(a - b for a, b in zip(fitted_sigmas, fitted_sigmas[1:]))
    lo, hi = min(f[0] for f in fitted) - spacing, max(f[0] for f in fitted) + spacing
    where = f"{file} was fitted on {len(fitted_sigmas) - 1} steps (σ {fitted_sigmas[0]:.3g} → {fitted_sigmas[-1]:.3g})"
    for sigma, gap, stale in reuse_sites(policy, run):
        if not lo <= sigma <= hi:
            raise PriorMismatch(f"{where}; this run reuses at σ = {sigma:.3g}, outside the fitted range "
                                f"[{lo:.3g}, {hi:.3g}]. Refit the priors with this scheduler and step count.")
        nearest = min((f for f in fitted if f[2] == stale), key=lambda f: abs(f[0] - sigma), default=None)
        if nearest is None:
            raise PriorMismatch(f"{where}; this run reuses values {stale} steps after a computation, which the fitted "
                                "run never did. Refit the priors with this scheduler and step count.")
        nearest = nearest[1]
        if not 1 / MAX_GAP_RATIO <= gap / nearest <= MAX_GAP_RATIO:
            raise PriorMismatch(f"{where}; at σ = {sigma:.3g} this run reuses values {gap / nearest:.2f}× as stale "
                                "as the fitted ones, too far to interpolate. Refit the priors with this scheduler and "
                                "step count.")
    return (f"{where}; this run has {len(run) - 1} steps: priors are interpolated over σ. Refit for the best "
            "quality.")


def run_warnings(meta: dict[str, Any], cfg: float | None = None, sampler: str | None = None,
                 scheduler: str | None = None) -> list[str]:
    """What differs between a run and the fit that the priors transfer across (None: the run's value is unknown)."""
    notes = []
    fitted_cfg = float(meta["cfg"])
    if cfg is not None and abs(cfg - fitted_cfg) > 1e-6:
        notes.append(f"priors were fitted at cfg {fitted_cfg:g}, this run uses cfg {cfg:g}: "
                     + ("only the positive branch has priors, and the trajectory differs; refit at cfg 1"
                        if cfg == 1.0 or fitted_cfg == 1.0 else "the trajectory differs; refit for the best quality"))
    if sampler is not None and meta["sampler"] != sampler:
        notes.append(f"priors were fitted with sampler {meta['sampler']}, this run uses {sampler}: sites are matched by "
                     "σ; refit for the best quality")
    if scheduler is not None and meta["scheduler"] != scheduler:
        notes.append(f"priors were fitted with scheduler {meta['scheduler']}, this run's σ are {scheduler}'s: sites are "
                     "matched by σ; refit for the best quality")
    return notes
