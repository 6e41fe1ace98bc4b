"""Fuzz of the prior loader with hypothesis: truncated, bit-flipped and hand-crafted files. Every outcome must be a
clean load (every invariant the rest of the pack relies on holds, and its consumers run) or a PriorFileError that names
the file and the fix. Anything else, a safetensors panic included, is a crash and fails the test.

CC_FUZZ_EXAMPLES sets the examples per strategy (default 150, a few seconds); CC_REPORT_DIR, when set, receives
fuzz.json with the counts (reliability_report.py runs a long campaign this way).
"""

import json
import math
import os
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from calibrated_cache.calibration import CachePolicy
from calibrated_cache.priors import PriorFileError, PriorMismatch, check_schedule, load_priors, read_metadata
from calibrated_cache.priors.card import prior_card
from calibrated_cache.priors.format import REQUIRED
from calibrated_cache.priors.report import summarize

from prior_cases import parts, raw_file, valid_file

EXAMPLES = int(os.environ.get("CC_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
COUNTS: Counter = Counter()  # (strategy, outcome) -> cases
DTYPES = ["F32", "F64", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X", ""]
FIXES = ("refit", "Refit", "fit the priors", "copy")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fuzz")
    path = valid_file(folder / "valid.tcc.safetensors")
    data = path.read_bytes()
    tensors, meta = parts(path)
    yield {"folder": folder, "data": data, "header": 8 + struct.unpack("<Q", data[:8])[0], "tensors": tensors,
           "meta": meta}
    report = os.environ.get("CC_REPORT_DIR")
    if report:
        Path(report).mkdir(parents=True, exist_ok=True)
        rows = [{"strategy": s, "outcome": o, "cases": n} for (s, o), n in sorted(COUNTS.items())]
        (Path(report) / "fuzz.json").write_text(json.dumps({"examples_per_strategy": EXAMPLES, "counts": rows},
                                                           indent=1))


def outcome(strategy: str, path: Path) -> None:
    """Load the file; count and check what happened. Any exception but PriorFileError propagates as a crash."""
    try:
        try:
            meta = read_metadata(path)
        except PriorFileError as err:
            clear(err, path)
            meta = None
        try:
            prior = load_priors(path)
        except PriorFileError as err:
            clear(err, path)
            COUNTS[(strategy, "refused")] += 1
            return
        assert meta == prior.meta  # the header reader never passes what the loader refuses
        clean(prior, path)
        COUNTS[(strategy, "loaded")] += 1
    except BaseException:
        COUNTS[(strategy, "crash")] += 1
        raise


def clear(err: PriorFileError, path: Path) -> None:
    message = str(err)
    assert path.name in message and any(fix in message for fix in FIXES), message
    assert len(message) < 800 and message.isprintable(), message


def clean(prior, path: Path) -> None:
    """The invariants the engine, the nodes and the graph editor rely on, and the consumers themselves."""
    for key, p in prior.priors.priors.items():
        assert all(t.dtype == torch.float32 and t.dim() == 1 and t.shape == p.a.shape for t in (p.a, p.g, p.b))
        assert all(bool(torch.isfinite(t).all()) for t in (p.a, p.g, p.b))
        assert 0 <= p.sigma <= p.anchor_sigma and isinstance(p.stale_steps, int) and p.stale_steps >= 1
    for inputs, outputs in (prior.channels or {}).values():
        assert all(bool(torch.isfinite(t).all() and (t >= 0).all()) for t in (inputs, outputs))
    meta = prior.meta
    assert isinstance(meta["steps"], int) and math.isfinite(meta["cfg"]) and isinstance(meta["model"], dict)
    json.dumps(prior_card(meta), allow_nan=False)
    summarize(prior, per_site=True)
    try:
        check_schedule(meta, CachePolicy.from_dict(meta["policy"]), meta["sigmas"], path.name)
    except PriorMismatch:
        pass


def written(base: dict, data: bytes) -> Path:
    path = base["folder"] / "case.tcc.safetensors"
    path.write_bytes(data)
    return path


@FUZZ
@given(st.data())
def test_truncated_files_load_cleanly_or_are_refused_clearly(base, data):
    cut = data.draw(st.integers(0, len(base["data"]) - 1))
    outcome("truncated", written(base, base["data"][:cut]))


@FUZZ
@given(st.data())
def test_bit_flipped_files_load_cleanly_or_are_refused_clearly(base, data):
    """Half the flips land in the header, where the structure is; the rest anywhere."""
    blob = bytearray(base["data"])
    end = data.draw(st.sampled_from([base["header"], len(blob)]))
    for position, bit in data.draw(st.lists(st.tuples(st.integers(0, end - 1), st.integers(0, 7)), min_size=1,
                                            max_size=8)):
        blob[position] ^= 1 << bit
    outcome("bit-flipped", written(base, bytes(blob)))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


def metadata_value(draw) -> str:
    """A JSON document, raw text, or the valid value of another field."""
    return draw(st.one_of(json_values.map(json.dumps), st.text(max_size=60),
                          st.sampled_from(["1", "2", "-1", "1e400", "NaN", "tcc", "drift", "[]", "{}", "[1.0, 0.0]",
                                           '{"family": "x", "architecture": "0123456789abcdef"}'])))


@FUZZ
@given(st.data())
def test_files_with_crafted_metadata_load_cleanly_or_are_refused_clearly(base, data):
    meta = dict(base["meta"])
    fields = list(REQUIRED) + ["report", "seeds", "icc_stats", "unknown_field"]
    for field in data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=4, unique=True)):
        if data.draw(st.booleans()) and data.draw(st.booleans()):
            meta.pop(field, None)
        else:
            meta[field] = metadata_value(data.draw)
    path = base["folder"] / "case.tcc.safetensors"
    save_file(base["tensors"], str(path), metadata=meta)
    outcome("crafted metadata", path)


shapes = st.lists(st.integers(0, 12), max_size=3)
values = st.floats(allow_nan=True, allow_infinity=True, width=32)
torch_dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8,
                                torch.uint8, torch.bool])


@FUZZ
@given(st.data())
def test_files_with_crafted_tensors_load_cleanly_or_are_refused_clearly(base, data):
    tensors = dict(base["tensors"])
    names = list(tensors) + ["tcc/cond/1/0/attn/x", "tcc/uncond/2/1/mlp/a", "icc/9/out/in", "icc/0/qkv/side", "x"]
    for name in data.draw(st.lists(st.sampled_from(names) | st.text(min_size=1, max_size=30), min_size=1,
                                   max_size=4, unique=True)):
        if data.draw(st.integers(0, 3)) == 0:
            tensors.pop(name, None)
            continue
        shape = data.draw(shapes)
        numbers = data.draw(st.lists(values, min_size=math.prod(shape), max_size=math.prod(shape)))
        tensor = torch.tensor(numbers, dtype=torch.float64).reshape(shape)
        tensors[name] = tensor.to(data.draw(torch_dtypes))
    path = base["folder"] / "case.tcc.safetensors"
    save_file(tensors, str(path), metadata=base["meta"])
    outcome("crafted tensors", path)


@FUZZ
@given(st.data())
def test_hand_written_headers_load_cleanly_or_are_refused_clearly(base, data):
    """Headers save_file would never write: wrong offsets, unknown dtypes, negative or huge shapes, odd metadata."""
    header: dict = {}
    for name in data.draw(st.lists(st.sampled_from(list(base["tensors"])) | st.text(max_size=20), max_size=4)):
        start = data.draw(st.integers(-4, 600))
        header[name] = {"dtype": data.draw(st.sampled_from(DTYPES)),
                        "shape": data.draw(st.lists(st.integers(-2, 2**40), max_size=3) | shapes),
                        "data_offsets": [start, start + data.draw(st.integers(-4, 600))]}
    if data.draw(st.booleans()):
        header["__metadata__"] = {**base["meta"], **data.draw(st.dictionaries(st.sampled_from(list(base["meta"])),
                                                                                st.text(max_size=30), max_size=3))}
    blob = raw_file(header, data.draw(st.binary(max_size=600)))
    outcome("hand-written header", written(base, blob))
