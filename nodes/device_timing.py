"""The clock a fit for a target speedup reads on the user's device, and what a prior file says about where it read it.

A fitted plan's wall speedup is a measurement on one machine: its file records the device (`device_name`), the
predicted and measured speedups and what a full step cost there per sample; a run elsewhere says its timing came from
another device. (A run's own speedup needs full computation beside it at the same batch and resolution, which a run
does not have: the run report gives its wall time.)
"""

from __future__ import annotations

import os
import platform
from typing import Any, Callable

import torch


def device_sync(device: torch.device) -> Callable[[], None] | None:
    """What waits for `device` to finish its queued work, so that a round's time is its work's (None on a CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "xpu":
        return lambda: torch.xpu.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return None


def device_name(device: torch.device) -> str:
    """The device as a person would name it: the GPU's model, or the CPU's architecture and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def timing_record(device: torch.device, report: dict[str, float]) -> dict[str, Any]:
    """What a prior file keeps of the fit's clock (its `timing` entry)."""
    return {"device": device_name(device), "torch": torch.__version__,
            "predicted_speedup": report["plan_predicted_speedup"],
            "measured_speedup": report.get("plan_measured_speedup"), "full_step_s": report["cost_full_step_s"]}


def timing_note(meta: dict[str, Any], device: torch.device) -> str | None:
    """A prior file timed on another device: its speedups are that device's."""
    timing = meta.get("timing")
    here = device_name(device)
    if not timing or timing["device"] == here:
        return None
    measured = timing.get("measured_speedup")
    return (f"this plan was timed on {timing['device']}"
            + (f" ({measured:.2f}x there)" if measured else "")
            + f", not on this {here}: its speedup here may differ; refit on this machine for a wall-clock target "
              "that holds here")
