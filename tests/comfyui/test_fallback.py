"""ComfyUI tier: the generic fallback for a DiT the family table does not know. A BaseModel whose diffusion model is
our own small DiT (a ModuleList of identical blocks) is cached through object patches of the blocks' forward, says so
in the log and on the run report, and is exact at interval 1; a model without repeated blocks is refused with a
message that names what was looked for."""

import pytest
import torch
from torch import nn

from .tiny_models import SPECS, _model_config, _patcher, make_inputs, run_sampler, session_of

SETTINGS = dict(mode="fixed", forecaster="reuse", interval=3, warmup_steps=1, start=0.0, end=1.0, first_blocks=0,
                last_blocks=0, threshold=0.1, max_skips=4, order=2, time_unit="step", foca_lambda=1.0,
                granularity="block")


class UnknownBlock(nn.Module):
    """An adaLN-style transformer block: attention and MLP, scaled by the timestep embedding."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.modulation = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gate, shift = self.modulation(t)[:, None].chunk(2, dim=-1)
        h = self.norm(x) + shift
        x = x + gate * self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm(x))


class PairBlock(UnknownBlock):
    """A block that returns a side output beside its stream, as some families' blocks do."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x, t), t


class UnknownDiT(nn.Module):
    """A DiT no family entry names; `repeated` False keeps its blocks outside any ModuleList."""

    def __init__(self, channels: int = 4, width: int = 64, depth: int = 3, repeated: bool = True,
                 block: type[UnknownBlock] = UnknownBlock) -> None:
        super().__init__()
        self.dtype = torch.float32  # BaseModel reads its diffusion model's dtype
        self.patch = nn.Conv2d(channels, width, 2, stride=2)
        self.time = nn.Linear(1, width)
        self.context = nn.LazyLinear(width)
        blocks = [block(width) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks) if repeated else None
        if not repeated:
            self.only = blocks[0]
        self.out = nn.ConvTranspose2d(width, channels, 2, stride=2)

    def forward(self, x, timesteps, context=None, **kwargs):
        n, _, h, w = x.shape
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        t = self.time(timesteps.reshape(-1, 1).to(x.dtype)) + self.context(context).mean(1)
        for block in self.blocks if self.blocks is not None else [self.only]:
            out = block(tokens, t)
            tokens = out[0] if isinstance(out, tuple) else out
        return self.out(tokens.transpose(1, 2).reshape(n, -1, h // 2, w // 2))


def unknown_model(repeated: bool = True, block: type[UnknownBlock] = UnknownBlock):
    """A real ComfyUI BaseModel (PixArt's config: EPS, 4-channel latent) with our DiT as its diffusion model."""
    config = _model_config(SPECS["PixArt"].unet_config, "PixArtSigma")
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    torch.manual_seed(0)
    dit = UnknownDiT(repeated=repeated, block=block)
    dit(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 2, 4096))  # materialise the lazy layer
    model.diffusion_model = dit.eval()
    model.eval()
    return _patcher(model)


def test_an_unknown_dit_is_cached_through_its_repeated_blocks_and_says_so(pack, caplog):
    policy_node, apply_node = pack
    model = unknown_model()
    positive, negative, latent = make_inputs("PixArt")
    full = run_sampler(model, positive, negative, latent, steps=8, cfg=2.0)
    exact = apply_node.execute(model, policy_node.execute(**{**SETTINGS, "interval": 1}).result[0]).result[0]
    assert torch.equal(run_sampler(exact, positive, negative, latent, steps=8, cfg=2.0), full)
    assert "generic fallback caches its 3 blocks in 'blocks'" in caplog.text
    cached = apply_node.execute(model, policy_node.execute(**SETTINGS).result[0]).result[0]
    out = run_sampler(cached, positive, negative, latent, steps=8, cfg=2.0)
    report = session_of(cached).last_report
    assert report["family"] == "UnknownDiT (generic: 3 UnknownBlock in 'blocks')"
    assert report["blocks_skipped"] == 4 * 3 * 2  # steps 0 (warm-up), 1, 4, 7 compute; 2, 3, 5, 6 skip, per branch
    assert torch.isfinite(out).all() and 0 < ((out - full).norm() / full.norm()).item() < 0.5


def test_a_model_without_repeated_blocks_is_refused_naming_what_was_looked_for(pack):
    policy_node, apply_node = pack
    with pytest.raises(ValueError, match="no list of repeated transformer blocks"):
        apply_node.execute(unknown_model(repeated=False), policy_node.execute(**SETTINGS).result[0])


def test_a_fallback_block_that_returns_more_than_its_stream_stops_the_run_with_the_reason(pack):
    policy_node, apply_node = pack
    model = unknown_model(block=PairBlock)
    positive, negative, latent = make_inputs("PixArt")
    cached = apply_node.execute(model, policy_node.execute(**SETTINGS).result[0]).result[0]
    with pytest.raises(ValueError, match=r"block 0 returns tuple .* cannot be cached"):
        run_sampler(cached, positive, negative, latent, steps=4, cfg=2.0)
    assert torch.isfinite(run_sampler(model, positive, negative, latent, steps=4, cfg=2.0)).all()  # unpatched: fine
