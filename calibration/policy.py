"""What a cache run computes and how it fills in what it skips: one validated, immutable config with a tag."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import PolicyError
from .goc import GocSettings
from .icc import IccSettings
from .plan import BlockPlan

SET_MODES = ("fixed", "dynamic")  # what a user sets; "plan" comes from a fit with a target speedup
MODES = (*SET_MODES, "plan")
FORECASTERS = ("reuse", "taylor", "foca", "spectrum", "dmd")
TIME_UNITS = ("step", "sigma")
GRANULARITIES = ("module", "block", "step")


@dataclass(frozen=True)
class CachePolicy:
    """Which block evaluations are computed, and how skipped sites are produced.

    mode "fixed" computes every `interval`-th step (FORA's schedule); mode "dynamic" computes the probe blocks
    (the first `max(1, first_blocks)`) every step and skips the rest while the probe's residual changes by less than
    `threshold` relative to the last computed step, at most `max_skips` steps in a row (First-Block-Cache/DBCache).
    Steps before `warmup_steps` and outside the window [start, end) (fractions of the run's steps) are computed.
    The first `first_blocks` and last `last_blocks` blocks are always computed. Mode "plan" computes what its
    searched `plan` says, step by step and block by block (`calibration/plan.py`); the schedule settings above do not
    apply to it.

    `granularity` is what a skipped evaluation fills in: each adaLN block's pre-gate sites ("module", engine models
    that expose them), each block's residual ("block"), or on a step that skips every block the model's output
    itself ("step": the embedders, the final layer and the calls into the blocks are skipped too). A plan may mix
    the two: at its `calls` "0" steps the model's output is forecast whole, elsewhere skipped blocks are filled in.
    """

    mode: str = "fixed"
    interval: int = 3
    warmup_steps: int = 1
    start: float = 0.0
    end: float = 1.0
    first_blocks: int = 0
    last_blocks: int = 0
    threshold: float = 0.1
    max_skips: int = 3
    forecaster: str = "reuse"
    order: int = 1
    time_unit: str = "step"
    foca_lambda: float = 1.0
    granularity: str = "module"
    goc: GocSettings | None = None
    icc: IccSettings | None = None
    plan: BlockPlan | None = None

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("forecaster", self.forecaster, FORECASTERS)
        _choice("time_unit", self.time_unit, TIME_UNITS)
        _choice("granularity", self.granularity, GRANULARITIES)
        _integer("interval", self.interval, 1, "N = 1 computes every step; N = 3 computes one step in three")
        _integer("warmup_steps", self.warmup_steps, 0, "0 lets caching start at the first step")
        _integer("first_blocks", self.first_blocks, 0, "0 lets every block be skipped")
        _integer("last_blocks", self.last_blocks, 0, "0 lets every block be skipped")
        _integer("max_skips", self.max_skips, 1, "it caps how many steps in a row the dynamic policy may skip")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 1 <= self.order <= 3:
            raise PolicyError(f"Taylor order must be 1, 2 or 3 (got {self.order!r}); higher orders amplify noise")
        for name in ("start", "end", "threshold", "foca_lambda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PolicyError(f"{name} must be a number (got {value!r})")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise PolicyError(
                f"the caching window must satisfy 0 <= start < end <= 1 (got start={self.start}, end={self.end}): "
                "both are fractions of the sampling steps, e.g. start=0.1, end=0.9"
            )
        if not self.threshold > 0:
            raise PolicyError(f"threshold must be > 0 (got {self.threshold}); typical values are 0.05-0.2")
        if not 0.0 <= self.foca_lambda <= 1.0:
            raise PolicyError(f"foca_lambda must be in [0, 1] (got {self.foca_lambda}); 1 = the relaxation the anchors "
                              "show, 0 = none (first order with the BDF2 slope)")
        if self.goc is not None and not isinstance(self.goc, GocSettings):
            raise PolicyError(f"goc must be GOC settings or None (got {self.goc!r})")
        if self.goc is not None and self.forecaster != "reuse":
            raise PolicyError(f"GOC corrects reused features (FORA), not a {self.forecaster} forecast, which already "
                              "follows the trend: set the Cache Policy forecaster to reuse, or drop the GOC Corrector")
        if self.icc is not None and not isinstance(self.icc, IccSettings):
            raise PolicyError(f"icc must be ICC settings or None (got {self.icc!r})")
        if (self.mode == "plan") != (self.plan is not None):
            raise PolicyError("mode plan needs a searched plan (Fit TCC Priors with a target speedup writes one), and "
                              "a plan needs mode plan")
        if self.plan is not None and not isinstance(self.plan, BlockPlan):
            raise PolicyError(f"plan must be a searched BlockPlan or None (got {self.plan!r})")
        if self.plan is not None and self.time_unit != "step":
            raise PolicyError("a searched plan forecasts in steps, as it was searched: set time_unit to step")
        if self.granularity == "step" and (self.mode == "dynamic" or self.first_blocks or self.last_blocks):
            raise PolicyError("whole-step forecasting skips every block of a step, so it needs a fixed interval (or a "
                              "plan) and no first_blocks or last_blocks (the dynamic mode decides from its first "
                              "block): set those to 0 and the mode to fixed, or forecast block by block")
        if self.granularity == "step" and self.plan is not None and len(set(self.plan.rows)) > 1:
            raise PolicyError("whole-step forecasting computes all blocks of a step or none, so its plan must compute "
                              "every block at the same steps: forecast block by block for this plan")
        if self.granularity == "step" and self.plan is not None and self.plan.whole_steps:
            raise PolicyError("a plan that forecasts some model calls whole and fills in blocks at others runs block "
                              "by block: set the granularity to block")
        if self.icc is not None and (self.granularity == "step" or (self.plan is not None and self.plan.whole_steps)):
            raise PolicyError("ICC recomputes skipped blocks from their Linears' increments, and whole-step "
                              "forecasting runs no block on a skipped step: forecast block by block (a plan without "
                              "whole steps), or set the ICC rank to 0")
        if self.icc is not None and (self.forecaster != "reuse" or self.goc is not None):
            raise PolicyError("ICC recomputes skipped blocks from their Linears' increments, so there is no reused or "
                              "forecast value to correct: use it with a reuse (FORA) policy and no GOC Corrector, or "
                              "set the ICC rank to 0")

    @property
    def probe_blocks(self) -> int:
        """Blocks computed every step in dynamic mode; their residual decides whether the rest is skipped."""
        return max(1, self.first_blocks) if self.mode == "dynamic" else self.first_blocks

    def computes_everything(self) -> bool:
        if self.plan is not None:
            return "0" not in "".join(self.plan.rows)
        return self.mode == "fixed" and self.interval == 1

    def tag(self) -> str:
        """A compact identity for logs, file names and prior metadata, e.g. `FORA_N3_W1` or `TAYLOR2_N4_W1_sigma`."""
        if self.plan is not None:
            parts = [f"PLAN{round(100 * self.plan.fraction())}-{self.plan.digest()}"]
            if self.plan.whole_steps:
                parts.append(f"WS{self.plan.whole_steps}")
        elif self.mode == "fixed":
            parts = [f"N{self.interval}"]
        else:
            parts = [f"DYN{self.threshold:g}", f"K{self.max_skips}"]
        if self.plan is None:
            parts.append(f"W{self.warmup_steps}")
        if self.plan is None and (self.start, self.end) != (0.0, 1.0):
            parts.append(f"S{self.start:g}-{self.end:g}")
        if self.plan is None and (self.first_blocks or self.last_blocks):
            parts.append(f"F{self.first_blocks}B{self.last_blocks}")
        if self.granularity != "module":
            parts.append({"block": "G2", "step": "G1"}[self.granularity])
        head = {"reuse": "FORA", "taylor": f"TAYLOR{self.order}", "foca": f"FOCAI{self.foca_lambda:g}",
                "spectrum": "SPECTRUM", "dmd": "DMD"}[self.forecaster]
        if self.forecaster != "reuse" and self.time_unit == "sigma":
            parts.append("sigma")
        if self.goc is not None:
            parts.append(self.goc.tag())
        if self.icc is not None:
            parts.append(self.icc.tag())
        return "_".join([head, *parts])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CachePolicy":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError(f"unknown policy settings {unknown}; known settings are {sorted(known)}")
        goc, icc, plan = data.get("goc"), data.get("icc"), data.get("plan")
        if plan is not None and not isinstance(plan, BlockPlan):
            data = {**data, "plan": BlockPlan.from_dict(plan)}
        if isinstance(goc, dict):
            data = {**data, "goc": _settings(GocSettings, "GOC", {**goc, "steps": tuple(goc.get("steps") or ())})}
        if isinstance(icc, dict):
            data = {**data, "icc": _settings(IccSettings, "ICC", icc)}
        return cls(**data)


def _settings(kind: type, name: str, data: dict[str, Any]) -> Any:
    """A method's settings from JSON, refusing names this version does not know."""
    known = [f.name for f in fields(kind)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise PolicyError(f"unknown {name} settings {unknown}; known settings are {', '.join(known)}")
    return kind(**data)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PolicyError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")


def _integer(name: str, value: object, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(f"{name} must be an integer >= {minimum} (got {value!r}): {hint}")
