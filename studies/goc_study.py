"""The measurements behind the GOC Corrector: its rule for intervals above 2, which inflection detection, which
weight, and how GOC composes with TCC priors. Run: `python studies/goc_study.py [--samples 128]`.

1. The rule at weight 0.8, `auto`: the official queue (each cached step pushed from the value used at the round
   before, k uncapped), the anchored push with k capped at 1, and the pack's rule, which also divides by the steps
   the value before the newest computation was stale.
2. For each weight and interval: FORA without GOC, GOC pushing everywhere ("off"), GOC with online detection
   ("auto", per sample, from the values the run computes) and GOC with the offline rule of methods reference §8.3
   (steps where ρ(s), the mean turn of sample-averaged full-computation features, falls below 0, measured on separate
   calibration requests; the push is dropped at cached steps with an inflection within the two steps before), and
   the online detector's threshold at interval 2.
3. FORA with TCC priors (drift, fitted on 64 calibration requests) with and without GOC at several weights.
"""

from __future__ import annotations

import argparse
import sys

import torch

from torch import Tensor
from calibrated_cache.calibration import CachePolicy
from calibrated_cache.calibration.calibrator import Calibrator, Reused, Site
from calibrated_cache.calibration.goc import GocCorrector, GocSettings, Used, track_key
from error_share import site_values
from calibrated_cache.testbed.bench import machine, provenance
from calibrated_cache.testbed.evaluate import bench_inputs, score
from calibrated_cache.testbed.fit_priors import fit_testbed
from calibrated_cache.testbed.metrics import rel_l2
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result
from calibrated_cache.testbed.sampling import sample
from calibrated_cache.testbed.weights import load_classifier, load_dit

STEPS, CFG = 24, 2.0
WEIGHTS = (0.5, 0.8, 1.0, 1.2)
WEIGHTS_WITH_TCC = (0.5, 0.8)
INTERVALS = (2, 3, 4, 6)
THRESHOLDS = (-0.3, 0.3, 0.6)  # of the online detector, at the default weight and interval 2
CALIBRATION_SAMPLES = 64


class Capped(GocCorrector):
    """The anchored push without dividing by the staleness of the value before the newest computation."""

    def gain(self, before: Used, computed_sigma: float, site: Site) -> float:
        gap = before.sigma - computed_sigma
        return 0.0 if gap <= 0 else self.settings.weight * min((computed_sigma - site.sigma) / gap, 1.0)


class OfficialQueue(GocCorrector):
    """The official code's queue: Â = u₁ + w·k·(u₁ − u₀) from the two values used at the two newest rounds."""

    def __init__(self, settings: GocSettings) -> None:
        super().__init__(settings)
        self._queues: dict[tuple, list[tuple[float, Tensor]]] = {}

    def start(self) -> None:
        super().start()
        self._queues = {}

    def calibrate(self, sites: list[Site], reused: Reused) -> Tensor:
        key = track_key(sites)
        queue = self._queues.setdefault(key, [])
        anchor = max(s.anchor_sigma for s in sites)
        if not queue or queue[-1][0] > anchor:
            queue.append((anchor, reused.value))
        super().calibrate(sites, reused)  # keeps the turn mask up to date
        steady = self._tracks[key].steady
        if len(queue) < 2 or steady is None or queue[-2][0] <= queue[-1][0]:
            return reused.value
        (s0, u0), (s1, u1) = queue[-2:]
        return u1 + (u1 - u0) * (steady * self.settings.weight * (s1 - sites[0].sigma) / (s0 - s1))

    def settle(self, sites: list[Site], value: Tensor) -> None:
        queue = self._queues[track_key(sites)]
        queue.append((sites[0].sigma, value))
        del queue[:-2]


def turns(steps: int, cfg: float, samples: int = 128) -> list[float]:
    """ρ(s) for s = 2 … steps−1: mean over sites of cos(F̄(s) − F̄(s−1), F̄(s−1) − F̄(s−2)) (F̄: sample mean)."""
    values = site_values(steps, cfg, samples)
    mean = {k: v.mean(0).flatten() for k, v in values.items()}
    sites = {(b, n) for _, b, n in values}
    rho = []
    for s in range(2, steps):
        cos = [torch.nn.functional.cosine_similarity(mean[(s, b, n)] - mean[(s - 1, b, n)],
                                                     mean[(s - 1, b, n)] - mean[(s - 2, b, n)], dim=0).item()
               for b, n in sites]
        rho.append(sum(cos) / len(cos))
    return rho


def offline_steps(rho: list[float], steps: int, threshold: float = 0.0) -> tuple[int, ...]:
    """Cached steps whose push the §8.3 rule drops: an inflection (ρ < threshold) at s, s−1 or s−2."""
    inflections = {s + 2 for s, r in enumerate(rho) if r < threshold}
    return tuple(s for s in range(steps) if inflections & {s, s - 1, s - 2})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write the rows here")
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    model, classifier = load_dit()[0], load_classifier()[0]
    labels, noise = bench_inputs(model, args.samples, 0)
    full, _ = sample(model, labels, noise, STEPS, CFG)
    rho = turns(STEPS, CFG)
    dropped = offline_steps(rho, STEPS)
    print("ρ(s), s = 2…:", " ".join(f"{r:+.2f}" for r in rho))
    print("offline rule drops the push at steps:", list(dropped) or "none")
    rows = []

    def row(interval: int, name: str, goc: GocSettings | None, tcc: bool = False,
            rule: Calibrator | None = None) -> None:
        policy = CachePolicy(interval=interval, warmup_steps=0, goc=goc)
        calibrator = fit_testbed(model, policy, CALIBRATION_SAMPLES, STEPS, CFG, held_out=0)[0] if tcc else rule
        x, _ = sample(model, labels, noise, STEPS, CFG, policy=policy, calibrator=calibrator)
        rows.append({"interval": interval, "method": name, "tcc": tcc, "rel_l2": rel_l2(x, full),
                     "fd": score(classifier, x, labels)["fd"]})
        r = rows[-1]
        print(f"N={interval} {name:<26} rel_l2 {r['rel_l2']:.4f}  fd {r['fd']:.2f}", flush=True)

    for interval in INTERVALS:
        row(interval, "rule: official queue", None, rule=OfficialQueue(GocSettings()))
        row(interval, "rule: capped", None, rule=Capped(GocSettings()))
        row(interval, "rule: capped, per step", GocSettings())
    for interval in INTERVALS:
        row(interval, "fora", None)
        for w in WEIGHTS:
            row(interval, f"goc w{w:g} off", GocSettings(w, "off"))
            row(interval, f"goc w{w:g} auto", GocSettings(w, "auto"))
            if dropped:
                row(interval, f"goc w{w:g} offline", GocSettings(w, "manual", steps=dropped))
    for threshold in THRESHOLDS:
        row(2, f"goc w0.8 auto t{threshold:g}", GocSettings(0.8, "auto", threshold))
    for interval in INTERVALS:
        row(interval, "fora+tcc", None, tcc=True)
        for w in WEIGHTS_WITH_TCC:
            row(interval, f"fora+goc w{w:g} auto+tcc", GocSettings(w, "auto"), tcc=True)
    if tree:
        write_result(args.json, {"command": "python studies/goc_study.py " + " ".join(sys.argv[1:]), **provenance(),
                                 "machine": machine("cpu"), "rho": rho, "offline_steps": list(dropped), "rows": rows},
                     tree, indent=1)


if __name__ == "__main__":
    main()
