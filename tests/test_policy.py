import pytest

from calibrated_cache.calibration import CachePolicy, PolicyError
from calibrated_cache.calibration.schedule import StepPlan


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"interval": 0}, "interval must be an integer >= 1"),
        ({"interval": 2.5}, "interval must be an integer"),
        ({"forecaster": "taylor", "order": 4}, "order must be 1, 2 or 3"),
        ({"order": 0}, "order must be 1, 2 or 3"),
        ({"start": -0.1}, "0 <= start < end <= 1"),
        ({"end": 1.5}, "0 <= start < end <= 1"),
        ({"start": 0.6, "end": 0.4}, "0 <= start < end <= 1"),
        ({"mode": "sometimes"}, "mode must be one of fixed, dynamic"),
        ({"forecaster": "magic"}, "forecaster must be one of"),
        ({"threshold": 0}, "threshold must be > 0"),
        ({"max_skips": 0}, "max_skips must be an integer >= 1"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ({"foca_lambda": 2.0}, "foca_lambda must be in [0, 1]"),
    ],
)
def test_impossible_settings_raise_a_clear_error(settings, words):
    with pytest.raises(PolicyError) as err:
        CachePolicy(**settings)
    assert words in str(err.value)


def test_unknown_settings_are_named():
    with pytest.raises(PolicyError, match="unknown policy settings \\['intervall'\\]"):
        CachePolicy.from_dict({"intervall": 3})


def test_policy_round_trips_through_a_dict_and_has_distinct_tags():
    a = CachePolicy(interval=4, forecaster="taylor", order=2, time_unit="sigma")
    assert CachePolicy.from_dict(a.to_dict()) == a
    assert a.tag() == "TAYLOR2_N4_W1_sigma"
    assert CachePolicy(interval=3).tag() == "FORA_N3_W1"
    methods = ("reuse", "taylor", "foca", "spectrum", "dmd")
    tags = {CachePolicy(interval=n, forecaster=f).tag() for n in (2, 3) for f in methods}
    assert len(tags) == 10
    # the integrator is not the anchored forecast of earlier releases: their prior files must not match it
    assert CachePolicy(forecaster="foca").tag() == "FOCAI1_N3_W1" and "FOCA0_" not in CachePolicy(
        forecaster="foca", foca_lambda=0.0).tag()


def test_fixed_plan_computes_every_nth_step_after_warmup():
    plan = StepPlan(CachePolicy(interval=3, warmup_steps=2), steps=10)
    assert [s for s in range(10) if plan.full[s]] == [0, 1, 2, 5, 8]


def test_window_limits_caching_to_its_fraction_of_steps():
    plan = StepPlan(CachePolicy(interval=4, warmup_steps=0, start=0.2, end=0.8), steps=10)
    assert plan.cacheable == [False, False, True, True, True, True, True, True, False, False]
    assert [s for s in range(10) if plan.full[s]] == [0, 1, 2, 6, 8, 9]


def test_values_are_kept_only_while_a_later_step_can_skip():
    plan = StepPlan(CachePolicy(interval=3, warmup_steps=0, end=0.5), steps=10)
    assert [plan.may_skip_after(s) for s in range(10)] == [True, True, True, True, False, False, False, False, False, False]
