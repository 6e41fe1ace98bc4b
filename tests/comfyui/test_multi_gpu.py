"""Two GPUs of a Raylight run, simulated by two CPU processes joined by gloo (usp_ranks.py says what is Raylight's own
code and what follows it), under sequence parallelism (each rank holds half the tokens) and CFG parallelism (each rank
evaluates one branch): every policy takes identical decisions on both ranks though their inputs differ, the output
equals the single-process run, and ranks that diverge fail at once instead of hanging."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raylight_source import raylight_env

HERE = Path(__file__).resolve().parent
CASES = ("interval1", "fixed", "plan", "step", "dynamic", "goc", "icc", "cap")
TOLERANCE = 1e-5  # relative L2: the two ranks' attention sums its keys in another order than one process does
RUN_SECONDS = 300  # a run that takes longer hangs: the test fails rather than wait


def _flux_usp_supported() -> bool:
    """Raylight's Flux USP forward reads `txt_norm`, which ComfyUI's Flux class gained after 0.3.64."""
    import comfy.ldm.flux.model

    return "txt_norm" in comfy.ldm.flux.model.Flux.__init__.__code__.co_names


RUNS = [("usp", "Wan"), ("cfg", "Wan"), ("cfg", "Flux")] + ([("usp", "Flux")] if _flux_usp_supported() else [])


def run_ranks(tmp: Path, family: str, cases: tuple[str, ...], *flags: str) -> tuple[list[dict], float]:
    """Both ranks' results and the seconds until both processes ended."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **raylight_env(), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(HERE / "usp_ranks.py"), "--rank", str(r), "--port", str(port),
                               "--out", str(tmp), "--family", family, "--cases", *cases, *flags], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=RUN_SECONDS)[0].decode(errors="replace"))
    finally:
        for p in procs:
            p.kill()
    seconds = time.monotonic() - start
    results = []
    for r, log in enumerate(logs):
        file = tmp / f"rank{r}.pt"
        results.append(torch.load(file, weights_only=False) if file.is_file() else {"error": f"no result: {log[-3000:]}"})
    return results, seconds


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module", params=RUNS, ids=["-".join(run) for run in RUNS])
def ranks(request, tmp_path_factory) -> list[dict]:
    parallel, family = request.param
    results, _ = run_ranks(tmp_path_factory.mktemp(parallel), family, CASES, "--parallel", parallel)
    for r, result in enumerate(results):
        assert "error" not in result, f"rank {r}: {result.get('traceback', result['error'])}"
    return results


def blocks_decided(log: list[tuple]) -> list[tuple]:
    """Per decision (round, step, computed blocks): under CFG parallelism a rank's calls hold one branch of the two."""
    return [(round_, step, blocks) for round_, step, _, blocks in log]


def test_two_ranks_without_the_cache_equal_one_process(ranks):
    """The harness itself: Raylight's USP forward on two ranks computes what one process computes."""
    for result in ranks:
        assert rel_l2(result["uncached_parallel"], result["uncached_single"]) < TOLERANCE


def test_interval_1_on_two_ranks_equals_one_process(ranks):
    for result in ranks:
        assert rel_l2(result["interval1"]["parallel"], result["uncached_single"]) < TOLERANCE
        assert result["interval1"]["report"]["blocks_skipped"] == 0


@pytest.mark.parametrize("case", CASES)
def test_both_ranks_take_the_decisions_of_one_process_and_return_its_output(ranks, case):
    """The ranks' inputs differ (token shards, or branches), yet every block call is decided alike on both, and as one
    process decides it (a memory cap holds each rank's share: one process is given the cap of both GPUs together)."""
    first, second = ranks[0][case], ranks[1][case]
    assert first["decisions"] and first["decisions"] == second["decisions"]
    assert blocks_decided(first["decisions"]) == blocks_decided(first["single_decisions"])
    for result in (first, second):
        assert rel_l2(result["parallel"], result["single"]) < TOLERANCE
    assert first["report"]["blocks_skipped"] > 0 or case in ("interval1", "cap")


def test_skipping_really_happens_and_only_data_dependent_policies_reduce(ranks):
    """Fixed and planned policies run no collective of the pack's (but a whole step's gather of the branches' forecasts
    under CFG parallelism); the dynamic one votes once per model call that may skip, a memory cap once per skipping
    call, and under sequence parallelism GOC's turns sum their statistics over the shards."""
    result = ranks[0]
    silent = ("interval1", "fixed", "plan", "icc")
    assert {c: result[c]["collectives"] for c in silent} == dict.fromkeys(silent, 0)
    whole_steps = result["step"]["report"]["calls_skipped"]
    if result["parallel"] == "usp":
        assert result["goc"]["collectives"] > 0 and result["step"]["collectives"] == 0
    else:
        assert result["goc"]["collectives"] == 0 and result["step"]["collectives"] == whole_steps
    assert result["dynamic"]["collectives"] > 0
    assert result["cap"]["collectives"] > 0 and result["cap"]["report"]["blocks_over_limit"] > 0
    assert whole_steps > 0


@pytest.mark.parametrize("case, flags", [("dynamic", ()), ("fixed", ("--check",))])
def test_ranks_that_diverge_stop_together_with_one_message(tmp_path, case, flags):
    """Rank 1 is given another threshold (dynamic) or interval (fixed, with CALIBRATED_CACHE_CHECK_RANKS=1): the
    vote's digest differs, and both ranks raise RankDivergence at that round instead of hanging."""
    results, seconds = run_ranks(tmp_path, "Wan", (case,), "--diverge", "--timeout", "20", *flags)
    for result in results:  # the session turns the engine's RankDivergence into a ValueError without a deep traceback
        assert result.get("error", "").startswith("ValueError: calibrated_cache: the GPUs running this model")
    assert seconds < RUN_SECONDS


def test_ranks_that_diverge_without_a_vote_fail_within_the_collective_timeout(tmp_path):
    """Without a vote (a fixed policy, no check) a divergence is caught by the model's own collectives: a rank fails
    within the process group's timeout rather than hang."""
    results, seconds = run_ranks(tmp_path, "Wan", ("fixed",), "--diverge", "--timeout", "10")
    assert any("error" in result for result in results)
    for result in results:  # each rank got as far as the cached two-rank run, or was aborted by the process group
        assert "uncached_parallel" in result or result["error"].startswith("no result")
    assert seconds < RUN_SECONDS
