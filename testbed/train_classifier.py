"""Train the digits classifier that scores testbed samples, and store the real-digit FD reference with it.

    python -m calibrated_cache train-classifier [--out PATH | --replace-shipped] [--seed 0] [--epochs 80]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .classifier import Classifier, ClassifierConfig
from .data import load_digits_tensors, load_split
from .metrics import accuracy
from .progress import Progress
from .repro import deterministic
from .weights import CLASSIFIER_PATH, add_output_arguments, output_path, save_module

BACKGROUND = -1.0
BLUR = torch.tensor([1.0, 2.0, 1.0]) / 4.0


def shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Translate each image by up to one pixel in each direction, filling with background."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1), value=BACKGROUND)
    views = torch.stack([padded[..., i : i + h, j : j + w] for i in range(3) for j in range(3)])
    return views[torch.randint(0, 9, (n,), generator=gen), torch.arange(n)]


def blur(x: Tensor) -> Tensor:
    """Separable [1, 2, 1]/4 blur with background padding: generated digits are often softer than real ones."""
    k = (BLUR[:, None] * BLUR[None, :]).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), value=BACKGROUND), k)


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random shift, a random amount of blur and Gaussian noise, so samples that are slightly off still classify."""
    n = x.shape[0]
    x = shift(x, gen)
    amount = torch.rand(n, 1, 1, 1, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) < 0.5)
    x = x + amount * (blur(x) - x)
    sigma = 0.15 * torch.rand(n, 1, 1, 1, generator=gen)
    return x + sigma * torch.randn(x.shape, generator=gen)


@torch.no_grad()
def evaluate(model: Classifier, images: Tensor, labels: Tensor) -> float:
    return accuracy(model(images), labels)


def train_epoch(
    model: Classifier,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    data: tuple[Tensor, Tensor],
    batch: int,
    gen: torch.Generator,
) -> float:
    """One shuffled pass over augmented training digits; returns the mean batch loss."""
    images, labels = data
    perm = torch.randperm(len(labels), generator=gen)
    losses = []
    for i in range(0, len(perm), batch):
        idx = perm[i : i + batch]
        loss = F.cross_entropy(model(augment(images[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def train(
    out_path: str | Path | None = CLASSIFIER_PATH,
    seed: int = 0,
    epochs: int = 80,
    batch: int = 128,
    lr: float = 2e-3,
    config: ClassifierConfig = ClassifierConfig(),
) -> dict[str, float]:
    """Train with AdamW and cosine LR on the fixed training split, then store the FD reference over all 1797 digits.

    Saves to out_path (unless None); returns held-out accuracy, the last epoch's mean loss and the wall time.
    """
    start = time.perf_counter()
    train_data, (x_held, y_held) = load_split()
    with deterministic(seed) as gen:
        model = Classifier(config)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(train_data[1]) // batch))
        progress, losses = Progress(epochs, "train-classifier"), []
        try:
            for _ in range(epochs):
                losses.append(train_epoch(model, opt, sched, train_data, batch, gen))
                progress.advance(1, f"loss {losses[-1]:.4f}")
        finally:
            progress.close()
    model.eval()
    all_images, all_labels = load_digits_tensors()
    model.set_reference(all_images)
    figures = {
        "held_out_accuracy": evaluate(model, x_held, y_held),
        "all_digits_accuracy": evaluate(model, all_images, all_labels),
        "final_loss": losses[-1],
        "seconds": time.perf_counter() - start,
    }
    if out_path is not None:
        save_module(out_path, model, config.to_dict(), seed=seed, epochs=epochs, **figures)
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_output_arguments(parser, CLASSIFIER_PATH, "scores every benchmark")
    parser.add_argument("--epochs", type=int, default=80, help="training epochs (default 80)")


def run(args: argparse.Namespace) -> int:
    out = output_path(args.out, CLASSIFIER_PATH, args.replace_shipped, args.overwrite)
    figures = train(out, seed=args.seed, epochs=args.epochs)
    print(f"held-out accuracy {figures['held_out_accuracy']:.4f}  all digits {figures['all_digits_accuracy']:.4f}  "
          f"loss {figures['final_loss']:.4f}  {figures['seconds']:.1f}s  -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
