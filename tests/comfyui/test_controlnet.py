"""ComfyUI tier: a ControlNet adds its residuals to the hidden state in place between blocks, on computed and skipped
steps alike. Blocks skipped together are cached as one summed residual (spans), which would take in that addition and
add it twice on skipped steps; the pack sees the control and caches block by block instead (skipped without
COMFYUI_PATH)."""

import comfy.controlnet
import pytest
import torch

from .test_nodes import SETTINGS, bundle, patched
from .tiny_models import cache_block_by_block, run_sampler, session_of


class FixedControl(comfy.controlnet.ControlBase):
    """A ControlNet of ComfyUI's own base class whose residuals are fixed tensors, given to Flux's double and single
    blocks, from `start` (fraction of the run) on."""

    def __init__(self, tokens: int, width: int, start: float = 0.0) -> None:
        super().__init__()
        self.timestep_percent_range = (start, 1.0)
        generator = torch.Generator().manual_seed(7)
        self.residual = torch.randn(1, tokens, width, generator=generator)

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        if t[0] > self.timestep_range[0]:
            return None
        add = self.residual.expand(x_noisy.shape[0], -1, -1).to(x_noisy.dtype)
        return {"input": [add, add], "output": [add] * 4}

    def copy(self) -> "FixedControl":
        return self


def controlled(positive, negative, control):
    return ([[c, {**o, "control": control}] for c, o in positive], [[c, {**o, "control": control}] for c, o in negative])


def sample(pack, model, positive, negative, latent, monkeypatch=None):
    """Taylor-2 at interval 3, cached as the pack chooses or (with `monkeypatch`) block by block."""
    cached = patched(pack, model, **dict(SETTINGS, forecaster="taylor", interval=3))
    if monkeypatch is not None:
        cache_block_by_block(monkeypatch, cached)
    out = run_sampler(cached, positive, negative, latent, steps=8, cfg=2.0)
    assert session_of(cached).last_report["blocks_skipped"] > 0
    return out


@pytest.mark.parametrize("start", [0.0, 0.4], ids=["from-the-start", "from-40%"])
def test_a_controlnet_residual_is_added_once_on_skipped_steps(pack, bundles, start, monkeypatch):
    model, positive, negative, latent = bundle(bundles, "Flux")
    control = FixedControl(tokens=16 * 16, width=256, start=start)
    with_control = controlled(positive, negative, control)
    full, free = (run_sampler(model, *pair, latent, steps=8, cfg=2.0) for pair in (with_control, (positive, negative)))
    assert ((full - free).norm() / free.norm()).item() > 0.05  # the control steers the output
    cached = sample(pack, model, *with_control, latent)
    alone = sample(pack, model, *with_control, latent, monkeypatch)
    assert ((cached - alone).norm() / alone.norm()).item() < 1e-5
    assert not torch.allclose(sample(pack, model, positive, negative, latent), cached)
