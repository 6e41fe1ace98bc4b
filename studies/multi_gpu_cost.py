"""What agreeing across GPUs costs: wall time per step of a two-rank run (gloo, 2 CPU processes, Raylight's USP or
CFG-parallel forward on the ComfyUI tier's tiny model; tests/comfyui/usp_ranks.py) for full computation, a fixed
policy (no collective of the pack's), the same policy with every skipping call voting across the ranks
(CALIBRATED_CACHE_CHECK_RANKS=1: identical decisions, so the difference is the vote), and the dynamic policy (one vote
per model call that may skip). Every config runs in both rank processes, interleaved, `--repeats` times; the medians
per step are reported (the slower rank's), with each config's distance to the same policy run in one process and
whether both ranks logged the same decisions. CPU figures: they show the vote's cost against a step's, not a GPU's all-reduce latency.

    COMFYUI_PATH=… python studies/multi_gpu_cost.py [--parallel usp|cfg] [--json benchmarks/results/multi_gpu_cost.json]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "comfyui"))

from comfy_boot import bootstrap_comfy  # noqa: E402

bootstrap_comfy()
import comfyui_version  # noqa: E402  (the ComfyUI checkout's, first on sys.path)
import torch  # noqa: E402
from raylight_source import raylight_env  # noqa: E402
from calibrated_cache.testbed.bench import machine, provenance  # noqa: E402
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result  # noqa: E402

CASES = ("fixed", "fixed_voted", "dynamic")
STEPS = 8  # usp_ranks.STEPS


def run(family: str, parallel: str, repeats: int) -> list[dict]:
    import os

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = Path(tempfile.mkdtemp())
    env = {**os.environ, **raylight_env(), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "comfyui" / "usp_ranks.py"), "--rank", str(r),
                               "--port", port, "--out", str(out), "--family", family, "--parallel", parallel,
                               "--repeats", str(repeats), "--cases", *CASES], env=env) for r in (0, 1)]
    for p in procs:
        p.wait(timeout=1800)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r, result in enumerate(results):
        if "error" in result:
            raise SystemExit(f"rank {r}: {result['traceback']}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="Flux", choices=["Flux", "Wan"])
    parser.add_argument("--parallel", default="usp", choices=["usp", "cfg"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    results = run(args.family, args.parallel, args.repeats)
    rows = []
    for name in ("uncached", *CASES):
        per_step = [statistics.median(r["timing"][name]) / STEPS * 1000 for r in results]
        collectives = 0 if name == "uncached" else results[0][name]["collectives"]
        if name == "uncached":
            parallel, single, same = results[0]["uncached_parallel"], results[0]["uncached_single"], None
        else:
            parallel, single = results[0][name]["parallel"], results[0][name]["single"]
            same = results[0][name]["decisions"] == results[1][name]["decisions"]
        rows.append({"config": name, "ms_per_step": max(per_step), "collectives_per_run": collectives,
                     "blocks_skipped": None if name == "uncached" else results[0][name]["report"]["blocks_skipped"],
                     "rel_l2_vs_one_process": ((parallel - single).norm() / single.norm()).item(),
                     "ranks_decide_alike": same})
    print(f"{args.family}, {args.parallel}, 2 ranks (gloo, CPU), {STEPS} steps, median of {args.repeats}")
    print(f"{'config':<12} {'ms/step':>8} {'collectives/run':>16} {'blocks skipped':>15} {'rel_l2 vs one':>14}")
    for row in rows:
        print(f"{row['config']:<12} {row['ms_per_step']:>8.1f} {row['collectives_per_run']:>16} "
              f"{'' if row['blocks_skipped'] is None else row['blocks_skipped']:>15} "
              f"{row['rel_l2_vs_one_process']:>14.1e}")
    if tree:
        write_result(args.json, {"study": "multi_gpu_cost", "command": "COMFYUI_PATH=… python " + " ".join(sys.argv),
                                 "machine": machine("cpu"), "comfyui": comfyui_version.__version__, **provenance(),
                                 "family": args.family, "parallel": args.parallel, "steps": STEPS,
                                 "repeats": args.repeats, "rows": rows}, tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
