import math

import pytest
import torch

from calibrated_cache.calibration import FocaForecaster, ReuseForecaster, TaylorForecaster


def feed(forecaster, times, fn):
    for t in times:
        forecaster.update(t, torch.tensor([fn(t)], dtype=torch.float64))
    return forecaster


def test_reuse_returns_the_last_anchor():
    f = feed(ReuseForecaster(), [0, 1, 2], lambda t: 3.0 * t)
    assert f.predict(5.0).item() == 6.0
    assert len(f.values) == 1


def test_reuse_still_returns_the_newest_anchor_when_a_calibrator_keeps_more():
    f = ReuseForecaster()
    f.history = 2
    feed(f, [0, 1, 2], lambda t: 3.0 * t)
    assert len(f.values) == 2 and f.predict(5.0).item() == 6.0


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylor_reproduces_lines_exactly_at_every_order(order):
    line = lambda t: 1.0 - 2.0 * t  # noqa: E731
    f = feed(TaylorForecaster(order), [0.0, 2.0, 4.0, 6.0], line)
    assert f.predict(9.0).item() == pytest.approx(line(9.0))


def test_taylor_matches_taylorseer_difference_table():
    """Φ1 = (F_k − F_{k−1})/d, Φ2 = (Φ1_k − Φ1_{k−1})/d with d the newest gap; forecast Σ Φi x^i/i!."""
    times, values = [0.0, 3.0, 6.0], [1.0, 4.0, 2.0]
    f = TaylorForecaster(2)
    for t, v in zip(times, values):
        f.update(t, torch.tensor([v], dtype=torch.float64))
    phi1_new, phi1_old = (2.0 - 4.0) / 3, (4.0 - 1.0) / 3
    phi2 = (phi1_new - phi1_old) / 3
    x = 2.0
    assert f.predict(8.0).item() == pytest.approx(2.0 + phi1_new * x + phi2 * x**2 / 2)


def test_taylor_orders_fill_in_as_anchors_accumulate():
    f = TaylorForecaster(3)
    f.update(0.0, torch.tensor([5.0]))
    assert f.predict(2.0).item() == 5.0
    f.update(1.0, torch.tensor([6.0]))
    assert f.predict(2.0).item() == pytest.approx(7.0)


def test_foca_with_full_curvature_is_the_parabola_through_three_anchors_even_unevenly_spaced():
    parabola = lambda t: 2.0 - t + 0.75 * t * t  # noqa: E731
    f = feed(FocaForecaster(1.0), [0.0, 1.0, 3.5], parabola)
    for t in (4.0, 5.5, 7.0):
        assert f.predict(t).item() == pytest.approx(parabola(t))


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_foca_reproduces_linear_sequences_for_any_lambda(lam):
    line = lambda t: 4.0 - 1.5 * t  # noqa: E731
    f = feed(FocaForecaster(lam), [0.0, 2.0, 3.0], line)
    assert f.predict(6.0).item() == pytest.approx(line(6.0))


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_foca_does_not_collapse_to_linear_extrapolation(lam):
    """The degeneracy of methods.md §6.3: a corrector fed only the last two anchors equals 2F_k − F_{k−1}."""
    f = feed(FocaForecaster(lam), [0.0, 1.0, 2.0], lambda t: math.exp(t))
    linear = 2 * math.exp(2.0) - math.exp(1.0)
    assert abs(f.predict(3.0).item() - linear) > 0.5
    assert abs(f.predict(3.0).item() - math.exp(3.0)) < abs(linear - math.exp(3.0))


def test_foca_single_anchor_falls_back_to_reuse_and_two_anchors_to_a_line():
    f = FocaForecaster(0.5)
    f.update(1.0, torch.tensor([2.0]))
    assert f.predict(4.0).item() == 2.0
    f.update(2.0, torch.tensor([3.0]))
    assert f.predict(4.0).item() == pytest.approx(5.0)


def test_a_second_value_at_the_same_time_replaces_the_anchor():
    f = feed(TaylorForecaster(1), [0.0, 1.0], lambda t: t)
    f.update(1.0, torch.tensor([3.0], dtype=torch.float64))
    assert f.times == [0.0, 1.0]
    assert f.predict(2.0).item() == pytest.approx(6.0)


def test_history_is_bounded_by_the_method():
    for f, kept in ((ReuseForecaster(), 1), (TaylorForecaster(2), 3), (FocaForecaster(0.5), 3)):
        feed(f, range(10), float)
        assert len(f.values) == kept
        assert f.nbytes == kept * 8
