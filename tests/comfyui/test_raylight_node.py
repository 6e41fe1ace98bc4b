"""Apply Calibrated Cache (Raylight): offered only where Raylight is installed, and applied through Raylight's own
patch contract (`ray_patch`, imported from Raylight's source) on two real Ray actors that keep its worker's
`model_function_runner` contract (ray_actors.py), each holding a tiny Wan."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from raylight_source import raylight_env
from tiny_models import build_family, load_pack, run_sampler, session_of

HERE = Path(__file__).resolve().parent
STEPS = 6


@pytest.fixture(scope="module")
def raylight(tmp_path_factory):
    """Raylight's source and Ray importable here and on the actors; Raylight in a custom_nodes folder."""
    env = raylight_env()
    paths = [env["RAYLIGHT_DEPS"], str(Path(env["RAYLIGHT_PATH"]) / "src")]
    sys.path[:0] = paths
    custom_nodes = tmp_path_factory.mktemp("custom_nodes")
    (custom_nodes / "raylight").symlink_to(env["RAYLIGHT_PATH"], target_is_directory=True)
    yield custom_nodes, paths
    for path in paths:
        sys.path.remove(path)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    load_pack(str(tmp_path_factory.mktemp("pack")))
    import nodes

    apply = nodes.NODE_CLASS_MAPPINGS["CalibratedCache_Apply"]
    package = apply.__module__.rsplit(".", 2)[0]
    return {name: importlib.import_module(f"{package}.{name}") for name in ("nodes", "nodes.raylight", "calibration")}


def test_the_raylight_node_is_offered_only_where_raylight_is_installed(pack, raylight, tmp_path, monkeypatch):
    import folder_paths

    def offered(folder) -> bool:
        monkeypatch.setitem(folder_paths.folder_names_and_paths, "custom_nodes", ([str(folder)], set()))
        listed = asyncio.run(pack["nodes"].CalibratedCacheExtension().get_node_list())
        return "CalibratedCache_ApplyRaylight" in [n.define_schema().node_id for n in listed]

    assert offered(raylight[0])
    assert not offered(tmp_path)
    schema = pack["nodes.raylight"].ApplyCalibratedCacheRaylightNode.define_schema()
    assert [i.io_type for i in schema.inputs][:1] == ["RAY_ACTORS"] and schema.outputs[0].io_type == "RAY_ACTORS"
    assert all(i.tooltip for i in schema.inputs)


def test_the_node_patches_every_actors_model_through_raylights_contract(pack, raylight, monkeypatch):
    """Each actor's model comes back patched by the pack loaded there from its folder, deciding with the other GPUs
    through `rank_consensus` (one process per actor here: no process group, so no collective), and samples as the
    Apply node's model does in this process; running the node again (new settings) patches the actor's original
    model, so caches never stack."""
    import ray

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*raylight[1], str(HERE), os.environ.get("PYTHONPATH", "")]))
    policy = pack["calibration"].CachePolicy(mode="fixed", forecaster="taylor", order=2, interval=3,
                                             granularity="block", warmup_steps=1)
    local = build_family("Wan")
    apply = importlib.import_module(pack["nodes"].__name__ + ".apply_node").ApplyCalibratedCacheNode
    expected = run_sampler(apply.execute(local.model_patcher, policy).result[0], local.positive, local.negative,
                           local.latent, steps=STEPS, cfg=2.0, seed=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        from ray_actors import TinyWorker

        workers = [ray.remote(TinyWorker).remote("Wan") for _ in range(2)]
        actors = {"workers": workers}
        node = pack["nodes.raylight"].ApplyCalibratedCacheRaylightNode
        node.execute(actors, dataclasses.replace(policy, interval=2))
        assert node.execute(actors, policy).result[0] is actors
        for out, session in ray.get([w.sample.remote(STEPS) for w in workers]):
            assert session == {"tag": policy.tag(), "consensus": "rank_consensus", "skipped": session["skipped"],
                               "module": "calibrated_cache.nodes.session", "sessions": 1} and session["skipped"] > 0
            assert torch.equal(out, expected)
    finally:
        ray.shutdown()
