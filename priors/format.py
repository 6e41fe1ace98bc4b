"""TCC prior files: safetensors with one tensor group per site and branch role, and JSON provenance metadata.

Tensors are `tcc/<role>/<round>/<block>/<site>/{a,g,b}` (per channel, float32) and `.../info` (float64: σ, anchor σ,
steps since the anchor, error before and after calibration on the calibration set). Format version 2 adds ICC's
channel statistics, `icc/<block>/<linear>/{in,out}` (float32 per channel, with `icc_stats` metadata); files without
them are written as version 1, which older packs read. Metadata values are strings; structured ones are JSON.
Files are written to a temporary name in the target folder and renamed, so no reader ever sees half a file.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..calibration.icc import ChannelTable
from ..calibration.tcc import SiteKey, SitePrior, TccPriors
from . import schema
from .files import write_atomic

FORMAT = "calibrated_cache.tcc"
FORMAT_VERSION = 2
READS = ("1", "2")
REQUIRED = ("format", "format_version", "method", "variant", "model", "policy", "policy_tag", "sigmas", "steps",
            "sampler", "scheduler", "cfg", "samples", "pack_version", "created")
JSON_FIELDS = ("model", "policy", "sigmas", "report", "seeds", "icc_stats", "timing")
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
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=strings))


def file_hash(path: str | Path) -> str:
    """The SHA-256 of a prior file's bytes (16 hex digits): two copies are the same file wherever they lie, which
    `inspect` shows and the GPUs of one model check."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The provenance of a prior file, every field checked, without loading its tensors (listings, the prior card)."""
    path = Path(path)
    with _opened(path) as f:
        return _metadata(path.name, f.metadata() or {})


def load_priors(path: str | Path) -> PriorFile:
    """A prior file read as safetensors (never pickle), its metadata and every tensor checked (see schema.py)."""
    path = Path(path)
    groups: dict[SiteKey, dict[str, torch.Tensor]] = {}
    sides: dict[str, dict[str, torch.Tensor]] = {}
    with _opened(path) as f:
        meta = _metadata(path.name, f.metadata() or {})
        try:
            for name in f.keys():
                parts = _checked(path.name, schema.tensor_name, name)
                if parts[0] == "icc":
                    sides.setdefault(parts[1], {})[parts[2]] = f.get_tensor(name)
                else:
                    key = (parts[1], int(parts[2]), int(parts[3]), parts[4])
                    groups.setdefault(key, {})[parts[5]] = f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise PriorFileError(f"{path.name} cannot be read ({err}); it may be truncated: fit or copy it "
                                 "again") from None
    if sides and meta["format_version"] == "1":
        raise PriorFileError(f"{path.name} is format version 1 but holds ICC channel statistics, which version 2 "
                             "introduced: the file is damaged; refit it")
    if sides and "icc_stats" not in meta:
        raise PriorFileError(f"{path.name} holds ICC channel statistics without their 'icc_stats' metadata: the file "
                             "is damaged; refit it")
    priors = {key: _checked(path.name, _site, key, g) for key, g in groups.items()}
    if not priors and meta["policy"].get("plan") is None:  # a searched plan whose priors did not help has none
        raise PriorFileError(f"{path.name} holds no priors: refit them")
    widths: dict[tuple[int, str], int] = {}
    for (_, _, block, site), p in priors.items():
        if widths.setdefault((block, site), p.a.numel()) != p.a.numel():
            raise PriorFileError(f"{path.name}: block {block} site {site} has priors of {widths[(block, site)]} and "
                                 f"{p.a.numel()} channels: the file is damaged; refit it")
    table = {key: _checked(path.name, _linear, key, pair) for key, pair in sides.items()}
    return PriorFile(TccPriors(priors, meta["variant"]), meta, table or None)


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """The file opened by safetensors, which parses a JSON header and raw tensors only: nothing in it is executed."""
    try:
        f = safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise PriorFileError(f"prior file {path} does not exist: check its path, or fit the priors") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise PriorFileError(f"{path.name} is not a readable safetensors file ({_short(err)}); it may be truncated "
                             "or not a prior file: fit the priors again or copy the file again") from None
    with f:
        yield f


def _metadata(name: str, raw: dict[str, str]) -> dict[str, Any]:
    if raw.get("format") != FORMAT:
        raise PriorFileError(f"{name} is not a calibrated_cache TCC prior file (no '{FORMAT}' format tag): choose "
                             "a file written by Fit TCC Priors, or fit the priors")
    if raw.get("format_version") not in READS:
        raise PriorFileError(f"{name} has prior format version {schema.shown(raw.get('format_version'))}; this pack "
                             f"reads versions {', '.join(READS)}: refit the priors with this pack")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise PriorFileError(f"{name} lacks metadata {missing}: it was not written by this pack; refit it")
    return _checked(name, schema.check_metadata, raw)


def _site(key: SiteKey, g: dict[str, torch.Tensor]) -> SitePrior:
    where = _key_name(key, "*")
    if set(g) != set(PARTS):
        raise schema.Invalid(f"site {where} lacks {sorted(set(PARTS) - set(g))}")
    a, gain, b = (schema.channels(g[part], f"site {where} {part}", torch.float32) for part in ("a", "g", "b"))
    if not a.shape == gain.shape == b.shape:
        raise schema.Invalid(f"site {where} has tensors of mismatched shapes "
                             f"{[tuple(t.shape) for t in (a, gain, b)]}")
    return SitePrior(a, gain, b, *schema.site_info(g["info"], where))


def _linear(key: str, pair: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if set(pair) != {"in", "out"}:
        missing = "in" if "out" in pair else "out"
        raise schema.Invalid(f"the channel statistics of Linear {key} lack their {missing} side")
    sides = tuple(schema.channels(pair[s], f"the channel statistics of Linear {key} ({s})", torch.float32)
                  for s in ("in", "out"))
    if any(bool((t < 0).any()) for t in sides):
        raise schema.Invalid(f"the channel statistics of Linear {key} hold negative values")
    return sides


def _checked(name: str, check: Callable[..., Any], *args: Any) -> Any:
    """`check(*args)`, with its Invalid turned into the file's error naming the fix."""
    try:
        return check(*args)
    except schema.Invalid as err:
        raise PriorFileError(f"{name}: {err}: the file is damaged or was not written by this pack; refit the "
                             "priors or copy the file again") from None


def _short(err: Exception) -> str:
    return schema.shown(str(err)).strip("'\"")
