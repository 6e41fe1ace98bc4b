"""Which blocks of a ComfyUI diffusion model the pack hooks, and how, per DiT family.

Families whose DiT loop honours `patches_replace["dit"]` are hooked there; the others (PixArt, Lumina2) get their
blocks' `forward` object-patched, which keeps the module tree (and so LoRA key matching) intact. Detection walks the
diffusion model's class hierarchy, so subclasses (VACE, camera and HuMo Wan variants) are recognised.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Segment:
    """One block list: `attr` under diffusion_model; `replace` is its dit-replace name, or None for object patches.
    An object-patched block's stream is its first tensor argument, unless `kwargs` names the keyword arguments that
    are its streams, in the order it returns them (HiDream's blocks take keywords and return a tuple). A dit-replaced
    block's streams are its "img" and "txt" tensors, unless `packed` names the items of a tuple its "img" holds, which
    it returns as a tuple in that order (LTX-2's video and audio)."""

    attr: str
    replace: str | None
    kwargs: tuple[str, ...] = ()
    packed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]
    segments: tuple[Segment, ...]
    fallback: bool = False  # found by `_repeated_blocks`, not known by class
    # Whether each block's output feeds only the next block, so blocks skipped together may be cached as one span
    # (calibration/spans.py). Not where outputs also feed a skip stack (Hunyuan3D 2.1), nor in unknown models.
    chained: bool = True


DOUBLE_SINGLE = (Segment("double_blocks", "double_block"), Segment("single_blocks", "single_block"))
FAMILIES: tuple[Family, ...] = (
    Family("Flux", ("Flux",), DOUBLE_SINGLE),
    Family("Chroma", ("Chroma", "ChromaRadiance"), DOUBLE_SINGLE),
    Family("HunyuanVideo", ("HunyuanVideo",), DOUBLE_SINGLE),
    Family("SD3", ("OpenAISignatureMMDITWrapper",), (Segment("joint_blocks", "double_block"),)),
    Family("AuraFlow", ("MMDiT",), (Segment("double_layers", "double_block"), Segment("single_layers", "single_block"))),
    Family("Wan", ("WanModel",), (Segment("blocks", "double_block"),)),
    Family("Qwen-Image", ("QwenImageTransformer2DModel",), (Segment("transformer_blocks", "double_block"),)),
    # LTX-2 (audio and video) subclasses LTXV; detection meets its own class first in the class hierarchy.
    Family("LTX-2", ("LTXAVModel",), (Segment("transformer_blocks", "double_block", packed=("video", "audio")),)),
    Family("LTXV", ("LTXVModel",), (Segment("transformer_blocks", "double_block"),)),
    Family("PixArt", ("PixArtMS",), (Segment("blocks", None),)),
    Family("Lumina2", ("NextDiT",), (Segment("layers", None),)),
    # Its dit-replace loop returns "img" only ("txt" is read-only context); outputs of the first half also feed the
    # second half's long skips, so blocks are not cached in spans.
    Family("HunyuanDiT", ("HunYuanDiT",), (Segment("blocks", "double_block"),), chained=False),
    Family("Mochi", ("AsymmDiTJoint",), (Segment("blocks", "double_block"),)),
    Family("HiDream", ("HiDreamImageTransformer2DModel",),
           (Segment("double_stream_blocks", None, ("image_tokens", "text_tokens")),
            Segment("single_stream_blocks", None, ("image_tokens",)))),
    Family("Cosmos Predict2", ("MiniTrainDIT",), (Segment("blocks", None),)),
    Family("Stable Audio", ("AudioDiffusionTransformer",), (Segment("transformer.layers", "double_block"),)),
    Family("Hunyuan3D 2.0", ("Hunyuan3Dv2",), DOUBLE_SINGLE),
    Family("Hunyuan3D 2.1", ("HunYuanDiTPlain",), (Segment("blocks", None),), chained=False),
    Family("OmniGen2", ("OmniGen2Transformer2DModel",), (Segment("layers", None),)),
    Family("ACE-Step", ("ACEStepTransformer2DModel",), (Segment("transformer_blocks", None),)),
    # Its dit-replace path calls the blocks with keywords they do not take (ComfyUI 0.8.0), so its visual blocks are
    # object-patched; the text blocks before them refine the prompt and run every step.
    Family("Kandinsky 5", ("Kandinsky5",), (Segment("visual_transformer_blocks", None),)),
)

UNSUPPORTED = {
    "GeneralDIT": "Cosmos 1.0's blocks take time-first (T, H, W, B, D) tensors held in a ModuleDict, and its loop adds a "
                  "positional embedding to the hidden state in place between blocks",
}


class UnsupportedModel(ValueError):
    """The model's family cannot be cached (yet); the message names it and the families that can."""


@dataclass(frozen=True)
class BlockSite:
    """One hooked block: its global index in execution order and how to reach it."""

    index: int
    segment: Segment
    position: int

    @property
    def object_path(self) -> str:
        return f"diffusion_model.{self.segment.attr}.{self.position}.forward"


def detect(diffusion_model: nn.Module) -> tuple[Family, list[BlockSite]]:
    """The family of a diffusion model and its blocks in execution order; a clear error when unsupported."""
    names = [cls.__name__ for cls in type(diffusion_model).__mro__]
    for name in names:
        if name in UNSUPPORTED:
            raise UnsupportedModel(f"Apply Calibrated Cache cannot cache {name} yet: {UNSUPPORTED[name]}. "
                                   "Remove the node for this model; sampling without it is unaffected.")
        for family in FAMILIES:
            if name in family.classes:
                return family, _blocks(family, diffusion_model)
    supported = ", ".join(f.name for f in FAMILIES)
    attr = _repeated_blocks(diffusion_model)
    if attr is None:
        raise UnsupportedModel(f"Apply Calibrated Cache does not know the diffusion model {names[0]} (it supports "
                               f"{supported}) and found no list of repeated transformer blocks in it to cache "
                               "generically (a ModuleList of at least two blocks of one class, directly under the "
                               "diffusion model). Remove the node for this model, or report the model so it can be "
                               "added.")
    blocks = getattr(diffusion_model, attr)
    family = Family(f"{names[0]} (generic: {len(blocks)} {type(blocks[0]).__name__} in '{attr}')", (names[0],),
                    (Segment(attr, None),), fallback=True, chained=False)
    return family, _blocks(family, diffusion_model)


def _repeated_blocks(diffusion_model: nn.Module) -> str | None:
    """The generic fallback's blocks: the diffusion model's child ModuleList of at least two modules of one class with
    the most parameters (the transformer trunk, not a list of embedders). None where there is none."""
    best, size = None, 0
    for attr, child in diffusion_model.named_children():
        if isinstance(child, nn.ModuleList) and len(child) >= 2 and len({type(block) for block in child}) == 1:
            parameters = sum(p.numel() for p in child.parameters())
            if parameters > size:
                best, size = attr, parameters
    return best


def _blocks(family: Family, diffusion_model: nn.Module) -> list[BlockSite]:
    sites: list[BlockSite] = []
    for segment in family.segments:
        try:
            blocks = diffusion_model.get_submodule(segment.attr)
        except AttributeError:
            blocks = None
        if blocks is None:
            raise UnsupportedModel(f"{family.name} model {type(diffusion_model).__name__} has no '{segment.attr}' "
                                   "block list; this ComfyUI version changed it. Please report it.")
        sites += [BlockSite(len(sites) + i, segment, i) for i in range(len(blocks))]
    if not sites:
        raise UnsupportedModel(f"the {family.name} model has no blocks to cache")
    return sites
