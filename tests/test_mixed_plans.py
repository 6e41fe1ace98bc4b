"""Plans that mix granularities per step (issue 33): whole-step forecasts where the model is not called, block fills
elsewhere; their runtime, their file format and how `mixing.mix` builds them (a wall-clock fit choosing one:
test_step_costs.py)."""

import pytest
import torch

from calibrated_cache.calibration import CachePolicy, PolicyError, RunState
from calibrated_cache.calibration.forecast import WeightedForecaster
from calibrated_cache.calibration.icc import IccSettings
from calibrated_cache.calibration.mixing import StepSeconds, mix
from calibrated_cache.calibration.plan import BlockPlan
from calibrated_cache.calibration.registry import make_forecaster
from calibrated_cache.calibration.speed_fit import plan_policy
from calibrated_cache.testbed.sampling import GuidedVelocity, flow_sigmas, sample_euler

LABELS = torch.tensor([3, 1])
# steps 0, 1 compute every block; 2 and 4 fill the blocks in; 3 and 5 forecast the model's output whole
ROW, CALLS = "110000", "111010"


def mixed_plan(blocks: int, steps: int = 6) -> BlockPlan:
    return BlockPlan(tuple(flow_sigmas(steps).tolist()), (ROW,) * blocks, CALLS)


def test_a_mixed_plan_calls_the_model_only_at_its_called_steps_and_forecasts_whole_ones_from_fully_computed_steps(
        random_dit):
    """With reuse, a whole step returns the output of the last step that computed every block (step 1), not of the
    block-filled step between (step 2), whose output carries the fills' error."""
    plan = mixed_plan(len(random_dit.blocks))
    policy = plan_policy(CachePolicy(granularity="block"), plan)
    run = RunState(policy, plan.sigmas, len(random_dit.blocks))
    guided = GuidedVelocity(random_dit, LABELS, 3.0, True, run)
    calls, velocities = [], []
    handle = random_dit.register_forward_pre_hook(lambda *_: calls.append(1))

    def velocity(x, sigma):
        velocities.append(guided(x, sigma))
        return velocities[-1]

    try:
        sample_euler(velocity, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                     torch.tensor(plan.sigmas))
    finally:
        handle.remove()
    stats = run.finish()
    assert len(calls) == 4 and stats.calls_skipped == 2  # cond and uncond batched: one call per called step
    assert torch.equal(velocities[3], velocities[1]) and torch.equal(velocities[5], velocities[1])
    assert not torch.equal(velocities[2], velocities[1])  # the block-filled step ran the model
    assert stats.blocks_skipped > 0 and policy.tag().startswith("FORA_PLAN") and "_WS2_" in policy.tag()


def test_a_mixed_plan_round_trips_its_calls_and_refuses_blocks_computed_at_a_whole_step():
    plan = mixed_plan(2)
    assert BlockPlan.from_dict(plan.to_dict()) == plan and plan.whole_steps == 2
    assert plan.digest() != BlockPlan(plan.sigmas, plan.rows).digest()
    assert "calls" not in BlockPlan(plan.sigmas, plan.rows, "111111").to_dict()  # every step called: no mix
    assert plan.picture().splitlines() == ["  0 ##.-.-", "  1 ##.-.-"]
    with pytest.raises(PolicyError, match="computes a block at a step whose model call it forecasts whole"):
        BlockPlan(plan.sigmas, ("111000", "110000"), "101111")
    with pytest.raises(PolicyError, match="starting with 1"):
        BlockPlan(plan.sigmas, plan.rows, "011111")
    with pytest.raises(PolicyError, match="set the granularity to block"):
        plan_policy(CachePolicy(), plan).__class__(**{**plan_policy(CachePolicy(), plan).__dict__,
                                                      "granularity": "step"})
    with pytest.raises(PolicyError, match="a plan without whole steps"):
        plan_policy(CachePolicy(), plan).__class__(**{**plan_policy(CachePolicy(), plan).__dict__,
                                                      "icc": IccSettings(rank=4)})


def _flat_grams(steps: int, values: list[list[float]]) -> torch.Tensor:
    """A Gram of a scalar trajectory per row of `values` (one value per step)."""
    x = torch.tensor(values, dtype=torch.float64).T  # steps × features
    assert x.shape[0] == steps
    return x @ x.T


def test_mix_forecasts_whole_first_the_steps_whose_output_its_anchors_predict_best_until_the_budget_is_met():
    """The output is constant over steps 0-5 and moves after: reuse predicts steps 1-5 exactly, so they are forecast
    whole first; the blocks, constant, cost nothing in error anywhere."""
    steps = 10
    sigmas = flow_sigmas(steps).tolist()
    output = _flat_grams(steps, [[1.0] * 6 + [2.0, 3.0, 4.0, 5.0]])
    blocks = [_flat_grams(steps, [[1.0] * steps])] * 2
    weights = [[1.0] * steps] * 2
    rows = ["1" + "0" * (steps - 1)] * 2
    reuse: WeightedForecaster = make_forecaster(CachePolicy(forecaster="reuse"))
    seconds = StepSeconds(outside=1.0, computed=(1.0, 1.0), filled=(0.0, 0.0), whole=0.0)
    # everything filled costs (3 + 9) / 30 = 0.4: forecasting four steps whole reaches 0.8 / 3 ≈ 0.267
    plan, error = mix(rows, blocks, weights, output, 1.0, seconds, sigmas, 0.27, reuse, 1)
    assert plan.calls == "1" + "0000" + "1" * 5 and error == pytest.approx(0.0)
    assert seconds.fraction(plan) <= 0.27
    assert mix(rows, blocks, weights, output, 1.0, seconds, sigmas, 0.11, reuse, 1) is None  # all whole: no mix
