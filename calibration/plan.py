"""An explicit compute plan: for every step and block, whether the block is computed or filled in, and for every step
whether the model is called at all (a step that is not forecasts the model's output whole, as granularity step does).

A plan is searched for one σ schedule (`calibration/search.py`) and carries that schedule, so it maps to another step
count or scheduler through σ as TCC priors do: a step of the run takes the decisions of the fitted step whose interval
[σ_i, σ_i+1) holds its σ. Each block keeps about its share of computed steps (exactly, at a multiple of the fitted
step count), and the first step is always computed, since a skip needs an anchor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

from .clock import StepClock
from .errors import PolicyError

MAX_BLOCKS = 4096
MAX_STEPS = 10000


@dataclass(frozen=True)
class BlockPlan:
    """`rows[b][s]` is "1" where block b is computed at step s of the schedule `sigmas`, "0" where it is filled in.
    `calls[s]` (empty: every step) is "0" where the model is not called at step s and its output is forecast whole
    from the steps that computed every block; no block is computed there."""

    sigmas: tuple[float, ...]
    rows: tuple[str, ...]
    calls: str = ""

    def __post_init__(self) -> None:
        steps = len(self.sigmas) - 1
        if not 1 <= steps <= MAX_STEPS or not all(isinstance(s, (int, float)) and s >= 0 for s in self.sigmas) or \
                any(b > a for a, b in zip(self.sigmas, self.sigmas[1:])):
            raise PolicyError(f"a plan's sigmas must be 2 to {MAX_STEPS + 1} non-negative, non-increasing numbers")
        if not 1 <= len(self.rows) <= MAX_BLOCKS:
            raise PolicyError(f"a plan needs 1 to {MAX_BLOCKS} block rows (got {len(self.rows)})")
        for b, row in enumerate(self.rows):
            if not isinstance(row, str) or len(row) != steps or set(row) - {"0", "1"}:
                raise PolicyError(f"plan row {b} must be {steps} characters of 0 and 1, one per step")
            if row[0] != "1":
                raise PolicyError(f"plan row {b} skips the first step, which has nothing to reuse: refit the plan")
        if self.calls:
            if not isinstance(self.calls, str) or len(self.calls) != steps or set(self.calls) - {"0", "1"} or \
                    self.calls[0] != "1":
                raise PolicyError(f"a plan's calls must be {steps} characters of 0 and 1 starting with 1, one per step")
            if any(c == "0" and row[s] == "1" for s, c in enumerate(self.calls) for row in self.rows):
                raise PolicyError("a plan computes a block at a step whose model call it forecasts whole: refit the "
                                  "plan")
            if "0" not in self.calls:  # every step called: the same plan as no calls at all
                object.__setattr__(self, "calls", "")

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def blocks(self) -> int:
        return len(self.rows)

    @property
    def whole_steps(self) -> int:
        """Steps whose model call is forecast whole."""
        return self.calls.count("0")

    def fraction(self) -> float:
        """Computed (step, block) evaluations over all of them (blocks weighted equally)."""
        return sum(r.count("1") for r in self.rows) / (self.steps * self.blocks)

    def digest(self) -> str:
        text = ";".join(self.rows) + "|" + ",".join(f"{s:.6g}" for s in self.sigmas) + (f"|{self.calls}" if
                                                                                          self.whole_steps else "")
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def computed(self, sigmas: Sequence[float]) -> list[tuple[bool, ...]]:
        """Per step of a run on `sigmas`, per block: computed. The fitted schedule maps to itself exactly."""
        return [tuple(row[s] == "1" for row in self.rows) for s in self._fitted(sigmas)]

    def whole(self, sigmas: Sequence[float]) -> list[bool]:
        """Per step of a run on `sigmas`: whether its model call is forecast whole."""
        return [self.whole_steps > 0 and self.calls[s] == "0" for s in self._fitted(sigmas)]

    def _fitted(self, sigmas: Sequence[float]) -> list[int]:
        """The fitted step whose interval [σ_i, σ_i+1) holds each step of a run on `sigmas`."""
        clock = StepClock(self.sigmas)
        return [min(int(clock.position(float(sigma)) + 1e-6), self.steps - 1) for sigma in list(sigmas)[:-1]]

    def picture(self, width: int = 80) -> str:
        """Blocks down, steps across: '#' computed, '.' filled in, '-' the model call forecast whole (long schedules
        are sampled to `width` columns)."""
        cols = range(self.steps) if self.steps <= width else [round(i * (self.steps - 1) / (width - 1))
                                                                 for i in range(width)]
        whole = self.calls if self.whole_steps else "1" * self.steps
        return "\n".join(f"{b:>3} " + "".join("-" if whole[s] == "0" else "#" if row[s] == "1" else "." for s in cols)
                         for b, row in enumerate(self.rows))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sigmas": list(self.sigmas), "rows": list(self.rows)}
        if self.whole_steps:
            out["calls"] = self.calls
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "BlockPlan":
        if not isinstance(data, dict) or not {"sigmas", "rows"} <= set(data) <= {"sigmas", "rows", "calls"}:
            raise PolicyError("a plan must be an object with 'sigmas', 'rows' and optionally 'calls'")
        sigmas, rows, calls = data["sigmas"], data["rows"], data.get("calls", "")
        if not isinstance(sigmas, (list, tuple)) or not isinstance(rows, (list, tuple)):
            raise PolicyError("a plan's sigmas and rows must be lists")
        if any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in sigmas):
            raise PolicyError("a plan's sigmas must be numbers")
        if not isinstance(calls, str):
            raise PolicyError("a plan's calls must be a string of 0 and 1")
        return cls(tuple(float(s) for s in sigmas), tuple(rows), calls)
