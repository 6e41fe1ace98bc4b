"""ICC study: which channel statistics weigh the factors best, at which rank and refresh interval, on the testbed.

`python studies/icc_study.py` (about 6 minutes on 2 cores) prints rel_l2 against full computation
on 128 benchmark requests for plain SVD and the two statistic sources of the official code, each recorded on 64
separate calibration requests, and FORA at the same schedule with the compute fractions.
"""

from __future__ import annotations

import json
from dataclasses import replace

from calibrated_cache.calibration import CachePolicy
from calibrated_cache.calibration.icc import STAT_SOURCES, FactorCache, IccSettings
from calibrated_cache.testbed.evaluate import bench_inputs
from calibrated_cache.testbed.fit_priors import record_channels
from calibrated_cache.testbed.metrics import rel_l2
from calibrated_cache.testbed.sampling import sample
from calibrated_cache.testbed.weights import load_dit

SAMPLES, CALIBRATION = 128, 64
RANKS, INTERVALS = (8, 16, 32, 64), (2, 3)


def main() -> int:
    model, meta = load_dit()
    steps, cfg = int(meta["bench_steps"]), float(meta["bench_cfg"])
    tables = {s: record_channels(model, CALIBRATION, steps, cfg, source=s)[0] for s in STAT_SOURCES}
    labels, noise = bench_inputs(model, SAMPLES)
    full, _ = sample(model, labels, noise, steps, cfg)
    rows = []
    print(f"rel_l2 against full computation, {SAMPLES} requests, {steps} steps, cfg {cfg}")
    print(f"{'interval':>8} {'rank':>5} {'fraction':>8} {'fora':>7} {'plain':>7} " +
          " ".join(f"{s:>9}" for s in STAT_SOURCES))
    for n in INTERVALS:
        fora = CachePolicy(interval=n, warmup_steps=0)
        x, state = sample(model, labels, noise, steps, cfg, policy=fora)
        base = rel_l2(x, full)
        for rank in RANKS:
            row = {"interval": n, "rank": rank, "fora": base, "fora_fraction": state.stats.compute_fraction}
            for name, svd, table in [("plain", "plain", None)] + [(s, "channel-aware", tables[s]) for s in STAT_SOURCES]:
                policy = replace(fora, icc=IccSettings(rank, svd))
                x, icc_state = sample(model, labels, noise, steps, cfg, policy=policy, factors=FactorCache(table))
                row[name], row["fraction"] = rel_l2(x, full), icc_state.stats.compute_fraction
            rows.append(row)
            print(f"{n:>8} {rank:>5} {row['fraction']:>8.3f} {base:>7.4f} {row['plain']:>7.4f} " +
                  " ".join(f"{row[s]:>9.4f}" for s in STAT_SOURCES), flush=True)
    print(json.dumps({"samples": SAMPLES, "calibration": CALIBRATION, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
