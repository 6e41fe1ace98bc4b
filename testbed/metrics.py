"""Image and distribution metrics for the benchmark; numpy/torch only, so scoring needs neither scipy nor sklearn."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DATA_RANGE = 2.0  # images live in [-1, 1]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).double()


def rel_l2(x: Tensor, ref: Tensor) -> float:
    """Mean over samples of ||x − ref|| / ||ref||: scale-free error of a cached sample against its uncached one."""
    d, r = _flat(x) - _flat(ref), _flat(ref)
    return (d.norm(dim=1) / r.norm(dim=1).clamp_min(1e-12)).mean().item()


def psnr(x: Tensor, ref: Tensor, data_range: float = DATA_RANGE) -> float:
    """Mean over samples of 10·log10(range² / MSE); identical samples give +inf."""
    mse = (_flat(x) - _flat(ref)).pow(2).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).mean().item()


def feature_stats(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, D) features, in float64."""
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues from round-off are clamped to 0."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_stats_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians; tr((S1 S2)^½) = Σ√λ(S1^½ S2 S1^½), symmetric, so eigvalsh works."""
    root1 = _sqrt_psd(s1)
    eig = np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0.0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.sum(np.sqrt(eig)))


def frechet_distance(feats: Tensor | np.ndarray, ref_mean: Tensor | np.ndarray, ref_cov: Tensor | np.ndarray) -> float:
    """Fréchet distance between the Gaussian fit of `feats` (N, D) and reference statistics."""
    mu, cov = feature_stats(feats)
    return frechet_stats_distance(mu, cov, np.asarray(ref_mean, np.float64), np.asarray(ref_cov, np.float64))


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max class equals the label."""
    return (logits.argmax(dim=-1) == labels).double().mean().item()
