"""torch.compile with the engine: a compiled model samples exactly as the eager one, the engine's per-step state stays
out of compiled graphs (no recompile per block or step), and blocks compiled one by one run compiled under the cache."""

import copy

import torch

from calibrated_cache.calibration import CachePolicy
from calibrated_cache.testbed.sampling import sample

from dynamo_counting import Counting

LABELS = torch.tensor([2, 5])
STEPS, CFG = 9, 2.0
TAYLOR = CachePolicy(interval=3, warmup_steps=1, forecaster="taylor", order=2)


def noise(seed: int) -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_a_compiled_model_samples_exactly_as_the_eager_one_and_recompiles_for_no_step(random_dit):
    torch._dynamo.reset()
    eager, eager_run = sample(random_dit, LABELS, noise(0), STEPS, CFG, policy=TAYLOR)
    backend = Counting()
    compiled = torch.compile(random_dit, backend=backend)
    out, run = sample(compiled, LABELS, noise(0), STEPS, CFG, policy=TAYLOR)
    assert torch.equal(out, eager) and run.stats.to_dict() == eager_run.stats.to_dict()
    first = backend.graphs
    again, _ = sample(compiled, LABELS, noise(1), STEPS, CFG, policy=TAYLOR)
    assert backend.graphs == first  # a new seed and every step of it reuse the graphs of the first run
    assert torch.equal(again, sample(random_dit, LABELS, noise(1), STEPS, CFG, policy=TAYLOR)[0])


def test_blocks_compiled_one_by_one_run_compiled_under_the_cache(random_dit):
    torch._dynamo.reset()
    policy = CachePolicy(interval=3, warmup_steps=1, forecaster="taylor", order=2, granularity="block")
    eager, eager_run = sample(random_dit, LABELS, noise(0), STEPS, CFG, policy=policy)
    model, backend = copy.deepcopy(random_dit), Counting()
    for block in model.blocks:
        block.compile(backend=backend)
    out, run = sample(model, LABELS, noise(0), STEPS, CFG, policy=policy)
    assert torch.equal(out, eager) and run.stats.blocks_skipped == eager_run.stats.blocks_skipped > 0
    graphs, calls = backend.graphs, backend.calls
    sample(model, LABELS, noise(1), STEPS, CFG, policy=policy)
    computed_calls = run.stats.blocks_computed // 2  # cond and uncond are one batched call
    assert backend.graphs == graphs and backend.calls - calls >= computed_calls
