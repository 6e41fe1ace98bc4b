"""How the processes that run one model together agree on what the cache decides.

Under sequence parallelism (Raylight's USP) every rank runs the same blocks on its shard of the tokens, and the blocks'
attention exchanges shards between ranks: a block skipped on one rank and computed on another leaves the ranks'
collectives unmatched, and the run hangs or returns noise. So every decision that depends on data is reduced across
the ranks at one point per round, through this object, and every rank then applies the same decision:

* `agree`: the MAX over the *decision group*, every rank whose forward shares collectives (the whole Raylight world:
  sequence, CFG and FSDP ranks alike). A change metric is reduced with MAX, a "must compute" flag with MAX (MIN of
  "skip"), and a digest of each rank's own view of the round with MAX of it and of its negative, so that ranks that
  diverged anyway fail together, loudly, instead of hanging in the model's next collective.
* `total`: the SUM over the *token group*, the ranks holding shards of the same sequence, for statistics over tokens
  (a mean change, a cosine between two trajectories' steps), so that they equal the single-process ones.
* `gather`: under CFG parallelism each rank of the *branch group* evaluates one branch (cond on one GPU, uncond on
  another) and keeps that branch's caches; a step whose output is forecast whole gathers the ranks' forecasts, as
  Raylight gathers their computed outputs.

Without `torch.distributed` initialised the run uses `Consensus`, which reduces nothing and runs no collective.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

DIGEST_SPAN = 2**31  # a digest is a CRC-32 folded into what a float64 holds exactly, with its negative beside it


class RankDivergence(RuntimeError):
    """The ranks of one model reached a decision point in different states: their next collective would not match."""


class Consensus:
    """One process: every reduction is the identity and no collective runs."""

    ranks = 1

    def __init__(self) -> None:
        self.collectives = 0  # reductions run, for the run report and the tests

    @property
    def shards_tokens(self) -> bool:
        """Whether statistics over tokens need a `total` (the tokens are sharded over more than one rank)."""
        return False

    @property
    def branch_part(self) -> tuple[int, int]:
        """(this rank's index, ranks) in the branch group: which share of a batch's branches this rank evaluates."""
        return 0, 1

    def agree(self, votes: Tensor) -> Tensor:
        return votes

    def total(self, values: Tensor) -> Tensor:
        return values

    def gather(self, part: Tensor) -> Tensor:
        """The branch group's parts, in rank order along the batch."""
        return part

    def same(self, what: str, text: str) -> None:
        """Refuse, on every rank, a value that differs between ranks (e.g. a prior file's hash)."""


class RankConsensus(Consensus):
    """The ranks of a `torch.distributed` process group. `group`: the decision group (None: the whole world).
    `tokens`: the token group, the sequence-parallel ranks (None: each rank holds whole sequences, as under CFG, FSDP
    or data parallelism alone). `branches`: the CFG-parallel ranks, each evaluating its share of a batch's branches
    (None: every rank evaluates every branch)."""

    def __init__(self, group=None, tokens=None, branches=None) -> None:
        super().__init__()
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.tokens = tokens
        self.ranks = dist.get_world_size(group)
        self._token_ranks = 1 if tokens is None else dist.get_world_size(tokens)
        self.branches = branches
        self._branch_part = (0, 1) if branches is None else (dist.get_rank(branches), dist.get_world_size(branches))
        backend = str(dist.get_backend(group)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    @property
    def shards_tokens(self) -> bool:
        return self._token_ranks > 1

    def agree(self, votes: Tensor) -> Tensor:
        return self._reduce(votes, self._dist.ReduceOp.MAX, self.group)

    def total(self, values: Tensor) -> Tensor:
        if self._token_ranks == 1:
            return values
        return self._reduce(values, self._dist.ReduceOp.SUM, self.tokens)

    @property
    def branch_part(self) -> tuple[int, int]:
        return self._branch_part

    def gather(self, part: Tensor) -> Tensor:
        if self._branch_part[1] == 1:
            return part
        self.collectives += 1
        parts = [torch.empty_like(part) for _ in range(self._branch_part[1])]
        self._dist.all_gather(parts, part.contiguous(), group=self.branches)
        return torch.cat(parts)

    def same(self, what: str, text: str) -> None:
        if diverged(self.agree(torch.tensor(witness(digest(text)), dtype=torch.float64))):
            raise RankDivergence(f"calibrated_cache: the ranks of this model hold different {what}: every GPU must "
                                 "read the same file (copy it to every machine, and compare `python -m "
                                 "calibrated_cache inspect FILE` on each)")

    def _reduce(self, values: Tensor, op, group) -> Tensor:
        self.collectives += 1
        moved = values.to(self.device, torch.float64)
        self._dist.all_reduce(moved, op=op, group=group)
        return moved.to(values.device, values.dtype)


def digest(*parts: object) -> float:
    """A number every rank computes alike from alike inputs (exact in float64, so a MAX compares it bit for bit)."""
    return float(zlib.crc32(repr(parts).encode()) % DIGEST_SPAN)


def witness(value: float) -> list[float]:
    """A digest as two votes, itself and its negative: after a MAX they are each other's negatives only where every
    rank voted the same digest."""
    return [value, -value]


def diverged(reduced: Tensor) -> bool:
    """Whether the last two of a reduced vote, a `witness`, show ranks that voted different digests."""
    return bool(reduced[-2] != -reduced[-1])


def current(group=None, tokens=None, branches=None) -> Consensus:
    """The consensus of this process: over `group` where `torch.distributed` is initialised, else none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return RankConsensus(group, tokens, branches)
    return Consensus()
