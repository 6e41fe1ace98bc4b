"""How much any aligned plan could win on the testbed (issue 21): an oracle that chooses the plan on the evaluation
requests themselves, so an upper bound on a schedule search's gain, not a method.

An aligned plan computes every block at its computed steps and fills in every block elsewhere; at target S it has
round(steps / S) computed steps, step 0 among them, as the uniform interval has. For each plan and forecaster (FORA,
TaylorSeer 1 and 2) the oracle scores rel_l2 against full computation on the first `--screen` evaluation requests
(noise seed 0); the `--top` best are scored again on all `--samples`. Where the plans number at most `--exhaustive`
it tries every one; otherwise it hill-climbs (move one computed step by 1 or 2, any forecaster, first improvement)
from the uniform interval, the searched plan of `benchmarks/results/plans.json` and `--starts` random plans, within
`--budget` screened runs. The uniform interval and the searched plan are scored alike, without TCC priors.

    python studies/plan_oracle.py [--targets 4 6] [--json benchmarks/results/plan_oracle.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
from pathlib import Path

from calibrated_cache.calibration import CachePolicy
from calibrated_cache.calibration.plan import BlockPlan
from calibrated_cache.calibration.speed_fit import plan_policy, uniform_row
from calibrated_cache.testbed.bench import machine, provenance
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result
from calibrated_cache.testbed.evaluate import bench_inputs
from calibrated_cache.testbed.metrics import rel_l2
from calibrated_cache.testbed.sampling import flow_sigmas, sample
from calibrated_cache.testbed.weights import load_dit

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "plans.json"
FORECASTERS = {"fora": ("reuse", 1), "taylor1": ("taylor", 1), "taylor2": ("taylor", 2)}


def row_of(computed: tuple[int, ...], steps: int) -> str:
    return "".join("1" if s in computed else "0" for s in range(steps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--screen", type=int, default=16)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--targets", type=float, nargs="+", default=[4, 6])
    p.add_argument("--exhaustive", type=int, default=2000)
    p.add_argument("--budget", type=int, default=1500)
    p.add_argument("--starts", type=int, default=4)
    p.add_argument("--json", type=Path)
    add_allow_dirty(p)
    args = p.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    model, meta = load_dit()
    steps, cfg = int(meta["bench_steps"]), float(meta["bench_cfg"])
    sigmas = flow_sigmas(steps)
    blocks = len(model.blocks)
    labels, noise = bench_inputs(model, args.samples, 0)
    full, _ = sample(model, labels, noise, steps, cfg, sigmas=sigmas)
    n = args.screen
    base = CachePolicy(granularity="block")
    searched = {row["target"]: row["picture"].splitlines()[0].split()[-1].replace("#", "1").replace(".", "0")
                for row in json.loads(RESULTS.read_text())["rows"]}

    def error(row: str, forecaster: str, count: int) -> float:
        plan = BlockPlan(tuple(sigmas.tolist()), (row,) * blocks)
        policy = plan_policy(base, plan, *FORECASTERS[forecaster])
        out, _ = sample(model, labels[:count], noise[:count], steps, cfg, policy=policy, sigmas=sigmas)
        return rel_l2(out, full[:count])

    screened: dict[tuple[str, str], float] = {}

    def screen(row: str, forecaster: str) -> float:
        if (row, forecaster) not in screened:
            screened[(row, forecaster)] = error(row, forecaster, n)
        return screened[(row, forecaster)]

    results = []
    for target in args.targets:
        screened.clear()
        k = max(2, round(steps / target))
        total = math.comb(steps - 1, k - 1)
        uniform = uniform_row(steps, round(target))
        if total <= args.exhaustive:
            mode = "exhaustive"
            for rest in itertools.combinations(range(1, steps), k - 1):
                for f in FORECASTERS:
                    screen(row_of((0, *rest), steps), f)
        else:
            mode = "hill climb"
            rng = random.Random(0)
            starts = [uniform] + ([searched[target]] if searched.get(target, "").count("1") == k else [])
            starts += [row_of((0, *sorted(rng.sample(range(1, steps), k - 1))), steps) for _ in range(args.starts)]
            per_start = args.budget // len(starts)
            for start in starts:
                _climb(start, screen, lambda: len(screened), per_start)
        ranked = sorted(screened, key=screened.get)[:args.top]
        scored = {key: error(*key, args.samples) for key in ranked}
        best = min(scored, key=scored.get)
        reference = {f: error(uniform, f, args.samples) for f in FORECASTERS}
        best_uniform = min(reference, key=reference.get)
        result = {"target": target, "computed_steps": k, "plans": total, "mode": mode, "screened_runs": len(screened),
                  "uniform": {"row": uniform, "forecaster": best_uniform, "rel_l2": reference[best_uniform],
                              "by_forecaster": reference},
                  "oracle": {"row": best[0], "forecaster": best[1], "rel_l2": scored[best]}}
        if searched.get(target):
            by = {f: error(searched[target], f, args.samples) for f in FORECASTERS}
            pick = min(by, key=by.get)
            result["searched"] = {"row": searched[target], "forecaster": pick, "rel_l2": by[pick], "by_forecaster": by}
        results.append(result)
        print(_line(result), flush=True)
    if tree:
        write_result(args.json, {"command": "python studies/plan_oracle.py " + " ".join(sys.argv[1:]),
                                 **provenance(), "machine": machine("cpu"), "samples": args.samples, "screen": n,
                                 "rows": results}, tree, indent=1)


def _climb(start: str, screen, runs, budget: int) -> None:
    """First-improvement hill climbing over (plan, forecaster) from `start`, within `budget` new screened runs
    (`runs()` counts them)."""
    limit = runs() + budget
    best = min(((start, f) for f in FORECASTERS), key=lambda key: screen(*key))
    improved = True
    while improved and runs() < limit:
        improved = False
        row, forecaster = best
        computed = [s for s, c in enumerate(row) if c == "1"]
        for s, delta, f in itertools.product(computed[1:], (-1, 1, -2, 2), FORECASTERS):
            to = s + delta
            if not 0 < to < len(row) or row[to] == "1":
                continue
            moved = row[:s] + "0" + row[s + 1:]
            moved = moved[:to] + "1" + moved[to + 1:]
            if screen(moved, f) < screen(*best):
                best, improved = (moved, f), True
                break
            if runs() >= limit:
                break


def _line(r: dict) -> str:
    pic = lambda row: row.replace("1", "#").replace("0", ".")  # noqa: E731
    u, o = r["uniform"], r["oracle"]
    s = r.get("searched")
    text = (f"{r['target']:g}x ({r['computed_steps']} steps, {r['plans']} plans, {r['mode']}, "
            f"{r['screened_runs']} screened runs): uniform {pic(u['row'])} {u['forecaster']} {u['rel_l2']:.4f}; ")
    if s:
        text += f"searched {pic(s['row'])} {s['forecaster']} {s['rel_l2']:.4f}; "
    return text + (f"oracle {pic(o['row'])} {o['forecaster']} {o['rel_l2']:.4f} "
                   f"({100 * (o['rel_l2'] / u['rel_l2'] - 1):+.0f}% vs uniform)")


if __name__ == "__main__":
    main()
