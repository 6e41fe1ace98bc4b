"""Caching engine: policies, forecasters, per-run state, block sites. Pure torch; never imports comfy."""

from .clock import StepClock
from .foca import FocaForecaster
from .forecast import Forecaster
from .memory import CacheMemory
from .policy import CachePolicy, PolicyError
from .reuse import ReuseForecaster
from .sites import gated_block, residual_block
from .state import ModelCall, RunState
from .stats import RunStats
from .taylor import TaylorForecaster

__all__ = [
    "CacheMemory",
    "CachePolicy",
    "FocaForecaster",
    "Forecaster",
    "ModelCall",
    "PolicyError",
    "ReuseForecaster",
    "RunState",
    "RunStats",
    "StepClock",
    "TaylorForecaster",
    "gated_block",
    "residual_block",
]
