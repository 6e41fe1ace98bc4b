"""The pip wheel holds the product, the testbed the demo needs and the files ComfyUI reads, nothing else; and it
works on its own, outside the repository."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                             "-q", "-w", str(out)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"pip wheel failed: {result.stderr[-2000:]}")
    return next(out.glob("calibrated_cache-*.whl"))


def test_the_wheel_holds_the_product_and_no_research_scripts_tests_or_docs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[1] for n in names if n.startswith("calibrated_cache/") and n.count("/") > 1}
    assert tops == {"calibration", "priors", "nodes", "testbed", "web", "example_workflows"}, tops
    for required in ("calibrated_cache/__init__.py", "calibrated_cache/web/calibrated_cache.js",
                     "calibrated_cache/testbed/weights/dit.safetensors", "calibrated_cache/testbed/demo.py",
                     "calibrated_cache/example_workflows/flux_dev_calibrated_cache.json"):
        assert required in names, required
    assert not [n for n in names if "study" in n or "error_share" in n or n.endswith(".md")], names


def test_the_unpacked_wheel_runs_the_demo_outside_the_repository(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import calibrated_cache, pathlib; from calibrated_cache.testbed.weights import load_dit; load_dit(); "
            "print(pathlib.Path(calibrated_cache.__file__).parent)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "site" / "calibrated_cache"
