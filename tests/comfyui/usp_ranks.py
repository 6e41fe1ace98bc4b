"""One rank of a two-process sequence-parallel run, as Raylight runs a DiT on two GPUs, on the CPU with gloo.

`python usp_ranks.py --rank R --world 2 --port P --out DIR --family Flux --cases fixed dynamic ...` (the tests start
one process per rank). What is Raylight's and what is ours:

* Raylight's own code (the source in RAYLIGHT_PATH, imported): its minimal xfuser install (`raylight.xfuser_compat`)
  and xfuser's process groups (`init_distributed_environment`, `initialize_model_parallel`, `get_sp_group`), and the
  USP forwards `raylight.diffusion_models.flux.xdit_context_parallel` (`usp_dit_forward`, the double and single
  stream block forwards) and `raylight.diffusion_models.wan.xdit_context_parallel` (`usp_dit_forward`, the self and
  cross attention forwards): tokens padded to the world size, chunked per rank, the `patches_replace["dit"]` block
  hooks called on each rank's shard, shards all-gathered at the end.
* Ours, because xfuser's attention layer needs CUDA (`xfuser/core/long_ctx_attention/hybrid/attn_layer.py` falls back
  to `object` without it): `make_xfuser_attention` is replaced by exact attention over the keys and values of every
  rank (all-gathered, which equals Ulysses' all-to-all attention), and xfuser 0.7's `envs.get_device_name`, which
  Raylight's minimal stub lacks, is given ("cpu"). Raylight's Flux forward takes a `timestep_zero_index` argument
  the tested ComfyUI versions do not pass, so it is called through an adapter that passes None in its place (as
  Raylight's `USPInjectRegistry` would on the newer ComfyUI it is written for).

Each case runs the pack's policy twice on the same tiny model: single-process (no process group, no USP) and under
USP with the pack's consensus over the ranks (`nodes/raylight.py`), logging every decision. The rank writes
DIR/rank{R}.pt: per case the two outputs, the decision logs, the collectives run and the seconds taken.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 8
REPORTED = ("blocks_skipped", "blocks_computed", "blocks_over_limit", "calls_skipped")
VOTED = {"fixed_voted"}  # run with CALIBRATED_CACHE_CHECK_RANKS=1: the fixed policy's decisions, voted on every call


def timed(run, voted: bool):
    """The run's result and seconds; `voted`: with every skipping call voting across the ranks."""
    if voted:
        os.environ["CALIBRATED_CACHE_CHECK_RANKS"] = "1"
    try:
        start = time.perf_counter()
        return run(), time.perf_counter() - start
    finally:
        if voted:
            os.environ.pop("CALIBRATED_CACHE_CHECK_RANKS", None)


def start_ranks(rank: int, world: int, port: int, timeout: float, parallel: str) -> None:
    """The process group every collective of the run goes through, with a timeout, and xfuser's groups on it:
    `parallel` "usp" shards the tokens over the ranks, "cfg" gives each rank one branch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    import raylight  # noqa: F401  (installs Raylight's minimal xfuser)

    sys.modules["xfuser.envs"].get_device_name = lambda: "cpu"
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel

    init_distributed_environment(rank=rank, world_size=world, backend="gloo")
    if parallel == "usp":
        initialize_model_parallel(sequence_parallel_degree=world, ulysses_degree=world, backend="gloo")
    else:
        initialize_model_parallel(classifier_free_guidance_degree=world, sequence_parallel_degree=1, backend="gloo")
    import raylight.distributed_modules.attention as attention

    attention.set_attn_type("TORCH_MATH")
    attention.set_sync_ulysses(False)
    attention.make_xfuser_attention = lambda *_: exact_attention


def exact_attention(q, k, v, heads, skip_reshape=False, **_):
    """Attention of this rank's queries over every rank's keys and values, shaped as Raylight's xfuser attention
    returns it (batch, tokens, heads × head size)."""
    import torch
    from xfuser.core.distributed import get_sp_group

    if not skip_reshape:
        b, s, _ = q.shape
        q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    group = get_sp_group()
    k, v = (group.all_gather(t.contiguous(), dim=2) for t in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def inject_cfg(patcher, family: str) -> None:
    """Raylight's CFG-parallel DIFFUSION_MODEL wrapper (`raylight.diffusion_models.*.xdit_cfg_parallel`), as its
    worker's `patch_cfg` registers it, on the patcher whose clones the runs sample."""
    import comfy.patcher_extension
    import importlib

    module = importlib.import_module(f"raylight.diffusion_models.{family.lower()}.xdit_cfg_parallel")
    patcher.add_wrapper(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, module.cfg_parallel_forward_wrapper)


def inject_usp(patcher, family: str) -> None:
    """Raylight's USP forwards on the diffusion model (shared by every clone of the patcher)."""
    model = patcher.model.diffusion_model
    if family == "Flux":
        from raylight.diffusion_models.flux import xdit_context_parallel as usp

        for block in model.double_blocks:
            block.forward = types.MethodType(usp.usp_double_stream_forward, block)
        for block in model.single_blocks:
            block.forward = types.MethodType(usp.usp_single_stream_forward, block)

        def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                         transformer_options={}, attn_mask=None):
            return usp.usp_dit_forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, control, None,
                                       transformer_options, attn_mask)

        model.forward_orig = types.MethodType(forward_orig, model)
    else:
        from raylight.diffusion_models.wan import xdit_context_parallel as usp
        from raylight.distributed_modules.usp import _patch_wan_attention_blocks

        _patch_wan_attention_blocks(model, usp.usp_self_attn_forward, usp.usp_t2v_cross_attn_forward)
        model.forward_orig = types.MethodType(usp.usp_dit_forward, model)


def policies(pack, family: str, blocks: int, sigmas: list[float], skew: bool = False) -> dict:
    """Each case: (policy, cache limit in bytes or 0). `skew`: the policies of a rank that diverges from the others
    (another interval, threshold and plan)."""
    calibration = pack["calibration"]
    CachePolicy, BlockPlan = calibration.CachePolicy, pack["plan"].BlockPlan
    GocSettings, IccSettings = pack["goc"].GocSettings, pack["icc"].IccSettings
    block = dict(granularity="block", warmup_steps=1, start=0.0, end=1.0, first_blocks=0, last_blocks=0)
    rows = tuple(("11010110" if b % 2 != skew else "10110101")[:STEPS] for b in range(blocks))
    interval = 4 if skew else 3
    return {
        "interval1": (CachePolicy(mode="fixed", forecaster="reuse", interval=1, **block), 0),
        "fixed": (CachePolicy(mode="fixed", forecaster="taylor", order=2, interval=interval, **block), 0),
        "plan": (CachePolicy(mode="plan", forecaster="taylor", order=1, granularity="block",
                             plan=BlockPlan(tuple(sigmas), rows)), 0),
        "step": (CachePolicy(mode="fixed", forecaster="taylor", order=1, interval=2, granularity="step"), 0),
        "dynamic": (CachePolicy(mode="dynamic", forecaster="reuse", threshold=2.0 if skew else 1.0, max_skips=2,
                                **block), 0),
        "goc": (CachePolicy(mode="fixed", forecaster="reuse", interval=2, goc=GocSettings(), **block), 0),
        "icc": (CachePolicy(mode="fixed", forecaster="reuse", interval=2, icc=IccSettings(rank=8, svd="plain"),
                            **block), 0),
        "fixed_voted": (CachePolicy(mode="fixed", forecaster="taylor", order=2, interval=interval, **block), 0),
        "cap": (CachePolicy(mode="fixed", forecaster="taylor", order=2, interval=interval, **block),
                {"Flux": 2**20, "Wan": 2**17}[family]),
    }


def load_pack() -> dict:
    """The pack as ComfyUI loads it (custom_nodes/<folder>), and the modules the harness uses."""
    import importlib
    import tempfile

    sys.path.insert(1, str(HERE))
    import tiny_models

    tiny_models.load_pack(tempfile.mkdtemp())
    import nodes as comfy_nodes

    package = comfy_nodes.NODE_CLASS_MAPPINGS["CalibratedCache_Apply"].__module__.rsplit(".", 2)[0]
    names = {"calibration": "calibration", "plan": "calibration.plan", "goc": "calibration.goc",
             "icc": "calibration.icc", "memory": "calibration.memory", "consensus": "calibration.consensus",
             "apply": "nodes.apply_node", "raylight": "nodes.raylight"}
    return {k: importlib.import_module(f"{package}.{v}") for k, v in names.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--family", default="Flux", choices=["Flux", "Wan"])
    parser.add_argument("--cases", nargs="+", default=["fixed"])
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds any collective may wait")
    parser.add_argument("--diverge", action="store_true", help="rank 1 runs another policy than rank 0")
    parser.add_argument("--parallel", default="usp", choices=["usp", "cfg"])
    parser.add_argument("--repeats", type=int, default=0, help="timed runs of every case, interleaved (studies)")
    parser.add_argument("--check", action="store_true", help="every skipping call votes (CALIBRATED_CACHE_CHECK_RANKS)")
    parser.add_argument("--cfg", type=float, default=2.0)
    args = parser.parse_args()
    if args.check:
        os.environ["CALIBRATED_CACHE_CHECK_RANKS"] = "1"
    os.environ["CALIBRATED_CACHE_ICC_ANY_SIZE"] = "1"  # tiny blocks (see tests/comfyui/test_icc.py)
    sys.path[:0] = [p for p in (os.environ.get("RAYLIGHT_DEPS"), str(Path(os.environ["RAYLIGHT_PATH"]) / "src")) if p]
    sys.path.insert(0, str(HERE))
    from comfy_boot import bootstrap_comfy

    bootstrap_comfy()
    import torch

    torch.manual_seed(0)
    results: dict = {"parallel": args.parallel}
    try:
        start_ranks(args.rank, args.world, args.port, args.timeout, args.parallel)
        pack = load_pack()
        import tiny_models

        bundle = tiny_models.build_family(args.family)
        session_of = tiny_models.session_of
        sampling = bundle.model_patcher.get_model_object("model_sampling")
        import comfy.samplers

        sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", STEPS).tolist()
        blocks = sum(tiny_models.SPECS[args.family].block_lists.values())
        cases = policies(pack, args.family, blocks, sigmas, skew=args.diverge and args.rank == 1)

        def sample(model) -> torch.Tensor:
            return tiny_models.run_sampler(model, bundle.positive, bundle.negative, bundle.latent, steps=STEPS,
                                           cfg=args.cfg, seed=1)

        def patched(name: str, ranks):
            policy, cap = cases[name]
            if ranks is None:  # a rank's caches hold its shard, so a cap admits on one GPU what twice it would on all
                cap *= args.world
            memory = pack["memory"].CacheMemory(False, cap)
            model, session = pack["apply"].patch_model(bundle.model_patcher.clone(), policy, memory=memory)
            session.decisions = []
            if ranks is not None:
                session.ranks = ranks
            return model, session

        for name in args.cases:  # single process first: the USP forwards replace the shared diffusion model's
            model, session = patched(name, None)
            results[name] = {"single": sample(model), "single_decisions": session.decisions}
        results["uncached_single"] = sample(bundle.model_patcher.clone())
        (inject_usp if args.parallel == "usp" else inject_cfg)(bundle.model_patcher, args.family)
        results["uncached_parallel"] = sample(bundle.model_patcher.clone())
        for name in args.cases:
            counted = []

            def ranks():
                counted.append(pack["raylight"].rank_consensus())
                return counted[-1]

            model, session = patched(name, ranks)
            out, seconds = timed(lambda: sample(model), name in VOTED)
            results[name].update(parallel=out, decisions=session.decisions, seconds=seconds,
                                 collectives=sum(c.collectives for c in counted),
                                 report={k: session.last_report.get(k) for k in REPORTED})
        timing: dict[str, list[float]] = {name: [] for name in ("uncached", *args.cases)}
        for _ in range(args.repeats):  # interleaved, for the study of what the votes cost
            for name in timing:
                model = bundle.model_patcher.clone() if name == "uncached" else patched(
                    name, pack["raylight"].rank_consensus)[0]
                timing[name].append(timed(lambda: sample(model), name in VOTED)[1])
        results["timing"] = timing
    except Exception as err:  # the tests read what failed, on which rank
        results["error"] = f"{type(err).__name__}: {err}"
        results["traceback"] = traceback.format_exc()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(results, args.out / f"rank{args.rank}.pt")
    sys.stdout.flush()
    os._exit(0)  # not through the process group's teardown, which aborts when the peer has already gone


if __name__ == "__main__":
    main()
