"""A class-conditional DiT with adaLN-Zero blocks, small enough to train on two CPU cores.

Each block exposes its two gated residual sites (pre-gate attention and MLP outputs) through `sites()`, and its own
`forward` is built from exactly those sites, so an engine that computes every site reproduces it bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class DiTConfig:
    image_size: int = 8
    channels: int = 1
    patch: int = 1
    width: int = 128
    depth: int = 8
    heads: int = 4
    mlp_ratio: int = 4
    classes: int = 10

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


Site = tuple[str, Tensor, Callable[[Tensor], Tensor]]


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += α1·Attn(mod(LN x)); x += α2·MLP(mod(LN x)); modulation comes from c every call."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, width * mlp_ratio)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def sites(self, c: Tensor) -> list[Site]:
        """The block as an ordered list of (name, gate, pre-gate function of the current hidden state)."""
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(c).chunk(6, dim=-1)
        return [
            ("attn", g1.unsqueeze(1), lambda x: self.attn(modulate(self.norm1(x), sh1, sc1))),
            ("mlp", g2.unsqueeze(1), lambda x: self.mlp(modulate(self.norm2(x), sh2, sc2))),
        ]

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        for _, gate, branch in self.sites(c):
            x = x + gate * branch(x)
        return x

    def site_flops(self, tokens: int) -> dict[str, float]:
        """Multiply-adds ×2 per sample, so that compute fractions weigh attention, MLP and modulation honestly."""
        w = self.attn.proj.in_features
        hidden = self.mlp.fc1.out_features
        attn = 2 * tokens * (3 * w * w + w * w) + 4 * tokens * tokens * w
        mlp = 2 * tokens * 2 * w * hidden
        return {"modulation": 2 * 6 * w * w, "attn": float(attn), "mlp": float(mlp)}


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


BlockRunner = Callable[[int, DiTBlock, Tensor, Tensor], Tensor]


class DiT(nn.Module):
    """Predicts the flow-matching velocity v = noise − data at time t ∈ [0, 1] (t = σ) for class y (y = classes: null)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        w, p = config.width, config.patch
        self.patchify = nn.Conv2d(config.channels, w, kernel_size=p, stride=p)
        self.pos = nn.Parameter(torch.zeros(1, config.tokens, w))
        self.t_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.y_embed = nn.Embedding(config.classes + 1, w)
        self.blocks = nn.ModuleList(DiTBlock(w, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.final = nn.Linear(w, p * p * config.channels)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.pos, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        nn.init.zeros_(self.final_adaLN[-1].weight)
        nn.init.zeros_(self.final_adaLN[-1].bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    @property
    def null_class(self) -> int:
        return self.config.classes

    def flops(self) -> float:
        """Multiply-adds ×2 per sample of one forward: the blocks, and the embedders and final layer around them."""
        cfg, w = self.config, self.config.width
        pixels = cfg.patch * cfg.patch * cfg.channels
        blocks = sum(sum(block.site_flops(cfg.tokens).values()) for block in self.blocks)
        outside = 2 * cfg.tokens * pixels * w * 2 + 2 * 2 * w * w + 2 * w * 2 * w  # patches in and out, t, final adaLN
        return float(blocks + outside)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, runner: BlockRunner | None = None) -> Tensor:
        cfg = self.config
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos
        c = self.t_embed(timestep_embedding(t, cfg.width).to(h.dtype)) + self.y_embed(y)
        for i, block in enumerate(self.blocks):
            h = block(h, c) if runner is None else runner(i, block, h, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(h), shift, scale))
        g, p = cfg.image_size // cfg.patch, cfg.patch
        out = out.view(-1, g, g, p, p, cfg.channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(-1, cfg.channels, cfg.image_size, cfg.image_size)
