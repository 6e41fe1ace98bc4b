"""Cache memory: the size is reported, a limit caps it by computing the blocks that do not fit, offload is reported."""

from dataclasses import replace

import pytest
import torch

from calibrated_cache.calibration import CacheMemory, CachePolicy, PolicyError
from calibrated_cache.calibration.icc import IccSettings
from calibrated_cache.testbed.sampling import sample

LABELS = torch.tensor([1, 7])
STEPS, CFG = 12, 2.0
TAYLOR = CachePolicy(interval=3, warmup_steps=1, forecaster="taylor", order=2)


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def run(model, policy=TAYLOR, memory=None):
    return sample(model, LABELS, noise(), STEPS, CFG, policy=policy, memory=memory)


def test_the_report_gives_the_peak_cache_size_and_every_run_releases_it(random_dit):
    _, state = run(random_dit)
    stats = state.stats.to_dict()
    depth, sites, history = len(random_dit.blocks), 2, 3  # Taylor-2 keeps three anchors of attn and mlp per block
    value = 4 * 16 * 64 * 4  # cond and uncond of 2 samples, 16 tokens, 64 channels, float32
    assert stats["peak_cache_bytes"] == depth * sites * history * value
    assert state.stats.cache_bytes == 0 and not state.branches
    assert stats["cache_offloaded"] is False and stats["cache_limit_bytes"] is None and stats["blocks_over_limit"] == 0


def test_a_cache_limit_keeps_the_peak_under_it_by_computing_the_blocks_that_do_not_fit(random_dit, caplog):
    unlimited, free = run(random_dit)
    peak, depth = free.stats.peak_cache_bytes, len(random_dit.blocks)
    half, capped = run(random_dit, memory=CacheMemory(limit_bytes=peak // 2))
    assert capped.stats.peak_cache_bytes <= peak // 2
    assert 0 < capped.stats.blocks_over_limit < depth
    assert 0 < capped.stats.blocks_skipped < free.stats.blocks_skipped
    assert "cache limit of" in caplog.text and "computed every step" in caplog.text
    assert "blocks over the cache limit" in capped.stats.summary()
    assert not torch.equal(half, unlimited)


def test_a_limit_too_small_for_any_block_is_full_computation(random_dit):
    full, _ = sample(random_dit, LABELS, noise(), STEPS, CFG)
    out, state = run(random_dit, memory=CacheMemory(limit_bytes=1))
    assert state.stats.blocks_skipped == 0 and state.stats.blocks_over_limit == len(random_dit.blocks)
    assert state.stats.peak_cache_bytes == 0 and torch.equal(out, full)


def test_a_limit_the_caches_fit_under_changes_nothing(random_dit):
    unlimited, free = run(random_dit)
    out, capped = run(random_dit, memory=CacheMemory(limit_bytes=free.stats.peak_cache_bytes))
    assert capped.stats.blocks_over_limit == 0 and torch.equal(out, unlimited)


def test_the_limit_also_caps_icc_linear_caches(random_dit):
    policy = replace(CachePolicy(interval=3, warmup_steps=1), icc=IccSettings(8, "plain"))
    _, free = run(random_dit, policy)
    _, capped = run(random_dit, policy, CacheMemory(limit_bytes=free.stats.peak_cache_bytes // 3))
    assert capped.stats.peak_cache_bytes <= free.stats.peak_cache_bytes // 3
    assert 0 < capped.stats.blocks_over_limit < len(random_dit.blocks) and capped.stats.blocks_skipped > 0


def test_offload_is_reported_and_leaves_the_samples_unchanged(random_dit):
    """On the CPU the caches are already in CPU memory: offload changes nothing but the report (a GPU run copies)."""
    plain, _ = run(random_dit)
    out, state = run(random_dit, memory=CacheMemory(offload=True))
    assert torch.equal(out, plain) and state.stats.cache_offloaded
    assert "offloaded to CPU" in state.stats.summary()


@pytest.mark.parametrize("settings, message", [
    (dict(limit_bytes=-1), "whole number of bytes >= 0"),
    (dict(limit_bytes=1.5), "whole number of bytes"),
    (dict(offload="yes"), "true or false"),
])
def test_impossible_memory_settings_are_refused_with_the_fix(settings, message):
    with pytest.raises(PolicyError, match=message):
        CacheMemory(**settings)
