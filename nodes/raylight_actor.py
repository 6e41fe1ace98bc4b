"""What Raylight runs on each GPU's actor to apply the pack there. Standard library only: Ray ships this function by
value, since ComfyUI imports the pack under a path-derived name the actors cannot import; on the actor the pack is
loaded from its folder as `calibrated_cache`, and its Raylight module patches that actor's model."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

ACTOR_PACKAGE = "calibrated_cache"


def patch_on_actor(_node, model, pack_dir: str, settings: dict):
    """Raylight's `ray_patch` contract: called as patch(node, model, *args) on each actor; returns the patched model."""
    if ACTOR_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(ACTOR_PACKAGE, os.path.join(pack_dir, "__init__.py"),
                                                      submodule_search_locations=[pack_dir])
        package = importlib.util.module_from_spec(spec)
        sys.modules[ACTOR_PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{ACTOR_PACKAGE}.nodes.raylight").patch_rank(model, settings)
