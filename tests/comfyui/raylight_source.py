"""Where the multi-GPU tests find Raylight and the registry packages its USP code imports.

`RAYLIGHT_PATH` (a Raylight source tree, the folder holding `src/raylight`) and `RAYLIGHT_DEPS` (a folder with
`xfuser`, `yunchang` and `ray`) are used when set. Otherwise Raylight's published source is unpacked from
`../shared/raylight/raylight-*.tar.gz` beside the repository, and the two packages, pinned, are installed from the
package registry with this interpreter's pip into a folder of their own (never into the venv: xfuser would pull
diffusers and more into ComfyUI's environment), both under ~/.cache/cc-raylight, once. The packages' versions are those `pip install xfuser ray` resolves for these
venvs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path.home() / ".cache" / "cc-raylight"
# xfuser and yunchang for the USP forwards; Ray and what it imports that ComfyUI's venv lacks, for the node's actors
PINNED = ("xfuser==0.7.0", "yunchang==0.6.4", "ray==2.60.0", "msgpack==1.2.4", "protobuf==7.36.2", "jsonschema==4.26.0",
          "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1")


def raylight_env() -> dict[str, str]:
    """RAYLIGHT_PATH and RAYLIGHT_DEPS for the rank processes; raises with the fix when neither can be had."""
    return {"RAYLIGHT_PATH": os.environ.get("RAYLIGHT_PATH") or str(_unpacked()),
            "RAYLIGHT_DEPS": os.environ.get("RAYLIGHT_DEPS") or str(_installed())}


def _unpacked() -> Path:
    tree = CACHE / "raylight"
    if (tree / "src" / "raylight").is_dir():
        return tree
    tarballs = sorted((REPO.parent / "shared" / "raylight").glob("raylight-*.tar.gz"))
    if not tarballs:
        raise RuntimeError("no Raylight source: set RAYLIGHT_PATH to a Raylight checkout (the folder holding "
                           "src/raylight), or put raylight-*.tar.gz in ../shared/raylight")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / "unpacking"
    with tarfile.open(tarballs[-1]) as archive:
        archive.extractall(partial, filter="data")
    (partial / "raylight").rename(tree)
    partial.rmdir()
    return tree


def _installed() -> Path:
    target = CACHE / f"deps-py{sys.version_info.major}{sys.version_info.minor}"
    done = target / ".installed"
    if done.is_file() and done.read_text() == " ".join(PINNED):
        return target
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(target),
                    *PINNED], check=True)
    done.write_text(" ".join(PINNED))
    return target
