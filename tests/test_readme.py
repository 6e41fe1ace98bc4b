"""The README's copy-paste commands are the ones that work: CI runs its test commands verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fenced_commands(text: str) -> list[str]:
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readmes_two_test_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    top = readme[: readme.index("\n## ")]  # the commands the README opens with
    tests = [c for c in fenced_commands(top) if "pytest" in c]
    assert len(tests) == 2 and "tests/comfyui" in tests[1] and "COMFYUI_REQUIRED=1" in tests[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(command in ci.splitlines() for command in tests)
    assert "torch==2.13.0" in tests[0]  # the CPU build on local disk, never an unpinned torch
