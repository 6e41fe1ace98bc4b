"""Every field of a prior file is checked before anything uses it: metadata types, ranges and versions; tensor names,
dtypes, shapes and values. Prior files come from other people's machines, so nothing in one is trusted: a field that
fails its check names itself and the file is refused, before any of it reaches a model or the graph editor.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Any, Callable

import torch
from torch import Tensor

from ..calibration.errors import PolicyError
from ..calibration.policy import CachePolicy
from ..calibration.tcc import VARIANTS

MAX_TEXT = 1024  # characters of a metadata string (file names, sampler names, versions)
MAX_STEPS = 10000
MAX_CHANNELS = 1 << 20
MAX_INDEX = 1 << 20  # rounds and blocks
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")  # a role, site or Linear name inside a tensor name
HASH = re.compile(r"[0-9a-f]{16}")
# in-sample errors of files written before held-out reports (rel_l2_*), held-out and in-sample errors, site counts
REPORT_NUMBERS = ("rel_l2_before", "rel_l2_after", "held_out_before", "held_out_after", "in_sample_before",
                  "in_sample_after", "sites", "rounds")
ERROR_PAIRS = ("rel_l2", "held_out", "in_sample")  # each an error without and with the priors, both or neither


class Invalid(ValueError):
    """One field that fails its check; the caller adds the file name and the fix."""


def text(value: Any, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise Invalid(f"must be printable text of 1 to {limit} characters (got {shown(value)})")
    return value


def integer(value: Any, low: int, high: int) -> int:
    """An int, or its decimal string (safetensors metadata values are strings)."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,20}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Invalid(f"must be an integer in [{low}, {high}] (got {shown(value)})")
    return value


def number(value: Any, finite: bool = True) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise Invalid(f"must be a number (got {shown(value)})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (finite and not math.isfinite(value)):
        raise Invalid(f"must be a {'finite ' if finite else ''}number (got {shown(value)})")
    return float(value)


def parsed(value: str) -> Any:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError) as err:
        raise Invalid(f"is not valid JSON ({type(err).__name__})") from None


def mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"must be a JSON object (got {shown(value)})")
    return value


def model_identity(value: Any) -> dict[str, str]:
    fp = mapping(value)
    unknown = sorted(set(fp) - {"family", "architecture", "weights", "patches", "name"})
    if unknown:
        raise Invalid(f"has unknown keys {unknown}")
    for key in ("architecture", "weights", "patches"):
        if key in fp and not (isinstance(fp[key], str) and HASH.fullmatch(fp[key])):
            raise Invalid(f"{key} must be a 16-digit hex hash (got {shown(fp[key])})")
    for key in ("architecture", "weights"):
        if key not in fp:
            raise Invalid(f"lacks {key}")
    text(fp.get("family"), 64)
    if "name" in fp:
        text(fp["name"])
    return fp


def policy(value: Any) -> dict[str, Any]:
    """The policy settings as written; they must make a valid CachePolicy."""
    try:
        CachePolicy.from_dict(mapping(value))
    except (PolicyError, TypeError, ValueError, AttributeError) as err:
        raise Invalid(f"is not a valid cache policy ({err})") from None
    return value


def sigmas(value: Any) -> list[float]:
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_STEPS + 1:
        raise Invalid(f"must be a list of 2 to {MAX_STEPS + 1} numbers (got {shown(value)})")
    values = [number(s) for s in value]
    if any(s < 0 for s in values) or any(a < b for a, b in zip(values, values[1:])):
        raise Invalid("must be non-negative and non-increasing, as a sampler's schedule")
    return values


def created(value: Any) -> str:
    stamp = text(value, 64)
    try:
        datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        raise Invalid(f"must be an ISO 8601 time (got {shown(stamp)})") from None
    return stamp


def report(value: Any) -> dict[str, Any]:
    """The fit's figures; NaN is allowed (an error that could not be measured), text and nesting are not."""
    data = mapping(value)
    for key, item in data.items():
        text(key, 64)
        if not isinstance(item, (int, float, bool)) and item is not None:
            raise Invalid(f"{key} must be a number or true/false (got {shown(item)})")
    for key in REPORT_NUMBERS:
        if key in data:
            number(data[key], finite=False)
    for prefix in ERROR_PAIRS:
        if (f"{prefix}_before" in data) != (f"{prefix}_after" in data):
            raise Invalid(f"has {prefix}_before without {prefix}_after, or the reverse")
    return data


def seeds(value: Any) -> list[int]:
    if not isinstance(value, list) or len(value) > 4096:
        raise Invalid(f"must be a list of at most 4096 seeds (got {shown(value)})")
    return [integer(s, 0, 2**64 - 1) for s in value]


def icc_stats(value: Any) -> dict[str, Any]:
    """How the channel statistics were recorded: scalars, and the calibration seeds."""
    data = mapping(value)
    for key, item in data.items():
        text(key, 64)
        if key == "seeds":
            seeds(item)
        elif isinstance(item, str):
            text(item, 64)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            raise Invalid(f"{key} must be a number or text (got {shown(item)})")
    return data


def timing(value: Any) -> dict[str, Any]:
    """Where a fit for a wall-clock target read its clock: the device, and the speedups and full-step time there."""
    data = mapping(value)
    unknown = sorted(set(data) - {"device", "torch", "predicted_speedup", "measured_speedup", "full_step_s"})
    if unknown:
        raise Invalid(f"has unknown keys {unknown}")
    for key in ("device", "torch"):
        text(data.get(key), 128)
    for key in ("predicted_speedup", "full_step_s"):
        number(data.get(key))
    if data.get("measured_speedup") is not None:
        number(data["measured_speedup"])
    return data


Check = Callable[[Any], Any]
# Metadata strings → typed values; JSON fields are parsed first. `format` and `format_version` are checked before these.
FIELDS: dict[str, tuple[bool, Check]] = {
    "method": (False, lambda v: _one_of(v, ("tcc",))),
    "variant": (False, lambda v: _one_of(v, VARIANTS)),
    "model": (True, model_identity),
    "policy": (True, policy),
    "policy_tag": (False, lambda v: text(v, 256)),
    "sigmas": (True, sigmas),
    "steps": (False, lambda v: integer(v, 1, MAX_STEPS)),
    "sampler": (False, lambda v: text(v, 128)),
    "scheduler": (False, lambda v: text(v, 128)),
    "cfg": (False, number),
    "samples": (False, lambda v: integer(v, 1, 4096)),
    "pack_version": (False, lambda v: text(v, 64)),
    "comfyui_version": (False, lambda v: text(v, 64)),  # the ComfyUI the fit ran on; older files lack it
    "created": (False, created),
    "report": (True, report),
    "seeds": (True, seeds),
    "held_out": (False, lambda v: integer(v, 0, 4096)),
    "held_out_seeds": (True, seeds),
    "icc_stats": (True, icc_stats),
    "timing": (True, timing),  # fits for a wall-clock target only
}


def check_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """The typed metadata; raises Invalid naming the first bad field. Unknown fields are dropped, not trusted."""
    meta: dict[str, Any] = {"format": raw["format"], "format_version": raw["format_version"]}
    for key, (is_json, check) in FIELDS.items():
        if key not in raw:
            continue
        try:
            meta[key] = check(parsed(raw[key]) if is_json else raw[key])
        except Invalid as err:
            raise Invalid(f"metadata field {key!r} {err}") from None
    shared = set(meta.get("seeds", ())) & set(meta.get("held_out_seeds", ()))
    if shared:
        raise Invalid(f"metadata field 'held_out_seeds' shares seeds {sorted(shared)[:4]} with the fitting seeds; "
                      "held-out requests must be ones the priors were not fitted on")
    tag = CachePolicy.from_dict(meta["policy"]).tag()
    if meta["policy_tag"] != tag:
        raise Invalid(f"metadata field 'policy_tag' is {meta['policy_tag']!r}, but its policy settings make {tag!r}")
    return meta


def tensor_name(name: str) -> tuple[str, ...]:
    """The parts of a tensor name: ("tcc", role, round, block, site, part) or ("icc", linear key, side)."""
    parts = name.split("/")
    if parts[0] == "tcc" and len(parts) == 6 and parts[5] in ("a", "g", "b", "info"):
        role, round_, block, site = parts[1:5]
        if NAME.fullmatch(role) and NAME.fullmatch(site) and _index(round_) and _index(block):
            return tuple(parts)
    if parts[0] == "icc" and 4 <= len(parts) <= 8 and parts[-1] in ("in", "out"):
        if all(NAME.fullmatch(p) for p in parts[1:-1]):
            return "icc", "/".join(parts[1:-1]), parts[-1]
    raise Invalid(f"holds an unexpected tensor {shown(name)}")


def channels(values: Tensor, what: str, dtype: torch.dtype) -> Tensor:
    """A per-channel vector of `dtype` with finite values."""
    if values.dtype != dtype:
        raise Invalid(f"{what} is {values.dtype}, not {dtype}")
    if values.dim() != 1 or not 1 <= values.numel() <= MAX_CHANNELS:
        raise Invalid(f"{what} has shape {tuple(values.shape)}, not one value per channel")
    if not bool(torch.isfinite(values).all()):
        raise Invalid(f"{what} holds non-finite values")
    return values


def site_info(info: Tensor, where: str) -> tuple[float, float, int, float, float]:
    """σ, anchor σ, steps since the anchor, and the error before and after (NaN when not measured)."""
    if info.dtype != torch.float64 or tuple(info.shape) != (5,):
        raise Invalid(f"site {where} info is {info.dtype} of shape {tuple(info.shape)}, not 5 float64 values")
    sigma, anchor, stale, before, after = info.tolist()
    if not (math.isfinite(sigma) and math.isfinite(anchor) and 0 <= sigma <= anchor):
        raise Invalid(f"site {where} has σ {sigma} and anchor σ {anchor}; a reused value's anchor is an earlier, "
                      "higher σ")
    if not (stale == int(stale) if math.isfinite(stale) else False) or not 1 <= stale <= MAX_STEPS:
        raise Invalid(f"site {where} is {stale} steps after its anchor; it must be a whole number of steps >= 1")
    if any(not math.isnan(e) and not (math.isfinite(e) and e >= 0) for e in (before, after)):
        raise Invalid(f"site {where} has errors {before}, {after}; they must be >= 0 or NaN")
    return sigma, anchor, int(stale), before, after


def _index(value: str) -> bool:
    return value.isdigit() and len(value) <= 7 and int(value) <= MAX_INDEX


def _one_of(value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise Invalid(f"must be one of {', '.join(options)} (got {shown(value)})")
    return value


def shown(value: Any) -> str:
    """A short, printable rendering of a bad value for a message."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
