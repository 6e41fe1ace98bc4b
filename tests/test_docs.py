"""The docs' figures come from measurements: every table of figures names the command that produced it, the generated
ones match their result files, and every link in the README and the docs leads somewhere."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"`(python |python3 |calibrated-cache |COMFYUI_PATH=|bash )[^`]*`")
MEASUREMENT = re.compile(r"^\**[−+-]?\d+\.\d+\s*(×|x|%| s)?\**(\s*/\s*\**[−+-]?\d+\.\d+\**)*$")  # a cell that is a figure
LOOKBACK = 12  # lines before a table that may name its command


def tables(text: str) -> list[tuple[int, list[str]]]:
    """(first line index, lines) of every Markdown table."""
    lines, found, start = text.splitlines(), [], None
    for i, line in enumerate(lines + [""]):
        if line.startswith("|") and start is None:
            start = i
        elif not line.startswith("|") and start is not None:
            found.append((start, lines[start:i]))
            start = None
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_generated_tables_match_their_result_files():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_table_of_figures_names_the_command_that_produced_it(page):
    lines = page.read_text().splitlines()
    unnamed = []
    for start, rows in tables(page.read_text()):
        cells = [cell.strip() for row in rows[2:] for cell in row.strip("|").split("|")]
        if sum(bool(MEASUREMENT.match(cell)) for cell in cells) < 2:
            continue  # a table of settings or messages, not of measurements
        before = "\n".join(lines[max(0, start - LOOKBACK):start])
        if not COMMAND.search(before):
            unnamed.append(f"line {start + 1}: {rows[0][:60]}")
    assert unnamed == [], f"{page.name}: tables of figures without the command that produced them: {unnamed}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
            continue
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert broken == [], f"{page.name}: broken links {broken}"


def test_the_readme_reads_in_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
