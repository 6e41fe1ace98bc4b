import hashlib
import io
import json
import signal
import subprocess
import sys
import zlib

import pytest
import torch

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


def test_demo_compares_full_and_cached_sampling_and_writes_a_labelled_picture(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--samples", "10"]) == 0
    printed, progress = capsys.readouterr()
    assert "demo [" in progress and "100%" in progress and "demo [" not in printed  # progress on stderr only
    assert "compute fraction" in printed and "rel_l2 vs full" in printed
    assert "median of 5 interleaved pairs" in printed and "white = " in printed
    assert (tmp_path / "demo_grid.png").read_bytes()[:4] == b"\x89PNG"


def test_the_demo_picture_carries_a_title_row_labels_a_scale_and_the_figures():
    from calibrated_cache.testbed.demo import picture

    rows = torch.zeros(3, 1, 8, 8)
    figures = {"policy": "TAYLOR2_N4_W0", "samples": 3, "steps": 24, "cfg": 2.0, "compute_fraction": 0.274,
               "ideal_speedup": 3.65, "wall_speedup": 2.5, "wall_ratios": [2.5] * 5, "rel_l2": 0.04, "psnr": 36.0,
               "accuracy_full": 1.0, "accuracy_cached": 1.0}
    inked = (picture(rows, rows, rows, 8, figures)[:, :40] < 100).any(dim=1).tolist()  # the left margin, by row
    bands = sum(1 for i, ink in enumerate(inked) if ink and (i == 0 or not inked[i - 1]))
    assert bands == 7  # the title, three row labels, the scale's label and two lines of figures


def test_the_difference_is_stretched_by_a_power_of_two_toward_the_full_range():
    from calibrated_cache.testbed.demo import difference_gain

    assert difference_gain(torch.full((2, 2), 0.2)) == 8  # 0.2 × 8 = 1.6 ≤ 2
    assert difference_gain(torch.zeros(2)) == 1 and difference_gain(torch.full((1,), 1e-9)) == 256


def test_demo_errors_a_user_can_cause_get_messages_not_tracebacks(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--samples", "0"])
    assert "must be 1 or more" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(SystemExit, match="cannot write the demo picture to .*choose a writable folder with --out"):
        main(["demo", "--out", str(blocked / "sub")])


def test_the_training_commands_take_their_options_and_never_overwrite_the_shipped_weights(tmp_path, capsys):
    from calibrated_cache.testbed.weights import CLASSIFIER_PATH, DIT_PATH

    for command in ("train-dit", "train-classifier"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and "--replace-shipped" in capsys.readouterr().out
    shipped = {path: path.stat().st_mtime_ns for path in (DIT_PATH, CLASSIFIER_PATH)}
    with pytest.raises(SystemExit, match="shipped weights: pass --replace-shipped"):
        main(["train-dit", "--out", str(DIT_PATH), "--iters", "1"])
    out = tmp_path / "classifier.safetensors"
    assert main(["train-classifier", "--epochs", "1", "--out", str(out)]) == 0 and out.exists()
    with pytest.raises(SystemExit, match="exists: pass --overwrite"):
        main(["train-classifier", "--epochs", "1", "--out", str(out)])
    assert main(["train-dit", "--iters", "2", "--eval-samples", "0", "--out", str(tmp_path / "dit.safetensors")]) == 0
    assert {path: path.stat().st_mtime_ns for path in shipped} == shipped


def test_training_without_scikit_learn_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit, match=r"scikit-learn.*calibrated-cache\[train\]"):
        main(["train-classifier", "--epochs", "1", "--out", str(tmp_path / "c.safetensors")])


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_redraws_a_bar_on_a_terminal_and_writes_a_few_plain_lines_to_a_log():
    from calibrated_cache.testbed.progress import Progress

    terminal, log, off = Stream(True), Stream(False), Stream(False)
    for stream, enabled in ((terminal, True), (log, True), (off, False)):
        bar = Progress(4, "bench", stream, enabled=enabled, every=3600)
        bar.advance(1, "fora")
        bar.advance(1)
        bar.advance(2, "taylor")
        bar.close()
    assert "\r" in terminal.getvalue() and "50%" in terminal.getvalue() and "ETA" in terminal.getvalue()
    assert "fora" in terminal.getvalue() and terminal.getvalue().endswith("\r\x1b[K")  # cleared for what follows
    lines = log.getvalue().splitlines()  # the start and the end; the rest within `every` seconds is not repeated
    assert len(lines) == 2 and "  0%" in lines[0] and "100%" in lines[1] and "taylor" in lines[1]
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue() and off.getvalue() == ""


def test_fit_priors_shows_progress_on_stderr_and_counts_one_request_in_the_singular(tmp_path, capsys):
    out = tmp_path / "one.tcc.safetensors"
    assert main(["fit-priors", "--interval", "2", "--samples", "1", "--held-out", "1", "--steps", "6",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "fitted on 1 request;" in printed.out and "on 1 held-out request:" in printed.out
    assert "fit-priors [" in printed.err and "100%" in printed.err and "fit-priors [" not in printed.out
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "on 1 request (seeds" in shown and "fitted on 1 request (seeds" in shown
    copy = tmp_path / "elsewhere" / out.name  # a worker compares this line to know it holds the same file
    copy.parent.mkdir()
    copy.write_bytes(out.read_bytes())
    assert main(["inspect", str(copy)]) == 0
    assert shown.splitlines()[0] == capsys.readouterr().out.splitlines()[0] == f"file          sha256 " \
        f"{hashlib.sha256(out.read_bytes()).hexdigest()[:16]} (the same on every machine that holds this file)"
    header = next(line for line in shown.splitlines() if line.startswith("role "))
    assert header.split()[:3] == ["role", "step", "sigma"]  # Euler: one model evaluation per step


def test_inspect_on_a_directory_says_to_give_a_prior_file_inside_it(tmp_path):
    (tmp_path / "b.tcc.safetensors").write_bytes(b"")
    (tmp_path / "a.tcc.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(SystemExit, match=r"is a directory: give a prior file \(\.safetensors\) inside it; it holds "
                                         r"a\.tcc\.safetensors, b\.tcc\.safetensors$"):
        main(["inspect", str(tmp_path)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="is a directory: .*; it holds no .safetensors file"):
        main(["inspect", str(tmp_path / "empty")])


def test_fit_priors_help_describes_every_granularity_and_the_forecaster_default(capsys):
    with pytest.raises(SystemExit):
        main(["fit-priors", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--granularity {module,block,step}" in text
    for described in ("module (default, G3", "block (G2", "step (G1: the model's whole output",
                      "how skipped sites are filled (default reuse"):
        assert described in text


def test_ctrl_c_stops_a_command_with_one_line_and_exit_code_130(tmp_path):
    """As a user's Ctrl-C in a terminal: SIGINT once the command shows progress; no traceback, no file."""
    out = tmp_path / "p.tcc.safetensors"
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal
            "from calibrated_cache.cli import main; sys.exit(main(sys.argv[1:]))")
    command = subprocess.Popen([sys.executable, "-c", code, "fit-priors", "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        first = command.stderr.readline()  # the progress line a fit shows before it samples anything
        assert first.startswith("fit-priors ["), first
        command.send_signal(signal.SIGINT)
        printed, said = command.communicate(timeout=120)
    finally:
        command.kill()
    assert command.returncode == 130 and "Traceback" not in printed + said and not out.exists()
    assert [line for line in said.splitlines() if not line.startswith("fit-priors [")] == [
        "interrupted: fit-priors stopped before the end; it writes files only when it finishes, so none is "
        "half-written"]


@pytest.mark.slow
def test_benchmark_reports_every_method_and_the_orderings_its_tables_claim(tmp_path):
    report = run_benchmark(quick=True, samples=16)
    write_json(report, tmp_path / "bench.json")
    loaded = json.loads((tmp_path / "bench.json").read_text())
    assert loaded["schema"] == SCHEMA
    rows = loaded["quality"]["rows"]
    assert {r["method"] for r in rows} == {"full", "engine-all", "fora", "taylor1", "taylor2", "foca", "spectrum",
                                           "dmd", "fbcache", "fora+tcc", "taylor+tcc", "foca+tcc", "fora+tcc-oneshot",
                                           "fora+goc",
                                           "fora+goc-noinflection", "fora+goc+tcc", "icc-r16", "icc-r32",
                                           "icc-plain-svd", "icc+tcc", "fewer-steps"}
    for row in rows:  # quality rows carry no wall figure: only paired ones are printed, in the speed section
        assert set(row) >= {"method", "params", "compute_fraction", "rel_l2", "psnr", "fd", "accuracy"}
        assert "wall_speedup" not in row
    steps = loaded["quality"]["config"]["steps"]
    fewer = {r["params"]["interval"]: r for r in rows if r["method"] == "fewer-steps"}  # the honest floor
    assert set(fewer) == {2, 3, 4, 5, 6, 8} and all(r["rel_l2"] > 0 for r in fewer.values())
    assert all(r["compute_fraction"] == r["params"]["steps"] / steps == pytest.approx(1 / n, abs=0.1)
               for n, r in fewer.items())
    engine_all = next(r for r in rows if r["method"] == "engine-all")
    assert engine_all["bit_identical"] and engine_all["rel_l2"] == 0.0
    fora = {r["target_fraction"]: r["compute_fraction"] for r in rows if r["method"] == "fora"}
    assert fora[0.25] == pytest.approx(0.25, abs=0.03) and fora[0.5] == pytest.approx(0.5, abs=0.03)
    tcc = {(r["method"], r["target_fraction"]): r for r in rows if "tcc" in r["method"] and r["method"] != "foca+tcc"}
    assert {t for _, t in tcc} == {0.5, 0.33} and all(r["fit_s"] > 0 for r in tcc.values())
    assert {r["target_fraction"] for r in rows if r["method"] == "foca+tcc"} == {0.5, 0.33, 0.25, 0.2, 0.17, 0.125}
    assert tcc[("fora+tcc", 0.33)]["compute_fraction"] == pytest.approx(fora[0.33], abs=0.01)
    goc = {(r["method"], r["target_fraction"]): r for r in rows if "goc" in r["method"]}
    assert {t for _, t in goc} == {0.5, 0.33} and goc[("fora+goc", 0.5)]["params"]["goc"] == "GOC0.8"
    assert goc[("fora+goc+tcc", 0.5)]["fit_s"] > 0 and "fit_s" not in goc[("fora+goc", 0.5)]
    icc = {r["method"]: r for r in rows if "icc" in r["method"]}
    assert all(r["target_fraction"] == 0.5 and r["params"]["interval"] == 2 for r in icc.values())
    assert icc["icc-r32"]["params"]["icc"] == "ICC32" and icc["icc-plain-svd"]["params"]["icc"] == "ICC32plain"
    assert icc["icc+tcc"]["fit_s"] > 0 and icc["icc-r16"]["compute_fraction"] < icc["icc-r32"]["compute_fraction"]
    error = {(r["method"], r["target_fraction"]): r["rel_l2"] for r in rows}
    for target in (0.5, 0.33, 0.25, 0.2, 0.17):  # forecasting beats reuse at equal compute
        assert max(error[("taylor1", target)], error[("taylor2", target)]) < error[("fora", target)]
    assert min(error[("taylor1", 0.125)], error[("foca", 0.125)]) < error[("fora", 0.125)]  # 1 step in 8
    for target in (0.5, 0.33):  # what calibration and correction add to FORA at the same schedule
        assert error[("fora+tcc", target)] < 0.75 * error[("fora", target)]
        assert error[("fora+goc", target)] < error[("fora", target)]
        assert error[("fora+tcc", target)] < error[("fora+tcc-oneshot", target)]
    assert error[("icc-r32", 0.5)] < error[("fora", 0.5)] and error[("icc-r32", 0.5)] < error[("icc-r16", 0.5)]
    assert error[("foca", 0.125)] != pytest.approx(error[("taylor2", 0.125)], rel=0.03)  # another method
    for name in ("testbed", "stack"):
        speed = {(r["method"], r["params"].get("interval")): r for r in loaded["speed"][name]["rows"]}
        assert speed[("engine-all", 1)]["bit_identical"] and speed[("engine-all", 1)]["compute_fraction"] == 1.0
        for r in speed.values():  # paired ratios with their spread, within reach of the ideal they are a share of
            low, high = r["spread"]
            assert low <= r["wall_speedup"] <= high and 0 < r["share_of_ideal"] < 1.3
        assert speed[("fora", 6)]["wall_speedup"] > speed[("fora", 2)]["wall_speedup"]  # ideal 6 against 2
        assert speed[("fora-step", 4)]["compute_fraction"] < speed[("fora", 4)]["compute_fraction"]
    first_runs = [r for r in loaded["speed"]["stack"]["rows"] if "factorize_s" in r]
    assert [r["params"]["icc"] for r in first_runs] == ["ICC10plain", "ICC32plain"]
    assert all(r["factorized"] == 8 * 4 for r in first_runs)  # the token-wise Linears of 8 blocks, at each new rank


def test_the_version_of_pyproject_the_package_and_a_fitted_files_provenance_agree(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    from calibrated_cache import __version__
    from calibrated_cache.cli import main
    from calibrated_cache.priors import read_metadata

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == __version__
    monkeypatch.chdir(tmp_path)
    assert main(["fit-priors", "--interval", "2", "--samples", "2", "--held-out", "1", "--steps", "6",
                 "--out", "p.tcc.safetensors"]) == 0
    meta = read_metadata(tmp_path / "p.tcc.safetensors")
    assert meta["pack_version"] == __version__


def test_fit_priors_for_a_target_speedup_writes_the_plan_and_inspect_draws_it(tmp_path, capsys):
    out = tmp_path / "plan.tcc.safetensors"
    assert main(["fit-priors", "--target-speedup", "3", "--granularity", "block", "--samples", "8", "--held-out", "4",
                 "--steps", "12", "--out", str(out)]) == 0
    printed, progress = capsys.readouterr()
    assert progress.splitlines()[-1].startswith("fit-priors [") and "100%" in progress  # on stderr, to the end
    assert "searched plan for 3x" in printed and "refined by" in printed and str(out) in printed
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "8 blocks x 12 steps" in shown and shown.count("#") >= 12
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["fit-priors", "--target-speedup", "3", "--out", str(out)])
    with pytest.raises(SystemExit, match="chooses the schedule and the forecaster itself"):
        main(["fit-priors", "--target-speedup", "3", "--forecaster", "taylor", "--out", str(tmp_path / "x")])
