"""The README's copy-paste commands are the ones that work: CI runs its test commands verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fenced_commands(text: str) -> list[str]:
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readmes_test_commands_verbatim_the_comfyui_tier_on_both_versions():
    readme = (ROOT / "README.md").read_text()
    top = readme[: readme.index("\n## ")]  # the commands the README opens with
    tests = [c for c in fenced_commands(top) if "pytest" in c]
    assert len(tests) == 3
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(command in ci for command in tests)
    for command, version in zip(tests[1:], ("0.3.64", "0.8.0")):
        argument = "" if version == "0.3.64" else f" {version}"  # install.sh's default version is 0.3.64
        assert re.search(r"install\.sh \S+" + re.escape(argument) + r" \|", command), (version, command)
        assert "tests/comfyui" in command and "COMFYUI_REQUIRED=1" in command
        assert ci[ci.index(command) - 1] == f'export CC_TIER="ComfyUI {version}"'  # each version's own count line
    assert "torch==2.13.0" in tests[0]  # the CPU build on local disk, never an unpinned torch
