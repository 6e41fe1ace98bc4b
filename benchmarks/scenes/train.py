"""Train the scenes benchmark's two networks, seeded and logged; the results ship in `weights/`.

    python -m benchmarks.scenes.train reader                     # the evaluator (torch only, ~3 minutes on 2 cores)
    COMFYUI_PATH=… python -m benchmarks.scenes.train flux        # the Flux model (ComfyUI's classes; ~40 minutes)

Run from the repository root, with the Python that has ComfyUI's requirements for `flux`. Each refuses to replace an
existing file without --overwrite. The reader is trained first: the model's log scores samples with it.

The Flux model is trained by rectified flow (ComfyUI's FLOW convention: x_σ = (1 − σ)·x₀ + σ·ε, the model predicts
ε − x₀, timestep = σ), σ logit-normal, 10% of prompts dropped to the empty prompt for CFG, AdamW with a warm-up and a
cosine schedule, gradient clipping and an EMA of the weights, which is what is saved. Initialisation is ours (ComfyUI
builds its layers uninitialised): Linear weights N(0, 1/fan_in), biases 0, RMSNorm scales 1, and adaLN-zero, the
modulation and final layers at 0, so every block starts as the identity.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from calibrated_cache.priors.files import write_atomic
from calibrated_cache.testbed.repro import deterministic

from .data import PAIRS, scenes, targets
from .evaluator import SceneReader, adherence, frechet, read, statistics

WEIGHTS = Path(__file__).resolve().parent / "weights"
READER = WEIGHTS / "scene_reader.safetensors"
REAL_SEED, READER_SEED, FLUX_SEED, CHECK_SEED = 101, 102, 103, 104


def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], overwrite: bool) -> None:
    import safetensors.torch

    if path.exists() and not overwrite:
        raise SystemExit(f"{path} exists: pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=meta))


def load_reader(path: Path = READER) -> tuple[SceneReader, torch.Tensor, torch.Tensor]:
    """The reader and the feature statistics of real scenes (for the Fréchet distance)."""
    import safetensors.torch

    if not path.is_file():
        raise SystemExit(f"{path} is missing: train it with python -m benchmarks.scenes.train reader")
    tensors = safetensors.torch.load_file(str(path))
    mean, cov = tensors.pop("real.mean"), tensors.pop("real.cov")
    reader = SceneReader()
    reader.load_state_dict(tensors)
    return reader.eval(), mean, cov


def train_reader(args: argparse.Namespace, log) -> None:
    images, specs = scenes(args.samples, READER_SEED)
    counts, centres = targets(specs)
    held_images, held_specs = scenes(2000, CHECK_SEED)
    with deterministic(args.seed) as g:
        reader = SceneReader()
        optimiser = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=1e-4)
        steps = args.epochs * (len(images) // args.batch)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 2e-3, total_steps=steps, pct_start=0.1)
        start, step = time.perf_counter(), 0
        for epoch in range(args.epochs):
            order = torch.randperm(len(images), generator=g)
            for i in range(0, len(images) - args.batch + 1, args.batch):
                idx = order[i:i + args.batch]
                x = images[idx] + 0.03 * torch.randn(images[idx].shape, generator=g)  # robustness to sampler noise
                logits, c, _ = reader(x)
                present = counts[idx] > 0
                loss = nn.functional.cross_entropy(logits.reshape(-1, 4), counts[idx].reshape(-1))
                loss = loss + 20 * ((c - centres[idx]).square().sum(-1) * present).sum() / present.sum().clamp_min(1)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                step += 1
            reader.eval()
            log(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f} held-out adherence "
                f"{adherence(reader, held_images, held_specs):.4f} ({time.perf_counter() - start:.0f} s)")
            reader.train()
    reader.eval()
    real, _ = scenes(args.real, REAL_SEED)
    mean, cov = statistics(read(reader, real)[2])
    others, _ = scenes(args.real, CHECK_SEED + 1)
    log(f"real scenes: adherence {adherence(reader, held_images, held_specs):.4f}, FD of {args.real} other real "
        f"scenes {frechet(read(reader, others)[2], mean, cov):.3f}")
    save(args.out or READER, {**reader.state_dict(), "real.mean": mean.float(), "real.cov": cov.float()},
         {"what": "scenes benchmark reader", "seed": str(args.seed), "samples": str(args.samples),
          "classes": ",".join(f"{c} {s}" for c, s in PAIRS)}, args.overwrite)


def initialise(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                zero = any(part in name for part in ("mod.lin", "modulation.lin", "final_layer"))
                module.weight.copy_(torch.zeros_like(module.weight) if zero else
                                    torch.randn(module.weight.shape, generator=g) / math.sqrt(module.in_features))
                if module.bias is not None:
                    module.bias.zero_()
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.fill_(1.0)


def train_flux(args: argparse.Namespace, log) -> None:
    from . import flux
    from .codec import context, decode, model_input

    images, specs = scenes(args.samples, FLUX_SEED)
    x0 = model_input(images)
    ctx, pooled = context([s.prompt for s in specs])
    empty_ctx, empty_pooled = context([""])
    reader, mean, cov = load_reader()
    check = [specs[i] for i in range(64)]
    with deterministic(args.seed) as g:
        base = flux.build()
        net = base.diffusion_model
        initialise(net, g)
        net.train()
        ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
        optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
        warmup = 200

        def rate(step: int) -> float:
            return min(1.0, (step + 1) / warmup) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / args.iters)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, rate)
        start = time.perf_counter()
        for step in range(args.iters):
            idx = torch.randint(len(x0), (args.batch,), generator=g)
            drop = torch.rand(args.batch, generator=g) < 0.1
            c = torch.where(drop[:, None, None], empty_ctx, ctx[idx])
            y = torch.where(drop[:, None], empty_pooled, pooled[idx])
            sigma = torch.sigmoid(torch.randn(args.batch, generator=g))
            noise = torch.randn(x0[idx].shape, generator=g)
            s = sigma[:, None, None, None]
            x = (1 - s) * x0[idx] + s * noise
            optimiser.zero_grad()
            with torch.autograd.graph.allow_mutation_on_saved_tensors():  # ComfyUI's Flux blocks add in place
                out = net(x, sigma, c, y)
                loss = (out - (noise - x0[idx])).square().mean()
                loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                decay = min(args.ema, (step + 1) / (step + 10))
                for k, v in net.state_dict().items():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            if (step + 1) % args.log_every == 0 or step + 1 == args.iters:
                message = f"iter {step + 1}/{args.iters} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)"
                if (step + 1) % (args.log_every * 4) == 0 or step + 1 == args.iters:
                    samples = euler(net, ema, check, 20, 2.0, g)
                    message += (f"; EMA, 20 Euler steps, cfg 2, 64 training prompts: adherence "
                                f"{adherence(reader, decode_images(samples, decode), check):.3f}")
                log(message)
    save(args.out or flux.WEIGHTS, ema, {"what": "scenes benchmark Flux (ComfyUI FluxSchnell classes)",
                                         "seed": str(args.seed), "iters": str(args.iters), "batch": str(args.batch),
                                         "unet_config": str(flux.UNET_CONFIG)}, args.overwrite)


def decode_images(latents: torch.Tensor, decode) -> torch.Tensor:
    from .codec import SCALE, SHIFT

    return decode(latents / SCALE + SHIFT).clamp(-1, 1)


@torch.no_grad()
def euler(net: nn.Module, weights: dict[str, torch.Tensor], specs, steps: int, cfg: float,
          g: torch.Generator) -> torch.Tensor:
    """A quick check during training with the EMA weights (the benchmark samples through ComfyUI's KSampler)."""
    from .codec import context

    live = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(weights)
    net.eval()
    ctx, pooled = context([s.prompt for s in specs] + [""] * len(specs))
    x = torch.randn(len(specs), 16, 16, 16, generator=g)
    sigmas = torch.linspace(1, 0, steps + 1)
    for a, b in zip(sigmas, sigmas[1:]):
        out = net(torch.cat([x, x]), a.repeat(2 * len(specs)), ctx, pooled)
        cond, uncond = out.chunk(2)
        x = x + (b - a) * (uncond + cfg * (cond - uncond))
    net.load_state_dict(live)
    net.train()
    return x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["reader", "flux"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=None, help="scenes to train on (reader 30000, flux 40000)")
    parser.add_argument("--epochs", type=int, default=12, help="reader")
    parser.add_argument("--real", type=int, default=2000, help="reader: real scenes for the FD statistics")
    parser.add_argument("--iters", type=int, default=4000, help="flux")
    parser.add_argument("--batch", type=int, default=None, help="reader 128, flux 64")
    parser.add_argument("--lr", type=float, default=1e-3, help="flux")
    parser.add_argument("--ema", type=float, default=0.999, help="flux")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    args.samples = args.samples or (30000 if args.what == "reader" else 40000)
    args.batch = args.batch or (128 if args.what == "reader" else 64)
    target = args.out or (READER if args.what == "reader" else WEIGHTS / "scenes_flux.safetensors")
    if target.exists() and not args.overwrite:
        raise SystemExit(f"{target} exists: pass --overwrite to replace it")
    log_path = target.with_suffix(".log")
    lines: list[str] = []

    def log(message: str) -> None:
        print(message, flush=True)
        lines.append(message)
        write_atomic(log_path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))

    log(f"train {args.what}: {vars(args)} torch {torch.__version__}, {torch.get_num_threads()} threads")
    (train_reader if args.what == "reader" else train_flux)(args, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
