"""The ComfyUI benchmark: the trained scenes Flux inside a real ComfyUI, sampled by the stock KSampler node through the
pack's nodes (Cache Policy → [GOC Corrector] → [Fit TCC Priors] → Apply Calibrated Cache) and ComfyUI's EasyCache and
LazyCache, on held-out prompts and seeds.

    COMFYUI_PATH=… python -m benchmarks.scenes.bench [--json benchmarks/results/scenes.json]   # ~30 minutes, 2 cores
    COMFYUI_PATH=… python -m benchmarks.scenes.bench --quick                                    # ~2 minutes

With euler at 20 steps every method runs at fixed intervals 2, 3, 4 and 6 after one warm-up step (nominal compute
fractions 0.5, 0.33, 0.25 and 0.17; the warm-up step makes them about 0.55, 0.41, 0.32 and 0.23 at 20 steps); the other
settings (dpmpp_2m at 20 steps, euler and dpmpp_2m at 50) at interval 4. The thresholds of the dynamic policy and of
the peers are tuned on the calibration prompts to the compute fraction the FORA row of the same interval reaches, and
the peers also run at their nodes' default threshold (0.2). TCC priors are fitted by the Fit TCC Priors node on
calibration prompts and seeds disjoint from the evaluation ones. Full computation at fewer steps, at about each
interval's cost (steps / interval, and one more), is the honest floor beside them. Quality against full computation
from the same noise: rel_l2 and PSNR of the decoded images; prompt adherence and FD from the scene reader. Speed (euler, 20 steps): every config timed against full
computation, interleaved, median of paired ratios. The peers' compute fraction is the share of model evaluations
they run (they skip whole evaluations; their own bookkeeping is not counted).

ComfyUI 0.3.64's EasyCache cannot sample a latent batch of more than one image per prompt: on a skipped step it adds
one image's cached difference to the whole batch (`x += diff`, a shape error), and both peers decide their skips from
the whole batch. So the peers sample one prompt at a time, as users run them, with the very noise the batched runs get
(`batch_index`), and their speed is measured against full computation sampled the same way. ComfyUI 0.8.0's EasyCache
slices per prompt; the runs stay the same on both versions, so their rows compare. On a skipped step EasyCache adds
in place to the model's input, which in float32 (this model) is the tensor the denoised latent is computed from
(studies/easycache_alias.py); a bf16 or fp8 model, as users run, hands it a copy. So EasyCache gets a copy here too:
a diffusion-model wrapper registered before its own clones the input (`with_copied_input`), and its rows measure the
method, not the aliasing (the clone's cost is in its time).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import flux  # boots ComfyUI (CPU mode) before anything imports comfy

import comfy.samplers  # noqa: E402
import comfyui_version  # noqa: E402  (the ComfyUI checkout's, first on sys.path)
import comfy.utils  # noqa: E402
from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode  # noqa: E402
from tiny_models import (  # noqa: E402  (tests/comfyui, on sys.path through flux.py)
    comfyui_nodes, load_pack, session_of, with_copied_input)

from calibrated_cache.testbed.bench import fewer_steps, machine, provenance  # noqa: E402
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result  # noqa: E402

from .codec import context, decode  # noqa: E402
from .data import prompts, scenes  # noqa: E402
from .evaluator import adherence, frechet, psnr, read  # noqa: E402
from .train import load_reader  # noqa: E402

# ICC's quality is measured on this model, whose blocks (width 128) are too small for its speed: the node refuses it
# there unless told to run it anyway; its rows' wall speedups show why.
os.environ.setdefault("CALIBRATED_CACHE_ICC_ANY_SIZE", "1")
EVAL_PROMPTS, CAL_PROMPTS = 1001, 1002  # prompt seeds: evaluation and calibration are disjoint
EVAL_SEED, CAL_SEED = 5000, 7000  # sampling seeds, likewise
TARGETS = {2: 0.5, 3: 0.33, 4: 0.25, 6: 0.17}
POLICY = dict(mode="fixed", forecaster="reuse", interval=3, warmup_steps=1, start=0.0, end=1.0, first_blocks=0,
              last_blocks=0, threshold=0.1, max_skips=4, order=2, time_unit="step", foca_lambda=1.0,
              granularity="block")


@dataclass
class Setting:
    sampler: str
    steps: int


@dataclass
class Config:
    method: str
    params: dict[str, Any]
    target: float | None
    model: Any
    fraction: Callable[[], float] = field(default=lambda: 1.0)
    per_prompt: bool = False  # ComfyUI's EasyCache and LazyCache: one prompt at a time
    steps: int | None = None  # full computation at fewer steps than the setting's

    def setting(self, setting: Setting) -> Setting:
        return setting if self.steps is None else Setting(setting.sampler, self.steps)


class Harness:
    """The nodes, the prompts, and how one config samples and is scored."""

    def __init__(self, n_eval: int, n_cal: int) -> None:
        import folder_paths

        load_pack()
        comfy.utils.PROGRESS_BAR_ENABLED = False  # thousands of samplings: the table is the progress
        # the fits' prior files go to a temporary folder, never into the ComfyUI checkout
        self.priors_dir = tempfile.mkdtemp(prefix="scenes_priors_")
        folder_paths.folder_names_and_paths["cache_priors"] = ([self.priors_dir], {".safetensors"})
        self.nodes = comfyui_nodes()  # ComfyUI's nodes.py: KSampler and the loaded node classes
        mapping = self.nodes.NODE_CLASS_MAPPINGS
        self.policy_node, self.apply_node = mapping["CalibratedCache_CachePolicy"], mapping["CalibratedCache_Apply"]
        self.fit_node, self.goc_node = mapping["CalibratedCache_FitTCCPriors"], mapping["CalibratedCache_GOC"]
        self.model = flux.load()
        self.reader, self.real_mean, self.real_cov = load_reader()
        self.eval_specs, self.cal_specs = prompts(n_eval, EVAL_PROMPTS), prompts(n_cal, CAL_PROMPTS)
        self.eval = self.inputs(self.eval_specs)
        self.cal = self.inputs(self.cal_specs)
        self.first_block = self.model.model.diffusion_model.double_blocks[0]
        self.tuned: dict[tuple[int, int], dict[str, float]] = {}  # (steps, interval) → thresholds

    @staticmethod
    def inputs(specs) -> tuple[list, list, dict]:
        ctx, pooled = context([s.prompt for s in specs])
        empty, empty_pooled = context([""])
        positive = [[ctx, {"pooled_output": pooled}]]
        negative = [[empty, {"pooled_output": empty_pooled}]]
        return positive, negative, {"samples": torch.zeros(len(specs), 16, 16, 16)}

    def policy(self, **settings):
        return self.policy_node.execute(**{**POLICY, **settings}).result[0]

    def apply(self, policy, **inputs):
        return self.apply_node.execute(self.model, policy, **inputs).result[0]

    def sample(self, model, setting: Setting, inputs, seed: int, per_prompt: bool = False,
               cfg: float = 2.0) -> torch.Tensor:
        positive, negative, latent = inputs
        if per_prompt:  # each prompt alone, with the noise it gets in the batch (prepare_noise's batch_index)
            (ctx, extra), = positive
            pooled = extra["pooled_output"]
            return torch.cat([self.sample(model, setting, ([[ctx[i:i + 1], {"pooled_output": pooled[i:i + 1]}]],
                                                           negative, {"samples": latent["samples"][i:i + 1],
                                                                      "batch_index": [i]}), seed, cfg=cfg)
                              for i in range(len(latent["samples"]))])
        out = self.nodes.KSampler().sample(model, seed, setting.steps, cfg, setting.sampler, "simple", positive,
                                            negative, latent)[0]["samples"]
        return decode(out).clamp(-1, 1)

    def counted(self, model, setting: Setting, inputs, seed: int, per_prompt: bool = False) -> tuple[torch.Tensor, int]:
        """Samples and how many times the model's first block ran (a peer skips whole evaluations)."""
        calls = [0]
        handle = self.first_block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            return self.sample(model, setting, inputs, seed, per_prompt), calls[0]
        finally:
            handle.remove()

    def report(self, model) -> dict:
        return session_of(model).last_report

    def peer(self, name: str, threshold: float):
        """ComfyUI's EasyCache (given a copy of its input, see the module's docstring) or LazyCache at a threshold."""
        if name == "easycache":
            return EasyCacheNode.execute(with_copied_input(self.model), threshold, 0.15, 0.95, False).result[0]
        return LazyCacheNode.execute(self.model, threshold, 0.15, 0.95, False).result[0]


def tune(run: Callable[[float], float], target: float, low: float, high: float, iters: int) -> float:
    """A threshold meeting `target` (compute fraction falls as the threshold rises), by bisection on a log scale."""
    best = high
    for _ in range(iters):
        mid = (low * high) ** 0.5
        if run(mid) > target:
            low = mid
        else:
            high = best = mid
    return best


def pack_configs(h: Harness, setting: Setting, quick: bool, log, intervals: list[int]) -> list[Config]:
    configs: list[Config] = []
    for n in intervals:
        target = TARGETS[n]
        kinds = [("fora", {}), ("taylor1", {"forecaster": "taylor", "order": 1}),
                 ("taylor2", {"forecaster": "taylor", "order": 2}), ("foca", {"forecaster": "foca"}),
                 ("taylor2-step", {"forecaster": "taylor", "order": 2, "granularity": "step"})]
        if quick:
            kinds = [kinds[0], kinds[2]]
        for name, extra in kinds:
            model = h.apply(h.policy(interval=n, **extra))
            configs.append(Config(name, {"interval": n, **extra}, target, model))
        for name, extra in [("fora+tcc", {}), ("taylor2+tcc", {"forecaster": "taylor", "order": 2})][:1 if quick else 2]:
            policy = h.policy(interval=n, **extra)
            start = time.perf_counter()
            positive, negative, latent = h.cal
            priors, text = h.fit_node.execute(h.model, policy, positive, negative, latent, samples=3, seed=CAL_SEED,
                                              steps=setting.steps, cfg=2.0, sampler_name=setting.sampler,
                                              scheduler="simple", variant="auto", checkpoint="none",
                                              save_to="cache_priors folder", overwrite=True).result[:2]
            log(f"  fitted {name} N={n} in {time.perf_counter() - start:.1f} s: {text.splitlines()[0]}")
            configs.append(Config(name, {"interval": n, **extra}, target, h.apply(policy, priors=priors)))
        if not quick:
            goc = h.goc_node.execute(h.policy(interval=n), weight=0.8, inflection="auto", threshold=0.0,
                                     steps="").result[0]
            configs.append(Config("fora+goc", {"interval": n, "goc": 0.8}, target, h.apply(goc)))
    if not quick:
        for n in [n for n in (2, 3) if n in intervals]:
            configs.append(Config("icc-r32-plain", {"interval": n, "icc_rank": 32}, TARGETS[n],
                                  h.apply(h.policy(interval=n), icc_rank=32, icc_svd="plain")))
    for config in configs:
        config.fraction = (lambda m=config.model: h.report(m)["compute_fraction"])
    return configs


def fewer_step_configs(h: Harness, setting: Setting, intervals: list[int]) -> list[Config]:
    """Full computation at the step counts nearest each interval's cost (steps / interval, and one more for the warm-up
    step the caching rows compute): the honest floor of every caching row, at the same wall time."""
    return [Config("fewer-steps", {"interval": n, "steps": k}, TARGETS[n], h.model, lambda k=k: k / setting.steps,
                   steps=k) for n, fewer in fewer_steps(setting.steps, intervals) for k in (fewer, fewer + 1)]


def tuned_configs(h: Harness, setting: Setting, quick: bool, log, intervals: list[int]) -> list[Config]:
    """The dynamic policy and ComfyUI's EasyCache and LazyCache, thresholds tuned on the calibration prompts (with
    euler, once per step count) to the compute fraction the fixed FORA policy of each interval reaches there, so that
    every row of an interval spends about the same compute."""
    tune_setting = Setting("euler", setting.steps)
    peers = ("easycache", "lazycache")

    def dynamic(threshold: float):
        return h.apply(h.policy(mode="dynamic", threshold=threshold, max_skips=8))

    @functools.cache
    def full_calls() -> int:  # model evaluations of full computation on the calibration prompts, one at a time
        return h.counted(h.model, tune_setting, h.cal, CAL_SEED, per_prompt=True)[1]

    def pack_fraction(model) -> float:
        h.sample(model, tune_setting, h.cal, CAL_SEED)
        return h.report(model)["compute_fraction"]

    configs = [] if quick else [Config(f"{name}-default", {"reuse_threshold": 0.2}, None, h.peer(name, 0.2),
                                       per_prompt=True) for name in peers]  # as the node comes
    for n in intervals:
        key = (setting.steps, n)
        if key not in h.tuned:
            fraction = pack_fraction(h.apply(h.policy(interval=n)))
            found = {"fbcache": tune(lambda t: pack_fraction(dynamic(t)), fraction, 0.005, 2.0, 5 if quick else 7)}
            for name in peers:
                def peer_fraction(threshold: float, name=name) -> float:
                    model = h.peer(name, threshold)
                    return h.counted(model, tune_setting, h.cal, CAL_SEED, per_prompt=True)[1] / full_calls()

                found[name] = tune(peer_fraction, fraction, 0.005, 3.0, 5 if quick else 7)
            h.tuned[key] = found
            log(f"  tuned to FORA N={n}'s compute fraction {fraction:.3f} at {setting.steps} steps: "
                + ", ".join(f"{k} {v:.4f}" for k, v in found.items()))
        found = h.tuned[key]
        model = dynamic(found["fbcache"])
        configs.append(Config("fbcache", {"threshold": round(found["fbcache"], 4), "max_skips": 8}, TARGETS[n], model,
                              lambda m=model: h.report(m)["compute_fraction"]))
        for name in peers:
            configs.append(Config(name, {"reuse_threshold": round(found[name], 4)}, TARGETS[n],
                                  h.peer(name, found[name]), per_prompt=True))
    return configs


def quality(h: Harness, setting: Setting, configs: list[Config], log) -> list[dict]:
    full = h.sample(h.model, setting, h.eval, EVAL_SEED)
    full_calls_alone = h.counted(h.model, setting, h.eval, EVAL_SEED, per_prompt=True)[1]
    _, _, features = read(h.reader, full)
    rows = [{"setting": f"{setting.sampler} {setting.steps}", "method": "full", "params": {}, "target": None,
             "compute_fraction": 1.0, "rel_l2": 0.0, "psnr": None,
             "adherence": adherence(h.reader, full, h.eval_specs), "fd": frechet(features, h.real_mean, h.real_cov)}]
    log(format_row(rows[0]))
    for c in configs:
        x, calls = h.counted(c.model, c.setting(setting), h.eval, EVAL_SEED, c.per_prompt)
        fraction = calls / full_calls_alone if c.per_prompt else c.fraction()
        rel = float(((x - full).flatten(1).norm(dim=1) / full.flatten(1).norm(dim=1)).mean())
        rows.append({"setting": rows[0]["setting"], "method": c.method, "params": c.params, "target": c.target,
                     "compute_fraction": fraction, "rel_l2": rel, "psnr": psnr(x, full),
                     "adherence": adherence(h.reader, x, h.eval_specs),
                     "fd": frechet(read(h.reader, x)[2], h.real_mean, h.real_cov)})
        log(format_row(rows[-1]))
    return rows


def speed(h: Harness, setting: Setting, configs: list[Config], rows: list[dict], repeats: int, log) -> None:
    """Paired, interleaved: each repeat times full computation (batched, and one prompt at a time for the peers)
    and every config once."""
    models = {"full": (h.model, False, setting), "full alone": (h.model, True, setting),
              **{f"{c.method} {c.params}": (c.model, c.per_prompt, c.setting(setting)) for c in configs}}
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, (model, per_prompt, run) in models.items():
            start = time.perf_counter()
            h.sample(model, run, h.eval, EVAL_SEED, per_prompt)
            times[name].append(time.perf_counter() - start)
    for c, row in zip(configs, rows[1:]):
        reference = times["full alone" if c.per_prompt else "full"]
        ratios = [f / t for f, t in zip(reference, times[f"{c.method} {c.params}"])]
        row["wall_speedup"] = statistics.median(ratios)
        row["spread"] = [min(ratios), max(ratios)]
        row["share_of_ideal"] = row["wall_speedup"] * row["compute_fraction"]
    rows[0]["wall_s"] = statistics.median(times["full"])
    log(f"  speed: full {rows[0]['wall_s']:.2f} s; " + ", ".join(
        f"{r['method']} {r['wall_speedup']:.2f}x" for r in rows[1:]))


def format_row(r: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in r["params"].items() if k not in ("forecaster",))
    target = "" if r["target"] is None else f"{r['target']:.2f}"
    p = "exact" if r["psnr"] is None else f"{r['psnr']:.1f}"
    return (f"{r['setting']:<12} {r['method']:<14} {params:<36.36} {target:>5} {r['compute_fraction']:>6.3f} "
            f"{r['rel_l2']:>7.4f} {p:>6} {r['adherence']:>6.3f} {r['fd']:>8.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 prompts, euler 20 steps, interval 3, few methods")
    parser.add_argument("--prompts", type=int, default=None, help="evaluation prompts (64; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    n_eval = args.prompts or (8 if args.quick else 64)
    settings = [Setting("euler", 20)] if args.quick else [Setting("euler", 20), Setting("dpmpp_2m", 20),
                                                          Setting("euler", 50), Setting("dpmpp_2m", 50)]

    def log(message: str) -> None:
        print(message, flush=True)

    h = Harness(n_eval, 8 if args.quick else 16)
    report: dict[str, Any] = {"schema": "calibrated_cache.scenes/1", "command": "COMFYUI_PATH=… python -m "
                              "benchmarks.scenes.bench " + " ".join(sys.argv[1:]), "quick": args.quick,
                              "machine": machine("cpu"), **provenance(), "comfyui": comfyui_version.__version__,
                              "prompts": n_eval, "rows": []}
    real, real_specs = scenes(512, EVAL_PROMPTS + 10)
    real_adherence = adherence(h.reader, real, real_specs)
    report["real"] = {"adherence": real_adherence, "fd": frechet(read(h.reader, real)[2], h.real_mean, h.real_cov)}
    log(f"real scenes: adherence {real_adherence:.3f}, FD {report['real']['fd']:.3f}")
    for setting in settings:
        log(f"{setting.sampler}, {setting.steps} steps")
        intervals = [3] if args.quick else list(TARGETS) if setting == settings[0] else [4]  # others: about 0.25
        configs = pack_configs(h, setting, args.quick, log, intervals) + tuned_configs(h, setting, args.quick, log,
                                                                                       intervals)
        configs += fewer_step_configs(h, setting, intervals)
        rows = quality(h, setting, configs, log)
        if setting.sampler == "euler" and setting.steps == 20:
            speed(h, setting, configs, rows, args.repeats, log)
        report["rows"] += rows
    if tree:
        write_result(args.json, report, tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
