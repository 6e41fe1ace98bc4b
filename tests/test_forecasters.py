import math

import pytest
import torch

from calibrated_cache.calibration import (DmdForecaster, FocaForecaster, ReuseForecaster, SpectrumForecaster,
                                          TaylorForecaster)
from calibrated_cache.calibration.spectrum import DEGREE, RIDGE, WINDOW, chebyshev


def same(value):
    return value


def feed(forecaster, times, fn):
    for t in times:
        forecaster.update(t, torch.as_tensor(fn(t), dtype=torch.float64).reshape(1, -1))
    return forecaster


def at(forecaster, t) -> float:
    return forecaster.forecast(t, same).item()


def test_reuse_returns_the_last_anchor_itself():
    f = feed(ReuseForecaster(), [0, 1, 2], lambda t: 3.0 * t)
    assert f.forecast(5.0, same) is f.values[-1] and at(f, 5.0) == 6.0 and len(f.values) == 1


def test_reuse_still_returns_the_newest_anchor_when_a_calibrator_keeps_more():
    f = feed(ReuseForecaster(keep=2), [0, 1, 2], lambda t: 3.0 * t)
    assert len(f.values) == 2 and at(f, 5.0) == 6.0 and f.flops(5.0) == 0.0


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylor_reproduces_lines_exactly_at_every_order(order):
    line = lambda t: 1.0 - 2.0 * t  # noqa: E731
    f = feed(TaylorForecaster(order), [0.0, 2.0, 4.0, 6.0], line)
    assert at(f, 9.0) == pytest.approx(line(9.0))


def test_taylor_matches_taylorseer_difference_table_and_ignores_anchors_kept_for_calibrators():
    """Φ1 = (F_k − F_{k−1})/d, Φ2 = (Φ1_k − Φ1_{k−1})/d with d the newest gap; forecast Σ Φi x^i/i!."""
    times, values = [0.0, 3.0, 6.0], [1.0, 4.0, 2.0]
    f = feed(TaylorForecaster(2, keep=5), [-3.0] + times, dict(zip([-3.0] + times, [9.0] + values)).get)
    phi1_new, phi1_old = (2.0 - 4.0) / 3, (4.0 - 1.0) / 3
    phi2 = (phi1_new - phi1_old) / 3
    assert len(f.values) == 4 and at(f, 8.0) == pytest.approx(2.0 + phi1_new * 2 + phi2 * 2**2 / 2)


def test_taylor_orders_fill_in_as_anchors_accumulate():
    f = feed(TaylorForecaster(3), [0.0], lambda t: 5.0)
    assert at(f, 2.0) == 5.0
    f.update(1.0, torch.tensor([[6.0]], dtype=torch.float64))
    assert at(f, 2.0) == pytest.approx(7.0)


def bdf2_slope(times, values):
    (t0, t1, t2), (f0, f1, f2) = times, values
    h1, h2 = t2 - t1, t1 - t0
    return f2 * (2 * h1 + h2) / (h1 * (h1 + h2)) - f1 * (h1 + h2) / (h1 * h2) + f0 * h1 / (h2 * (h1 + h2))


def test_foca_without_relaxation_is_the_first_order_forecast_with_the_bdf2_slope_at_any_spacing():
    """λ = 0: the anchored form of earlier releases, F_c + Δ·ġ_c, whatever the path the integrator took there."""
    curve = lambda t: 2.0 - t + 0.75 * t * t  # noqa: E731
    times = [0.0, 1.0, 3.5]
    f = feed(FocaForecaster(0.0), times, curve)
    slope = bdf2_slope(times, [curve(t) for t in times])
    for t in (4.0, 4.5, 7.0):  # steps of 0.5, then 2.5
        assert at(f, t) == pytest.approx(curve(3.5) + (t - 3.5) * slope)


def test_foca_reproduces_lines_and_forecasting_the_same_time_twice_returns_the_same_value():
    line = lambda t: 1.0 + 0.5 * t  # noqa: E731
    f = feed(FocaForecaster(1.0), [0.0, 2.0, 4.0], line)
    for t in (5.0, 6.0, 7.5):
        assert at(f, t) == pytest.approx(line(t))
    assert f.forecast(7.5, same) is f.forecast(7.5, same)


def test_foca_starts_as_reuse_then_as_the_secant_line():
    f = feed(FocaForecaster(1.0), [0.0], lambda t: 4.0)
    assert at(f, 1.0) == 4.0
    f.update(2.0, torch.tensor([[6.0]], dtype=torch.float64))
    assert at(f, 3.0) == pytest.approx(7.0)


def exponentials(t: float) -> list[float]:
    """A feature relaxing toward a state: a sum of exponentials in t, as a 3-channel value."""
    return [1.0 + 2.0 * math.exp(-0.3 * t), -0.5 + 1.5 * math.exp(-0.3 * t), 0.2 - 0.8 * math.exp(-0.3 * t)]


def test_foca_follows_a_relaxing_feature_over_any_horizon_where_taylor_diverges():
    anchors = [0.0, 3.0, 6.0]
    foca, taylor = feed(FocaForecaster(1.0), anchors, exponentials), feed(TaylorForecaster(2), anchors, exponentials)
    truth = lambda t: torch.tensor(exponentials(t), dtype=torch.float64)  # noqa: E731
    foca_errors, taylor_errors = [], []
    for step in range(1, 31):  # one step at a time: the integrator advances from its own previous forecast
        t = 6.0 + step
        foca_errors.append(float((foca.forecast(t, same) - truth(t)).norm()))
        taylor_errors.append(float((taylor.forecast(t, same) - truth(t)).norm()))
    assert all(b > a for a, b in zip(taylor_errors[4:], taylor_errors[5:]))  # Taylor-2's error grows with the horizon
    assert taylor_errors[-1] > 10.0
    assert max(foca_errors) < 0.15 and foca_errors[-1] < 0.1  # the integrator's stays bounded, and small
    assert foca.rate.item() == pytest.approx(-0.3, rel=1e-6)  # the relaxation rate, read off the anchors


def test_foca_works_per_row_so_a_batch_forecasts_each_row_as_alone():
    rows = [lambda t: exponentials(t), lambda t: [math.sin(t), t, 2.0 - t * t]]
    batched = FocaForecaster(1.0)
    alone = [FocaForecaster(1.0) for _ in rows]
    for t in (0.0, 2.0, 4.0):
        batched.update(t, torch.tensor([fn(t) for fn in rows], dtype=torch.float64))
        for f, fn in zip(alone, rows):
            f.update(t, torch.tensor([fn(t)], dtype=torch.float64))
    for t in (5.0, 6.0):
        together = batched.forecast(t, same)
        assert torch.equal(together, torch.cat([f.forecast(t, same) for f in alone]))


STATE = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)  # where `exponentials` relaxes to


def decaying(rate: float):
    """`exponentials` relaxing at `rate`: the state plus a decaying offset."""
    return lambda t: [s + o * math.exp(-rate * t) for s, o in zip(STATE.tolist(), (2.0, 1.5, -0.8))]


@pytest.mark.parametrize("h", [3.0, 10.0], ids=["z=-3", "z=-10"])
def test_foca_never_moves_further_from_a_stiff_features_state_than_its_newest_anchor(h):
    """A row relaxing at rate 1 with steps of h (z = hλα = −h): each implicit step shrinks the distance to the state by
    |(1 + z/2)/(1 − z/2)|; the explicit Heun corrector's recurrence grew it by 1.30 (z = −3) and 4.9 (z = −10) a step."""
    f = feed(FocaForecaster(1.0), [0.0, 3.0, 6.0], decaying(1.0))
    distances = [float((f.values[-1][0] - STATE).norm())]
    for step in range(1, 21):
        distances.append(float((f.forecast(6.0 + step * h, same)[0] - STATE).norm()))
    assert f.rate.item() == pytest.approx(-1.0, rel=1e-9)
    assert all(b < a for a, b in zip(distances, distances[1:]))  # bounded by the anchor's distance, and shrinking
    assert distances[-1] < 1e-3 * distances[0]


@pytest.mark.parametrize("rate, h", [(0.5, 1.0), (1.0, 3.0), (1.0, 10.0), (10.0, 10.0)])
def test_foca_step_damps_the_distance_to_the_state_by_the_trapezoidal_factor(rate, h):
    """On a feature relaxing exactly exponentially, the field is exact, and every step (the first from the anchor
    included) multiplies F − F_∞ by (1 + z/2)/(1 − z/2), z = −rate·h: at most 1 in size for every z ≤ 0."""
    spacing = 1.0 / rate  # the anchors see the secants shrink by e^{-1}
    f = feed(FocaForecaster(1.0), [0.0, spacing, 2 * spacing], decaying(rate))
    z = -rate * h
    factor = (1 + z / 2) / (1 - z / 2)
    previous = f.values[-1][0] - STATE
    for step in range(1, 6):
        current = f.forecast(2 * spacing + step * h, same)[0] - STATE
        assert torch.allclose(current, factor * previous, rtol=1e-9, atol=1e-12)
        previous = current
    assert abs(factor) <= 1.0


def test_foca_bounds_the_rate_where_the_newest_secant_is_under_the_features_rounding():
    """r → 0⁺: the newest secant is under float32's resolution of the previous one, which is rounding, not a rate, so
    α stops at ln(eps)/((h₁ + h₂)/2) instead of following ln r."""
    f = FocaForecaster(1.0)
    for t, v in ((0.0, -1.0), (1.0, 0.0), (2.0, 1e-30)):
        f.update(t, torch.tensor([[v]], dtype=torch.float32))
    f.forecast(3.0, same)
    assert f.rate.item() == pytest.approx(math.log(torch.finfo(torch.float32).eps))


def test_foca_forecasts_half_precision_features_in_sigma_units_without_overflow():
    """Sigma gaps of 0.02 and a row that all but stops (its newest secant turns almost square to the previous one)
    make λα ≈ −350; the step's coefficients stay bounded, so a half-precision feature of size 1000 forecasts finite,
    next to its anchor, where g's constant ġ_c − λα·F_c alone is past float16's range."""
    values = {0.0: [1000.0, 0.0, 0.0], 0.02: [1000.0, 8.0, 8.0], 0.04: [1000.0, 8.25, 7.7578125]}
    f = FocaForecaster(1.0)
    for t, v in values.items():
        f.update(t, torch.tensor([v], dtype=torch.float16))
    for t in (0.06, 0.08, 0.1):
        out = f.forecast(t, same)
        assert torch.isfinite(out).all() and torch.allclose(out.float(), f.values[-1].float(), atol=0.05)
    assert f.rate.item() < -300


def test_foca_is_taylor2_at_the_anchor_gap_on_even_anchors_where_rows_do_not_relax_and_differs_elsewhere():
    """The coincidence docs/methods.md states: with λ = 0, or on a row that is not relaxing, the field is the BDF2
    slope 1.5·s₁ − 0.5·s₂, and one step of the anchor gap d is Taylor-2's F + d·s₁ + d²/2·(s₁ − s₂)/d. Any other
    horizon, or uneven anchors, and relaxing rows tell them apart."""
    speeding = lambda t: [1.0 + t * t, 2.0 - 0.5 * t**3]  # noqa: E731  secants grow: not relaxing
    for relaxation, fn in ((0.0, exponentials), (1.0, speeding)):
        taylor = feed(TaylorForecaster(2), [0.0, 2.0, 4.0], fn)
        assert torch.allclose(feed(FocaForecaster(relaxation), [0.0, 2.0, 4.0], fn).forecast(6.0, same),
                              taylor.forecast(6.0, same), rtol=1e-12)
        assert not torch.allclose(feed(FocaForecaster(relaxation), [0.0, 2.0, 4.0], fn).forecast(5.0, same),
                                  taylor.forecast(5.0, same), rtol=1e-3)
        assert not torch.allclose(feed(FocaForecaster(relaxation), [0.0, 1.0, 4.0], fn).forecast(7.0, same),
                                  feed(TaylorForecaster(2), [0.0, 1.0, 4.0], fn).forecast(7.0, same), rtol=1e-3)
    assert not torch.allclose(feed(FocaForecaster(1.0), [0.0, 2.0, 4.0], exponentials).forecast(6.0, same),
                              feed(TaylorForecaster(2), [0.0, 2.0, 4.0], exponentials).forecast(6.0, same), rtol=1e-3)


def test_spectrum_is_the_ridge_regression_on_chebyshev_polynomials_over_its_window():
    span = (0.0, 24.0)
    times = [float(t) for t in range(0, 36, 3)]  # 12 anchors: the window keeps the newest 10
    values = torch.randn(len(times), 1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = SpectrumForecaster(span, keep=WINDOW)
    for t, v in zip(times, values):
        f.update(t, v)
    taus = lambda ts: torch.tensor(ts, dtype=torch.float64) / 12.0 - 1.0  # noqa: E731
    x = chebyshev(taus(times[-WINDOW:]), DEGREE)
    coef = torch.linalg.solve(x.T @ x + RIDGE * torch.eye(DEGREE + 1, dtype=torch.float64),
                              x.T @ values[-WINDOW:, 0])
    expected = chebyshev(taus([34.0]), DEGREE) @ coef
    assert torch.allclose(f.forecast(34.0, same), expected, atol=1e-12)
    assert len(f.values) == WINDOW and f.flops(34.0) == 2.0 * WINDOW


def test_spectrum_with_one_anchor_reuses_it():
    f = feed(SpectrumForecaster((0.0, 10.0)), [0.0], lambda t: [3.0, 4.0])
    assert at_vector(f, 2.0) == [3.0, 4.0]


def at_vector(f, t):
    return f.forecast(t, same).flatten().tolist()


def linear_system(t: float) -> list[float]:
    """Two decaying, rotating modes: the exact solution class of a linear system, which DMD identifies."""
    return [math.exp(-0.1 * t) * math.cos(0.4 * t), math.exp(-0.1 * t) * math.sin(0.4 * t),
            0.5 * math.exp(-0.25 * t), 0.3 * math.exp(-0.1 * t) * math.cos(0.4 * t) + math.exp(-0.25 * t)]


def test_dmd_identifies_a_linear_system_from_four_uniform_snapshots_and_forecasts_it_at_any_horizon():
    f = feed(DmdForecaster(), [0.0, 2.0, 4.0, 6.0, 8.0], linear_system)
    for t in (9.0, 11.0, 13.5, 20.0):
        assert at_vector(f, t) == pytest.approx(linear_system(t), abs=1e-6)


def test_dmd_is_taylor_order_one_before_four_uniform_snapshots():
    f = feed(DmdForecaster(), [0.0, 1.0, 3.0, 5.0], linear_system)  # uneven: only the newest three are uniform
    newest, previous = linear_system(5.0), linear_system(3.0)
    assert at_vector(f, 6.0) == pytest.approx([n + (n - p) / 2 for n, p in zip(newest, previous)])
