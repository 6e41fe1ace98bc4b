"""What the graph editor shows when a prior file is chosen: its provenance, and whether it was fitted for the model
file connected upstream.

The browser knows only the loader's file name and whether LoRAs sit between it and the node, so the verdict here is
by name; Apply Calibrated Cache checks the weights themselves when it runs (validate.check_model).
"""

from __future__ import annotations

import math
import os
from typing import Any

MATCH, MISMATCH, UNKNOWN = "match", "mismatch", "unknown"


def prior_card(meta: dict[str, Any]) -> dict[str, Any]:
    """The fields a user compares before sampling with a prior file, typed for display."""
    model, report = _dict(meta.get("model")), _dict(meta.get("report"))
    # held-out errors are what to expect on new requests; older files only have the in-sample ones
    measured = "held_out" if "held_out_before" in report else "rel_l2" if "rel_l2_before" in report else None
    return {
        "model": model.get("name") or "(not recorded)",
        "family": model.get("family", "?"),
        "lora": bool(model.get("patches")),
        "policy": meta.get("policy_tag", "?"),
        "variant": meta.get("variant", "?"),
        "steps": _int(meta.get("steps")),
        "sampler": meta.get("sampler", "?"),
        "scheduler": meta.get("scheduler", "?"),
        "cfg": _float(meta.get("cfg")),
        "samples": _int(meta.get("samples")),
        "created": meta.get("created", "?"),
        "held_out": _int(meta.get("held_out")),
        "error_on": {"held_out": "held-out", "rel_l2": "in-sample"}.get(measured),
        "error_before": _float(report.get(f"{measured}_before")),
        "error_after": _float(report.get(f"{measured}_after")),
        "icc_statistics": "icc_stats" in meta,
    }


def match_connected(meta: dict[str, Any], model_file: str | None, lora: bool | None) -> dict[str, str]:
    """`model_file`: the loader file upstream of the node (None: not traceable); `lora`: whether a LoRA loader sits
    between them (None: unknown)."""
    fitted = _dict(meta.get("model"))
    name = fitted.get("name")
    if not model_file:
        return _verdict(UNKNOWN, "the connected model's file could not be traced in the graph; the run checks the "
                                 "weights")
    if not name:
        return _verdict(UNKNOWN, "this file does not record its model's file name (fitted with checkpoint none); "
                                 "the run checks the weights")
    if name != model_file and os.path.basename(name) != os.path.basename(model_file):
        return _verdict(MISMATCH, f"fitted for {name}; the connected model is {model_file}. Choose priors fitted "
                                  "for it, or fit new ones with Fit TCC Priors")
    patched = bool(fitted.get("patches"))
    if lora is not None and lora != patched:
        state = "with LoRAs applied, and none is connected" if patched else "without LoRAs, and one is connected"
        return _verdict(MISMATCH, f"fitted for {name} {state}; TCC priors belong to the exact weights (ICC's "
                                  "channel statistics still apply). Fit priors for this combination")
    note = "; the LoRAs are checked when the run starts" if patched else ""
    return _verdict(MATCH, f"fitted for {name}{note}")


def _verdict(verdict: str, reason: str) -> dict[str, str]:
    return {"verdict": verdict, "reason": reason}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None  # NaN and infinity are not JSON
