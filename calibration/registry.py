"""Builds the forecaster a policy names; one entry per method file."""

from __future__ import annotations

from typing import Callable

from .foca import FocaForecaster
from .forecast import Forecaster
from .policy import FORECASTERS, CachePolicy
from .reuse import ReuseForecaster
from .taylor import TaylorForecaster

BUILDERS: dict[str, Callable[[CachePolicy], Forecaster]] = {
    "reuse": lambda policy: ReuseForecaster(),
    "taylor": lambda policy: TaylorForecaster(policy.order),
    "foca": lambda policy: FocaForecaster(policy.foca_lambda),
}
assert tuple(BUILDERS) == FORECASTERS


def make_forecaster(policy: CachePolicy) -> Forecaster:
    return BUILDERS[policy.forecaster](policy)
