"""Score testbed samples with the digits classifier: class fidelity (accuracy) and Fréchet distance to real digits."""

from __future__ import annotations

import torch
from torch import Tensor

from .classifier import Classifier
from .metrics import accuracy, frechet_distance
from .model import DiT
from .sampling import sample


def bench_inputs(model: DiT, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Balanced labels (0, 1, …, 9, 0, …) and fixed-seed noise, so every run scores the very same requests."""
    cfg = model.config
    labels = torch.arange(n) % cfg.classes
    noise = torch.randn(n, cfg.channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))
    return labels, noise


@torch.no_grad()
def score(classifier: Classifier, samples: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy of the requested class and FD of the samples' features to the stored real-digit statistics."""
    return {
        "accuracy": accuracy(classifier(samples), labels),
        "fd": frechet_distance(classifier.features(samples), classifier.ref_mean, classifier.ref_cov),
    }


def evaluate(
    model: DiT, classifier: Classifier, n: int, steps: int, cfg: float, sampler: str = "euler", seed: int = 0
) -> dict[str, float]:
    """Sample n balanced, fixed-seed requests without caching and score them."""
    labels, noise = bench_inputs(model, n, seed)
    samples, _ = sample(model, labels, noise, steps, cfg, sampler=sampler)
    return score(classifier, samples, labels)

