"""ComfyUI tier: families whose loops do more than chain their blocks are cached correctly. Side streams added to the
hidden state between blocks (Wan VACE's hints and S2V's audio, in place) end a span of blocks skipped together, so
the spans' result equals block-by-block caching; blocks whose outputs also feed later blocks through long skips
(HunyuanDiT, Hunyuan3D 2.1) are never cached in spans (skipped without COMFYUI_PATH)."""

import pytest
import torch

from .test_nodes import SETTINGS, bundle, patched
from .tiny_models import cache_block_by_block, run_sampler, session_of

TAYLOR = dict(SETTINGS, forecaster="taylor", interval=3)


def sample(pack, bundles, family, monkeypatch=None, inference=False):
    """`inference`: under torch.inference_mode, as ComfyUI's server samples (tensors carry no version counter)."""
    model, positive, negative, latent = bundle(bundles, family)
    cached = patched(pack, model, **TAYLOR)
    if monkeypatch is not None:
        cache_block_by_block(monkeypatch, cached)
    with torch.inference_mode(inference):
        out = run_sampler(cached, positive, negative, latent, steps=8, cfg=2.0)
    assert session_of(cached).last_report["blocks_skipped"] > 0
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("inference", [False, True], ids=["no-grad", "inference-mode"])
@pytest.mark.parametrize("family", ["WanVace", "WanS2V"])
def test_a_side_stream_added_between_blocks_is_not_cached_into_a_span(pack, bundles, family, inference, monkeypatch):
    spans = sample(pack, bundles, family, inference=inference)
    alone = sample(pack, bundles, family, monkeypatch, inference)
    assert rel(spans, alone) < 1e-5


@pytest.mark.parametrize("family", ["HunyuanDiT", "Hunyuan3D21"])
def test_blocks_feeding_long_skips_are_cached_one_by_one(pack, bundles, family, monkeypatch):
    spans = sample(pack, bundles, family)
    assert torch.equal(spans, sample(pack, bundles, family, monkeypatch))
