"""Counts of one run: what was computed, what was skipped, what it cost and what the caches held."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunStats:
    """Evaluations count one block (or site) for one branch in one model call; FLOPs count per sample."""

    model_calls: int = 0
    rounds: int = 0
    steps: set[int] = field(default_factory=set)
    blocks_computed: int = 0
    blocks_skipped: int = 0
    sites_computed: int = 0
    sites_skipped: int = 0
    flops_computed: float = 0.0
    flops_full: float = 0.0
    # for the wall-clock cost model (`step_costs.py`), every sample of every call: blocks computed, blocks filled in
    flops_blocks: float = 0.0
    flops_filled: float = 0.0
    evaluations: int = 0  # samples the model was called on (a batched cond/uncond call of 2 images counts 4)
    calls_skipped: int = 0  # whole model calls forecast (granularity step, a plan's whole steps)
    cache_bytes: int = 0
    peak_cache_bytes: int = 0
    cache_offloaded: bool = False  # the caches lived in CPU memory
    cache_limit_bytes: int | None = None
    blocks_over_limit: int = 0  # blocks computed every step because caching them would pass the limit
    regroupings: int = 0  # model calls whose branches ComfyUI had batched differently before (their caches restart)
    block_flops: dict[int, float] = field(default_factory=dict)  # per sample: each block computed in full
    skipped_flops: dict[int, float] = field(default_factory=dict)  # per sample: each block filled in (last seen)
    outside_flops: float = 0.0  # per sample and model call, the work outside the blocks (embedders, final layer)

    @property
    def compute_fraction(self) -> float:
        """Block FLOPs spent (forecast arithmetic included) relative to computing every block."""
        return self.flops_computed / self.flops_full if self.flops_full else 1.0

    @property
    def estimated_speedup(self) -> float:
        return 1.0 / self.compute_fraction if self.compute_fraction else float("inf")

    def add_cache_bytes(self, delta: int) -> None:
        self.cache_bytes += delta
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)

    def summary(self) -> str:
        total = self.blocks_computed + self.blocks_skipped
        return (
            f"computed {self.blocks_computed} of {total} block evaluations over {len(self.steps)} steps "
            f"({self.model_calls} model calls), compute fraction {self.compute_fraction:.3f}, "
            f"estimated speedup {self.estimated_speedup:.2f}x, peak cache {self.peak_cache_bytes / 2**20:.1f} MiB"
            + (" (offloaded to CPU)" if self.cache_offloaded else "")
            + (f", {self.blocks_over_limit} blocks over the cache limit" if self.blocks_over_limit else "")
            + (f", caches restarted {self.regroupings}x as ComfyUI regrouped cond/uncond" if self.regroupings else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_calls": self.model_calls,
            "rounds": self.rounds,
            "steps": len(self.steps),
            "blocks_computed": self.blocks_computed,
            "blocks_skipped": self.blocks_skipped,
            "calls_skipped": self.calls_skipped,
            "sites_computed": self.sites_computed,
            "sites_skipped": self.sites_skipped,
            "compute_fraction": self.compute_fraction,
            "estimated_speedup": self.estimated_speedup,
            "peak_cache_bytes": self.peak_cache_bytes,
            "cache_offloaded": self.cache_offloaded,
            "cache_limit_bytes": self.cache_limit_bytes,
            "blocks_over_limit": self.blocks_over_limit,
            "regroupings": self.regroupings,
        }
