"""`python -m calibrated_cache`: the headless commands (demo, benchmark, TCC priors, testbed training)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .calibration.policy import FORECASTERS, GRANULARITIES
from .calibration.tcc import VARIANTS


def _demo(args: argparse.Namespace) -> int:
    from .testbed.demo import DemoError, run_demo

    try:
        run_demo(args.out, args.samples)
    except DemoError as err:
        raise SystemExit(f"error: {err}") from None
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .testbed.bench import format_tables, run_benchmark
    from .testbed.results import committed, write_result

    tree = committed(args.allow_dirty) if args.json else None
    report = run_benchmark(args.quick, args.samples, args.flux, args.device, args.skip_quality, args.shift,
                           args.skip_speed)
    print(format_tables(report))
    if tree:
        write_result(args.json, report, tree)
        print(f"\nJSON written to {args.json}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from .calibration import CachePolicy
    from .testbed.profile import format_breakdown, profile

    policies = {"full": None}
    for name in args.forecasters:
        forecaster, order = ("taylor", int(name[-1])) if name.startswith("taylor") else (name, 1)
        for granularity in args.granularity:
            label = f"{name} N={args.interval}" + ("" if granularity == "module" else f" {granularity}")
            policies[label] = CachePolicy(interval=args.interval, warmup_steps=0, forecaster=forecaster, order=order,
                                          granularity=granularity)
    print(f"testbed DiT, {args.samples} samples, cfg 2 (batched), medians of {args.repeats} interleaved runs")
    print(format_breakdown(profile(policies, args.samples, args.repeats, args.steps)))
    return 0


def _fit_priors(args: argparse.Namespace) -> int:
    from .calibration import CachePolicy, PolicyError
    from .calibration.goc import GocSettings
    from .calibration.icc import IccSettings, StatsRecorder
    from .priors import save_priors
    from .testbed.fit_priors import fit_requests, fit_testbed
    from .testbed.progress import Progress
    from .testbed.weights import load_dit

    try:
        if args.goc_weight is None and args.goc_inflection is not None:
            raise PolicyError("--goc-inflection needs --goc-weight, which attaches GOC to the policy")
        goc = None if args.goc_weight is None else GocSettings(args.goc_weight, args.goc_inflection or "auto")
        icc = None if not args.icc_rank else IccSettings(args.icc_rank, args.icc_svd)
        policy = CachePolicy(interval=args.interval, warmup_steps=args.warmup, forecaster=args.forecaster,
                             order=args.order, granularity=args.granularity, goc=goc, icc=icc)
    except PolicyError as err:
        raise SystemExit(f"error: {err}") from None
    if args.target_speedup is not None:
        return _fit_speed(args, policy)
    if policy.computes_everything():
        raise SystemExit("error: interval 1 computes every step: there is nothing to calibrate; use 2 or more")
    model, meta = load_dit()
    steps = args.steps or int(meta["bench_steps"])
    cfg = float(meta["bench_cfg"]) if args.cfg is None else args.cfg
    out = _out(args, policy.tag())
    progress = Progress(fit_requests(policy, args.variant, args.samples, args.held_out, args.verify, args.rounds),
                        "fit-priors")
    recorder = StatsRecorder()
    try:
        priors, prior_meta = fit_testbed(model, policy, args.samples, steps, cfg, args.sampler, args.shift,
                                         args.variant, not args.oneshot, args.rounds, args.batch,
                                         held_out=args.held_out, verify=args.verify, recorder=recorder,
                                         progress=lambda n, purpose: progress.advance(n, purpose))
    finally:
        progress.close()
    path = save_priors(out, priors, prior_meta, recorder.table())
    r = prior_meta["report"]
    print(f"{r['sites']} sites fitted on {plural(args.samples, 'request')}; rel_l2 against full computation on "
          f"{plural(args.held_out, 'held-out request')}: {r['held_out_before']:.4f} without priors, "
          f"{r['held_out_after']:.4f} with them ({r['held_out_after'] / r['held_out_before'] - 1:+.0%})")
    if args.verify:
        print(f"on the {plural(args.samples, 'fitted request')} (optimistic): {r['in_sample_before']:.4f} without "
              f"priors, {r['in_sample_after']:.4f} with them")
    print(f"written {path}")
    return 0


def _out(args: argparse.Namespace, tag: str) -> str:
    out = args.out or f"dit.{tag}.tcc.safetensors"
    if os.path.exists(out) and not args.overwrite:
        raise SystemExit(f"error: {out} exists; pass --overwrite to replace it or --out to choose another name")
    return out


def _fit_speed(args: argparse.Namespace, base) -> int:
    """`fit-priors --target-speedup S`: search the plan, forecaster and priors for S (calibration/speed_fit.py)."""
    from .calibration import PolicyError
    from .calibration.speed_fit import fit_runs, priors_verdict
    from .priors import save_priors
    from .testbed.fit_priors import fit_testbed_speed
    from .testbed.progress import Progress
    from .testbed.weights import load_dit

    if base.goc is not None or base.icc is not None or args.forecaster != "reuse" or args.interval != 3:
        raise SystemExit("error: --target-speedup chooses the schedule and the forecaster itself; drop --interval, "
                         "--forecaster, --goc-weight and --icc-rank")
    out = _out(args, f"SPEEDUP{args.target_speedup:g}")  # the plan's tag is known only at the end
    model, meta = load_dit()
    steps = args.steps or int(meta["bench_steps"])
    cfg = float(meta["bench_cfg"]) if args.cfg is None else args.cfg
    runs = fit_runs(held_out=args.held_out > 0, variant=args.variant)
    progress = Progress(sum(args.samples if part == "fit" else args.held_out for part, _ in runs), "fit-priors")
    try:
        fitted, prior_meta = fit_testbed_speed(model, base, args.target_speedup, args.samples, steps, cfg,
                                               args.sampler, args.shift, args.variant, held_out=args.held_out,
                                               progress=lambda n, part: progress.advance(n, part))
        progress.finish()
    except PolicyError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        progress.close()
    path = save_priors(out, fitted.priors, prior_meta)
    r = prior_meta["report"]
    print(f"searched plan for {args.target_speedup:g}x: {fitted.policy.tag()}, compute fraction "
          f"{r['plan_file_fraction']:.3f} measured as saved ({1 / r['plan_file_fraction']:.2f}x; predicted "
          f"{r['plan_predicted_fraction']:.3f}, the plan without priors {r['plan_calibration_fraction']:.3f}); target "
          f"at most {1 / args.target_speedup:.3f}")
    print(fitted.policy.plan.picture())
    for c in fitted.candidates:
        print(f"  candidate {c.policy.tag()} ({c.aggregate}): predicted rel_l2 {c.predicted ** 0.5:.4f}, measured "
              f"{c.error:.4f} on the calibration requests")
    print(f"refined by {int(r['plan_refine_runs'])} runs: {r['plan_searched_error']:.4f} -> "
          f"{r['plan_calibration_error']:.4f} on the calibration requests")
    print(f"search {r['plan_search_s']:.2f} s and {r['plan_search_bytes'] / 2**20:.1f} MiB of tables; the fit took "
          f"{r['fit_s']:.1f} s and {int(r['plan_runs'])} runs over {args.samples} calibration requests "
          f"({args.held_out} held out)")
    for note in fitted.skipped:
        print(f"not searched: {note}")
    print(f"rel_l2 against full computation on {args.held_out} held-out requests: {r['held_out_before']:.4f} with the "
          f"plan alone, {r['held_out_after']:.4f} with its TCC priors ({fitted.priors.variant}); on the calibration "
          f"requests (measured with or without --verify: they decide the priors) {r['in_sample_before']:.4f} and "
          f"{r['in_sample_after']:.4f}")
    print(priors_verdict(r, fitted.priors.variant, "requests"))
    print(f"written {path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .priors import PriorFileError, file_hash, load_priors
    from .priors.report import summarize

    if os.path.isdir(args.file):
        found = sorted(n for n in os.listdir(args.file) if n.endswith(".safetensors"))
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        inside = f"; it holds {', '.join(found[:5])}{more}" if found else "; it holds no .safetensors file"
        raise SystemExit(f"error: {args.file} is a directory: give a prior file (.safetensors) inside it{inside}")
    try:
        summary = summarize(load_priors(args.file), args.sites)
        print(f"{'file':<13} sha256 {file_hash(args.file)} (the same on every machine that holds this file)")
        print(summary)
    except PriorFileError as err:
        raise SystemExit(f"error: {err}") from None
    return 0


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {value})")
    return value


def parser() -> argparse.ArgumentParser:
    from .testbed.results import add_allow_dirty

    p = argparse.ArgumentParser(prog="python -m calibrated_cache", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="sample the embedded testbed with and without caching; write a PNG grid")
    demo.add_argument("--out", default="demo_out", help="folder for demo_grid.png (default: ./demo_out)")
    demo.add_argument("--samples", type=positive, default=20, help="digits to sample (default 20)")
    demo.set_defaults(run=_demo)

    bench = sub.add_parser("bench", help="quality at matched compute fractions, and wall speedup vs ideal")
    bench.add_argument("--quick", action="store_true", help="64 samples and a smaller speed stack (< 2 min on 2 cores)")
    bench.add_argument("--json", metavar="PATH", help="also write the report as JSON (schema in README)")
    bench.add_argument("--samples", type=int, help="quality samples (default 256, quick 64)")
    bench.add_argument("--flux", action="store_true", help="speed section on a Flux-sized block stack (GPU only)")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--skip-quality", action="store_true", help="run the speed section only")
    bench.add_argument("--skip-speed", action="store_true", help="run the quality section only (no timing: it may "
                                                                  "share the machine with other work)")
    bench.add_argument("--shift", type=float, default=1.0, help="σ-schedule shift of the quality runs (default 1)")
    add_allow_dirty(bench)
    bench.set_defaults(run=_bench)

    prof = sub.add_parser("profile", help="where a cached run's time goes: blocks, the pack's work, the rest")
    prof.add_argument("--samples", type=positive, default=256, help="requests per run (default 256, the benchmark's)")
    prof.add_argument("--steps", type=positive, help="sampling steps (default: the benchmark's 24)")
    prof.add_argument("--interval", type=positive, default=4, help="policy interval (default 4)")
    prof.add_argument("--repeats", type=positive, default=3, help="interleaved runs per configuration (default 3)")
    prof.add_argument("--forecasters", nargs="+", default=["reuse", "taylor2", "foca"],
                      choices=("reuse", "taylor1", "taylor2", "taylor3", "foca", "spectrum", "dmd"),
                      help="configurations besides full computation")
    prof.add_argument("--granularity", nargs="+", default=["module"], choices=GRANULARITIES,
                      help="what a skipped evaluation fills in, one configuration each (default module; block is "
                           "ComfyUI's, cached in spans)")
    prof.set_defaults(run=_profile)

    fit = sub.add_parser("fit-priors", help="fit TCC calibration priors for a cache policy on the testbed")
    fit.add_argument("--interval", type=int, default=3, help="policy: compute one step in N (default 3)")
    fit.add_argument("--forecaster", default="reuse", choices=FORECASTERS,
                     help="policy: how skipped sites are filled (default reuse, FORA's)")
    fit.add_argument("--order", type=int, default=1, help="policy: Taylor order (default 1)")
    fit.add_argument("--warmup", type=int, default=0, help="policy: warm-up steps (default 0)")
    fit.add_argument("--granularity", default="module", choices=GRANULARITIES,
                     help="policy: what a skipped evaluation fills in: module (default, G3: each block's sites), "
                          "block (G2: each block's residual) or step (G1: the model's whole output, skipping the "
                          "embedders and final layer too)")
    fit.add_argument("--goc-weight", type=float, help="policy: attach GOC with this weight (fitted with GOC active)")
    fit.add_argument("--goc-inflection", choices=("auto", "off"), help="GOC inflection handling (default auto)")
    fit.add_argument("--icc-rank", type=positive, help="policy: ICC at this rank (fitted with ICC active)")
    fit.add_argument("--icc-svd", default="channel-aware", choices=("channel-aware", "plain"),
                     help="ICC factorisation (default channel-aware, from the statistics this fit records)")
    fit.add_argument("--variant", default="auto", choices=("auto", *VARIANTS),
                     help="prior form: auto (default: drift for reuse, mm for taylor/foca; with --target-speedup, each "
                          "variant fitted and the best on the calibration requests kept), drift, trend or mm")
    fit.add_argument("--samples", type=positive, default=64, help="requests the priors are fitted on (default 64)")
    fit.add_argument("--held-out", type=positive, default=16,
                     help="other requests the fit's error is reported on (default 16)")
    fit.add_argument("--verify", action="store_true",
                     help="also report the error on the fitted requests (three more runs over them)")
    fit.add_argument("--batch", type=positive, help="samples per batch (default: all in one)")
    fit.add_argument("--rounds", type=positive, default=1, help="fit rounds (default 1; more when batched)")
    fit.add_argument("--oneshot", action="store_true", help="ablation: fit every prior on one uncalibrated run")
    fit.add_argument("--steps", type=positive, help="sampling steps (default: the benchmark's 24)")
    fit.add_argument("--cfg", type=float, help="guidance scale (default: the benchmark's 2.0)")
    fit.add_argument("--sampler", default="euler", choices=("euler", "heun"), help="sampler (default euler)")
    fit.add_argument("--shift", type=float, default=1.0, help="σ-schedule shift (default 1)")
    fit.add_argument("--target-speedup", type=float, metavar="S",
                     help="search the plan (which steps compute), the forecaster and the priors for S times fewer "
                          "FLOPs, instead of fitting priors for the policy given by --interval/--forecaster")
    fit.add_argument("--out", help="prior file (default dit.<policy tag>.tcc.safetensors, with --target-speedup S "
                                   "dit.SPEEDUP<S>.tcc.safetensors)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing file")
    fit.set_defaults(run=_fit_priors)

    inspect = sub.add_parser("inspect", help="print a prior file's metadata and per-step summary")
    inspect.add_argument("file", help="a .tcc.safetensors file")
    inspect.add_argument("--sites", action="store_true", help="also list every site")
    inspect.set_defaults(run=_inspect)

    from .testbed import train_classifier, train_dit

    for name, module, text in (
        ("train-dit", train_dit, "retrain the testbed DiT on scikit-learn's digits (needs the [train] extra)"),
        ("train-classifier", train_classifier, "retrain the digits classifier used for accuracy and FD (needs the "
                                               "[train] extra)"),
    ):
        cmd = sub.add_parser(name, help=text, description=module.__doc__.splitlines()[0])
        module.add_arguments(cmd)
        cmd.set_defaults(run=module.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .testbed.data import MissingDependency
    from .testbed.weights import ShippedWeights

    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (MissingDependency, ShippedWeights) as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback through torch; 130 as a shell reports SIGINT
        print(f"interrupted: {args.command} stopped before the end; it writes files only when it finishes, so none "
              "is half-written", file=sys.stderr)
        return 130
