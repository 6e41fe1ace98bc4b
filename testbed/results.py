"""Result files behind the docs' figures are written from a committed tree: a figure names the commit that measured
it, and a reader can rebuild that code. A benchmark or study that writes one refuses a tree with uncommitted changes
unless `--allow-dirty` is given, and then stores the diff in the file."""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..priors.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
# Result files are what measurements write, not code: one study may read another's fresh results (plan_oracle.py reads
# plans.json) without the tree counting as changed.
CODE = (".", ":(exclude)benchmarks/results")


@dataclass(frozen=True)
class Tree:
    """The checkout a measurement ran from: its commit (None outside git) and `git diff HEAD` ("" when clean)."""

    commit: str | None
    diff: str = ""

    @property
    def dirty(self) -> bool:
        return bool(self.diff)

    def fields(self) -> dict[str, Any]:
        """What a result file records of it: the diff only when there is one."""
        return {"commit": self.commit, "dirty": self.dirty if self.commit else None,
                **({"uncommitted_diff": self.diff} if self.dirty else {})}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def read_tree(root: Path = ROOT) -> Tree:
    """Tracked files only, as `git status --porcelain --untracked-files=no` sees them, result files aside. Outside a checkout of its own
    (an installed copy, or one copied into another repository, such as a ComfyUI checkout), no commit."""
    try:
        if Path(_git(root, "rev-parse", "--show-toplevel").strip()).resolve() != Path(root).resolve():
            return Tree(None)
        commit = _git(root, "rev-parse", "--short", "HEAD").strip()
        if not _git(root, "status", "--porcelain", "--untracked-files=no", "--", *CODE).strip():
            return Tree(commit)
        return Tree(commit, _git(root, "diff", "--no-color", "--no-ext-diff", "HEAD", "--", *CODE)
                    or "(staged or mode changes)\n")
    except (OSError, subprocess.SubprocessError):
        return Tree(None)


def committed(allow_dirty: bool, root: Path = ROOT) -> Tree:
    """The tree a result file will name; call it before measuring, so a refusal costs nothing."""
    tree = read_tree(root)
    if tree.dirty and not allow_dirty:
        changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *CODE).splitlines()
        raise SystemExit(f"error: {root} has uncommitted changes ({', '.join(c[3:] for c in changed[:5])}"
                         f"{', …' if len(changed) > 5 else ''}), so the result file could not name the code that "
                         "measured it. Commit them first, or pass --allow-dirty to write it anyway with the diff "
                         "recorded in the file (\"uncommitted_diff\").")
    return tree


def add_allow_dirty(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-dirty", action="store_true",
                        help="write the result file from a tree with uncommitted changes, recording the diff in it")


def write_json(report: dict[str, Any], path: str | Path, indent: int = 2) -> Path:
    """Atomic: a reader never sees half a report, and an interrupted write leaves the old file."""
    text = json.dumps(report, indent=indent, default=float) + "\n"
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_result(path: str | Path, report: dict[str, Any], tree: Tree, indent: int = 2) -> Path:
    """`report` with the commit (and diff) of `tree`, from `committed`, written atomically to `path`."""
    return write_json({**report, **tree.fields()}, path, indent)
