"""Module-level sites against whole-block residuals on the trained scenes Flux, inside ComfyUI (issue 19, item 4).

Whole-block caching (the pack's, on every family) reuses a block's residual, which carries the anchor step's
modulation (adaLN shift, scale and gate) into the skipped steps. Module-level caching keeps each block's pre-gate
outputs — Flux's double blocks: the image and text attention projections and MLPs; single blocks: `linear2`, which
holds attention and MLP together — and applies the current step's gates to them. This study measures the quality of
both at the same schedule (euler, 20 steps, FORA and Taylor-2 at intervals 2, 3, 4 and 6 after one warm-up step),
on the scenes benchmark's held-out prompts and seeds: rel_l2 and PSNR of the decoded images against full
computation, and prompt adherence.

Module-level values are filled in by forward hooks on the site modules, which replace the module's output on a
skipped step. The rest of each block still runs (its output is discarded where the hook replaces it), so this
measures module-level caching's quality, not its speed; both skip the same block matmuls, so their compute fractions
differ only by the modulation and norms a module-level skip recomputes. Whole-block rows run through the pack's nodes.

    COMFYUI_PATH=… python studies/flux_module_sites.py [--prompts 32] [--json benchmarks/results/flux_module_sites.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scenes.bench import EVAL_SEED, Harness, Setting  # noqa: E402  (boots ComfyUI, CPU mode)
from benchmarks.scenes.evaluator import adherence, psnr  # noqa: E402

import torch  # noqa: E402

from calibrated_cache.calibration import CachePolicy  # noqa: E402
from calibrated_cache.calibration.registry import make_forecaster  # noqa: E402
from calibrated_cache.calibration.schedule import StepPlan  # noqa: E402
from calibrated_cache.testbed.bench import machine, provenance  # noqa: E402
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result  # noqa: E402

INTERVALS = (2, 3, 4, 6)
FORECASTERS = {"fora": {"forecaster": "reuse"}, "taylor2": {"forecaster": "taylor", "order": 2}}
STEPS = 20


def site_modules(diffusion_model) -> dict[str, torch.nn.Module]:
    """Each block's pre-gate outputs: what a module-level cache keeps."""
    sites = {}
    for i, block in enumerate(diffusion_model.double_blocks):
        for name in ("img_attn.proj", "img_mlp", "txt_attn.proj", "txt_mlp"):
            sites[f"double.{i}.{name}"] = block.get_submodule(name)
    for i, block in enumerate(diffusion_model.single_blocks):
        sites[f"single.{i}.linear2"] = block.linear2
    return sites


class ModuleSites:
    """Forward hooks that cache each site's output on computed steps and fill it in on skipped ones."""

    def __init__(self, diffusion_model, policy: CachePolicy) -> None:
        self.model, self.policy = diffusion_model, policy
        self.plan = StepPlan(policy, STEPS)
        self.step, self.sigma, self.branches = -1, None, [0]
        self.forecasters: dict[tuple[str, int], object] = {}  # (site, branch)
        self.handles: list = []

    def __enter__(self) -> "ModuleSites":
        self.handles.append(self.model.register_forward_pre_hook(self._next_step, with_kwargs=True))
        for name, module in site_modules(self.model).items():
            self.handles.append(module.register_forward_hook(lambda m, args, out, name=name: self._site(name, out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _next_step(self, module, args, kwargs) -> None:
        """Euler evaluates the model once per step, cond and uncond in one call or apart: a new σ is a new step, and
        each call's batch is split into its branches (transformer_options' cond_or_uncond), cached apart."""
        sigma = float(args[1].flatten()[0])
        if sigma != self.sigma:
            self.step, self.sigma = self.step + 1, sigma
        self.branches = list(kwargs.get("transformer_options", {}).get("cond_or_uncond") or [0])

    def _site(self, name: str, out: torch.Tensor) -> torch.Tensor | None:
        t = float(self.step)
        chunks = out.chunk(len(self.branches))
        if self.plan.full[self.step]:
            for branch, chunk in zip(self.branches, chunks):
                forecaster = self.forecasters.setdefault((name, branch), make_forecaster(self.policy))
                forecaster.update(t, chunk.detach().clone())
            return None
        return torch.cat([self.forecasters[(name, b)].forecast(t, lambda v: v) for b in self.branches])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    h = Harness(args.prompts, 1)
    setting = Setting("euler", STEPS)
    diffusion_model = h.model.model.diffusion_model
    full = h.sample(h.model, setting, h.eval, EVAL_SEED)
    specs = h.eval_specs

    def scored(name: str, n: int, level: str, images: torch.Tensor, fraction: float | None) -> dict:
        row = {"forecaster": name, "interval": n, "level": level, "compute_fraction": fraction,
               "rel_l2": ((images - full).norm() / full.norm()).item(),
               "psnr": None if torch.equal(images, full) else psnr(images, full),
               "adherence": adherence(h.reader, images, specs)}
        print(f"{name:<8} N={n} {level:<6} {'' if fraction is None else f'{fraction:.3f}':>6} "
              f"rel_l2 {row['rel_l2']:.4f} psnr {row['psnr'] or float('inf'):.2f} adherence {row['adherence']:.3f}", flush=True)
        return row

    rows = [scored("full", 1, "-", full, 1.0)]
    for n in INTERVALS:
        for name, extra in FORECASTERS.items():
            block_model = h.apply(h.policy(interval=n, **extra))
            images = h.sample(block_model, setting, h.eval, EVAL_SEED)
            rows.append(scored(name, n, "block", images, h.report(block_model)["compute_fraction"]))
            policy = CachePolicy(interval=n, warmup_steps=1, **extra)
            with torch.no_grad(), ModuleSites(diffusion_model, policy):
                images = h.sample(h.model, setting, h.eval, EVAL_SEED)
            rows.append(scored(name, n, "module", images, None))
    if tree:
        report = {"study": "flux module sites", "command": "COMFYUI_PATH=… python " + " ".join(sys.argv),
                  "machine": machine("cpu"), **provenance(), "prompts": args.prompts, "steps": STEPS, "rows": rows}
        write_result(args.json, report, tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
