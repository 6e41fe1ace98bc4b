"""Prior files for the reliability tests: a small valid one, and a catalogue of bad ones with the message each must get.

Imported by test_prior_files.py and test_prior_fuzz.py (by path, as tests are not a package) and by
reliability_report.py, which prints the catalogue with the messages the pack gives today.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calibrated_cache.calibration import CachePolicy
from calibrated_cache.calibration.tcc import SitePrior, TccPriors
from calibrated_cache.priors import save_priors

CHANNELS = 8
POLICY = CachePolicy(interval=2, warmup_steps=0)
SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]
A = "tcc/cond/1/0/attn/a"  # one site's tensors, for the cases that damage one
INFO = "tcc/cond/1/0/attn/info"
MARKER = "pickle_ran.txt"  # what the pickle case's payload would write if anything unpickled it


def valid_file(path: Path, seed: int = 0) -> Path:
    """A version-2 prior file (TCC priors for two blocks and two reuse steps, ICC channel statistics) of a few KiB."""
    g = torch.Generator().manual_seed(seed)

    def vector(scale: float, offset: float = 0.0, width: int = CHANNELS) -> torch.Tensor:
        return torch.randn(width, generator=g) * scale + offset

    priors = {("cond", round_, block, site): SitePrior(vector(0.05, 1.0), vector(0.1), vector(0.01), s, s + 0.25, 1,
                                                        0.02, 0.01)
              for block in range(2) for site in ("attn", "mlp") for round_, s in ((1, 0.75), (3, 0.25))}
    channels = {f"{block}/qkv": (vector(1.0).abs(), vector(1.0, width=3 * CHANNELS).abs()) for block in range(2)}
    meta = {"model": {"family": "testbed-dit", "architecture": "0123456789abcdef", "weights": "fedcba9876543210",
                      "name": "tiny.safetensors"},
            "policy": POLICY.to_dict(), "policy_tag": POLICY.tag(), "sigmas": SIGMAS, "steps": 4, "sampler": "euler",
            "scheduler": "simple", "cfg": 2.0, "samples": 1, "seeds": [seed], "held_out": 1,
            "held_out_seeds": [seed + 1], "pack_version": "0.1.0", "created": "2026-11-22T00:00:00+00:00",
            "report": {"held_out_before": 0.07, "held_out_after": 0.04, "sites": 8, "rounds": 1, "sequential": True},
            "icc_stats": {"source": "delta_mag", "layers": 2, "alpha": 0.5, "samples": 1, "seeds": [seed]}}
    return save_priors(path, TccPriors(priors, "drift"), meta, channels)


def parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def raw_file(header: dict, data: bytes) -> bytes:
    """A safetensors file written by hand: header length, JSON header, data (to craft what save_file refuses)."""
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


class Case(NamedTuple):
    label: str
    make: Callable[[Path], Path]  # writes the bad file into a folder and returns its path
    message: str  # a regular expression the error message must match


def _edited(meta: dict[str, str | None] | None = None, tensors: dict[str, torch.Tensor | None] | None = None,
            ) -> Callable[[Path], Path]:
    """The valid file with metadata fields and tensors replaced (None removes one)."""

    def make(folder: Path) -> Path:
        good_tensors, good_meta = parts(valid_file(folder / "good.tcc.safetensors"))
        for source, changes in ((good_meta, meta), (good_tensors, tensors)):
            for key, value in (changes or {}).items():
                source.pop(key) if value is None else source.__setitem__(key, value)
        path = folder / "bad.tcc.safetensors"
        save_file(good_tensors, str(path), metadata=good_meta)
        return path

    return make


def _bytes(content: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    """A file made from the valid file's bytes."""

    def make(folder: Path) -> Path:
        path = folder / "bad.tcc.safetensors"
        path.write_bytes(content(valid_file(folder / "good.tcc.safetensors").read_bytes()))
        return path

    return make


class _Payload:
    """Unpickling this writes the marker file: a loader that unpickles is caught by the marker's presence."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        return (Path.write_text, (self.folder / MARKER, "unpickled"))


def _pickle(folder: Path) -> Path:
    path = folder / "pickle.tcc.safetensors"
    path.write_bytes(pickle.dumps({"tcc/cond/1/0/attn/a": _Payload(folder)}))
    return path


def _torch_save(folder: Path) -> Path:
    path = folder / "torch_save.tcc.safetensors"
    torch.save({"tcc/cond/1/0/attn/a": torch.ones(CHANNELS)}, str(path))
    return path


def _header(edit: Callable[[dict], None]) -> Callable[[Path], Path]:
    """The valid file with its JSON header edited by hand (offsets, dtypes and shapes that save_file would refuse)."""

    def make(folder: Path) -> Path:
        data = valid_file(folder / "good.tcc.safetensors").read_bytes()
        size = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + size])
        edit(header)
        path = folder / "bad.tcc.safetensors"
        path.write_bytes(raw_file(header, data[8 + size:]))
        return path

    return make


def _set(key: str, field: str, value: object) -> Callable[[dict], None]:
    return lambda header: header[key].__setitem__(field, value)


def _policy(**change: object) -> str:
    return json.dumps({**POLICY.to_dict(), **change})


def _model(**change: object) -> str:
    return json.dumps({"family": "testbed-dit", "architecture": "0123456789abcdef", "weights": "fedcba9876543210",
                       **change})


def _channels(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _info(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


GOOD_A = [1.0] * CHANNELS
CASES = [
    Case("no such file", lambda folder: folder / "missing.tcc.safetensors", r"does not exist"),
    Case("empty file", lambda folder: (folder / "empty.tcc.safetensors", (folder / "empty.tcc.safetensors")
                                       .write_bytes(b""))[0], r"not a readable safetensors file"),
    Case("truncated inside the header", _bytes(lambda b: b[:40]), r"not a readable safetensors file.*truncated"),
    Case("truncated inside the tensor data", _bytes(lambda b: b[:-100]), r"not a readable safetensors file.*truncated"),
    Case("a pickle whose payload writes a file", _pickle, r"not a readable safetensors file"),
    Case("a torch.save checkpoint", _torch_save, r"not a readable safetensors file"),
    Case("random bytes", lambda folder: (folder / "noise.tcc.safetensors", (folder / "noise.tcc.safetensors")
                                         .write_bytes(bytes(range(256)) * 8))[0], r"not a readable safetensors file"),
    Case("header length of 2^63", _bytes(lambda b: struct.pack("<Q", 2**63) + b[8:]), r"not a readable safetensors"),
    Case("header that is not JSON", _bytes(lambda b: b[:8] + b"{" * 8 + b[16:]), r"not a readable safetensors"),
    Case("tensor offsets past the end of the data", _header(_set(A, "data_offsets", [0, 10**9])),
         r"not a readable safetensors"),
    Case("tensor shape larger than its bytes", _header(_set(A, "shape", [10**6])), r"not a readable safetensors"),
    Case("unknown tensor dtype", _header(_set(A, "dtype", "X99")), r"not a readable safetensors"),
    Case("a safetensors model file, not priors", _edited(meta={"format": None}),
         r"not a calibrated_cache TCC prior file"),
    Case("format version from the future", _edited(meta={"format_version": "99"}), r"format version '99'.*reads"),
    Case("required metadata missing", _edited(meta={"sigmas": None}), r"lacks metadata \['sigmas'\]"),
    Case("method other than tcc", _edited(meta={"method": "pickle"}), r"'method' must be one of tcc"),
    Case("unknown TCC variant", _edited(meta={"variant": "evil"}), r"'variant' must be one of drift, trend, mm"),
    Case("model identity not JSON", _edited(meta={"model": "{not json"}), r"'model' is not valid JSON"),
    Case("deeply nested JSON", _edited(meta={"report": "[" * 100000 + "]" * 100000}),
         r"'report' is not valid JSON \(RecursionError\)"),
    Case("model weights hash not a hash", _edited(meta={"model": _model(weights="../../etc")}),
         r"weights must be a 16-digit hex hash"),
    Case("model identity with unknown keys", _edited(meta={"model": _model(exec="rm -rf /")}), r"unknown keys"),
    Case("model identity a list", _edited(meta={"model": "[1, 2]"}), r"'model' must be a JSON object"),
    Case("policy with an impossible interval", _edited(meta={"policy": _policy(interval=0)}),
         r"'policy' is not a valid cache policy \(interval must be an integer >= 1"),
    Case("policy with an unknown setting", _edited(meta={"policy": _policy(speed="max")}),
         r"unknown policy settings \['speed'\]"),
    Case("policy of the wrong type", _edited(meta={"policy": _policy(threshold="high")}),
         r"'policy' is not a valid cache policy \(threshold must be a number \(got 'high'\)\)"),
    Case("policy tag that does not match the policy", _edited(meta={"policy_tag": "FORA_N9_W0"}),
         r"'policy_tag' is 'FORA_N9_W0', but its policy settings make 'FORA_N2_W0'"),
    Case("sigmas increasing", _edited(meta={"sigmas": "[0.0, 0.5, 1.0]"}), r"'sigmas' must be non-negative and "
                                                                          r"non-increasing"),
    Case("sigmas with NaN", _edited(meta={"sigmas": "[1.0, NaN, 0.0]"}), r"'sigmas' must be a finite number"),
    Case("sigmas not a list", _edited(meta={"sigmas": '"1, 0"'}), r"'sigmas' must be a list"),
    Case("steps negative", _edited(meta={"steps": "-3"}), r"'steps' must be an integer in \[1, 10000\]"),
    Case("steps not a number", _edited(meta={"steps": "many"}), r"'steps' must be an integer"),
    Case("cfg infinite", _edited(meta={"cfg": "inf"}), r"'cfg' must be a finite number"),
    Case("sampler with terminal escape codes", _edited(meta={"sampler": "euler\x1b[2J"}), r"'sampler' must be "
                                                                                         r"printable text"),
    Case("sampler name of 10,000 characters", _edited(meta={"sampler": "e" * 10000}), r"'sampler' must be printable "
                                                                                     r"text of 1 to 128"),
    Case("creation time not a time", _edited(meta={"created": "yesterday"}), r"'created' must be an ISO 8601 time"),
    Case("report with text in it", _edited(meta={"report": '{"held_out_after": "<script>"}'}),
         r"'report' held_out_after must be a number"),
    Case("report with a held-out error without its pair", _edited(meta={"report": '{"held_out_before": 0.07}'}),
         r"'report' has held_out_before without held_out_after"),
    Case("held-out seeds the priors were fitted on", _edited(meta={"held_out_seeds": "[0]"}),
         r"'held_out_seeds' shares seeds \[0\] with the fitting seeds"),
    Case("held-out count negative", _edited(meta={"held_out": "-1"}), r"'held_out' must be an integer in \[0, 4096\]"),
    Case("seeds negative", _edited(meta={"seeds": "[-1]"}), r"'seeds' must be an integer in \[0, "),
    Case("ICC statistics metadata nested", _edited(meta={"icc_stats": '{"source": {"a": 1}}'}),
         r"'icc_stats' source must be a number or text"),
    Case("tensor name that escapes its group", _edited(tensors={"tcc/../../etc/passwd/x/a": torch.ones(CHANNELS)}),
         r"unexpected tensor 'tcc/../../etc/passwd/x/a'"),
    Case("tensor name with a non-numeric round", _edited(tensors={"tcc/cond/one/0/attn/a": torch.ones(CHANNELS)}),
         r"unexpected tensor"),
    Case("tensor outside the format", _edited(tensors={"__class__": torch.ones(1)}), r"unexpected tensor '__class__'"),
    Case("site without its info", _edited(tensors={INFO: None}), r"site tcc/cond/1/0/attn/\* lacks \['info'\]"),
    Case("site scale in float16", _edited(tensors={A: _channels(GOOD_A, torch.float16)}),
         r"site tcc/cond/1/0/attn/\* a is torch.float16, not torch.float32"),
    Case("site scale as integers", _edited(tensors={A: _channels(GOOD_A, torch.int64)}), r"a is torch.int64"),
    Case("site scale as a matrix", _edited(tensors={A: torch.ones(2, CHANNELS)}),
         r"a has shape \(2, 8\), not one value per channel"),
    Case("site scale with no channels", _edited(tensors={A: torch.ones(0)}), r"a has shape \(0,\)"),
    Case("site tensors of different lengths", _edited(tensors={A: torch.ones(CHANNELS + 1)}),
         r"mismatched shapes \[\(9,\), \(8,\), \(8,\)\]"),
    Case("site scale with NaN", _edited(tensors={A: _channels([float("nan")] * CHANNELS)}), r"a holds non-finite"),
    Case("site scale with infinity", _edited(tensors={A: _channels([float("inf")] * CHANNELS)}), r"non-finite"),
    Case("site info in float32", _edited(tensors={INFO: _info(0.75, 1.0, 1, 0, 0).float()}), r"info is torch.float32"),
    Case("site info too short", _edited(tensors={INFO: _info(0.75, 1.0)}), r"info is torch.float64 of shape \(2,\)"),
    Case("site anchor after the site", _edited(tensors={INFO: _info(0.75, 0.5, 1, 0, 0)}),
         r"σ 0.75 and anchor σ 0.5"),
    Case("site zero steps after its anchor", _edited(tensors={INFO: _info(0.75, 1.0, 0, 0, 0)}),
         r"0.0 steps after its anchor"),
    Case("site fractional steps after its anchor", _edited(tensors={INFO: _info(0.75, 1.0, 1.5, 0, 0)}),
         r"1.5 steps after its anchor"),
    Case("site negative error", _edited(tensors={INFO: _info(0.75, 1.0, 1, -1, 0)}), r"must be >= 0 or NaN"),
    Case("site width changing between steps", _edited(tensors={
        f"tcc/cond/3/0/attn/{p}": torch.ones(CHANNELS + 2) for p in "agb"}), r"priors of 8 and 10 channels"),
    Case("no priors at all", _edited(tensors={k: None for k in (f"tcc/cond/{r}/{b}/{s}/{p}" for r in (1, 3)
                                                                for b in (0, 1) for s in ("attn", "mlp")
                                                                for p in ("a", "g", "b", "info"))}),
         r"holds no priors"),
    Case("ICC statistics in a version-1 file", _edited(meta={"format_version": "1"}), r"version 1 but holds ICC"),
    Case("ICC statistics without their metadata", _edited(meta={"icc_stats": None}), r"without their 'icc_stats'"),
    Case("ICC statistics negative", _edited(tensors={"icc/0/qkv/in": -torch.ones(CHANNELS)}), r"negative values"),
    Case("ICC statistics one-sided", _edited(tensors={"icc/0/qkv/out": None}), r"lack their out side"),
]
