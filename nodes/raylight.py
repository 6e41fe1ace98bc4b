"""The pack on Raylight's GPUs: how the ranks of one model agree on every cache decision.

Raylight runs one Ray actor per GPU, each with its own ModelPatcher and sampler, joined by `torch.distributed`
(docs/multi-gpu.md). Every actor's forward takes part in the same collectives (USP's all-to-alls and all-gathers, CFG
parallelism's gather, FSDP's weight gathers), so every actor must take the same decision at every block call: the
decision group is the whole world. Under USP the tokens of a sequence are sharded over xfuser's sequence-parallel
group, so statistics over tokens are summed over that group; under CFG parallelism each rank of xfuser's CFG group
evaluates one branch and keeps its caches.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from comfy_api.latest import io

from ..calibration import CachePolicy
from ..calibration.consensus import Consensus, current
from ..calibration.icc import SVD_MODES
from ..calibration.rounds import CHECK_RANKS
from . import folders, raylight_actor
from .apply_node import ApplyCalibratedCacheNode, apply_cache, cache_memory
from .fitted import load
from .policy_node import CATEGORY

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_ACTORS = io.Custom("RAY_ACTORS")  # Raylight's socket: {"workers": [one Ray actor per GPU], ...}
PATCH_CONTRACT = os.path.join("src", "raylight", "comfy_extra_dist", "ray_patch_decorator.py")
BASE = "calibrated_cache_base"  # an actor model's attachment: the model before this node patched it


def raylight_installed() -> bool:
    """Whether Raylight is in a custom_nodes folder (found by its patch contract's file) and Ray can be imported:
    the Raylight node is offered only then."""
    import folder_paths

    if importlib.util.find_spec("ray") is None:
        return False
    return any(os.path.isfile(os.path.join(root, name, PATCH_CONTRACT))
               for root in folder_paths.get_folder_paths("custom_nodes") if os.path.isdir(root)
               for name in os.listdir(root))


class ApplyCalibratedCacheRaylightNode(io.ComfyNode):
    """Apply Calibrated Cache on every GPU of a Raylight model, through Raylight's own patch contract."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [i for i in ApplyCalibratedCacheNode.define_schema().inputs if i.id not in ("model", "priors")]
        return io.Schema(
            node_id="CalibratedCache_ApplyRaylight",
            display_name="Apply Calibrated Cache (Raylight)",
            category=CATEGORY,
            description="Apply Calibrated Cache on every GPU of a Raylight model (sequence, CFG or FSDP parallel): "
                        "every GPU takes the same decision at every block, so their collectives stay matched "
                        "(docs/multi-gpu.md). Fixed and planned policies without a cache cap cost no "
                        "communication; the dynamic one a small all-reduce per step.",
            inputs=[RAY_ACTORS.Input("ray_actors", tooltip="From Raylight's model loader (RAY_ACTORS)."), *inputs],
            outputs=[RAY_ACTORS.Output(display_name="ray_actors")],
        )

    @classmethod
    def execute(cls, ray_actors: dict, policy: CachePolicy | None = None, prior_file: str = folders.NONE,
                icc_rank: int = 0, icc_svd: str = SVD_MODES[0], cache_offload: bool = False,
                cache_limit_mb: int = 0) -> io.NodeOutput:
        from raylight.comfy_extra_dist.ray_patch_decorator import ray_patch
        from ray import cloudpickle

        cache_memory(cache_offload, cache_limit_mb)  # a bad setting is refused here, once, not on every GPU
        path = None if prior_file in (None, folders.NONE) else folders.find_prior(prior_file)
        settings = {"policy": None if policy is None else policy.to_dict(), "prior_path": path, "icc_rank": icc_rank,
                    "icc_svd": icc_svd, "cache_offload": cache_offload, "cache_limit_mb": cache_limit_mb,
                    "check_ranks": os.environ.get(CHECK_RANKS) == "1"}  # this process's, the same on every GPU
        cloudpickle.register_pickle_by_value(raylight_actor)
        return io.NodeOutput(ray_patch(raylight_actor.patch_on_actor)(None, ray_actors, PACK_DIR, settings)[0])


def patch_rank(model, settings: dict[str, Any]):
    """On one actor: the patched clone of its model, deciding with the other GPUs through `rank_consensus`. Every GPU
    reads the prior file itself; each run starts by checking they read the same one. The actor keeps the patched model
    in place of its own (Raylight's `model_function_runner`), so a later run of the node patches the model it was given
    the first time, not the patched one: caches never stack."""
    if settings["check_ranks"]:
        os.environ[CHECK_RANKS] = "1"
    else:
        os.environ.pop(CHECK_RANKS, None)
    base = model.attachments.get(BASE, model)
    policy = None if settings["policy"] is None else CachePolicy.from_dict(settings["policy"])
    fitted = None if settings["prior_path"] is None else load(settings["prior_path"])
    m, session, _ = apply_cache(base, policy, fitted, settings["icc_rank"], settings["icc_svd"],
                                cache_memory(settings["cache_offload"], settings["cache_limit_mb"]))
    session.ranks = rank_consensus
    m.attachments[BASE] = base
    return m


def rank_consensus() -> Consensus:
    """The consensus of this actor's run: over the world, with token statistics summed over xfuser's sequence-parallel
    group and branches split over its CFG group where those have more than one rank; none where `torch.distributed`
    is not initialised."""
    tokens = branches = None
    try:
        from xfuser.core.distributed import (get_cfg_group, get_classifier_free_guidance_world_size,
                                             get_sequence_parallel_world_size, get_sp_group)
    except ImportError:  # Raylight without xfuser (FSDP or data parallel only): each rank holds whole batches
        return current()
    try:
        if get_sequence_parallel_world_size() > 1:
            tokens = get_sp_group().device_group
        if get_classifier_free_guidance_world_size() > 1:
            branches = get_cfg_group().device_group
    except (AssertionError, AttributeError):  # xfuser's groups are not initialised: neither kind of parallelism
        tokens = branches = None
    return current(None, tokens, branches)
