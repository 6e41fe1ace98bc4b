"""Train the testbed DiT on the digits by rectified-flow matching, with CFG label dropout and an EMA of the weights.

    python -m calibrated_cache train-dit [--out PATH | --replace-shipped] [--seed 0] [--iters N] [--cfg W] [--steps S]

x_t = (1 − t)·x0 + t·ε and the target is v = ε − x0, matching `sampling.py`. The EMA weights are saved, together with
the DiT config, the training settings and the benchmark CFG/steps and the accuracy reached with them.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import load_digits_tensors
from .evaluate import evaluate
from .model import DiT, DiTConfig
from .repro import deterministic
from .weights import CLASSIFIER_PATH, DIT_PATH, add_output_arguments, load_classifier, output_path, save_module

CONFIG = DiTConfig(patch=2, width=128, depth=8, heads=4)
T_SAMPLING = ("logit_normal", "uniform")


@dataclass(frozen=True)
class FitSettings:
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    p_null: float = 0.1
    t_dist: str = "logit_normal"
    max_ema: float = 0.999

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def sample_t(n: int, gen: torch.Generator, dist: str) -> Tensor:
    """Training times; logit-normal (as in SD3) concentrates on mid noise levels, where the velocity is hardest."""
    if dist == "uniform":
        return torch.rand(n, generator=gen)
    if dist == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    raise ValueError(f"unknown t sampling {dist!r}: choose one of {T_SAMPLING}")


def flow_batch(x0: Tensor, gen: torch.Generator, dist: str) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, target velocity) for a batch of clean images."""
    eps = torch.randn(x0.shape, generator=gen)
    t = sample_t(x0.shape[0], gen, dist)
    tt = t.view(-1, 1, 1, 1)
    return (1 - tt) * x0 + tt * eps, t, eps - x0


def drop_labels(y: Tensor, gen: torch.Generator, p: float, null: int) -> Tensor:
    """Replace a fraction p of labels by the null class, so one network also learns the unconditional velocity."""
    return torch.where(torch.rand(y.shape, generator=gen) < p, torch.full_like(y, null), y)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def ema_update(ema: DiT, model: DiT, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


def ema_decay(step: int, max_decay: float) -> float:
    """Short memory early on (the first weights are noise), up to `max_decay`."""
    return min(max_decay, (1 + step) / (10 + step))


def fit(
    config: DiTConfig, seed: int, iters: int, settings: FitSettings, log_every: int = 100
) -> tuple[DiT, list[float]]:
    """The optimisation itself: returns the EMA model and the per-iteration losses."""
    images, labels = load_digits_tensors()
    with deterministic(seed) as gen:
        model = DiT(config)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, iters, settings.warmup))
        losses: list[float] = []
        start = time.perf_counter()
        for step in range(iters):
            idx = torch.randint(0, len(labels), (settings.batch,), generator=gen)
            xt, t, v = flow_batch(images[idx], gen, settings.t_dist)
            y = drop_labels(labels[idx], gen, settings.p_null, model.null_class)
            loss = F.mse_loss(model(xt, t, y), v)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            ema_update(ema, model, ema_decay(step, settings.max_ema))
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                window = losses[-log_every:]
                print(f"iter {step + 1}/{iters}  loss {sum(window) / len(window):.4f}  "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
    return ema.eval(), losses


def train(
    out_path: str | Path | None = DIT_PATH,
    seed: int = 0,
    iters: int = 3500,
    config: DiTConfig = CONFIG,
    bench_cfg: float = 2.0,
    bench_steps: int = 24,
    eval_samples: int = 256,
    classifier_path: str | Path = CLASSIFIER_PATH,
    settings: FitSettings = FitSettings(),
    log_every: int = 100,
) -> dict[str, float]:
    """Train, score the EMA model at the benchmark CFG/steps (Euler and Heun), save it with all of that as metadata."""
    start = time.perf_counter()
    model, losses = fit(config, seed, iters, settings, log_every)
    figures: dict[str, float] = {
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "train_seconds": time.perf_counter() - start,
    }
    if eval_samples:
        classifier, _ = load_classifier(classifier_path)
        for sampler in ("euler", "heun"):
            scores = evaluate(model, classifier, eval_samples, bench_steps, bench_cfg, sampler)
            figures.update({f"{k}_{sampler}": v for k, v in scores.items()})
    if out_path is not None:
        run = {"seed": seed, "iters": iters, "bench_cfg": bench_cfg, "bench_steps": bench_steps,
               "eval_samples": eval_samples, "training": settings.to_dict()}
        save_module(out_path, model, config.to_dict(), **run, **figures)
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_output_arguments(parser, DIT_PATH, "the demo and the benchmark load")
    parser.add_argument("--iters", type=int, default=3500, help="training iterations of batch 128 (default 3500)")
    parser.add_argument("--cfg", type=float, default=2.0, help="benchmark CFG scale, recorded in the weights")
    parser.add_argument("--steps", type=int, default=24, help="benchmark sampling steps, recorded in the weights")
    parser.add_argument("--eval-samples", type=int, default=256, help="samples scored after training (0: none)")
    parser.add_argument("--t-dist", choices=T_SAMPLING, default="logit_normal", help="training time distribution")


def run(args: argparse.Namespace) -> int:
    out = output_path(args.out, DIT_PATH, args.replace_shipped, args.overwrite)
    figures = train(out, args.seed, args.iters, bench_cfg=args.cfg, bench_steps=args.steps,
                    eval_samples=args.eval_samples, settings=FitSettings(t_dist=args.t_dist))
    print("  ".join(f"{k} {v:.4f}" for k, v in figures.items()), f"-> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
