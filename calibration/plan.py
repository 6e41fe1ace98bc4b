"""An explicit compute plan: for every step and block, whether the block is computed or filled in.

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
    """`rows[b][s]` is "1" where block b is computed at step s of the schedule `sigmas`, "0" where it is filled in."""

    sigmas: tuple[float, ...]
    rows: tuple[str, ...]

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

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def blocks(self) -> int:
        return len(self.rows)

    def fraction(self) -> float:
        """Computed (step, block) evaluations over all of them (blocks weighted equally)."""
        return sum(r.count("1") for r in self.rows) / (self.steps * self.blocks)

    def digest(self) -> str:
        text = ";".join(self.rows) + "|" + ",".join(f"{s:.6g}" for s in self.sigmas)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def computed(self, sigmas: Sequence[float]) -> list[tuple[bool, ...]]:
        """Per step of a run on `sigmas`, per block: computed. The fitted schedule maps to itself exactly."""
        clock = StepClock(self.sigmas)
        out = []
        for s, sigma in enumerate(list(sigmas)[:-1]):
            fitted = min(int(clock.position(float(sigma)) + 1e-6), self.steps - 1)
            out.append(tuple(row[fitted] == "1" for row in self.rows))
        return out

    def picture(self, width: int = 80) -> str:
        """Blocks down, steps across: '#' computed, '.' filled in (long schedules are sampled to `width` columns)."""
        cols = range(self.steps) if self.steps <= width else [round(i * (self.steps - 1) / (width - 1))
                                                                 for i in range(width)]
        return "\n".join(f"{b:>3} " + "".join("#" if row[s] == "1" else "." for s in cols)
                         for b, row in enumerate(self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {"sigmas": list(self.sigmas), "rows": list(self.rows)}

    @classmethod
    def from_dict(cls, data: Any) -> "BlockPlan":
        if not isinstance(data, dict) or set(data) != {"sigmas", "rows"}:
            raise PolicyError("a plan must be an object with exactly 'sigmas' and 'rows'")
        sigmas, rows = data["sigmas"], data["rows"]
        if not isinstance(sigmas, (list, tuple)) or not isinstance(rows, (list, tuple)):
            raise PolicyError("a plan's sigmas and rows must be lists")
        if any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in sigmas):
            raise PolicyError("a plan's sigmas must be numbers")
        return cls(tuple(float(s) for s in sigmas), tuple(rows))
