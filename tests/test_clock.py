import math

import pytest

from calibrated_cache.calibration import StepClock

SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]


def test_schedule_points_are_their_own_steps():
    clock = StepClock(SIGMAS)
    assert [clock.step(s) for s in SIGMAS[:-1]] == [0, 1, 2, 3]
    assert clock.position(0.5 * (1 + 1e-6)) == 2.0


def test_evaluations_between_points_belong_to_the_step_they_start_from():
    clock = StepClock(SIGMAS)
    midpoint = math.sqrt(0.75 * 0.5)  # DPM-2's second evaluation of step 1
    assert clock.step(midpoint) == 1
    assert 1.0 < clock.position(midpoint) < 2.0


def test_heun_evaluations_count_the_schedules_steps():
    clock = StepClock(SIGMAS)
    heun = [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]
    assert sorted({clock.step(s) for s in heun}) == [0, 1, 2, 3]


def test_partial_schedules_count_from_their_own_start():
    clock = StepClock(SIGMAS[2:])
    assert clock.steps == 2
    assert [clock.step(s) for s in (0.5, 0.25)] == [0, 1]


@pytest.mark.parametrize("sigmas", [[1.0], [0.5, 0.7, 0.0]])
def test_bad_schedules_are_refused(sigmas):
    with pytest.raises(ValueError):
        StepClock(sigmas)
