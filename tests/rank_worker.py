"""One rank of a two-process run of the engine (no model, no ComfyUI), for tests/test_consensus.py.

`python rank_worker.py RANK PORT OUT SCENARIO`: joins a gloo group of two with a 20 s timeout, plays SCENARIO and writes
OUT/rankRANK.json: the decisions logged, what each rank computed, and the error raised, if any.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from calibrated_cache.calibration import CacheMemory, CachePolicy, RunState
from calibrated_cache.calibration.consensus import RankConsensus
from calibrated_cache.testbed.sampling import flow_sigmas

STEPS = 6


def play(rank: int, scenario: str) -> dict:
    consensus = RankConsensus()
    if scenario == "prior":
        consensus.same("prior files", f"file of rank {rank}")
        return {}
    block = dict(granularity="block", warmup_steps=1, forecaster="foca")  # FoCa: blocks are cached one by one
    if scenario == "cap":  # rank 1 holds 1.5 times the tokens: its block 2 passes the cap, rank 0's does not
        policy, tokens, memory = CachePolicy(interval=2, **block), 16 + 8 * rank, CacheMemory(False, 5000)
    else:  # "policy": the ranks were given different thresholds
        policy, tokens, memory = CachePolicy(mode="dynamic", threshold=0.1 + rank, **block), 16, CacheMemory()
    run = RunState(policy, flow_sigmas(STEPS).tolist(), 3, memory=memory, consensus=consensus)
    run.decider.log = []
    computed: list[list[int]] = []
    for step, sigma in enumerate(flow_sigmas(STEPS)[:-1].tolist()):
        call = run.call(sigma, ["cond"], torch.zeros(1, 4))
        ran: list[int] = []
        h = {"img": torch.full((1, tokens, 8), float(step))}
        for b in range(3):
            h = call.block(b, h, lambda h=h, b=b: ran.append(b) or {"img": h["img"] + 1.0 + 0.1 * b * step})
        computed.append(ran)
    return {"decisions": run.decider.log, "computed": computed, "over_limit": run.stats.blocks_over_limit,
            "collectives": consensus.collectives}


def main() -> None:
    rank, port, out, scenario = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    try:
        result = play(rank, scenario)
    except Exception as err:  # the test reads which error each rank raised
        result = {"error": f"{type(err).__name__}: {err}"}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # not through the process group's teardown, which aborts when the peer has already gone


if __name__ == "__main__":
    main()
