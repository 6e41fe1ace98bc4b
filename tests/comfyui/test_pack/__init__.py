"""Test-only ComfyUI nodes: conditioning without a text encoder (none can be downloaded where the tests run)."""

import torch


class ZeroConditioning:
    """Seeded random text context of a given width, with an optional pooled vector."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            "dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
            "pooled_dim": ("INT", {"default": 0, "min": 0, "max": 8192}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, tokens, dim, pooled_dim, seed):
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled_dim, generator=g)} if pooled_dim else {}
        return ([[torch.randn(1, tokens, dim, generator=g), extra]],)


NODE_CLASS_MAPPINGS = {"CCTest_ZeroConditioning": ZeroConditioning}
