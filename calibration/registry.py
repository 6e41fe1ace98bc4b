"""Builds the forecaster a policy names; one entry per method file."""

from __future__ import annotations

from typing import Callable

from .dmd import DmdForecaster
from .foca import FocaForecaster
from .forecast import Forecaster
from .policy import FORECASTERS, CachePolicy
from .reuse import ReuseForecaster
from .spectrum import SpectrumForecaster
from .taylor import TaylorForecaster

# (policy, anchors to keep, the run's span in the policy's time unit) -> a forecaster for one site and branch group
BUILDERS: dict[str, Callable[[CachePolicy, int, tuple[float, float]], Forecaster]] = {
    "reuse": lambda policy, keep, span: ReuseForecaster(keep),
    "taylor": lambda policy, keep, span: TaylorForecaster(policy.order, keep),
    "foca": lambda policy, keep, span: FocaForecaster(policy.foca_lambda, keep),
    "spectrum": lambda policy, keep, span: SpectrumForecaster(span, keep),
    "dmd": lambda policy, keep, span: DmdForecaster(keep),
}
assert tuple(BUILDERS) == FORECASTERS
HISTORY = {"reuse": ReuseForecaster.history, "foca": FocaForecaster.history, "spectrum": SpectrumForecaster.history,
           "dmd": DmdForecaster.history}


def history(policy: CachePolicy) -> int:
    """How many computed values per site the policy's forecaster keeps."""
    return policy.order + 1 if policy.forecaster == "taylor" else HISTORY[policy.forecaster]


def make_forecaster(policy: CachePolicy, keep: int = 1, span: tuple[float, float] = (0.0, 1.0)) -> Forecaster:
    return BUILDERS[policy.forecaster](policy, keep, span)
