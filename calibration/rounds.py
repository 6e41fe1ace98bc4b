"""The one place where a run decides which blocks of each model call are computed and which are filled in.

A round's decision is made from inputs every rank of a multi-GPU model sees alike (the step, the policy, the plan),
and where it depends on data (the dynamic policy's probe, a memory cap's admissions, blocks whose caches a rank does
not hold), from votes reduced across the ranks once per model call, before any block that may be skipped runs
(`consensus.py`; under sequence parallelism the dynamic policy's token sums add one reduction before the vote). The
hot path reads the result: `Decision.computes[block]`.

Fixed and planned policies without a memory cap decide from the plan alone and run no collective. The dynamic policy
votes once per model call that may skip, after its probe blocks (which every round computes); a memory cap votes
once per model call of a skipping round. Setting `CALIBRATED_CACHE_CHECK_RANKS=1` makes every skipping call vote,
so ranks that diverged anyway (different policies, a bug) fail at once with one message instead of hanging.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor

from .clock import StepClock
from .consensus import Consensus, RankDivergence, digest, diverged, witness
from .policy import CachePolicy
from .schedule import StepPlan

CHECK_RANKS = "CALIBRATED_CACHE_CHECK_RANKS"  # environment: "1" checks the ranks' agreement at every skipping call


@dataclass
class Round:
    index: int
    sigma: float
    step: int
    time: float
    skip: bool | None  # None: the dynamic policy has not decided yet
    whole: bool = False  # the model's output is forecast whole (where a computed one is cached)
    seen: set[Hashable] = field(default_factory=set)


@dataclass
class Decision:
    """One model call's decision: per block, whether it is computed (True) or filled in."""

    computes: list[bool]


class RoundDecider:
    """Decides every round of one run; created and dropped with the run's `RunState`.

    `always`: blocks computed at every step (probe and last blocks, a plan's always-computed ones, blocks over the
    memory cap). `uncacheable`: blocks whose output is not input + residual. `release(block)` drops a block's caches
    when the ranks agree it no longer fits the cap.
    """

    def __init__(self, policy: CachePolicy, clock: StepClock, plan: StepPlan, blocks: int, consensus: Consensus,
                 capped: bool, release: Callable[[int], None]) -> None:
        self.policy = policy
        self.clock = clock
        self.plan = plan
        self.blocks = blocks
        self.consensus = consensus
        self.release = release
        self.always = set(range(policy.probe_blocks)) | set(range(blocks - policy.last_blocks, blocks))
        if plan.blocks is not None:  # blocks the plan computes at every step of this run
            self.always |= {b for b in range(blocks) if all(step[b] for step in plan.blocks)}
        self.uncacheable: set[int] = set()
        self.refused: set[int] = set()  # blocks this rank refused to cache since the last vote
        self.probe_refs: dict[Hashable, tuple[Tensor, ...]] = {}  # dynamic: each branch's probe residuals
        self.skips_in_row = 0
        self.rounds = 0
        distributed = consensus.ranks > 1
        self.votes = distributed and (capped or os.environ.get(CHECK_RANKS) == "1")  # fixed and plan modes
        self.identity = digest(policy.tag(), blocks, clock.steps)
        self.log: list[tuple] | None = None  # tests: every decision, (round, step, branch count, computed blocks)

    def open(self, sigma: float) -> Round:
        """A new round at σ: fixed and plan modes decide here whether it skips; the dynamic one after its probe."""
        step = self.clock.step(sigma)
        time = self.clock.position(sigma) if self.policy.time_unit == "step" else sigma
        if self.policy.mode != "dynamic":
            skip: bool | None = not self.plan.full[step]
        else:
            skip = None if self.plan.cacheable[step] else False
        if skip is False:
            self.skips_in_row = 0
        self.rounds += 1
        return Round(self.rounds - 1, sigma, step, time, skip, bool(skip) and self.plan.whole[step])

    def call(self, round_: Round, branches: Sequence[Hashable], ready: set[int]) -> Decision:
        """A model call's decision at its start, from the blocks its group holds values for (`ready`)."""
        if not round_.skip:  # every block computes (the dynamic policy decides after its probe)
            return self._decided(round_, branches, None)
        unready = self._voted(round_, branches, ready, 0.0)[0] if self.votes else self._unready(ready)
        return self._decided(round_, branches, unready)

    def probe(self, round_: Round, branches: Sequence[Hashable], parts: Sequence[tuple[Tensor, ...]],
              ready: set[int]) -> tuple[Round, Decision]:
        """Dynamic policy, after the probe blocks: whether the round skips. The round's first call decides for the
        round (at most `max_skips` in a row); a later call of a skipping round (cond and uncond in separate calls)
        computes if its own branches moved. Returns the call's round (a copy where it computes alone) and decision."""
        unready, change = self._voted(round_, branches, ready, self.change(parts, branches))
        steady = change < self.policy.threshold
        if round_.skip is None:
            round_.skip = self.skips_in_row < self.policy.max_skips and steady
            self.skips_in_row = self.skips_in_row + 1 if round_.skip else 0
        elif not steady:
            round_ = dataclasses.replace(round_, skip=False)
        if not round_.skip:
            self.refresh(branches, parts)
        return round_, self._decided(round_, branches, unready)

    def refresh(self, branches: Sequence[Hashable], parts: Sequence[tuple[Tensor, ...]]) -> None:
        """A computed round's probe residuals are what later rounds' changes are measured from."""
        for b, part in zip(branches, parts):
            self.probe_refs[b] = part

    def change(self, parts: Sequence[tuple[Tensor, ...]], branches: Sequence[Hashable]) -> Tensor:
        """How far the probe moved since the last computed round, as one scalar on the device: the largest mean
        relative L1 change of a probe residual over every image of every branch (cond and uncond) and every stream,
        so that one image, branch or small stream still changing is not averaged away by steady ones. Infinite when a
        branch has nothing to compare with (no reference yet, or streams of another shape). The sums run over all
        the tokens of the sequence, on however many ranks it is sharded."""
        moved, size = [], []
        for branch, residuals in zip(branches, parts):
            refs = self.probe_refs.get(branch)
            known = refs is not None and [r.shape for r in refs] == [r.shape for r in residuals]
            for i, r in enumerate(residuals):  # float32 sums: some devices (MPS) have no float64
                images = r.shape[0]
                if not known:  # the same shape as a known one's, so that every rank's sums can be added
                    moved.append(torch.full((images,), float("inf"), device=r.device))
                    size.append(torch.ones(images, device=r.device))
                    continue
                moved.append((r - refs[i]).abs().reshape(images, -1).sum(1, dtype=torch.float32))
                size.append(refs[i].abs().reshape(images, -1).sum(1, dtype=torch.float32))
        sums = torch.stack([torch.cat(moved), torch.cat(size)])
        if self.consensus.shards_tokens:  # run on every rank alike, a rank without references included
            sums = self.consensus.total(sums)
        return (sums[0] / sums[1].clamp_min(1e-30)).max()

    def refuse(self, block: int) -> None:
        """A block whose caches do not fit the memory cap is computed every step from now on (on every rank, once the
        ranks have voted: the caller released this rank's caches of it)."""
        self.always.add(block)
        if self.consensus.ranks > 1:
            self.refused.add(block)

    def _unready(self, ready: set[int]) -> list[bool]:
        """Per block, whether this rank cannot fill it in: computed every step, not cacheable, or no value held."""
        return [b in self.always or b in self.uncacheable or b not in ready for b in range(self.blocks)]

    def _voted(self, round_: Round, branches: Sequence[Hashable], ready: set[int], change: float | Tensor
               ) -> tuple[list[bool], float]:
        """This call's data-dependent inputs, reduced across the ranks (one MAX all-reduce): per block whether some
        rank cannot fill it in, and the largest change."""
        n = self.blocks
        unready = self._unready(ready)
        if self.consensus.ranks == 1:
            return unready, float(change)
        state = digest(self.identity, round_.index, round_.step, round_.skip, len(branches))
        votes = torch.tensor([float(change), *map(float, unready), *(float(b in self.refused) for b in range(n)),
                              *witness(state)], dtype=torch.float64)
        agreed = self.consensus.agree(votes)
        if diverged(agreed):
            raise RankDivergence(
                f"calibrated_cache: the GPUs running this model reached round {round_.index} (step {round_.step}) in "
                "different states (another policy, plan or schedule on some GPU): every GPU must run the same "
                "Apply Calibrated Cache settings. Stopped here rather than hang in the model's next collective.")
        for b in range(n):
            if agreed[1 + n + b] and b not in self.refused:
                self.always.add(b)
                self.release(b)
        self.refused.clear()
        return [bool(v) for v in agreed[1:1 + n].tolist()], float(agreed[0])

    def _decided(self, round_: Round, branches: Sequence[Hashable], unready: list[bool] | None) -> Decision:
        """Compute every block the round does not skip, and those that cannot be filled in (`unready`, read only
        where the round skips)."""
        if not round_.skip:
            computes = [True] * self.blocks
        elif self.plan.blocks is None:
            computes = list(unready)
        else:
            row = self.plan.blocks[round_.step]
            computes = [row[b] or unready[b] for b in range(self.blocks)]
        if self.log is not None:
            self.log.append((round_.index, round_.step, len(branches), tuple(b for b, c in enumerate(computes) if c)))
        return Decision(computes)
