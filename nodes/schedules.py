"""What a run's sampler and scheduler are called, so that priors fitted with other ones can be named in a warning.

A sampler reaches the OUTER_SAMPLE wrapper as an object and the scheduler only as the σ schedule it made, so both are
recognised: the sampler by its sampling function, the scheduler by recomputing each scheduler's σ for the run's step
count. A custom sampler or schedule (SamplerCustom with a hand-made schedule, partial denoise) stays unnamed: the
σ check then speaks for it.
"""

from __future__ import annotations

from typing import Any, Sequence

import comfy.samplers
import torch


def sampler_name(sampler: Any) -> str | None:
    """The KSampler name of a sampler object, or None when it is not one of KSampler's (ddim samples as euler)."""
    function = getattr(sampler, "sampler_function", None)
    if function is None:
        return None
    for name in comfy.samplers.SAMPLER_NAMES:
        if name in ("ddim", "dpm_fast", "dpm_adaptive"):
            continue
        candidate = comfy.samplers.sampler_object(name).sampler_function
        if candidate is function:
            return name
    closure = getattr(function, "__name__", "")
    return {"dpm_fast_function": "dpm_fast", "dpm_adaptive_function": "dpm_adaptive"}.get(closure)


def scheduler_name(model_sampling: Any, sigmas: Sequence[float], sampler: str | None) -> str | None:
    """The scheduler whose σ for this step count (as KSampler computes them for `sampler`) are the run's, or None."""
    run = torch.tensor([float(s) for s in sigmas], dtype=torch.float64)
    steps = len(run) - 1
    discard = sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    for name in comfy.samplers.SCHEDULER_NAMES:
        try:
            made = comfy.samplers.calculate_sigmas(model_sampling, name, steps + discard).double().cpu()
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError):  # it cannot make this many steps
            continue
        if discard:
            made = torch.cat([made[:-2], made[-1:]])
        if made.shape == run.shape and torch.allclose(made, run, rtol=1e-4, atol=1e-6):
            return name
    return None
