"""TCC prior files: safetensors with one tensor group per site and branch role, and JSON provenance metadata.

Tensors are `tcc/<role>/<round>/<block>/<site>/{a,g,b}` (per channel, float32) and `.../info` (float64: σ, anchor σ,
steps since the anchor, error before and after calibration on the calibration set). Format version 2 adds ICC's
channel statistics, `icc/<block>/<linear>/{in,out}` (float32 per channel, with `icc_stats` metadata); files without
them are written as version 1, which older packs read. Metadata values are strings; structured ones are JSON.
Files are written to a temporary name in the target folder and renamed, so no reader ever sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..calibration.icc import ChannelTable
from ..calibration.tcc import VARIANTS, SiteKey, SitePrior, TccPriors

FORMAT = "calibrated_cache.tcc"
FORMAT_VERSION = 2
READS = ("1", "2")
REQUIRED = ("format", "format_version", "method", "variant", "model", "policy", "policy_tag", "sigmas", "steps",
            "sampler", "scheduler", "cfg", "samples", "pack_version", "created")
JSON_FIELDS = ("model", "policy", "sigmas", "report", "seeds", "icc_stats")
PARTS = ("a", "g", "b", "info")


class PriorFileError(ValueError):
    """A prior file that cannot be used; the message names the file and what to do."""


@dataclass
class PriorFile:
    priors: TccPriors
    meta: dict[str, Any]
    channels: ChannelTable | None = None


def _key_name(key: SiteKey, part: str) -> str:
    role, round_, block, name = key
    return f"tcc/{role}/{round_}/{block}/{name}/{part}"


def save_priors(path: str | Path, priors: TccPriors, meta: dict[str, Any],
                channels: ChannelTable | None = None) -> Path:
    """Write atomically; `meta` holds the provenance (see REQUIRED); format fields and the variant are added.
    `channels`: ICC's channel statistics, recorded in the same calibration runs (meta then needs `icc_stats`)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for key, sides in (channels or {}).items():
        for side, values in zip(("in", "out"), sides):
            tensors[f"icc/{key}/{side}"] = values.detach().float().cpu().contiguous()
    for key, p in priors.priors.items():
        for part in ("a", "g", "b"):
            tensors[_key_name(key, part)] = getattr(p, part).detach().float().cpu().contiguous()
        tensors[_key_name(key, "info")] = torch.tensor([p.sigma, p.anchor_sigma, p.stale_steps, p.before, p.after],
                                                       dtype=torch.float64)
    full = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION if channels else 1, "method": "tcc",
            "variant": priors.variant}
    missing = [k for k in REQUIRED + (("icc_stats",) if channels else ()) if k not in full]
    if missing:
        raise ValueError(f"prior metadata lacks {missing}")
    strings = {k: json.dumps(v) if k in JSON_FIELDS else str(v) for k, v in full.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=strings)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The provenance of a prior file, without loading its tensors (for listings and validation)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except FileNotFoundError:
        raise PriorFileError(f"prior file {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise PriorFileError(f"{path.name} is not a readable safetensors file ({err}); it may be truncated or not a "
                             "prior file: fit the priors again or copy the file again") from None
    if raw.get("format") != FORMAT:
        raise PriorFileError(f"{path.name} is not a calibrated_cache TCC prior file (no '{FORMAT}' format tag)")
    if raw.get("format_version") not in READS:
        raise PriorFileError(f"{path.name} has prior format version {raw.get('format_version')}; this pack reads "
                             f"versions {', '.join(READS)}: refit the priors with this pack")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise PriorFileError(f"{path.name} lacks metadata {missing}: it was not written by this pack; refit it")
    try:
        return {k: json.loads(v) if k in JSON_FIELDS else v for k, v in raw.items()}
    except json.JSONDecodeError as err:
        raise PriorFileError(f"{path.name} has corrupt metadata ({err}): refit the priors") from None


def load_priors(path: str | Path) -> PriorFile:
    path = Path(path)
    meta = read_metadata(path)
    if meta["variant"] not in VARIANTS:
        raise PriorFileError(f"{path.name} uses TCC variant {meta['variant']!r}, unknown to this pack version")
    groups: dict[SiteKey, dict[str, torch.Tensor]] = {}
    sides: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                parts = name.split("/")
                if parts[0] == "icc" and len(parts) >= 4 and parts[-1] in ("in", "out"):
                    sides.setdefault("/".join(parts[1:-1]), {})[parts[-1]] = f.get_tensor(name)
                    continue
                if len(parts) != 6 or parts[0] != "tcc" or parts[5] not in PARTS:
                    raise PriorFileError(f"{path.name} holds an unexpected tensor {name!r}: refit the priors")
                try:
                    key = (parts[1], int(parts[2]), int(parts[3]), parts[4])
                except ValueError:
                    raise PriorFileError(f"{path.name} holds an unexpected tensor {name!r}: refit the priors") from None
                groups.setdefault(key, {})[parts[5]] = f.get_tensor(name)
    except (SafetensorError, OSError) as err:
        raise PriorFileError(f"{path.name} cannot be read ({err}); it may be truncated: fit or copy it again") from None
    priors: dict[SiteKey, SitePrior] = {}
    for key, g in groups.items():
        where = _key_name(key, "*")
        if set(g) != set(PARTS):
            raise PriorFileError(f"{path.name}: site {where} lacks {sorted(set(PARTS) - set(g))}: refit the priors")
        a, gain, b, info = g["a"], g["g"], g["b"], g["info"]
        if a.dim() != 1 or gain.shape != a.shape or b.shape != a.shape or info.shape != (5,):
            raise PriorFileError(f"{path.name}: site {where} has tensors of mismatched shapes "
                                 f"{[tuple(t.shape) for t in (a, gain, b, info)]}: the file is damaged; refit it")
        if not all(torch.isfinite(t).all() for t in (a, gain, b, info[:3])):
            raise PriorFileError(f"{path.name}: site {where} holds non-finite values: refit the priors")
        s, anchor, stale, before, after = info.tolist()
        priors[key] = SitePrior(a.float(), gain.float(), b.float(), s, anchor, int(stale), before, after)
    if not priors:
        raise PriorFileError(f"{path.name} holds no priors: refit them")
    return PriorFile(TccPriors(priors, meta["variant"]), meta, _channels(path.name, sides) if sides else None)


def _channels(name: str, sides: dict[str, dict[str, torch.Tensor]]) -> ChannelTable:
    table: ChannelTable = {}
    for key, pair in sides.items():
        if set(pair) != {"in", "out"} or any(t.dim() != 1 for t in pair.values()):
            raise PriorFileError(f"{name}: the channel statistics of Linear {key} are incomplete or misshapen: the "
                                 "file is damaged; refit it")
        if not all(torch.isfinite(t).all() and (t >= 0).all() for t in pair.values()):
            raise PriorFileError(f"{name}: the channel statistics of Linear {key} hold negative or non-finite values: "
                                 "refit the priors")
        table[key] = (pair["in"].float(), pair["out"].float())
    return table
