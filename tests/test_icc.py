import pytest
import torch

from calibrated_cache.calibration.icc import ChannelStats, LinearCache, factorize, increment_flops


def layer(out_features: int = 24, in_features: int = 16, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features)


def test_full_rank_factors_reproduce_the_weight_with_or_without_channel_weights():
    lin = layer()
    l, q = torch.rand(24) * 5, torch.rand(16) * 5
    for factors in (factorize(lin.weight, 16), factorize(lin.weight, 16, l, q)):
        assert torch.allclose(factors.a @ factors.b, lin.weight, atol=1e-5)


def test_at_full_rank_the_increment_is_the_layers_exact_output():
    lin, cache = layer(), LinearCache()
    x0, x1 = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        cache.record(x0, lin(x0))
        factors = factorize(lin.weight, 16).to(x1)
        assert cache.ready(x1) and not cache.ready(x1[:1])
        assert torch.allclose(cache.increment(x1, factors), lin(x1), atol=1e-5)


def test_channel_aware_factors_have_the_lowest_weighted_error_and_plain_svd_the_lowest_plain_error():
    lin = layer(32, 32)
    l, q = torch.rand(32) + 0.1, torch.rand(32) ** 4 * 50 + 0.1
    plain, aware = factorize(lin.weight, 6), factorize(lin.weight, 6, l, q)

    def error(f, weighted: bool) -> float:
        e = lin.weight.detach() - f.a @ f.b
        return float((l[:, None] * e * q[None, :]).norm() if weighted else e.norm())

    assert error(aware, True) < error(plain, True) and error(plain, False) < error(aware, False)


def test_the_increment_on_outlier_inputs_is_closer_with_channel_aware_factors():
    lin, stats = layer(32, 32, seed=1), ChannelStats()
    scale = torch.ones(32)
    scale[:3] = 30.0  # three outlier input channels, as DiT activations have
    for _ in range(4):
        stats.add(torch.randn(8, 10, 32) * scale)
    x0, x1 = torch.randn(4, 10, 32) * scale, torch.randn(4, 10, 32) * scale
    with torch.no_grad():
        exact = lin(x1)
        errors = {}
        for name, q in (("plain", None), ("aware", stats.weights())):
            cache = LinearCache()
            cache.record(x0, lin(x0))
            errors[name] = float((cache.increment(x1, factorize(lin.weight, 8, None, q)) - exact).norm())
    assert errors["aware"] < 0.8 * errors["plain"], errors


def test_channel_weights_are_normalised_per_sample_and_floored():
    stats = ChannelStats()
    a = torch.ones(2, 3, 4)
    a[0, :, 0], a[1, :, 0] = 10.0, 1000.0  # same shape of magnitudes, very different scales
    a[:, :, 3] = 0.0
    stats.add(a)
    w = stats.weights()
    assert stats.samples == 2 and w.argmax() == 0 and torch.isclose(w[0], torch.tensor(1.0))
    assert torch.isclose(w[3], w.max() / 1000)  # a dead channel keeps a floor, not a zero
    with pytest.raises(ValueError, match="run a calibration pass first"):
        ChannelStats().weights()


def test_factor_rank_is_validated_and_the_increment_cost_counts_both_products():
    lin = layer()
    with pytest.raises(ValueError, match=r"rank must be in \[1, 16\]"):
        factorize(lin.weight, 17)
    factors = factorize(lin.weight, 4)
    assert increment_flops(factors, 10) == 10 * (2 * 4 * (16 + 24) + 16 + 24)


def test_factors_follow_the_weight_as_it_is_now():
    lin = layer()
    before = factorize(lin.weight, 4)
    with torch.no_grad():
        lin.weight.add_(torch.randn_like(lin.weight) * 0.1)  # what a LoRA patch does to the weight in place
    after = factorize(lin.weight, 4)
    assert not torch.allclose(before.a @ before.b, after.a @ after.b)
