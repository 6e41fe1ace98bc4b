"""ComfyUI tier: Apply Calibrated Cache's `model` tooltip names every family the pack caches by name, read from the
family registry, so it cannot fall behind it (skipped without COMFYUI_PATH)."""

import sys


def test_the_model_tooltip_names_every_family_of_the_registry_and_the_fallback(pack):
    _, apply_node = pack
    registry = sys.modules[apply_node.__module__.rsplit(".", 1)[0] + ".families"].FAMILIES
    tooltip = next(i.tooltip for i in apply_node.define_schema().inputs if i.id == "model")
    assert len(registry) >= 19 and [f.name for f in registry if f.name not in tooltip] == []
    assert "generic fallback" in tooltip
