"""ComfyUI integration tier: skipped unless COMFYUI_PATH points at a ComfyUI checkout.

Without COMFYUI_PATH every test module in this folder is reported as skipped at collection time, and neither the module
nor ComfyUI is imported (so the default tier, whose venv has no ComfyUI, collects cleanly); the modules are marked
``comfyui_tier``, which CC_NO_SKIPS=1 (../ci_skips.py) counts as the other tier's rather than as skips of this run.
With COMFYUI_REQUIRED=1 (CI) a COMFYUI_PATH that is unset, not a checkout or not bootable is an error. With a
checkout, it is put first on sys.path, ``comfy.cli_args.args.cpu`` is set before anything imports
``comfy.model_management`` (ComfyUI's cli_args parses no argv unless ``comfy.options.enable_args_parsing()`` was
called, so pytest's options are never seen), and ``tiny_models`` (this folder's helper module) becomes importable.

Never ``import nodes`` expecting the pack: with the checkout first on sys.path, ``nodes`` is ComfyUI's ``nodes.py``.
Import the pack as ``calibrated_cache``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_ENV_VAR = "COMFYUI_PATH"
_REQUIRED_ENV = "COMFYUI_REQUIRED"  # "1": a missing or unbootable COMFYUI_PATH is an error, not a skip (use in CI)


def _load_comfy_boot():
    # By file path: with --import-mode=importlib this folder is not on sys.path (and must not be when skipping).
    if "comfy_boot" in sys.modules:
        return sys.modules["comfy_boot"]
    spec = importlib.util.spec_from_file_location("comfy_boot", os.path.join(_HERE, "comfy_boot.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["comfy_boot"] = module
    return module


_boot = _load_comfy_boot()
SKIP_REASON = _boot.comfyui_path_problem(os.environ.get(_ENV_VAR))
COMFYUI_DIR = None
if SKIP_REASON is not None and os.environ.get(_REQUIRED_ENV) == "1":
    raise pytest.UsageError(f"{_REQUIRED_ENV}=1 but {SKIP_REASON}")

if SKIP_REASON is None:
    # Import-order sensitive, so done at conftest import, before any test module of this folder can import comfy.
    try:
        COMFYUI_DIR = _boot.bootstrap_comfy(os.environ[_ENV_VAR])
    except Exception as exc:  # e.g. torchvision missing in this interpreter
        if os.environ.get(_REQUIRED_ENV) == "1":
            raise
        SKIP_REASON = (f"{_ENV_VAR}={os.environ[_ENV_VAR]!r} is set but ComfyUI cannot be booted with "
                       f"{sys.executable}: {type(exc).__name__}: {exc}")
    else:
        if _HERE not in sys.path:
            sys.path.insert(1, _HERE)  # after the checkout: `import tiny_models` in this folder's test modules


class _SkippedModule(pytest.Module):
    """A test module that is reported as skipped instead of being imported."""

    def collect(self):
        pytest.skip(SKIP_REASON)


def pytest_pycollect_makemodule(module_path, parent):
    if SKIP_REASON is not None:
        module = _SkippedModule.from_parent(parent, path=module_path)
        if not os.environ.get(_ENV_VAR):  # the tier was not asked for: a run of the other tier
            module.add_marker("comfyui_tier")
        return module
    return None


@pytest.fixture(scope="session")
def comfyui_dir() -> str:
    """Absolute path of the ComfyUI checkout in use."""
    return COMFYUI_DIR


@pytest.fixture(scope="session")
def server(tmp_path_factory, comfyui_dir):
    """One headless ComfyUI server for every test that needs one (see harness.py)."""
    from harness import running_server

    with running_server(tmp_path_factory.mktemp("comfy_base"), comfyui_dir) as running:
        yield running


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """The pack loaded as ComfyUI loads it: its Cache Policy and Apply Calibrated Cache classes (a module may
    override this fixture to return other node classes)."""
    from tiny_models import load_pack

    return load_pack(str(tmp_path_factory.mktemp("custom_nodes")))


@pytest.fixture(scope="module")
def bundles() -> dict:
    """Tiny family bundles built once per module (see `test_nodes.bundle`)."""
    return {}


@pytest.fixture(scope="session")
def tiny():
    """The `tiny_models` helper module (ComfyUI already booted in CPU mode)."""
    import tiny_models

    return tiny_models


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory, tiny) -> str:
    """A ComfyUI-style ``models`` dir with ``diffusion_models/tiny_<family lower-cased>.safetensors`` (loader families).

    Also registered with ComfyUI's ``folder_paths`` (as an extra ``diffusion_models`` folder), so UNETLoader-style
    lookups by file name (``tiny_sd3.safetensors``, ...) find them.
    """
    models_dir = str(tmp_path_factory.mktemp("comfy_models"))
    for name, spec in tiny.SPECS.items():
        if spec.via_loader:
            tiny.save_tiny_unet(spec, models_dir)
    import folder_paths  # ComfyUI's (the checkout is first on sys.path)

    folder_paths.add_model_folder_path("diffusion_models", os.path.join(models_dir, "diffusion_models"))
    return models_dir


@pytest.fixture(scope="session")
def _tiny_patchers(tiny, tiny_models_dir) -> dict:
    return {}


@pytest.fixture
def tiny_bundle(tiny, tiny_models_dir, _tiny_patchers):
    """Factory: ``tiny_bundle("Flux")`` -> TinyBundle with a fresh ``clone()`` of a session-cached ModelPatcher.

    Clones share the model weights but not patches/options, so tests may add wrappers, object patches and
    transformer_options freely. Conditioning and latent are rebuilt per call (cheap, deterministic).
    """

    def make(name: str):
        if name not in _tiny_patchers:
            _tiny_patchers[name] = tiny.build_family(name, tiny_models_dir).model_patcher
        positive, negative, latent = tiny.make_inputs(name)
        return tiny.TinyBundle(_tiny_patchers[name].clone(), positive, negative, latent)

    return make
