"""Apply Calibrated Cache: clone the model and hook its blocks to a cache policy, optionally with TCC priors."""

from __future__ import annotations

import dataclasses
import os

import comfy.patcher_extension
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from ..calibration import CachePolicy
from ..priors import check_model, check_policy
from . import folders
from .families import UnsupportedModel, detect
from .fitted import FittedPriors, TccPriorsType, fingerprint, load
from .policy_node import CATEGORY, CachePolicyType
from .session import HAS_PREDICT_NOISE, KEY, CacheSession, dit_patch, forward_patch

WrappersMP = comfy.patcher_extension.WrappersMP


def block_policy(policy: CachePolicy) -> CachePolicy:
    """In ComfyUI the pack caches whole-block residuals (G2): the DiT loops expose block inputs and outputs."""
    return dataclasses.replace(policy, granularity="block")


def patch_model(model: ModelPatcher, policy: CachePolicy, node_id: str | None = None,
                priors: FittedPriors | None = None) -> tuple[ModelPatcher, CacheSession]:
    """A clone of `model` whose blocks run through a new CacheSession for `policy` (G2); `model` is untouched."""
    m = model.clone()
    try:
        family, blocks = detect(m.get_model_object("diffusion_model"))
    except UnsupportedModel as err:
        raise ValueError(str(err)) from None
    session = CacheSession(block_policy(policy), family, blocks, node_id, priors)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, session.outer_sample)
    if HAS_PREDICT_NOISE:
        m.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, KEY, session.predict_noise)
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, KEY, session.calc_cond_batch)
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, session.apply_model)
    replaced = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for site in blocks:
        if site.segment.replace is None:
            m.add_object_patch(site.object_path, forward_patch(session, site, m.get_model_object(site.object_path)))
        else:
            key = (site.segment.replace, site.position)
            m.set_model_patch_replace(dit_patch(session, site, replaced.get(key)), "dit", *key)
    return m, session


def chosen_priors(priors: FittedPriors | None, prior_file: str) -> FittedPriors | None:
    """The connected priors, else the chosen file (a damaged or foreign file raises its PriorFileError)."""
    if priors is not None:
        return priors
    if prior_file in (None, folders.NONE):
        return None
    return load(folders.find_prior(prior_file))


class ApplyCalibratedCacheNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibratedCache_Apply",
            display_name="Apply Calibrated Cache",
            category=CATEGORY,
            description="Makes sampling faster by skipping DiT blocks on some steps and reusing or forecasting "
                        "their residuals, as the policy says. The input model is left untouched; bypass this node "
                        "to get exact full computation.",
            inputs=[
                io.Model.Input("model", tooltip="A DiT model: Flux, Chroma, SD3, AuraFlow, Wan, HunyuanVideo, "
                                                "Qwen-Image, LTXV, PixArt or Lumina2."),
                CachePolicyType.Input("policy", tooltip="From a Cache Policy node."),
                TccPriorsType.Input("priors", optional=True,
                                    tooltip="TCC priors from Fit TCC Priors; they correct each reused value. "
                                            "Wins over prior_file."),
                io.Combo.Input("prior_file", options=[folders.NONE, *folders.prior_files()], default=folders.NONE,
                               optional=True,
                               tooltip="A saved .tcc.safetensors file (cache_priors folder, or beside a checkpoint) "
                                       "fitted for this model and policy."),
            ],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, prior_file: str = folders.NONE, **_) -> object:
        """A refitted or replaced prior file must re-run the node, though its name is unchanged."""
        if prior_file in (None, folders.NONE):
            return folders.NONE
        try:
            stat = os.stat(folders.find_prior(prior_file))
        except (OSError, ValueError):
            return "missing"  # execute reports it
        return stat.st_mtime_ns, stat.st_size

    @classmethod
    def execute(cls, model: ModelPatcher, policy: CachePolicy, priors: FittedPriors | None = None,
                prior_file: str = folders.NONE) -> io.NodeOutput:
        fitted = chosen_priors(priors, prior_file)
        node_id = getattr(cls.hidden, "unique_id", None)  # None when called from a script rather than a prompt
        m, session = patch_model(model, policy, node_id, fitted)
        if fitted is not None:  # refused here, at node time, rather than after the sampler has loaded the model
            check_policy(fitted.meta, session.policy, fitted.name)
            check_model(fitted.meta, fingerprint(model, session.family.name), fitted.name)
        return io.NodeOutput(m)
