"""Prompt adherence from the image alone, as GenEval scores real text-to-image models with detectors: a small CNN
reads, for each of the 18 (colour, shape) classes, how many objects a scene holds (0–3) and where their centre is.
A prompt is followed when what it promises holds (data.py's three kinds: the object is there; both objects are there
and the first's centre is on the named side of the second's; exactly that many). Its penultimate features, against
those of real scenes, give a Fréchet distance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .data import PAIRS, RELATIONS, Spec

RELATION_MARGIN = 2.0 / 32  # the centres must differ by two pixels on the relation's axis
FEATURES = 64


class SceneReader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        channels = [5, 32, 64, 64, 128, 128]  # RGB plus two coordinate channels
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(channels, channels[1:])):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i % 2 == 0 else 2, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.body = nn.Sequential(*layers, nn.Conv2d(128, 128, 3, stride=2, padding=1), nn.SiLU())  # 4×4
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, FEATURES), nn.SiLU())
        self.counts = nn.Linear(FEATURES, len(PAIRS) * 4)
        self.centres = nn.Linear(FEATURES, len(PAIRS) * 2)

    def embed(self, images: Tensor) -> Tensor:
        n, _, h, w = images.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        coords = torch.stack([xs, ys]).to(images)[None].expand(n, -1, -1, -1)
        return self.features(self.body(torch.cat([images, coords], 1)))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(count logits (n, 18, 4), centres (n, 18, 2) in [0, 1], features (n, 64))."""
        f = self.embed(images)
        return self.counts(f).view(-1, len(PAIRS), 4), torch.sigmoid(self.centres(f)).view(-1, len(PAIRS), 2), f


def follows(spec: Spec, counts: Tensor, centres: Tensor) -> bool:
    """Whether one image's reading (counts (18,), centres (18, 2)) keeps the prompt's promise."""
    ks = [PAIRS.index(o) for o in spec.objects]
    if spec.kind == "single":
        return bool(counts[ks[0]] >= 1)
    if spec.kind == "count":
        return bool(counts[ks[0]] == spec.count)
    if not all(counts[k] >= 1 for k in ks):
        return False
    axis, sign = RELATIONS[spec.relation]
    return bool(sign * (centres[ks[0], axis] - centres[ks[1], axis]) > RELATION_MARGIN)


@torch.no_grad()
def read(reader: SceneReader, images: Tensor, batch: int = 512) -> tuple[Tensor, Tensor, Tensor]:
    counts, centres, features = [], [], []
    for i in range(0, len(images), batch):
        logits, c, f = reader(images[i:i + batch].float().clamp(-1, 1))
        counts.append(logits.argmax(-1))
        centres.append(c)
        features.append(f)
    return torch.cat(counts), torch.cat(centres), torch.cat(features)


def adherence(reader: SceneReader, images: Tensor, specs: list[Spec]) -> float:
    counts, centres, _ = read(reader, images)
    return sum(follows(s, n, c) for s, n, c in zip(specs, counts, centres)) / len(specs)


def frechet(features: Tensor, mean: Tensor, cov: Tensor) -> float:
    """Fréchet distance between a Gaussian fitted to `features` and (mean, cov)."""
    f = features.double()
    mu, sigma = f.mean(0), torch.cov(f.T)
    product = torch.linalg.eigvals(sigma @ cov.double()).real.clamp_min(0).sqrt().sum()
    return float((mu - mean.double()).square().sum() + sigma.trace() + cov.double().trace() - 2 * product)


def statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def psnr(x: Tensor, ref: Tensor) -> float:
    """dB over images in [−1, 1] (peak-to-peak 2)."""
    mse = float((x.float() - ref.float()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)
