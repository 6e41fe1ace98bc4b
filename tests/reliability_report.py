"""Writes the reliability report (tests/reports/reliability.md): the bad prior files tried and the message each gets
today, a long fuzz campaign of the prior loader, and, with a ComfyUI checkout, the queue soak and interrupt tests.

    python tests/reliability_report.py --fuzz-examples 3000 [--comfyui /path/to/ComfyUI]

Every figure comes from a run made by this script; run it with an interpreter that has the test extras (and ComfyUI's
requirements for --comfyui).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from calibrated_cache.priors import PriorFileError, load_priors

from prior_cases import CASES, MARKER

HERE = Path(__file__).resolve().parent


def catalogue() -> list[tuple[str, str]]:
    """(bad input, the message it gets); a case that loads or raises anything else is reported as such."""
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as folder:
            try:
                load_priors(case.make(Path(folder)))
                got = "LOADED (not refused)"
            except PriorFileError as err:
                got = str(err) if re.search(case.message, str(err)) else f"UNEXPECTED MESSAGE: {err}"
            except Exception as err:  # a crash is what the report exists to show
                got = f"CRASH: {type(err).__name__}: {err}"
            if (Path(folder) / MARKER).exists():
                got = f"CODE EXECUTED: {got}"
        rows.append((case.label, got))
    return rows


def pytest_run(args: list[str], env: dict[str, str]) -> tuple[str, list[str], float]:
    """The summary line of a pytest run, its per-test outcome lines and its wall time."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args],
                          cwd=HERE.parent, env={**os.environ, **env}, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    outcomes = [line for line in lines if line.startswith(("PASSED ", "FAILED ", "ERROR ", "SKIPPED "))]
    return (lines[-1].strip("= ") if lines else done.stderr[-500:]), outcomes, time.monotonic() - start


def table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(map(cell, r))} |" for r in rows)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzz-examples", type=int, default=3000, help="hypothesis examples per fuzz strategy")
    parser.add_argument("--comfyui", help="a ComfyUI checkout: also run the queue soak and interrupt tests")
    parser.add_argument("--out", default=str(HERE / "reports" / "reliability.md"))
    args = parser.parse_args()
    report = Path(tempfile.mkdtemp(prefix="cc_report_"))
    env = {"CC_REPORT_DIR": str(report)}
    lines = ["# Reliability report", "",
             f"Written by `python tests/reliability_report.py --fuzz-examples {args.fuzz_examples}"
             f"{' --comfyui PATH' if args.comfyui else ''}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: "
             f"Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPU cores, GPU "
             f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}.", ""]

    summary, _, wall = pytest_run(["tests/test_prior_fuzz.py"],
                                  {**env, "CC_FUZZ_EXAMPLES": str(args.fuzz_examples)})
    counts = json.loads((report / "fuzz.json").read_text())["counts"] if (report / "fuzz.json").exists() else []
    total = sum(r["cases"] for r in counts)
    crashes = sum(r["cases"] for r in counts if r["outcome"] == "crash")
    lines += ["## Fuzz of the prior loader (hypothesis)", "",
              f"{total} cases in {wall:.0f} s, crashes: {crashes}. pytest: `{summary}`.", "",
              "A case is a file given to `read_metadata` (the header reader behind the graph editor's prior card) and "
              "`load_priors`. It passes when it loads cleanly, with every invariant the engine, the nodes and the "
              "card rely on holding and the consumers (card, `inspect` summary, schedule check) running, or is refused "
              "with a `PriorFileError` naming the file and the fix. Anything else counts as a crash.", "",
              *table(("strategy", "outcome", "cases"), [(r["strategy"], r["outcome"], r["cases"]) for r in counts]),
              ""]

    rows = catalogue()
    lines += ["## Bad prior files and the message each gets", "",
              f"{len(rows)} hand-made bad inputs (tests/prior_cases.py; `test_prior_files.py` checks each message). "
              "The file names are those the test writes.", "", *table(("bad input", "message"), rows), ""]

    if args.comfyui:
        summary, outcomes, wall = pytest_run(["tests/comfyui/test_queue.py"], {**env, "COMFYUI_PATH": args.comfyui})
        soak = json.loads((report / "soak.json").read_text()) if (report / "soak.json").exists() else {}
        lines += ["## Queue soak and interrupts (ComfyUI tier, HTTP API)", "",
                  f"`tests/comfyui/test_queue.py`: `{summary}` in {wall:.0f} s.", "",
                  *(f"- {line}" for line in outcomes), "", "The soak's figures:", "",
                  *table(("figure", "value"), [(k, json.dumps(v) if isinstance(v, (dict, list)) else v)
                                               for k, v in soak.items()]), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 1 if crashes or any(m.startswith(("LOADED", "UNEXPECTED", "CRASH", "CODE")) for _, m in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
