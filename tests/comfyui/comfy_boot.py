"""Locate and boot a ComfyUI checkout for the integration tests (helper module, imports nothing from ComfyUI itself).

``comfyui_path_problem`` is a pure path check (conftest.py skips on it, or errors under COMFYUI_REQUIRED=1).
``bootstrap_comfy`` puts the checkout first on sys.path and imports ``comfy`` in CPU mode without parsing any command
line.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "COMFYUI_PATH"

_NEEDED = ("main.py", "nodes.py", "folder_paths.py", "comfy/cli_args.py", "comfy/options.py",
           "comfy/model_management.py", "comfy/sample.py", "comfy/sd.py")


def comfyui_path_problem(path: str | None) -> str | None:
    """Why `path` is not a usable ComfyUI checkout, or None when it looks like one."""
    if not path:
        return f"{ENV_VAR} is not set (point it at a ComfyUI checkout to run the ComfyUI integration tests)"
    missing = [n for n in _NEEDED if not os.path.isfile(os.path.join(path, *n.split("/")))]
    if missing:
        return f"{ENV_VAR}={path!r} is not a ComfyUI checkout (missing {', '.join(missing)})"
    return None


def bootstrap_comfy(path: str | None = None) -> str:
    """Make ``import comfy`` resolve to the checkout at `path` (default: $COMFYUI_PATH), in CPU mode. Idempotent.

    * The checkout goes first on sys.path, so ComfyUI's top-level ``nodes`` module (``nodes.py``) wins over anything
      else named ``nodes`` (the pack has a ``nodes`` subpackage: import the pack as ``calibrated_cache`` only).
    * ``comfy.cli_args`` parses ``sys.argv`` only if ``comfy.options.enable_args_parsing()`` was called (ComfyUI's
      main.py does that); the default is ``parse_args([])``, so pytest's argv is never seen. We keep it disabled.
    * ``args.cpu = True`` is set before ``comfy.model_management`` is imported: that module picks the device at import
      time and, without ``--cpu``, on a machine without CUDA it fails.

    Returns the absolute checkout path. Raises RuntimeError if the checkout is unusable or ``comfy`` was already
    imported from elsewhere / not in CPU mode.
    """
    path = path or os.environ.get(ENV_VAR)
    problem = comfyui_path_problem(path)
    if problem:
        raise RuntimeError(problem)
    path = os.path.abspath(path)
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    try:
        return _bootstrap(path)
    except BaseException:
        # Leave no half-booted ComfyUI behind (its top-level `nodes`, `utils`, `app`, `tests` would shadow others).
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            del sys.modules[name]
        raise


def _bootstrap(path: str) -> str:
    if sys.path[:1] != [path]:
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)

    stray_nodes = sys.modules.get("nodes")
    if stray_nodes is not None and not os.path.abspath(getattr(stray_nodes, "__file__", "") or "").startswith(path):
        raise RuntimeError(f"a module named `nodes` was already imported from {getattr(stray_nodes, '__file__', '?')}; "
                           "it would shadow ComfyUI's nodes.py (import the pack as `calibrated_cache`, not `nodes`)")

    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm

    comfy_file = os.path.abspath(comfy.cli_args.__file__)  # `comfy` is a namespace package: no comfy.__file__
    if not comfy_file.startswith(path + os.sep):
        raise RuntimeError(f"`comfy` was imported from {comfy_file}, not from {ENV_VAR}={path}")
    if not mm.cpu_mode():
        raise RuntimeError("comfy.model_management was imported before args.cpu was set; it is not in CPU mode")
    return path
