"""How much of a reused value's error each kind of prior could explain, on full-computation trajectories.

For every site FORA would reuse at interval N, the error is e = h*(t) − h*(t_anchor). Each predictor is fitted on 64
samples and scored on 64 others as the share of e's squared norm it explains. This is the measurement behind the
choice of TCC's default prior form (docs/methods.md, "TCC"). Run: `python studies/error_share.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from calibrated_cache.testbed.evaluate import bench_inputs
from calibrated_cache.testbed.sampling import flow_sigmas
from calibrated_cache.testbed.weights import load_dit

PREDICTORS = ("per-channel mean", "per-token-and-channel mean", "per-channel affine in h̃", "anchors' increment",
              "increment with a per-channel gain")


@torch.no_grad()
def site_values(steps: int, cfg: float, samples: int = 128) -> dict[tuple[int, int, str], Tensor]:
    """Every pre-gate site value of the cond branch, per (step, block, site), along full-computation trajectories."""
    model = load_dit()[0]
    labels, noise = bench_inputs(model, samples, seed=3)
    values: dict[tuple[int, int, str], Tensor] = {}
    step = 0

    def runner(i, block, h, c):
        for name, gate, fn in block.sites(c):
            v = fn(h)
            values[(step, i, name)] = v[:samples].clone()
            h = h + gate * v
        return h

    sigmas = flow_sigmas(steps)
    x = noise * sigmas[0]
    y = torch.cat([labels, torch.full_like(labels, model.null_class)])
    for step in range(steps):
        t = torch.full((2 * samples,), sigmas[step].item())
        v_c, v_u = model(torch.cat([x, x]), t, y, runner).chunk(2)
        x = x + (sigmas[step + 1] - sigmas[step]) * (v_u + cfg * (v_c - v_u))
    return values


def shares(values: dict[tuple[int, int, str], Tensor], steps: int, interval: int) -> dict[str, float]:
    fit, test = slice(0, 64), slice(64, 128)
    residual = dict.fromkeys(PREDICTORS, 0.0)
    total = 0.0
    for (s, block, name), now in values.items():
        anchor = s - s % interval
        if anchor == s or anchor < interval:  # every predictor needs the previous anchor too
            continue
        stale, previous = values[(anchor, block, name)], values[(anchor - interval, block, name)]
        err = now - stale
        trend = (stale - previous) * (s - anchor) / interval
        total += err[test].square().sum().item()
        c = now.shape[-1]
        x, y = stale[fit].reshape(-1, c), now[fit].reshape(-1, c)
        slope = ((x - x.mean(0)) * (y - y.mean(0))).mean(0) / (x - x.mean(0)).square().mean(0).clamp_min(1e-12)
        d, e = trend[fit].reshape(-1, c), err[fit].reshape(-1, c)
        gain = (d * e).mean(0) / d.square().mean(0).clamp_min(1e-12)
        guesses = (err[fit].mean((0, 1)), err[fit].mean(0),
                   slope * stale[test] + (y.mean(0) - slope * x.mean(0)) - stale[test], trend[test], gain * trend[test])
        for key, guess in zip(PREDICTORS, guesses):
            residual[key] += (err[test] - guess).square().sum().item()
    return {k: 1 - v / total for k, v in residual.items()}


def main() -> None:
    values = site_values(24, 2.0)
    table = {n: shares(values, 24, n) for n in (2, 3)}
    print(f"{'predictor of the error, per site':<36} {'N=2':>6} {'N=3':>6}")
    for key in PREDICTORS:
        print(f"{key:<36} {table[2][key]:>6.0%} {table[3][key]:>6.0%}")


if __name__ == "__main__":
    main()
