"""Speed of the pack inside a real ComfyUI, on the tiny models of the ComfyUI tier: where a cached run's time goes,
and the wall speedup as a share of the ideal one, paired and interleaved.

    COMFYUI_PATH=/path/to/ComfyUI python studies/comfyui_speed.py profile [--families SD3 Flux] [--steps 20]
    COMFYUI_PATH=/path/to/ComfyUI python studies/comfyui_speed.py share [--families SD3 Flux] [--json out.json]

`profile` splits one cached sampling run (FORA and Taylor-2 at interval 4, batch 1 with CFG) into: the blocks the run
computes, the pack's work on computed and on skipped block calls, the pack's work per model call outside the blocks
(its APPLY_MODEL wrapper; a whole-step forecast lands here), the model's work outside its blocks, and the rest
(sampler, guidance, ComfyUI). It times the model from outside (forward hooks on the diffusion model and its blocks,
the session's block hook and APPLY_MODEL wrapper), so the same command measures an older checkout of the pack (run it
from that checkout). Families whose blocks the pack object-patches (PixArt, Lumina2) are left out: there the block's
own forward is the pack's hook.
`share` times full computation against FORA and Taylor-2 at compute fractions about 0.5, 0.33, 0.25 and 0.17, and
against full computation at that share of the steps (the honest floor), interleaved, over several repeats, and
reports the median of the paired ratios, their spread, and the share of the ideal speedup (1 / compute fraction) it
reaches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "comfyui"))

import tiny_models  # noqa: E402
from tiny_models import (FAMILIES, diffusion_model, load_pack,  # noqa: E402  (boots ComfyUI, CPU mode)
                         run_sampler, session_of)

import torch  # noqa: E402
from calibrated_cache.testbed.bench import fewer_steps, machine, provenance  # noqa: E402
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result  # noqa: E402

POLICY = dict(mode="fixed", forecaster="reuse", interval=4, warmup_steps=0, start=0.0, end=1.0, first_blocks=0,
              last_blocks=0, threshold=0.1, max_skips=3, order=2, time_unit="step", foca_lambda=1.0)
PARTS = ("computed blocks", "pack, computed calls", "pack, skipped calls", "pack, per model call",
         "model outside blocks", "sampler, guidance, ComfyUI")
HOOKED = ("SD3", "Wan", "HunyuanVideo", "Flux", "QwenImage")


SMALL_SD3 = "SD3-3x16"


def _register_small_sd3() -> None:
    """The setting issue 18 was measured in: an SD3 with 3 joint blocks, 16 image tokens (an 8×8 latent) and batch 10
    (random weights: timings do not depend on them); run it with --steps 50."""
    spec = tiny_models.SPECS["SD3"]
    config = {**spec.unet_config, "depth": 3,
              "context_embedder_config": {"target": "torch.nn.Linear",
                                          "params": {"in_features": 4096, "out_features": 64 * 3}}}
    tiny_models.SPECS[SMALL_SD3] = spec._replace(name=SMALL_SD3, unet_config=config, block_lists={"joint_blocks": 3},
                                                 latent_shape=(10, 16, 8, 8))
    FAMILIES[SMALL_SD3] = lambda models_dir=None, seed=0: tiny_models.build_family(SMALL_SD3, models_dir, seed)


_register_small_sd3()


class Timing:
    """Forward hooks on the diffusion model and its blocks, and wrappers on the session's block hook and APPLY_MODEL
    wrapper, accumulating seconds by part over one sampling run."""

    def __init__(self, patched) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.calls = {"computed": 0, "skipped": 0}
        self.patched, self.model, self.session = patched, diffusion_model(patched), session_of(patched)
        self._stack: list[float] = []
        self._block = self._hook = self._forward = 0.0

    def install(self):
        handles = []
        blocks = [m for m in self.model.children() if isinstance(m, torch.nn.ModuleList)]
        for module in [b for blocklist in blocks for b in blocklist]:
            handles.append(module.register_forward_pre_hook(lambda *_: self._stack.append(time.perf_counter())))
            handles.append(module.register_forward_hook(self._block_done))
        handles.append(self.model.register_forward_pre_hook(lambda *_: self._stack.append(time.perf_counter())))
        handles.append(self.model.register_forward_hook(self._model_done))
        session = self.session
        cached_block, apply_model = session.cached_block, session.apply_model

        def timed_block(site, streams, run):
            before, block_before = session.run.stats.blocks_skipped, self._block
            start = time.perf_counter()
            out = cached_block(site, streams, run)
            elapsed = time.perf_counter() - start
            inside = self._block - block_before
            self._hook += elapsed
            skipped = session.run.stats.blocks_skipped > before
            self.seconds["pack, skipped calls" if skipped else "pack, computed calls"] += elapsed - inside
            self.calls["skipped" if skipped else "computed"] += 1
            return out

        def timed_apply(executor, *args, **kwargs):
            forward_before = self._forward
            start = time.perf_counter()
            out = apply_model(executor, *args, **kwargs)
            self.seconds["pack, per model call"] += time.perf_counter() - start - (self._forward - forward_before)
            return out

        session.cached_block = timed_block
        wrappers = self.session_wrappers()
        index = wrappers.index(apply_model) if apply_model in wrappers else None
        if index is not None:
            wrappers[index] = timed_apply
        return handles, index, wrappers, apply_model

    def session_wrappers(self):
        return self.patched.wrappers["apply_model"]["calibrated_cache"]

    def _block_done(self, module, args, output):
        elapsed = time.perf_counter() - self._stack.pop()
        self._block += elapsed
        self.seconds["computed blocks"] += elapsed

    def _model_done(self, module, args, output):
        elapsed = time.perf_counter() - self._stack.pop()
        self._forward += elapsed


def profile_run(family: str, bundle, policy_node, apply_node, settings: dict | None, steps: int) -> dict:
    model, positive, negative, latent = bundle
    if settings is None:
        patched = apply_node.execute(model, policy_node.execute(**{**POLICY, "interval": 1}).result[0]).result[0]
    else:
        patched = apply_node.execute(model, policy_node.execute(**settings).result[0]).result[0]
    timing = Timing(patched)
    handles, index, wrappers, original = timing.install()
    try:
        run_sampler(patched, positive, negative, latent, steps=steps, cfg=2.0)  # warm
        timing.seconds = dict.fromkeys(PARTS, 0.0)
        timing.calls = {"computed": 0, "skipped": 0}
        timing._block = timing._forward = 0.0
        start = time.perf_counter()
        run_sampler(patched, positive, negative, latent, steps=steps, cfg=2.0)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
        if index is not None:
            wrappers[index] = original
    seconds = timing.seconds
    seconds["model outside blocks"] = timing._forward - timing._block - seconds["pack, computed calls"] - \
        seconds["pack, skipped calls"]
    seconds["sampler, guidance, ComfyUI"] = total - sum(v for k, v in seconds.items() if k != "sampler, guidance, ComfyUI")
    report = session_of(patched).last_report
    return {"total": total, "seconds": seconds, "calls": timing.calls, "compute_fraction": report["compute_fraction"]}


def profile(args: argparse.Namespace, policy_node, apply_node) -> list[dict]:
    rows = []
    configs = {"engine, interval 1": None, "fora N=4": POLICY, "taylor2 N=4": {**POLICY, "forecaster": "taylor"}}
    if args.whole_step:
        configs.update({"fora N=4 step": {**POLICY, "granularity": "step"},
                        "taylor2 N=4 step": {**POLICY, "forecaster": "taylor", "granularity": "step"}})
    print(f"{'family':<13} {'config':<18} {'total_s':>8} " + " ".join(f"{p:>26}" for p in PARTS)
          + f" {'pack/skipped call':>17}")
    for family in args.families:
        bundle = FAMILIES[family]()
        results = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, settings in configs.items():
                results[name].append(profile_run(family, bundle, policy_node, apply_node, settings, args.steps))
        for name, runs in results.items():
            median = {p: statistics.median(r["seconds"][p] for r in runs) for p in PARTS}
            total = statistics.median(r["total"] for r in runs)
            skipped = runs[0]["calls"]["skipped"]
            per_skip = 1e6 * median["pack, skipped calls"] / skipped if skipped else 0.0
            rows.append({"family": family, "config": name, "total_s": total, "seconds": median,
                         "calls": runs[0]["calls"], "pack_us_per_skipped_call": per_skip})
            print(f"{family:<13} {name:<18} {total:>8.3f} " + " ".join(
                f"{median[p] * 1e3:>13.1f} ms {median[p] / total:>6.1%}" for p in PARTS) + f" {per_skip:>14.0f} µs",
                flush=True)
    return rows


def share(args: argparse.Namespace, policy_node, apply_node) -> list[dict]:
    rows = []
    intervals = (2, 3, 4, 6)
    print(f"{'family':<13} {'config':<14} {'compute':>7} {'ideal':>7} {'wall speedup':>22} {'share of ideal':>14}")
    for family in args.families:
        model, positive, negative, latent = FAMILIES[family]()
        configs = {"full": (model, args.steps)}
        kinds = [("fora", {}), ("taylor2", {"forecaster": "taylor"})]
        if args.whole_step:
            kinds += [("fora step", {"granularity": "step"}), ("taylor2 step", {"forecaster": "taylor",
                                                                               "granularity": "step"})]
        for n in intervals:
            for name, extra in kinds:
                policy = policy_node.execute(**{**POLICY, "interval": n, **extra}).result[0]
                configs[f"{name} N={n}"] = apply_node.execute(model, policy).result[0], args.steps
        for k in sorted({k for _, k in fewer_steps(args.steps, intervals)}, reverse=True):
            configs[f"full, {k} steps"] = model, k  # the honest floor: full computation at about each cost
        for m, steps in configs.values():
            run_sampler(m, positive, negative, latent, steps=steps, cfg=2.0)
        times = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, (m, steps) in configs.items():
                start = time.perf_counter()
                run_sampler(m, positive, negative, latent, steps=steps, cfg=2.0)
                times[name].append(time.perf_counter() - start)
        for name, (m, steps) in configs.items():
            if name == "full":
                continue
            ratios = [f / c for f, c in zip(times["full"], times[name])]
            fraction = steps / args.steps if m is model else session_of(m).last_report["compute_fraction"]
            speedup = statistics.median(ratios)
            rows.append({"family": family, "config": name, "compute_fraction": fraction, "ideal": 1 / fraction,
                         "wall_speedup": speedup, "spread": [min(ratios), max(ratios)],
                         "share_of_ideal": speedup * fraction})
            print(f"{family:<13} {name:<14} {fraction:>7.3f} {1 / fraction:>6.2f}x {speedup:>6.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}x) {speedup * fraction:>14.2f}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=("profile", "share"))
    parser.add_argument("--families", nargs="+", default=["SD3", "Flux"], choices=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--whole-step", action="store_true", help="also whole-step forecasting (step granularity)")
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    torch.set_num_threads(1)  # as the ComfyUI tier: stable timings on a shared 2-core machine
    policy_node, apply_node = load_pack()
    rows = profile(args, policy_node, apply_node) if args.study == "profile" else share(args, policy_node, apply_node)
    if tree:
        command = "COMFYUI_PATH=… python " + " ".join(sys.argv)
        write_result(args.json, {"study": args.study, "steps": args.steps, "command": command,
                                 "machine": machine("cpu"), **provenance(), "rows": rows}, tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
