"""Apply Calibrated Cache: clone the model and hook its blocks to a cache policy."""

from __future__ import annotations

import dataclasses

import comfy.patcher_extension
from comfy_api.latest import io

from .families import UnsupportedModel, detect
from .policy_node import CATEGORY, CachePolicyType
from .session import HAS_PREDICT_NOISE, KEY, CacheSession, dit_patch, forward_patch

WrappersMP = comfy.patcher_extension.WrappersMP


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
            ],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, policy) -> io.NodeOutput:
        m = model.clone()
        try:
            family, blocks = detect(m.get_model_object("diffusion_model"))
        except UnsupportedModel as err:
            raise ValueError(str(err)) from None
        # In ComfyUI the pack caches whole-block residuals (G2): the DiT loops expose block inputs and outputs.
        node_id = getattr(cls.hidden, "unique_id", None)  # None when called from a script rather than a prompt
        session = CacheSession(dataclasses.replace(policy, granularity="block"), family, blocks, node_id)
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
        return io.NodeOutput(m)
