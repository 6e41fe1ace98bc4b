"""A tiny CNN digits classifier: its logits score class fidelity of samples, its penultimate features feed the FD.

The real-digit feature statistics are buffers of the model, so they travel inside its weight file and benchmarking
needs no scikit-learn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ClassifierConfig:
    channels: int = 32
    hidden: int = 128
    features: int = 64
    classes: int = 10

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Classifier(nn.Module):
    """conv3×3 → conv3×3/2 → 128 → `features` → logits, on (N, 1, 8, 8) images in [-1, 1]."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(2 * c * 16, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.features)
        self.head = nn.Linear(config.features, config.classes)
        self.register_buffer("ref_mean", torch.zeros(config.features, dtype=torch.float64))
        self.register_buffer("ref_cov", torch.zeros(config.features, config.features, dtype=torch.float64))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations, the embedding in which Fréchet distances are measured."""
        h = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.fc2(F.gelu(self.fc1(h.flatten(1)))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def set_reference(self, images: Tensor, batch: int = 512) -> None:
        """Store mean and covariance of the features of `images` (all real digits) as the FD reference."""
        feats = torch.cat([self.features(images[i : i + batch]) for i in range(0, len(images), batch)]).double()
        self.ref_mean.copy_(feats.mean(dim=0))
        self.ref_cov.copy_(torch.cov(feats.T))
