"""Cache memory: the size is reported, a limit caps it by computing the blocks that do not fit, offload is reported."""

import copy
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
    assert state.stats.cache_bytes == 0 and not state.groups
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


class FakeHost(CacheMemory):
    """Offload for a model computing on the meta device: cached values are kept as CPU tensors (shapes only: meta
    tensors hold no data) and brought back to meta when read. Mixing a kept CPU value into the meta computation is an
    error, so a read that skips `use` fails the run; a store that skips `keep` leaves a meta value that `use` sees."""

    def __init__(self) -> None:
        super().__init__(offload=True)
        object.__setattr__(self, "kept", [])
        object.__setattr__(self, "used", [])

    def moves(self, value: torch.Tensor) -> bool:
        return self.offload and value.device.type == "meta"

    def keep(self, value: torch.Tensor) -> torch.Tensor:
        host = torch.empty(value.shape, dtype=value.dtype, device="cpu")
        self.kept.append(host.untyped_storage().data_ptr())
        return host

    def use(self, value: torch.Tensor, device: torch.device) -> torch.Tensor:
        self.used.append(value.device.type)
        return value.to(device)


@pytest.mark.parametrize("policy", [TAYLOR, CachePolicy(interval=3, warmup_steps=1)], ids=["taylor2", "fora"])
def test_offload_keeps_every_cached_value_on_the_host_and_brings_each_back_before_use(random_dit, policy):
    model = copy.deepcopy(random_dit).to("meta")
    memory = FakeHost()
    out, state = sample(model, LABELS, noise().to("meta"), STEPS, CFG, policy=policy, memory=memory)
    _, reference = sample(random_dit, LABELS, noise(), STEPS, CFG, policy=policy)
    assert out.device.type == "meta" and state.stats.cache_offloaded and "offloaded to CPU" in state.stats.summary()
    block_calls = reference.stats.blocks_computed // 2  # cond and uncond batched in one call; every step stores
    assert len(memory.kept) == block_calls * 2  # each computed block's two sites (attention, MLP), once per call
    assert memory.used and set(memory.used) == {"cpu"}  # every value read came from the host
    assert state.stats.blocks_skipped == reference.stats.blocks_skipped
    assert state.stats.peak_cache_bytes == reference.stats.peak_cache_bytes


@pytest.mark.needs_gpu("offload moves caches off a GPU")
def test_offload_on_a_gpu_keeps_the_caches_in_pinned_cpu_memory_and_changes_no_output(random_dit):
    model = copy.deepcopy(random_dit).cuda()
    plain, _ = sample(model, LABELS.cuda(), noise().cuda(), STEPS, CFG, policy=TAYLOR)
    seen = []
    memory = CacheMemory(offload=True)
    keep = memory.keep
    object.__setattr__(memory, "keep", lambda value: seen.append(keep(value)) or seen[-1])
    out, state = sample(model, LABELS.cuda(), noise().cuda(), STEPS, CFG, policy=TAYLOR, memory=memory)
    assert torch.equal(out, plain) and state.stats.cache_offloaded
    assert seen and all(t.device.type == "cpu" and t.is_pinned() for t in seen)


@pytest.mark.parametrize("settings, message", [
    (dict(limit_bytes=-1), "whole number of bytes >= 0"),
    (dict(limit_bytes=1.5), "whole number of bytes"),
    (dict(offload="yes"), "true or false"),
])
def test_impossible_memory_settings_are_refused_with_the_fix(settings, message):
    with pytest.raises(PolicyError, match=message):
        CacheMemory(**settings)
