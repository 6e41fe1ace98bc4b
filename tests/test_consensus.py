"""The ranks of one model agree on every data-dependent decision (calibration/rounds.py, consensus.py): two processes
joined by gloo play the engine's rounds (tests/rank_worker.py); the model-level proof, with Raylight's sequence- and
CFG-parallel forwards in real ComfyUI, is tests/comfyui/test_multi_gpu.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch

from calibrated_cache.calibration import CacheMemory, CachePolicy, RunState
from calibrated_cache.calibration.consensus import Consensus
from calibrated_cache.testbed.sampling import flow_sigmas

WORKER = Path(__file__).with_name("rank_worker.py")


def two_ranks(tmp_path: Path, scenario: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), port, str(tmp_path), scenario]) for r in (0, 1)]
    try:
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            p.kill()
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_a_block_over_the_cap_on_one_rank_is_computed_on_every_rank(tmp_path):
    """Rank 1 holds more tokens, so only its block 2 passes the memory cap; after the next vote both ranks compute
    block 2 at every step, and every decision is the same on both."""
    first, second = two_ranks(tmp_path, "cap")
    assert first["decisions"] == second["decisions"]
    assert first["computed"] == second["computed"]
    assert (first["over_limit"], second["over_limit"]) == (0, 1)
    assert all(2 in ran for ran in first["computed"]) and any(0 not in ran for ran in first["computed"])
    assert first["collectives"] == second["collectives"] > 0


def test_ranks_reading_different_prior_files_are_refused_on_every_rank(tmp_path):
    for result in two_ranks(tmp_path, "prior"):
        assert result["error"].startswith("RankDivergence: calibrated_cache: the ranks of this model hold different "
                                          "prior files")


def test_ranks_with_different_policies_stop_together_at_the_first_vote(tmp_path):
    for result in two_ranks(tmp_path, "policy"):
        assert result["error"].startswith("RankDivergence: calibrated_cache: the GPUs running this model reached round")


def test_one_process_has_a_consensus_that_reduces_nothing_and_never_votes():
    run = RunState(CachePolicy(granularity="block"), flow_sigmas(4).tolist(), 2, memory=CacheMemory(False, 1024))
    assert type(run.consensus) is Consensus and run.consensus.ranks == 1 and not run.decider.votes
    assert run.consensus.agree(torch.ones(3)).tolist() == [1.0, 1.0, 1.0] and run.consensus.collectives == 0
