"""`python -m calibrated_cache`: the headless commands (demo, benchmark, testbed training)."""

from __future__ import annotations

import argparse
from typing import Sequence


def _demo(args: argparse.Namespace) -> int:
    from .testbed.demo import run_demo

    run_demo(args.out, args.samples)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .testbed.bench import format_tables, run_benchmark, write_json

    report = run_benchmark(args.quick, args.samples, args.flux, args.device, args.skip_quality, args.shift)
    print(format_tables(report))
    if args.json:
        write_json(report, args.json)
        print(f"\nJSON written to {args.json}")
    return 0


def _train_dit(args: argparse.Namespace) -> int:
    from .testbed.train_dit import main as train

    return train(args.rest)


def _train_classifier(args: argparse.Namespace) -> int:
    from .testbed.train_classifier import main as train

    return train(args.rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calibrated_cache", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="sample the embedded testbed with and without caching; write a PNG grid")
    demo.add_argument("--out", default="demo_out", help="folder for demo_grid.png (default: ./demo_out)")
    demo.add_argument("--samples", type=int, default=20, help="digits to sample (default 20)")
    demo.set_defaults(run=_demo)

    bench = sub.add_parser("bench", help="quality at matched compute fractions, and wall speedup vs ideal")
    bench.add_argument("--quick", action="store_true", help="64 samples and a smaller speed stack (< 2 min on 2 cores)")
    bench.add_argument("--json", metavar="PATH", help="also write the report as JSON (schema in README)")
    bench.add_argument("--samples", type=int, help="quality samples (default 256, quick 64)")
    bench.add_argument("--flux", action="store_true", help="speed section on a Flux-sized block stack (GPU only)")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--skip-quality", action="store_true", help="run the speed section only")
    bench.add_argument("--shift", type=float, default=1.0, help="σ-schedule shift of the quality runs (default 1)")
    bench.set_defaults(run=_bench)

    for name, fn, text in (
        ("train-dit", _train_dit, "retrain the testbed DiT on scikit-learn's digits (needs scikit-learn)"),
        ("train-classifier", _train_classifier, "retrain the digits classifier used for accuracy and FD"),
    ):
        cmd = sub.add_parser(name, help=text, add_help=False)
        cmd.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the training script (--help lists them)")
        cmd.set_defaults(run=fn)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)
