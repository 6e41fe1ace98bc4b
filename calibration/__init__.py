"""Caching engine: policies, forecasters, per-run state, block calls. Pure torch; never imports comfy."""

from .call import ModelCall
from .clock import StepClock
from .dmd import DmdForecaster
from .foca import FocaForecaster
from .forecast import Forecaster, WeightedForecaster
from .memory import CacheMemory
from .policy import CachePolicy, PolicyError
from .reuse import ReuseForecaster
from .spectrum import SpectrumForecaster
from .state import RunState
from .stats import RunStats
from .taylor import TaylorForecaster

__all__ = [
    "CacheMemory",
    "CachePolicy",
    "DmdForecaster",
    "FocaForecaster",
    "Forecaster",
    "ModelCall",
    "PolicyError",
    "ReuseForecaster",
    "RunState",
    "RunStats",
    "SpectrumForecaster",
    "StepClock",
    "TaylorForecaster",
    "WeightedForecaster",
]
