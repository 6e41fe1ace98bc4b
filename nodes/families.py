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
    """One block list: `attr` under diffusion_model; `replace` is its dit-replace name, or None for object patches."""

    attr: str
    replace: str | None


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]
    segments: tuple[Segment, ...]
    fallback: bool = False  # found by `_repeated_blocks`, not known by class


DOUBLE_SINGLE = (Segment("double_blocks", "double_block"), Segment("single_blocks", "single_block"))
FAMILIES: tuple[Family, ...] = (
    Family("Flux", ("Flux",), DOUBLE_SINGLE),
    Family("Chroma", ("Chroma", "ChromaRadiance"), DOUBLE_SINGLE),
    Family("HunyuanVideo", ("HunyuanVideo",), DOUBLE_SINGLE),
    Family("SD3", ("OpenAISignatureMMDITWrapper",), (Segment("joint_blocks", "double_block"),)),
    Family("AuraFlow", ("MMDiT",), (Segment("double_layers", "double_block"), Segment("single_layers", "single_block"))),
    Family("Wan", ("WanModel",), (Segment("blocks", "double_block"),)),
    Family("Qwen-Image", ("QwenImageTransformer2DModel",), (Segment("transformer_blocks", "double_block"),)),
    Family("LTXV", ("LTXVModel",), (Segment("transformer_blocks", "double_block"),)),
    Family("PixArt", ("PixArtMS",), (Segment("blocks", None),)),
    Family("Lumina2", ("NextDiT",), (Segment("layers", None),)),
)

UNSUPPORTED = {
    "HiDreamImageTransformer2DModel": "its double-stream blocks return a text stream of another shape than they take",
    "WanModel_S2V": "its block loop passes no transformer options, so cond and uncond cannot be told apart",
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
                    (Segment(attr, None),), fallback=True)
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
        blocks = getattr(diffusion_model, segment.attr, None)
        if blocks is None:
            raise UnsupportedModel(f"{family.name} model {type(diffusion_model).__name__} has no '{segment.attr}' "
                                   "block list; this ComfyUI version changed it. Please report it.")
        sites += [BlockSite(len(sites) + i, segment, i) for i in range(len(blocks))]
    if not sites:
        raise UnsupportedModel(f"the {family.name} model has no blocks to cache")
    return sites
