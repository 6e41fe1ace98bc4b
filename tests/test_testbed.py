"""Testbed: metrics on known inputs, the committed weights, and seeded reproducibility of both training scripts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from calibrated_cache.testbed import train_classifier, train_dit
from calibrated_cache.testbed.data import load_digits_tensors, load_split
from calibrated_cache.testbed.evaluate import bench_inputs, score
from calibrated_cache.testbed.metrics import (
    accuracy,
    feature_stats,
    frechet_distance,
    frechet_stats_distance,
    psnr,
    rel_l2,
)
from calibrated_cache.testbed.sampling import sample
from calibrated_cache.testbed.weights import load_classifier, load_dit, read, save_atomic


def test_rel_l2_is_zero_on_itself_and_scale_free() -> None:
    ref = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert rel_l2(ref, ref) == 0.0
    assert rel_l2(3 * ref, ref) == pytest.approx(2.0)
    assert rel_l2(1000 * ref, 1000 * (ref + 0.01 * ref)) == pytest.approx(0.01 / 1.01)


def test_psnr_matches_formula() -> None:
    ref = torch.zeros(3, 1, 8, 8)
    assert psnr(ref + 0.1, ref) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(ref, ref) == math.inf


def test_frechet_distance_of_own_stats_is_zero() -> None:
    feats = np.random.default_rng(0).normal(size=(500, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    mean, cov = feature_stats(feats)
    assert frechet_distance(feats, mean, cov) == pytest.approx(0.0, abs=1e-6 * np.trace(cov))


def test_frechet_distance_grows_by_squared_mean_shift() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8, 8))
    cov, mean, shift = a @ a.T, rng.normal(size=8), rng.normal(size=8)
    assert frechet_stats_distance(mean, cov, mean + shift, cov) == pytest.approx(np.sum(shift**2), rel=1e-6)


def test_frechet_distance_of_diagonal_gaussians() -> None:
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_stats_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(expected)


def test_accuracy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75


def test_digits_are_scaled_to_unit_range() -> None:
    images, labels = load_digits_tensors()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == -1.0 and images.max() == 1.0


def test_save_atomic_round_trips_typed_metadata(tmp_path) -> None:
    path = save_atomic(tmp_path / "w.safetensors", {"a": torch.arange(3.0)}, {"config": {"x": 1}, "cfg": 2.5})
    tensors, meta = read(path)
    assert torch.equal(tensors["a"], torch.arange(3.0)) and meta == {"config": {"x": 1}, "cfg": 2.5}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_committed_classifier_is_accurate_on_real_digits() -> None:
    classifier, meta = load_classifier()
    _, (images, labels) = load_split()
    assert accuracy(classifier(images), labels) >= 0.95
    assert classifier.ref_cov.shape == (meta["config"]["features"],) * 2


def test_committed_dit_samples_deterministically_and_recognisably() -> None:
    model, meta = load_dit()
    classifier, _ = load_classifier()
    labels, noise = bench_inputs(model, 20, seed=123)
    first, _ = sample(model, labels, noise, meta["bench_steps"], meta["bench_cfg"])
    second, _ = sample(model, labels, noise, meta["bench_steps"], meta["bench_cfg"])
    assert torch.equal(first, second)
    assert score(classifier, first, labels)["accuracy"] >= 0.8


def test_dit_training_is_seeded_reproducible(tmp_path) -> None:
    runs = [
        train_dit.train(tmp_path / f"{i}.safetensors", seed=3, iters=2, eval_samples=0, log_every=0) for i in (0, 1)
    ]
    assert runs[0]["final_loss"] == runs[1]["final_loss"]
    (a, meta), (b, _) = load_dit(tmp_path / "0.safetensors"), load_dit(tmp_path / "1.safetensors")
    assert meta["iters"] == 2 and meta["seed"] == 3
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_classifier_training_is_seeded_reproducible(tmp_path) -> None:
    runs = [train_classifier.train(tmp_path / f"{i}.safetensors", seed=3, epochs=1) for i in (0, 1)]
    assert runs[0]["final_loss"] == runs[1]["final_loss"]
    a, _ = load_classifier(tmp_path / "0.safetensors")
    b, _ = load_classifier(tmp_path / "1.safetensors")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_speed_sections_progress_bar_moves_with_every_run_not_only_after_the_last_round():
    from calibrated_cache.testbed.bench import SPEED_INTERVALS, fewer_steps, speed_policies, speed_rows
    from calibrated_cache.testbed.model import DiT, DiTConfig

    class Recorder:
        def __init__(self) -> None:
            self.steps: list[tuple[float, str]] = []

        def advance(self, amount: float = 1.0, note: str | None = None) -> None:
            self.steps.append((amount, note or ""))

    torch.manual_seed(0)
    model = DiT(DiTConfig(image_size=4, width=48, depth=2, heads=2)).eval()
    labels, noise = torch.zeros(1, dtype=torch.long), torch.randn(1, 1, 4, 4)
    bar, repeats = Recorder(), 2
    rows = speed_rows(model, labels, noise, 4, 2.0, "cpu", repeats, bar)
    fewer = {k for _, k in fewer_steps(4, SPEED_INTERVALS)}  # full computation at fewer steps: 2 of 4 here
    runs = len(speed_policies(48)) + 1 + len(fewer)  # full computation is timed as often as each configuration
    assert len(rows) == runs - 1 and fewer == {2}
    floor = rows[-1]
    assert floor["method"] == "fewer-steps" and floor["params"] == {"steps": 2} and floor["compute_fraction"] == 0.5
    assert len(bar.steps) == runs * (repeats + 1)
    assert sum(amount for amount, _ in bar.steps) == pytest.approx(runs)
    assert bar.steps[0][1] == "speed: full"


def test_a_benchmark_asked_to_skip_both_sections_says_so_instead_of_writing_an_empty_report():
    from calibrated_cache.testbed.bench import run_benchmark

    with pytest.raises(SystemExit, match="drop one of them"):
        run_benchmark(quick=True, skip_quality=True, skip_speed=True)
