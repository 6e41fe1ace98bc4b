"""Why ComfyUI's EasyCache gives noise in our CPU benchmarks: on a skipped step it adds its cached difference in place to
the tensor the diffusion model was called with. For a flow model in float32 that tensor is the very one ComfyUI then
computes the denoised latent from (the model's input is cast to the model's dtype, which copies only when the dtypes
differ), so every skipped step corrupts it; with a half-precision model the input is a copy.

This runs EasyCache at two thresholds (a random-weight model changes too fast for its default, 0.2, to skip) on the
ComfyUI tier's tiny Flux (float32, euler, cfg 2), as the node
gives it and with one change outside EasyCache: a diffusion-model wrapper registered before it that hands it a copy of
the input, as a bf16 model's cast would. rel_l2 against full computation of each, over four seeds.
Quality only: nothing is timed.

    COMFYUI_PATH=… python studies/easycache_alias.py [--json benchmarks/results/easycache_alias.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "comfyui"))

import tiny_models  # noqa: E402  (boots ComfyUI)

import comfyui_version  # noqa: E402  (the ComfyUI checkout's, first on sys.path)
import torch  # noqa: E402
from comfy_extras.nodes_easycache import EasyCacheNode  # noqa: E402
from calibrated_cache.testbed.bench import machine, provenance  # noqa: E402
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result  # noqa: E402

FAMILY, STEPS, THRESHOLDS, SEEDS = "Flux", 20, (0.5, 3.0), (1, 2, 3, 4)


def easycache(model, threshold: float, copy: bool):
    if copy:
        model = tiny_models.with_copied_input(model)
    result = EasyCacheNode.execute(model, threshold, 0.15, 0.95, False)
    return (result.result if hasattr(result, "result") else result)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    torch.set_num_threads(1)
    model, positive, negative, latent = tiny_models.FAMILIES[FAMILY]()
    rows = []
    fulls = {seed: tiny_models.run_sampler(model, positive, negative, latent, steps=STEPS, cfg=2.0, seed=seed)
             for seed in SEEDS}
    for threshold in THRESHOLDS:
        for copy in (False, True):
            errors = []
            for seed, full in fulls.items():
                patched = easycache(model, threshold, copy)
                out = tiny_models.run_sampler(patched, positive, negative, latent, steps=STEPS, cfg=2.0, seed=seed)
                errors.append(((out - full).norm() / full.norm()).item())
            rows.append({"threshold": threshold, "input": "copied" if copy else "as ComfyUI passes it",
                         "rel_l2": sum(errors) / len(errors), "rel_l2_per_seed": errors})
            print(f"EasyCache {threshold}, input {rows[-1]['input']}: rel_l2 {rows[-1]['rel_l2']:.4f} "
                  f"(seeds {', '.join(f'{e:.4f}' for e in errors)})", flush=True)
    if tree:
        write_result(args.json, {"study": "easycache_alias", "command": "COMFYUI_PATH=… python " + " ".join(sys.argv),
                                 "machine": machine("cpu"), "comfyui": comfyui_version.__version__, **provenance(),
                                 "family": FAMILY, "steps": STEPS, "rows": rows}, tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
