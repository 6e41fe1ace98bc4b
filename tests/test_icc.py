import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from calibrated_cache.calibration import CachePolicy, PolicyError, RunState
from calibrated_cache.calibration.icc import (ChannelStats, FactorCache, Factors, IccLinear, IccRun, IccSettings,
                                              LayerFactors, StatsRecorder, channel_weights, factorize, increment,
                                              parallel_parts)
from calibrated_cache.priors import PriorFileError, load_priors, save_priors
from calibrated_cache.priors.report import summarize
from calibrated_cache.testbed.evaluate import bench_inputs
from calibrated_cache.testbed.fit_priors import fit_testbed, record_channels
from calibrated_cache.testbed.linears import block_linears
from calibrated_cache.testbed.metrics import rel_l2
from calibrated_cache.testbed.sampling import sample
from calibrated_cache.testbed.weights import load_dit

STEPS, CFG = 12, 2.0


def layer(out_features: int = 24, in_features: int = 16, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features)


@pytest.fixture(scope="module")
def trained():
    return load_dit()[0]


@pytest.fixture(scope="module")
def channels(trained):
    return record_channels(trained, 16, STEPS, CFG)[0]


@pytest.fixture(scope="module")
def requests(trained):
    labels, noise = bench_inputs(trained, 32, 0)
    return labels, noise, sample(trained, labels, noise, STEPS, CFG)[0]


def test_full_rank_factors_reproduce_the_weight_with_or_without_channel_weights():
    lin = layer()
    l, q = torch.rand(24) * 5, torch.rand(16) * 5
    for factors in (factorize(lin.weight, 16), factorize(lin.weight, 16, l, q)):
        assert torch.allclose(factors.a @ factors.b, lin.weight, atol=1e-5)


def test_at_full_rank_the_increment_is_the_layers_exact_output_also_per_output_chunk():
    lin = layer()
    x0, x1 = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    w = lin.weight.detach()
    whole = LayerFactors.of([factorize(w, 16)], x0)
    chunked = LayerFactors.of([factorize(w[:8], 8), factorize(w[8:], 16)], x0)
    with torch.no_grad():
        for factors in (whole, chunked):
            assert torch.allclose(increment(x1, factors.project(x0), lin(x0), factors), lin(x1), atol=1e-5)


def test_channel_aware_factors_have_the_lowest_weighted_error_and_plain_svd_the_lowest_plain_error():
    lin = layer(32, 32)
    l, q = torch.rand(32) + 0.1, torch.rand(32) ** 4 * 50 + 0.1
    plain, aware = factorize(lin.weight, 6), factorize(lin.weight, 6, l, q)

    def error(f: Factors, weighted: bool) -> float:
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
        exact, y0 = lin(x1), lin(x0)
        errors = {}
        for name, q in (("plain", None), ("aware", channel_weights(stats.mean()))):
            factors = LayerFactors.of([factorize(lin.weight, 8, None, q)], x0)
            errors[name] = float((increment(x1, factors.project(x0), y0, factors) - exact).norm())
    assert errors["aware"] < 0.8 * errors["plain"], errors


def test_channel_weights_are_normalised_per_sample_and_floored():
    stats = ChannelStats()
    a = torch.ones(2, 3, 4)
    a[0, :, 0], a[1, :, 0] = 10.0, 1000.0  # same shape of magnitudes, very different scales
    a[:, :, 3] = 0.0
    stats.add(a)
    w = channel_weights(stats.mean())
    assert stats.samples == 2 and w.argmax() == 0 and torch.isclose(w[0], torch.tensor(1.0))
    assert torch.isclose(w[3], w.max() / 1000)  # a dead channel keeps a floor, not a zero
    with pytest.raises(ValueError, match="run a calibration pass first"):
        ChannelStats().mean()


def test_factor_rank_is_validated_and_the_increment_cost_counts_both_products_per_chunk():
    lin = layer()
    with pytest.raises(ValueError, match=r"rank must be in \[1, 16\]"):
        factorize(lin.weight, 17)
    w = lin.weight.detach()
    factors = LayerFactors.of([factorize(w[:8], 4), factorize(w[8:], 4)], w)
    assert factors.project_flops(10) == 10 * 2 * 8 * 16
    assert factors.increment_flops(10) == 10 * (2 * 8 * 16 + 8 + 2 * 4 * 8 + 2 * 4 * 16 + 24)


@pytest.mark.parametrize("mlp_parts", [1, 2])
def test_a_parallel_blocks_fused_linear_is_factored_as_q_k_v_and_each_mlp_input_part(mlp_parts):
    """Flux's single-stream linear1 is q, k, v and the MLP input; Flux 2's gated MLP adds a second MLP part (gate and
    up): each part gets its own rank-r factors, the best rank-r approximation of its own rows."""
    hidden, mlp, rank = 8, 12, 3
    chunks = parallel_parts(3 * hidden + mlp_parts * mlp, hidden, mlp)
    assert chunks == (hidden,) * 3 + (mlp,) * mlp_parts
    lin = layer(sum(chunks), hidden)
    w = lin.weight.detach()
    factors = FactorCache().factors(IccLinear(0, "linear1", lambda like: w.to(like), chunks), torch.zeros(1, 2, hidden),
                                    IccSettings(rank, "plain"))
    assert [a.shape[0] for a in factors.a] == list(chunks)
    start = 0
    for i, size in enumerate(chunks):
        part = factors.a[i] @ factors.b[i * rank:(i + 1) * rank]
        best = torch.linalg.svdvals(w[start:start + size])[:rank]
        assert torch.allclose(torch.linalg.svdvals(part)[:rank], best, rtol=1e-4), i
        start += size
    assert parallel_parts(3 * hidden + 3 * mlp, hidden, mlp) is None  # no such layout: factored whole
    assert parallel_parts(3 * hidden + mlp + 1, hidden, mlp) is None


def test_the_factor_cache_refactorises_when_a_lora_patches_the_weight_and_only_then():
    lin = layer()
    cache, settings = FactorCache(), IccSettings(4, "plain")
    linear = IccLinear(0, "fc", lambda like: lin.weight.detach().to(like))
    like = torch.zeros(1, 2, 16)
    before = cache.factors(linear, like, settings)
    again = cache.factors(linear, like, settings)  # the held factors, not a new factorisation
    assert cache.factorized == 1 and torch.equal(again.b, before.b) and torch.equal(again.a[0], before.a[0])
    assert before.b.shape == (4, 16) and [a.shape for a in before.a] == [(24, 4)]
    with torch.no_grad():  # a LoRA: W + s·up·down, in place, as ComfyUI patches weights
        lin.weight.add_(0.3 * torch.randn(24, 2) @ torch.randn(2, 16))
    after = cache.factors(linear, like, settings)
    assert cache.factorized == 2
    assert not torch.allclose(before.a[0] @ before.b, after.a[0] @ after.b)
    exact = factorize(lin.weight, 4)
    assert torch.allclose(after.a[0] @ after.b, exact.a @ exact.b, atol=1e-5)


def test_the_factor_cache_holds_host_arrays_between_runs_and_no_tensor():
    """It outlives runs (ComfyUI keeps it with the model), where a tensor would stay on the device while ComfyUI pages
    the weights out: factors and channel statistics are arrays of their own, and each call gives tensors anew."""
    lin = layer()
    cache = FactorCache({"0/fc": (torch.rand(16), torch.rand(24))})
    factors = cache.factors(IccLinear(0, "fc", lambda like: lin.weight.detach().to(like)), torch.zeros(1, 2, 16),
                            IccSettings(4))
    assert factors.b.shape == (4, 16) and [a.shape for a in factors.a] == [(24, 4)]
    held = [*cache.channels["0/fc"], *(x for _, parts in cache._entries.values() for part in parts for x in part)]
    assert len(held) == 4 and all(isinstance(x, np.ndarray) and x.base is None for x in held)


def test_channel_aware_factors_refuse_statistics_of_another_model_with_the_fix():
    lin = layer()
    linear = IccLinear(3, "attn.qkv", lambda like: lin.weight.detach().to(like))
    like = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="no entry for Linear 3/attn.qkv.*set ICC svd to plain"):
        FactorCache({}).factors(linear, like, IccSettings(4))
    with pytest.raises(ValueError, match="another model"):
        FactorCache({"3/attn.qkv": (torch.ones(8), torch.ones(24))}).factors(linear, like, IccSettings(4))


def test_settings_are_validated_tagged_and_round_trip_through_policy_json():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(PolicyError, match="rank"):
            IccSettings(bad)
    with pytest.raises(PolicyError, match="svd"):
        IccSettings(8, "weighted")
    policy = CachePolicy(interval=2, icc=IccSettings(16, "plain"))
    assert policy.tag() == "FORA_N2_W1_ICC16plain"
    assert CachePolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    for other in ({"forecaster": "taylor"}, {"goc": __import__("calibrated_cache.calibration.goc",
                                                              fromlist=["GocSettings"]).GocSettings()}):
        with pytest.raises(PolicyError, match="reuse \\(FORA\\) policy"):
            CachePolicy(interval=2, icc=IccSettings(), **other)
    with pytest.raises(PolicyError, match="channel statistics"):
        RunState(replace(policy, icc=IccSettings(16)), [1.0, 0.5, 0.0], 2)


def test_only_token_wise_linears_of_the_running_block_are_incremented():
    lin = layer()
    run = IccRun(IccSettings(16, "plain"), FactorCache())
    linear = IccLinear(1, "fc", lambda like: lin.weight.detach().to(like))
    x0, x1, vec = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 16)
    with torch.no_grad():
        with run.running(1, ["c", "u"], 1, record=True) as scope:
            run.linear(linear, x0, lin)
        assert scope.saved == -2 * 5 * 16 * 16  # projecting each token's input on full rank 16, per sample
        assert run.nbytes == 2 * (5 * 16 + 5 * 24 + 5 * 24) * 4  # per branch: projection, output, its sample
        with run.running(1, ["c", "u"], 1, record=False) as scope:
            assert torch.allclose(run.linear(linear, x1, lin), lin(x1), atol=1e-5)  # full rank: exact
            assert scope.saved < 0  # at full rank the increment costs more than the layer: counted honestly
            assert torch.equal(run.linear(linear, vec, lin), lin(vec))  # modulation on (batch, channels): exact
        with run.running(0, ["c", "u"], 1, record=False) as scope:
            assert torch.equal(run.linear(linear, x1, lin), lin(x1)) and scope.saved == 0  # another block's Linear
        with run.running(1, ["u", "c"], 1, record=False):  # branches recalled in another order use their own caches
            swapped = run.linear(linear, x1, lin)
        assert torch.allclose(swapped, lin(x1), atol=1e-5)


def one_linear_run():
    """A rank-4 ICC run over one 24×16 Linear of block 0, and two inputs."""
    lin = layer()
    run = IccRun(IccSettings(4, "plain"), FactorCache())
    return lin, run, IccLinear(0, "fc", lambda like: lin.weight.detach().to(like)), torch.randn(1, 5, 16), \
        torch.randn(1, 5, 16)


def test_a_cached_output_the_model_modified_in_place_is_detected_and_the_layer_computed_exactly(caplog):
    lin, run, linear, x0, x1 = one_linear_run()
    with torch.no_grad():
        with run.running(0, ["c"], 1, record=True):
            y0 = run.linear(linear, x0, lin)
        y0.mul_(2.0)  # what a model that scales its Linear's output in place does
        with run.running(0, ["c"], 1, record=False) as scope:
            assert torch.equal(run.linear(linear, x1, lin), lin(x1)) and scope.saved == 0
    assert run.exact == {"0/fc"} and "Linear 0/fc has its output modified in place" in caplog.text


def test_tensors_the_block_itself_modifies_in_place_after_the_linear_are_detected(caplog):
    for side in ("input", "output"):
        lin, run, linear, x0, x1 = one_linear_run()
        with torch.no_grad():
            with run.running(0, ["c"], 1, record=True):
                y0 = run.linear(linear, x0, lin)
                (x0 if side == "input" else y0).add_(1.0)  # later in the same block, before the cache is settled
            with run.running(0, ["c"], 1, record=False):
                assert torch.equal(run.linear(linear, x1, lin), lin(x1))
        assert run.exact == {"0/fc"} and f"Linear 0/fc has its {side} modified in place" in caplog.text


def test_a_linear_called_twice_in_one_block_is_computed_exactly_rather_than_served_a_wrong_cache(caplog):
    lin, run, linear, x0, x1 = one_linear_run()
    with torch.no_grad():
        with run.running(0, ["c"], 1, record=True):
            run.linear(linear, x0, lin)
            assert torch.equal(run.linear(linear, x1, lin), lin(x1))
        with run.running(0, ["c"], 1, record=False):
            assert torch.equal(run.linear(linear, x1, lin), lin(x1))
        with run.running(0, ["c", "u"], 1, record=False):  # a batch that is not chunk × branches: exact
            assert torch.equal(run.linear(linear, x1, lin), lin(x1))
    assert run.exact == {"0/fc"} and "is called more than once per block" in caplog.text


def test_the_recorder_takes_channel_changes_between_calls_of_the_same_layout_within_a_sample():
    lin, recorder = layer(), StatsRecorder()
    linear = IccLinear(0, "fc", lambda like: like)
    x, shift = torch.randn(2, 5, 16), torch.zeros(16)
    shift[0] = 100.0  # uncond differs from cond in one channel: a change taken across layouts would single it out
    with torch.no_grad():
        for group in ("c", "u", "c", "u"):
            recorder.group = group
            recorder.linear(linear, x + (group == "u") * shift, lin)
        recorder.end_sample()
        recorder.group = "c"
        recorder.linear(linear, x, lin)
    inputs, outputs = recorder.layers["0/fc"]
    assert inputs.samples == 4  # two pairs of two samples: cond with cond, uncond with uncond, none across samples
    assert torch.equal(inputs.total, torch.full((16,), 4.0, dtype=torch.float64))  # no change: no channel stands out
    assert set(recorder.table()) == {"0/fc"}


def test_testbed_linears_are_every_block_linear_with_qkv_in_three_chunks(trained):
    found = block_linears(trained)
    names = {layer.name for layer, _ in found if layer.block == 0}
    assert names == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN.1"}
    qkv = next(layer for layer, _ in found if layer.name == "attn.qkv")
    assert qkv.chunks == (qkv.weight(torch.zeros(1)).shape[1],) * 3


def test_icc_at_full_rank_is_full_computation_and_the_model_is_restored(trained, requests):
    labels, noise, full = requests
    width = trained.blocks[0].attn.proj.in_features
    policy = CachePolicy(interval=2, warmup_steps=0, icc=IccSettings(width, "plain"))
    x, state = sample(trained, labels, noise, STEPS, CFG, policy=policy)
    assert rel_l2(x, full) < 1e-4
    assert state.stats.compute_fraction > 1.0  # full-rank increments cost more than the Linears: reported as such
    assert "forward" not in vars(trained.blocks[0].attn.qkv)
    assert torch.equal(sample(trained, labels, noise, STEPS, CFG)[0], full)


def test_icc_cuts_foras_error_by_half_with_channel_aware_at_least_as_good_as_plain(trained, requests, channels):
    labels, noise, full = requests
    fora = CachePolicy(interval=2, warmup_steps=0)
    x, fora_state = sample(trained, labels, noise, STEPS, CFG, policy=fora)
    errors = {"fora": rel_l2(x, full)}
    for svd in ("plain", "channel-aware"):
        x, state = sample(trained, labels, noise, STEPS, CFG, policy=replace(fora, icc=IccSettings(32, svd)),
                          factors=FactorCache(channels))
        errors[svd] = rel_l2(x, full)
        assert fora_state.stats.compute_fraction < state.stats.compute_fraction < 0.8
        assert state.stats.peak_cache_bytes > fora_state.stats.peak_cache_bytes
    assert errors["channel-aware"] < 0.5 * errors["fora"], errors
    assert errors["channel-aware"] < errors["plain"], errors


def test_icc_with_tcc_priors_fitted_on_icc_output_lowers_the_error(trained, requests, channels):
    labels, noise, full = requests
    policy = CachePolicy(interval=3, warmup_steps=0, icc=IccSettings(16))
    factors = FactorCache(channels)
    priors, meta = fit_testbed(trained, policy, 16, STEPS, CFG, factors=factors)
    alone = rel_l2(sample(trained, labels, noise, STEPS, CFG, policy=policy, factors=factors)[0], full)
    both = rel_l2(sample(trained, labels, noise, STEPS, CFG, policy=policy, factors=factors, calibrator=priors)[0],
                  full)
    assert both < alone and meta["policy_tag"].endswith("ICC16")


def test_channel_statistics_travel_in_the_prior_file_and_damage_is_refused(trained, channels, tmp_path):
    policy = CachePolicy(interval=3, warmup_steps=0)
    priors, meta = fit_testbed(trained, policy, 4, 6, CFG)
    plain = save_priors(tmp_path / "plain.tcc.safetensors", priors, meta)
    assert load_priors(plain).channels is None and load_priors(plain).meta["format_version"] == "1"
    path = save_priors(tmp_path / "p.tcc.safetensors", priors, {**meta, "icc_stats": {"source": "delta_mag"}},
                       channels)
    loaded = load_priors(path)
    assert loaded.meta["format_version"] == "2" and loaded.meta["icc_stats"]["source"] == "delta_mag"
    assert f"icc stats     {len(channels)} Linears, source delta_mag" in summarize(loaded)
    assert set(loaded.channels) == set(channels)
    assert all(torch.equal(loaded.channels[k][0], channels[k][0]) for k in channels)
    with pytest.raises(ValueError, match="icc_stats"):
        save_priors(tmp_path / "q.tcc.safetensors", priors, meta, channels)
    key = next(iter(channels))
    bad = {**channels, key: (channels[key][0], -channels[key][1])}
    save_priors(tmp_path / "bad.tcc.safetensors", priors, {**meta, "icc_stats": {}}, bad)
    with pytest.raises(PriorFileError, match=f"Linear {key} hold negative"):
        load_priors(tmp_path / "bad.tcc.safetensors")
