"""CI cannot pass with part of a tier skipped: under CC_NO_SKIPS=1 (.ci/run) a skip is a failure unless the test needs a
GPU (tests/ci_skips.py), and under COMFYUI_REQUIRED=1 a ComfyUI tier that cannot run is an error, not a skip."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
OURS = ("CC_NO_SKIPS", "CC_TIER", "CC_TIER_SUMMARY", "COMFYUI_PATH", "COMFYUI_REQUIRED")


def pytest_run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """A pytest run in a fresh interpreter with only the given settings of ours (the outer run's, CI's, dropped)."""
    clean = {k: v for k, v in os.environ.items() if k not in OURS}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args], cwd=cwd,
                          env={**clean, **env}, capture_output=True, text=True, timeout=300)


def tiny_suite(folder: Path) -> Path:
    (folder / "test_some.py").write_text(textwrap.dedent("""
        import pytest, torch

        def test_passes():
            pass

        def test_skips():
            pytest.skip("a browser is missing")

        @pytest.mark.needs_gpu("moves tensors to CUDA")
        def test_on_a_gpu():
            assert torch.cuda.is_available()
    """))
    (folder / "test_module_skip.py").write_text("import pytest\npytest.skip('no Chromium', allow_module_level=True)\n"
                                                "def test_never_collected():\n    pass\n")
    return folder


def plugin_run(folder: Path, **env: str) -> subprocess.CompletedProcess:
    return pytest_run(["-p", "ci_skips", str(folder)], folder, PYTHONPATH=str(TESTS), **env)


def test_skips_are_reported_as_skips_outside_ci(tmp_path):
    run = plugin_run(tiny_suite(tmp_path))
    gpu = torch.cuda.is_available()
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{1 + gpu} passed, {3 - gpu} skipped" in run.stdout and "tier " not in run.stdout


def test_under_ci_a_skip_fails_a_module_skipped_at_collection_fails_and_a_gpu_test_may_skip(tmp_path):
    summary = tmp_path / "tiers.txt"
    run = plugin_run(tiny_suite(tmp_path), CC_NO_SKIPS="1", CC_TIER="default", CC_TIER_SUMMARY=str(summary))
    gpu = torch.cuda.is_available()
    assert run.returncode == 1, run.stdout + run.stderr
    assert "a browser is missing" in run.stdout and "no Chromium" in run.stdout
    assert "with CC_NO_SKIPS=1 (CI) a skip is a failure" in run.stdout
    line = f"tier default: {1 + gpu} passed, 2 failed, 0 errors, {1 - gpu} skipped (allowed: {1 - gpu} needs a GPU)"
    assert line in run.stdout.splitlines()
    assert summary.read_text() == line + "\n"  # where .ci/run collects one line per tier


def comfyui_run(**env: str) -> subprocess.CompletedProcess:
    """One module of the ComfyUI tier beside one quick test of the default tier."""
    return pytest_run(["tests/comfyui/test_server.py", "tests/test_readme.py"], ROOT, **env)


def test_a_bad_comfyui_path_is_an_error_when_the_tier_is_required_and_a_skip_otherwise(tmp_path):
    required = comfyui_run(COMFYUI_PATH=str(tmp_path), COMFYUI_REQUIRED="1")
    said = required.stdout + required.stderr
    assert required.returncode not in (0, 5) and "skipped" not in said
    assert f"COMFYUI_REQUIRED=1 but COMFYUI_PATH='{tmp_path}' is not a ComfyUI checkout" in said
    unset = comfyui_run(COMFYUI_REQUIRED="1")
    assert unset.returncode not in (0, 5)
    assert "COMFYUI_REQUIRED=1 but COMFYUI_PATH is not set" in unset.stdout + unset.stderr
    optional = comfyui_run(COMFYUI_PATH=str(tmp_path))
    assert optional.returncode == 0 and "1 passed, 1 skipped" in optional.stdout
    assert "is not a ComfyUI checkout" in optional.stdout
    strict = comfyui_run(COMFYUI_PATH=str(tmp_path), CC_NO_SKIPS="1")  # set but unusable: a skip, so a CI failure
    assert strict.returncode == 1 and "1 failed, 1 passed" in strict.stdout


def test_the_default_tier_leaves_the_comfyui_modules_to_their_own_tier_under_ci():
    run = comfyui_run(CC_NO_SKIPS="1", CC_TIER="default")
    assert run.returncode == 0, run.stdout + run.stderr
    assert ("tier default: 1 passed, 0 failed, 0 errors, 0 skipped (allowed: 0 needs a GPU); 1 ComfyUI-tier module "
            "not collected (no COMFYUI_PATH)") in run.stdout
