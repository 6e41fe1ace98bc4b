"""Apply Calibrated Cache: clone the model and hook its blocks to a cache policy, optionally with TCC priors."""

from __future__ import annotations

import dataclasses
import logging
import os

import comfy.patcher_extension
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io, ui

from ..calibration import CacheMemory, CachePolicy, PolicyError
from ..calibration.icc import SVD_MODES, FactorCache, IccSettings
from ..priors import check_model, check_policy
from ..priors.validate import IDENTITY
from . import folders
from .families import FAMILIES, UnsupportedModel, detect
from .fitted import FittedPriors, TccPriorsType, comfyui_version, fingerprint, load
from .linears import factor_cache, route_linears
from .policy_node import CATEGORY, CachePolicyType
from .session import HAS_PREDICT_NOISE, KEY, CacheSession, dit_patch, forward_patch

WrappersMP = comfy.patcher_extension.WrappersMP
log = logging.getLogger("calibrated_cache")
MAX_RANK = 4096


def block_policy(policy: CachePolicy) -> CachePolicy:
    """In ComfyUI the pack caches whole-block residuals (G2), as the DiT loops expose block inputs and outputs, or with
    whole-step forecasting the model's output (G1); the adaLN blocks' pre-gate sites (G3) are not exposed."""
    return policy if policy.granularity == "step" else dataclasses.replace(policy, granularity="block")


def with_icc(policy: CachePolicy, rank: int, svd: str) -> CachePolicy:
    """The policy with ICC at `rank` (0: without), or a clear error when the policy cannot take it."""
    try:
        return dataclasses.replace(policy, icc=IccSettings(rank, svd) if rank else None)
    except PolicyError as err:
        raise ValueError(str(err)) from None


def patch_model(model: ModelPatcher, policy: CachePolicy, node_id: str | None = None,
                priors: FittedPriors | None = None, factors: FactorCache | None = None,
                memory: CacheMemory | None = None) -> tuple[ModelPatcher, CacheSession]:
    """A clone of `model` whose blocks run through a new CacheSession for `policy` (G2); `model` is untouched. With
    ICC, every Linear inside the blocks is routed through the session too (`factors` hold its channel statistics).
    `memory` places and caps the caches."""
    m = model.clone()
    try:
        family, blocks = detect(m.get_model_object("diffusion_model"))
    except UnsupportedModel as err:
        raise ValueError(str(err)) from None
    if family.fallback:
        log.warning("calibrated_cache: Apply Calibrated Cache does not know %s; the generic fallback caches its %d "
                    "blocks in '%s' through object patches of their forward. Report the model so it can be supported "
                    "by name.", family.classes[0], len(blocks), blocks[0].segment.attr)
    if policy.icc is not None and factors is None:
        factors = FactorCache()
    held = priors.held() if priors is not None else None
    session = CacheSession(block_policy(policy), family, blocks, node_id, held, factors, memory)
    if policy.icc is not None:
        route_linears(m, blocks, session.linear_target)
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


def cache_memory(offload: bool, limit_mb: int) -> CacheMemory:
    try:
        return CacheMemory(offload, limit_mb * 2**20)
    except PolicyError as err:
        raise ValueError(str(err)) from None


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
                io.Model.Input("model", tooltip="A DiT model: " + ", ".join(f.name for f in FAMILIES)
                               + ", or another DiT through the generic fallback on its repeated blocks."),
                CachePolicyType.Input("policy", optional=True,
                                      tooltip="From a Cache Policy node. Not needed with priors whose fit searched "
                                              "a plan for a target speedup: their plan is the policy, and replaces "
                                              "a connected one (the node says so)."),
                TccPriorsType.Input("priors", optional=True,
                                    tooltip="TCC priors from Fit TCC Priors; they correct each reused value. "
                                            "Wins over prior_file."),
                io.Combo.Input("prior_file", options=[folders.NONE, *folders.prior_files()], default=folders.NONE,
                               optional=True,
                               tooltip="A saved .tcc.safetensors file (cache_priors folder, or beside a checkpoint) "
                                       "fitted for this model and policy."),
                io.Int.Input("icc_rank", default=0, min=0, max=MAX_RANK, optional=True,
                             tooltip="ICC: skipped blocks are recomputed from their Linears' cached outputs plus a "
                                     "rank-r map of their inputs' change (attention, activations and norms exact). "
                                     "0: off. Higher is closer to full computation and costs more; needs a reuse "
                                     "policy without GOC. Refused on blocks too small for it to run faster than "
                                     "computing them (tiny models, small latents)."),
                io.Combo.Input("icc_svd", options=list(SVD_MODES), default=SVD_MODES[0], optional=True,
                               tooltip="channel-aware: factors weighted by the channel statistics in the priors / "
                                       "prior file (Fit TCC Priors records them). plain: an SVD of the weights alone."),
                io.Boolean.Input("cache_offload", default=False, optional=True,
                                 tooltip="Keep the caches in CPU memory instead of on the GPU and copy each cached "
                                         "value back when it is used: saves GPU memory (the run report gives the "
                                         "cache size) for two copies per reused value."),
                io.Int.Input("cache_limit_mb", default=0, min=0, max=2**20, optional=True,
                             tooltip="Cap the caches at this many MiB: blocks that do not fit are computed every "
                                     "step (slower, never out of memory). 0: no cap."),
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
    def execute(cls, model: ModelPatcher, policy: CachePolicy | None = None, priors: FittedPriors | None = None,
                prior_file: str = folders.NONE, icc_rank: int = 0, icc_svd: str = SVD_MODES[0],
                cache_offload: bool = False, cache_limit_mb: int = 0) -> io.NodeOutput:
        node_id = getattr(cls.hidden, "unique_id", None)  # None when called from a script rather than a prompt
        m, _, replaced = apply_cache(model, policy, chosen_priors(priors, prior_file), icc_rank, icc_svd,
                                     cache_memory(cache_offload, cache_limit_mb), node_id)
        return io.NodeOutput(m, ui=ui.PreviewText(replaced) if replaced else None)


def apply_cache(model: ModelPatcher, policy: CachePolicy | None, fitted: FittedPriors | None, icc_rank: int,
                icc_svd: str, memory: CacheMemory, node_id: str | None = None
                ) -> tuple[ModelPatcher, CacheSession, str | None]:
    """What Apply Calibrated Cache does to one model (on every GPU, for the Raylight node): the patched clone, its
    session, and the note when a plan file replaced the connected policy."""
    policy, replaced = run_policy(policy, fitted)
    policy = with_icc(policy, icc_rank, icc_svd)
    tcc = icc_priors(fitted, block_policy(policy))
    factors = factor_cache(model, fitted.channels if fitted is not None else None) if policy.icc else None
    m, session = patch_model(model, policy, node_id, tcc, factors, memory)
    session.notes = [replaced] if replaced else []
    session.prior_digest = None if fitted is None else fitted.digest
    if fitted is not None:  # refused here, at node time, rather than after the sampler has loaded the model
        # statistics alone carry over to LoRAs and merges of the same architecture; TCC priors do not
        parts = IDENTITY if tcc is not None else ("family", "architecture")
        check_model(fitted.meta, fingerprint(model, session.family.name), fitted.name, parts, comfyui_version())
        session.prior_check = f"{', '.join(parts)} match the model"
    if tcc is not None:
        check_policy(tcc.meta, session.policy, tcc.name)
    return m, session, replaced


def run_policy(policy: CachePolicy | None, fitted: FittedPriors | None) -> tuple[CachePolicy, str | None]:
    """The connected policy, or the plan a prior file was searched with (Fit TCC Priors with a target speedup), which
    wins: its priors belong to it. The note (None when nothing was replaced) says that the connected policy was set
    aside, for the node's panel and the run report: a user who connected one expects it to act."""
    planned = fitted is not None and fitted.meta["policy"].get("plan") is not None
    if planned:
        searched = CachePolicy.from_dict(fitted.meta["policy"])
        note = None
        if policy is not None and policy.tag() != searched.tag():
            note = (f"the connected Cache Policy ({policy.tag()}) was replaced by the plan of prior file {fitted.name} "
                    f"({searched.tag()}), searched for a target speedup: disconnect the policy to keep the plan, or "
                    "choose a prior file without a plan (or none) to sample with the policy")
            log.warning("calibrated_cache: %s", note)
        return searched, note
    if policy is None:
        raise ValueError("Apply Calibrated Cache needs a Cache Policy, or a prior file fitted with a target speedup "
                         "(whose plan is the policy): connect one, or choose such a file")
    return policy, None


def icc_priors(fitted: FittedPriors | None, policy: CachePolicy) -> FittedPriors | None:
    """The TCC priors to apply. With ICC, a prior file fitted for another policy (e.g. FORA alone) still gives its
    channel statistics; its TCC priors, fitted on other values, are not applied."""
    if policy.icc is None:
        return fitted
    if policy.icc.aware and (fitted is None or fitted.channels is None):
        where = f"{fitted.name} has none (it was written before ICC)" if fitted is not None else "none is connected"
        raise ValueError(f"channel-aware ICC needs the channel statistics a prior file records, and {where}. Choose a "
                         "prior file from Fit TCC Priors for this model (refit an older one), or set icc_svd to plain.")
    if fitted is not None and fitted.meta.get("policy_tag") != policy.tag():
        log.warning("calibrated_cache: %s was fitted for %s, not %s: ICC uses its channel statistics, and its TCC "
                    "priors are not applied. Fit TCC Priors with the same ICC settings to use both.", fitted.name,
                    fitted.meta.get("policy_tag"), policy.tag())
        return None
    return fitted
