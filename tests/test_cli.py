import json
import subprocess
import sys
import zlib

import pytest

from calibrated_cache.cli import main
from calibrated_cache.testbed.bench import SCHEMA, run_benchmark, write_json
from calibrated_cache.testbed.png import write_png


def test_module_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "calibrated_cache", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "bench", "fit-priors", "inspect", "train-dit", "train-classifier"):
        assert command in out.stdout


def test_importing_the_package_does_not_import_comfy():
    code = "import sys, calibrated_cache, calibrated_cache.calibration; print(any(m.startswith('comfy') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_png_writer_produces_a_valid_greyscale_png(tmp_path):
    import torch

    pixels = torch.arange(12, dtype=torch.uint8).view(3, 4) * 20
    data = write_png(pixels, tmp_path / "a.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    raw = zlib.decompress(data[idat + 4 : idat + 4 + length])
    assert raw == b"".join(b"\x00" + bytes(row) for row in pixels.tolist())


def test_demo_compares_full_and_cached_sampling_and_writes_the_grid(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--samples", "10"]) == 0
    printed = capsys.readouterr().out
    assert "compute fraction" in printed and "rel_l2 vs full" in printed
    assert (tmp_path / "demo_grid.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_benchmark_reports_every_method_with_the_documented_fields(tmp_path):
    report = run_benchmark(quick=True, samples=16)
    write_json(report, tmp_path / "bench.json")
    loaded = json.loads((tmp_path / "bench.json").read_text())
    assert loaded["schema"] == SCHEMA
    rows = loaded["quality"]["rows"]
    assert {r["method"] for r in rows} == {"full", "engine-all", "fora", "taylor1", "taylor2", "foca", "fbcache",
                                           "fora+tcc", "taylor+tcc", "foca+tcc", "fora+tcc-oneshot", "fora+goc",
                                           "fora+goc-noinflection", "fora+goc+tcc", "icc-r16", "icc-r32",
                                           "icc-plain-svd", "icc+tcc"}
    for row in rows:
        assert set(row) >= {"method", "params", "compute_fraction", "wall_s", "wall_speedup", "rel_l2", "psnr", "fd", "accuracy"}
    engine_all = next(r for r in rows if r["method"] == "engine-all")
    assert engine_all["bit_identical"] and engine_all["rel_l2"] == 0.0
    fora = {r["target_fraction"]: r["compute_fraction"] for r in rows if r["method"] == "fora"}
    assert fora[0.25] == pytest.approx(0.25, abs=0.03) and fora[0.5] == pytest.approx(0.5, abs=0.03)
    tcc = {(r["method"], r["target_fraction"]): r for r in rows if "tcc" in r["method"]}
    assert {t for _, t in tcc} == {0.5, 0.33} and all(r["fit_s"] > 0 for r in tcc.values())
    assert tcc[("fora+tcc", 0.33)]["compute_fraction"] == pytest.approx(fora[0.33], abs=0.01)
    goc = {(r["method"], r["target_fraction"]): r for r in rows if "goc" in r["method"]}
    assert {t for _, t in goc} == {0.5, 0.33} and goc[("fora+goc", 0.5)]["params"]["goc"] == "GOC0.8"
    assert goc[("fora+goc+tcc", 0.5)]["fit_s"] > 0 and "fit_s" not in goc[("fora+goc", 0.5)]
    icc = {r["method"]: r for r in rows if "icc" in r["method"]}
    assert all(r["target_fraction"] == 0.5 and r["params"]["interval"] == 2 for r in icc.values())
    assert icc["icc-r32"]["params"]["icc"] == "ICC32" and icc["icc-plain-svd"]["params"]["icc"] == "ICC32plain"
    assert icc["icc+tcc"]["fit_s"] > 0 and icc["icc-r16"]["compute_fraction"] < icc["icc-r32"]["compute_fraction"]
    speed = loaded["speed"]["rows"]
    assert all(r["ideal_speedup"] == pytest.approx(1 / r["compute_fraction"]) for r in speed)
    first_runs = [r for r in speed if "factorize_s" in r]
    assert [r["params"]["icc"] for r in first_runs] == ["ICC10plain", "ICC32plain"]
    assert all(r["factorized"] == 8 * 4 for r in first_runs)  # the token-wise Linears of 8 blocks, at each new rank
