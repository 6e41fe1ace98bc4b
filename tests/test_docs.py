"""The docs' figures come from measurements: every table of figures names the command that produced it, the generated
ones match their result files, the figures quoted in prose equal their result files' values, and every link in the
README and the docs leads somewhere."""

import ast
import functools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"`(python |python3 |calibrated-cache |COMFYUI_PATH=|bash )[^`]*`")
MEASUREMENT = re.compile(r"^\**[−+-]?\d+\.\d+\s*(×|x|%| s)?\**(\s*/\s*\**[−+-]?\d+\.\d+\**)*$")  # a cell that is a figure
LOOKBACK = 12  # lines before a table that may name its command
RESULTS = ROOT / "benchmarks" / "results"


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


def test_a_generated_table_leaves_out_a_column_no_result_fills_yet_and_keeps_a_partly_filled_one(monkeypatch):
    """A row a rerun has not measured yet (full computation at fewer steps, before its result files are rerun) must
    not leave an empty column in the docs; once one row has it, the column shows, blank where others lack it."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import tables

    machine = {"processor": "x86_64", "cpu_count": 2, "torch": "2.13.0", "device": "cpu"}
    columns = [("config", lambda r: r["config"]), ("floor", tables.number("floor", 2))]
    monkeypatch.setitem(tables.TABLES, "probe", ("probe.json", "probe", lambda r: r["rows"], columns))
    report = {"machine": machine, "rows": [{"config": "fora"}, {"config": "taylor2", "floor": None}]}
    monkeypatch.setattr(tables, "load", lambda name: report)
    assert "| config |\n|---|\n| fora |\n| taylor2 |" in tables.render("probe")
    report["rows"][1]["floor"] = 0.25
    assert "| config | floor |\n|---|---|\n| fora |  |\n| taylor2 | 0.25 |" in tables.render("probe")


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


# Figures quoted in prose, each tied to the result file it comes from. The values are read from the file at test time
# and formatted as the prose writes them: when a result file is regenerated, every sentence whose figures it changes
# fails here, naming the page, the sentence and the file, until the prose says what the file says.


@dataclass(frozen=True)
class Figure:
    page: str  # relative to the repository root
    text: str  # the sentence as it reads on the page (any line breaks), with {} where each figure stands
    source: str  # the result file(s) and the fields the figures come from, for the failure message
    values: Callable[[], Sequence[str]]  # the figures, read from the result file and formatted as the prose writes them


@functools.cache
def result(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def one(rows: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    """The one row whose fields (or params) equal `where`."""
    found = [r for r in rows if all(r.get(k, r.get("params", {}).get(k)) == v for k, v in where.items())]
    assert len(found) == 1, f"{len(found)} rows match {where}"
    return found[0]


def fixed(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def slashed(xs: Sequence[float], digits: int) -> str:
    return " / ".join(fixed(x, digits) for x in xs)


def spread(xs: Sequence[float], digits: int) -> str:
    return f"{min(xs):.{digits}f}–{max(xs):.{digits}f}"


def percents(xs: Sequence[float]) -> str:
    return f"{100 * min(xs):.0f}–{100 * max(xs):.0f}%"


def below(new: float, old: float) -> str:
    """How far `new` is below `old`, as the prose writes it ("49%"); negative when it is above, so "below" fails."""
    return f"{1 - new / old:.0%}"


def above(new: float, old: float) -> str:
    """How far `new` is above `old` ("4%"); negative when it is below."""
    return f"{new / old - 1:.0%}"


def same(*figures: str) -> str:
    """One figure the prose states for several values: all of them must round to it."""
    return figures[0] if len(set(figures)) == 1 else " or ".join(figures)


INTERVALS = (2, 3, 4, 6)


def quality(method: str, interval: int) -> dict[str, Any]:
    return one(result("testbed.json")["quality"]["rows"], method=method, interval=interval)


def quantized() -> dict[str, Any]:
    return result("quantized_icc.json")["rows"][0]


SCENES_0364, SCENES_080 = "scenes.json", "scenes_080.json"  # the README quotes ComfyUI 0.8.0's


def scenes(method: str, target: float | None, setting: str = "euler 20", source: str = SCENES_0364) -> dict[str, Any]:
    return one(result(source)["rows"], setting=setting, method=method, target=target)


def gpu_cost(name: str, config: str) -> dict[str, Any]:
    return one(result(name)["rows"], config=config)


def largest_gpu_cost_error() -> float:
    """The largest distance of a two-rank run to the same policy in one process, over both studies."""
    return max(r["rel_l2_vs_one_process"] for name in ("multi_gpu_cost.json", "multi_gpu_cost_cfg.json")
               for r in result(name)["rows"])


def fewer_scenes(steps: int, setting: str = "euler 20") -> dict[str, Any]:
    """Full computation at `steps` steps in the 0.3.64 scenes benchmark."""
    return one(result(SCENES_0364)["rows"], setting=setting, method="fewer-steps", steps=steps)


def spans(config: str) -> dict[str, Any]:
    return one(result("spans.json")["rows"], config=config)


def target(name: str, speedup: float) -> dict[str, Any]:
    """One target of a scenes plan study, its rows by method (and params)."""
    return one(result(name)["targets"], target=speedup)


def plan_row(name: str, speedup: float) -> dict[str, Any]:
    return one(target(name, speedup)["rows"], method="plan+tcc")


def uniform_rows(name: str, speedup: float, warmup: int | None = None) -> list[dict[str, Any]]:
    return [r for r in target(name, speedup)["rows"] if "interval" in r["params"]
            and (warmup is None or r["params"]["warmup"] == warmup)]


def best_uniform(name: str, speedup: float, warmup: int | None = None) -> dict[str, Any]:
    return min(uniform_rows(name, speedup, warmup), key=lambda r: r["rel_l2"])


def plan_change(name: str, speedup: float) -> str:
    return below(plan_row(name, speedup)["rel_l2"], target(name, speedup)["best_uniform"]["rel_l2"])


def held_out_change(name: str, speedup: float) -> str:
    report = target(name, speedup)["fit_report"]
    return below(report["held_out_after"], report["held_out_before"])


def fit_samplings(name: str) -> list[float]:
    return [t["fit_report"]["fit_cost_samplings"] for t in result(name)["targets"]]


def fit_cost() -> list[float]:
    """Fit TCC Priors' cost on a given policy, in samplings of one seed, on every tiny ComfyUI model."""
    return [r["samplings"] for r in result("comfyui_fit_cost.json")["rows"]]


def plan_study(speedup: float) -> dict[str, Any]:
    return one(result("plans.json")["rows"], target=speedup)


def plan_study_change(speedup: float) -> float:
    r = plan_study(speedup)
    return r["plan"]["with_tcc"]["rel_l2"] / r["best_uniform"]["rel_l2"] - 1


def variant_row(plan: str) -> dict[str, Any]:
    return one(result("plan_variants.json")["rows"], plan=plan)


def oracle(speedup: float) -> dict[str, Any]:
    return one(result("plan_oracle.json")["rows"], target=speedup)


def comfyui_share(name: str, family: str, config: str) -> dict[str, Any]:
    return one(result(name)["rows"], family=family, config=config)


def sd3_small(config: str) -> dict[str, Any]:
    """The setting issue 18 was measured in: SD3 with 3 joint blocks and 16 tokens."""
    return comfyui_share("comfyui_share_sd3_small.json", "SD3-3x16", config)


def speed(section: str, method: str, interval: int) -> dict[str, Any]:
    return one(result("testbed_speed.json")["speed"][section]["rows"], method=method, interval=interval)


def fit_samples(policy: str, samples: int) -> dict[str, Any]:
    return one(result("fit_samples.json")["rows"], policy=policy, samples=samples)


def module_sites(forecaster: str, interval: int, level: str) -> dict[str, Any]:
    return one(result("flux_module_sites.json")["rows"], forecaster=forecaster, interval=interval, level=level)


BLOCK_LEVEL = ("fora", "taylor1", "taylor2", "foca", "fora+tcc", "taylor2+tcc", "fora+goc")  # the pack's, per block
SP, SP30 = "scenes_plans.json", "scenes_plans_30.json"


def block_level_shares(source: str = SCENES_0364) -> str:
    """The range of share_of_ideal over the pack's block-level rows of the scenes benchmark, euler 20."""
    return spread([r["share_of_ideal"] for r in result(source)["rows"]
                   if r["setting"] == "euler 20" and r["method"] in BLOCK_LEVEL], 2)


def spans_shares(level: str) -> str:
    """The range of share_of_ideal over the spans study's rows at one level ("spans" or "module")."""
    return spread([r["share_of_ideal"] for r in result("spans.json")["rows"] if r["config"].endswith(" " + level)], 2)


def module_sites_gain(forecaster: str, intervals: Sequence[int]) -> list[float]:
    """How much module-level sites lower `forecaster`'s rel_l2 against whole blocks, per interval."""
    return [1 - module_sites(forecaster, n, "module")["rel_l2"] / module_sites(forecaster, n, "block")["rel_l2"]
            for n in intervals]


FIGURES = [
    # README: what it does, measured
    Figure("README.md", "block-level caching reaches {} of it on a model this small",
           "scenes_080.json: share_of_ideal of the pack's block-level rows, euler 20",
           lambda: [block_level_shares(SCENES_080)]),
    Figure("README.md", "module sites lower FORA's error by {} at the same schedule",
           "flux_module_sites.json: 1 - rel_l2 module / block, FORA, intervals 2-6",
           lambda: [percents(module_sites_gain("fora", INTERVALS))]),
    Figure("README.md", "and cost speed ({} of the ideal against {} on the testbed)",
           "spans.json: share_of_ideal of the module rows, and of the spans rows",
           lambda: [spans_shares("module"), spans_shares("spans")]),
    Figure("README.md", "FORA at intervals 2 / 3 / 4 / 6 reaches {} of the ideal on the testbed (compute fractions {})",
           "spans.json: rows 'fora N=… spans', share_of_ideal and compute_fraction",
           lambda: [slashed([spans(f"fora N={n} spans")["share_of_ideal"] for n in INTERVALS], 2),
                    slashed([spans(f"fora N={n} spans")["compute_fraction"] for n in INTERVALS], 2)]),
    Figure("README.md", "and {} on tiny Flux in ComfyUI ({}); above 1, a cached run allocates less",
           "comfyui_share.json: rows Flux 'fora N=…', share_of_ideal and compute_fraction",
           lambda: [slashed([comfyui_share("comfyui_share.json", "Flux", f"fora N={n}")["share_of_ideal"]
                             for n in INTERVALS], 2),
                    slashed([comfyui_share("comfyui_share.json", "Flux", f"fora N={n}")["compute_fraction"]
                             for n in INTERVALS], 2)]),
    # README: calibrate for a speed target
    Figure("README.md", "A fit costs {} samplings of one\nseed, and up to 16 more",
           "scenes_plans.json: fit_cost_samplings", lambda: [spread(fit_samplings(SP), 0)]),
    Figure("nodes/fit_node.py", "Costs about {} samplings of one seed",
           "scenes_plans.json: fit_cost_samplings (the target_speedup tooltip)",
           lambda: [spread(fit_samplings(SP), 0)]),
    # README: settings, fitting
    Figure("README.md", "FORA was closer to full computation than Taylor-2 on {} of the {} tiny models",
           "families.json: rows with fora_rel_l2 < taylor2_rel_l2, of all rows",
           lambda: [str(sum(r["fora_rel_l2"] < r["taylor2_rel_l2"] for r in result("families.json")["rows"])),
                    str(len(result("families.json")["rows"]))]),
    Figure("README.md", "less than half of FORA's error on the testbed and {} less on the trained Flux (ComfyUI 0.8.0; "
           "{} less on 0.3.64)",
           "scenes_080.json and scenes.json: fora+goc against fora rel_l2, euler 20, interval 2",
           lambda: [below(scenes("fora+goc", 0.5, source=SCENES_080)["rel_l2"],
                          scenes("fora", 0.5, source=SCENES_080)["rel_l2"]),
                    below(scenes("fora+goc", 0.5)["rel_l2"], scenes("fora", 0.5)["rel_l2"])]),
    Figure("docs/methods.md", "Every fit chose a mixed plan and kept {} of its target by the clock (the cost model "
           "predicted {}×; the fit's own held-out measurement, on 16 prompts, read {}×)",
           "wall_targets.json: ratio_to_target; fit_report predicted and measured speedups",
           lambda: [spread([t["ratio_to_target"] for t in result("wall_targets.json")["targets"]], 2),
                    slashed([t["fit_report"]["plan_predicted_speedup"] for t in result("wall_targets.json")["targets"]], 2),
                    slashed([t["fit_report"]["plan_measured_speedup"] for t in result("wall_targets.json")["targets"]], 2)]),
    Figure("docs/methods.md", "(at 4×, {} below the\nbest uniform policy, whole steps at interval 5",
           "wall_targets.json: target 4, fit rel_l2 against best whole-step rel_l2",
           lambda: [below(one(result("wall_targets.json")["targets"], target=4)["fit"]["rel_l2"],
                          one(result("wall_targets.json")["targets"], target=4)["best whole-step"]["rel_l2"])]),
    Figure("docs/methods.md", "At 30 steps the fits kept {} of their targets", "wall_targets_30.json: ratio_to_target",
           lambda: [spread([t["ratio_to_target"] for t in result("wall_targets_30.json")["targets"]], 2)]),
    Figure("docs/methods.md", "by rel_l2 (at 4×, {} below FORA at interval 6)",
           "wall_targets_30.json: target 4, fit rel_l2 against best block (fora N6) rel_l2",
           lambda: [below(one(result("wall_targets_30.json")["targets"], target=4)["fit"]["rel_l2"],
                          one(result("wall_targets_30.json")["targets"], target=4)["best block"]["rel_l2"])]),
    Figure("docs/methods.md", "block policies stop at {}× (FORA at interval 8 still costs {} of the compute)",
           "wall_targets_sd3.json: the fastest block baseline row; fora N8 compute_fraction",
           lambda: [fixed(max(r["wall_speedup"] for r in result("wall_targets_sd3.json")["baseline"]["block"]), 2),
                    fixed(one(result("wall_targets_sd3.json")["baseline"]["block"], config="fora N8")
                          ["compute_fraction"], 3)]),
    Figure("docs/methods.md", "The fits kept {} of their targets by the clock. At 2× the mixed plan",
           "wall_targets_sd3.json: ratio_to_target", lambda: [spread([t["ratio_to_target"] for t in
                                                                      result("wall_targets_sd3.json")["targets"]], 2)]),
    Figure("README.md", "at its default threshold it runs {} of the compute at rel_l2 {} ({} at 50 steps)",
           "scenes_080.json: easycache-default, euler 20 and 50",
           lambda: [fixed(scenes("easycache-default", None, source=SCENES_080)["compute_fraction"], 2),
                    fixed(scenes("easycache-default", None, source=SCENES_080)["rel_l2"], 3),
                    fixed(scenes("easycache-default", None, "euler 50", SCENES_080)["rel_l2"], 3)]),
    Figure("README.md", "keeping full computation's adherence; tuned to 0.3 it trails FORA ({} against {}) and beats "
           "LazyCache ({})", "scenes_080.json: easycache, fora and lazycache at target 0.25, euler 20",
           lambda: [fixed(scenes(m, 0.25, source=SCENES_080)["rel_l2"], 3)
                    for m in ("easycache", "fora", "lazycache")]),
    Figure("README.md", "costs about {} samplings of one seed",
           "comfyui_fit_cost.json: samplings", lambda: [spread(fit_cost(), 0)]),
    Figure("README.md", "(a reader we trained scores real scenes {})",
           "scenes_080.json: real.adherence", lambda: [fixed(result(SCENES_080)["real"]["adherence"], 2)]),
    Figure("docs/methods.md", "none of its {} block Linears is an `nn.Linear`; ICC routes all {}",
           "quantized_icc.json: block_linears, icc16.linears_routed",
           lambda: [str(quantized()["block_linears"]), str(quantized()["icc16"]["linears_routed"])]),
    Figure("docs/methods.md", "and factorises {} (the other",
           "quantized_icc.json: icc16.linears_factorised", lambda: [str(quantized()["icc16"]["linears_factorised"])]),
    Figure("docs/methods.md", "FORA at interval 2 over 8 steps is {} from full computation, with ICC rank 16 {}, and at "
           "full rank {} (exact", "quantized_icc.json: reuse, icc16 and icc_full_rank rel_l2",
           lambda: [fixed(quantized()["reuse"]["rel_l2"], 4), fixed(quantized()["icc16"]["rel_l2"], 4),
                    f"{quantized()['icc_full_rank']['rel_l2']:.2e}"]),
    Figure("docs/methods.md", "holds statistics for {} Linears and loads again for a fresh load of the checkpoint: there "
           "FORA is {} from full computation, with the file's priors {}.", "quantized_icc.json: round_trip",
           lambda: [str(quantized()["round_trip"]["linear_statistics"]), fixed(quantized()["round_trip"]["reuse"], 4),
                    fixed(quantized()["round_trip"]["priors"], 4)]),
    Figure("README.md", "(rel_l2 on tiny Flux {} as passed, {} handed a copy, threshold 3",
           "easycache_alias.json: threshold 3.0, input as passed and copied, rel_l2",
           lambda: [fixed(one(result("easycache_alias.json")["rows"], threshold=3.0, input=kind)["rel_l2"], 4)
                    for kind in ("as ComfyUI passes it", "copied")]),
    # methods.md: FoCa, DMD
    Figure("docs/methods.md",
           "it trails Taylor-2 at intervals 2–6 ({} against {} at 3, {} against {} at 4) and beats it at 8 ({} against "
           "{}, `fd` {} against {})",
           "testbed.json: quality rows foca and taylor2, rel_l2 and fd",
           lambda: [fixed(quality("foca", 3)["rel_l2"], 4), fixed(quality("taylor2", 3)["rel_l2"], 4),
                    fixed(quality("foca", 4)["rel_l2"], 4), fixed(quality("taylor2", 4)["rel_l2"], 4),
                    fixed(quality("foca", 8)["rel_l2"], 4), fixed(quality("taylor2", 8)["rel_l2"], 4),
                    fixed(quality("foca", 8)["fd"], 2), fixed(quality("taylor2", 8)["fd"], 2)]),
    Figure("docs/methods.md", "it beats Taylor-2 at intervals 4 and 6 ({} against {}, {} against {})",
           "testbed.json: quality.schedule rows foca and taylor2 (step time unit), rel_l2",
           lambda: [fixed(one(result("testbed.json")["quality"]["schedule"]["rows"], method=m, interval=n,
                              time_unit=None)["rel_l2"], 4) for n in (4, 6) for m in ("foca", "taylor2")]),
    Figure("docs/methods.md", "DMD is the most accurate at interval 2 ({} against Taylor-2's {})",
           "testbed.json: quality rows dmd and taylor2 at interval 2, rel_l2",
           lambda: [fixed(quality("dmd", 2)["rel_l2"], 4), fixed(quality("taylor2", 2)["rel_l2"], 4)]),
    Figure("docs/methods.md",
           "interval 4 its share of ideal is {} on the testbed (16-token blocks, where its per-window "
           "eigendecompositions weigh as much as a block) against Taylor-2's {}, and {} against Taylor-2's {} on the "
           "stack",
           "testbed_speed.json: speed rows dmd and taylor2 at interval 4, share_of_ideal, testbed and stack",
           lambda: [fixed(speed(s, m, 4)["share_of_ideal"], 2) for s in ("testbed", "stack")
                    for m in ("dmd", "taylor2")]),
    # methods.md: what a fit costs
    Figure("docs/methods.md",
           "On the tiny ComfyUI models that is {} samplings of one seed at the default 3 seeds ({} on Flux)",
           "comfyui_fit_cost.json: samplings, all rows and Flux's",
           lambda: [spread(fit_cost(), 1), fixed(min(r["samplings"] for r in result("comfyui_fit_cost.json")["rows"]
                                                   if r["family"] == "Flux"), 1)]),
    Figure("docs/methods.md", "testbed {} with 1 request, {} with 8, {} with 64 (no priors: {})",
           "fit_samples.json: 'fora N=3 + drift' rows, held_out and no_priors",
           lambda: [fixed(fit_samples("fora N=3 + drift", n)["held_out"], 4) for n in (1, 8, 64)]
           + [fixed(fit_samples("fora N=3 + drift", 1)["no_priors"], 4)]),
    # methods.md: searched plans on the testbed
    Figure("docs/methods.md",
           "The searched plan is {} below the best uniform policy at 3× and {} above it at 2×, {} at 4× and {} at 6×, "
           "where the uniform row computes {} more than the plan",
           "plans.json: plan.with_tcc rel_l2 against best_uniform rel_l2, and their fractions",
           lambda: [f"{-plan_study_change(3):.0%}"] + [f"{plan_study_change(s):.0%}" for s in (2, 4, 6)]
           + [percents([plan_study(s)["best_uniform"]["fraction"] / plan_study(s)["plan"]["with_tcc"]["fraction"] - 1
                        for s in (2, 3, 4, 6)])]),
    Figure("docs/methods.md", "The measured compute fractions are {} at 2× / 3× / 4× / 6×, each at or below 1/S",
           "plans.json: plan.with_tcc fraction",
           lambda: [slashed([plan_study(s)["plan"]["with_tcc"]["fraction"] for s in (2, 3, 4, 6)], 3)]),
    Figure("docs/methods.md", "Over the {} searched candidates of the four fits",
           "plans.json: report.plan_candidates, summed",
           lambda: [f"{sum(r['report']['plan_candidates'] for r in result('plans.json')['rows']):.0f}"]),
    Figure("docs/methods.md",
           "at the 4× plan {} against Taylor-1's {}, at interval 4 {} against Taylor-2's {}",
           "plan_variants.json: rows 'searched 4x' and 'interval 4', fitted weights against Taylor",
           lambda: [spread([variant_row("searched 4x")[f"fitted, {n} anchors"] for n in (1, 2, 3)], 3),
                    fixed(variant_row("searched 4x")["taylor1"], 3),
                    spread([variant_row("interval 4")[f"fitted, {n} anchors"] for n in (1, 2, 3)], 3),
                    fixed(variant_row("interval 4")["taylor2"], 3)]),
    Figure("docs/methods.md",
           "(Taylor-2: {} alone, {} with priors), and at 4× they moved it by at most {} either way (Taylor-2: {} alone, "
           "{} with priors)",
           "plan_variants.json: rows 'searched 6x' and 'searched 4x', taylor2 with and without TCC",
           lambda: [fixed(variant_row("searched 6x")["taylor2"], 4),
                    spread([variant_row("searched 6x")[f"taylor2+{v}"] for v in ("drift", "trend", "mm")], 4),
                    f"{max(abs(variant_row('searched 4x')[f'{f}+{v}'] / variant_row('searched 4x')[f] - 1) for f in ('taylor1', 'taylor2') for v in ('drift', 'trend', 'mm')):.0%}",
                    fixed(variant_row("searched 4x")["taylor2"], 4),
                    spread([variant_row("searched 4x")[f"taylor2+{v}"] for v in ("drift", "trend", "mm")], 4)]),
    Figure("docs/methods.md", "The search itself takes {} s",
           "plans.json: search_s", lambda: [spread([r["search_s"] for r in result("plans.json")["rows"]], 1)]),
    Figure("docs/methods.md", "ranks the measured one with Spearman {}",
           "plans.json: rank_correlation", lambda: [fixed(result("plans.json")["rank_correlation"], 2)]),
    Figure("docs/methods.md",
           "does not reach fractions below {} on this model and is {} times further from full computation than the "
           "searched plan",
           "plans.json: dynamic fraction, and dynamic rel_l2 over plan.with_tcc rel_l2",
           lambda: [fixed(min(r["dynamic"]["fraction"] for r in result("plans.json")["rows"]), 2),
                    spread([r["dynamic"]["rel_l2"] / r["plan"]["with_tcc"]["rel_l2"]
                            for r in result("plans.json")["rows"]], 1)]),
    Figure("docs/methods.md", "no aligned plan is more than {} below the uniform interval",
           "plan_oracle.json: target 6, oracle rel_l2 against uniform",
           lambda: [below(oracle(6)["oracle"]["rel_l2"], oracle(6)["uniform"]["rel_l2"])]),
    Figure("docs/methods.md", "At 4× the best plan the oracle found is {} below",
           "plan_oracle.json: target 4, oracle rel_l2 against uniform",
           lambda: [below(oracle(4)["oracle"]["rel_l2"], oracle(4)["uniform"]["rel_l2"])]),
    Figure("docs/methods.md", "and the searched plan is {} below it: when the fit could spend",
           "plan_oracle.json: target 6, searched plan rel_l2 against uniform",
           lambda: [below(oracle(6)["searched"]["rel_l2"], oracle(6)["uniform"]["rel_l2"])]),
    Figure("docs/methods.md", "so not a proof), and the searched plan is {} below.",
           "plan_oracle.json: target 4, searched plan rel_l2 against uniform",
           lambda: [below(oracle(4)["searched"]["rel_l2"], oracle(4)["uniform"]["rel_l2"])]),
    # methods.md: searched plans in ComfyUI, 20 steps
    Figure("docs/methods.md", "the first two blocks of one more ({} of the compute, {} below 1/3).",
           "scenes_plans.json: target 3, plan+tcc compute_fraction",
           lambda: [fixed(plan_row(SP, 3)["compute_fraction"], 3),
                    f"{1 - 3 * plan_row(SP, 3)['compute_fraction']:.0%}"]),
    Figure("docs/methods.md",
           "At 3× the plan's {} is below every interval-3 policy's error (the best, FORA + TCC drift with a warm-up "
           "step, {}, spends {}); at 4× its {} is {} below interval 4's best without a warm-up step (Taylor-2 + TCC "
           "mm, {}), which spends {} more (with a warm-up step FORA + TCC drift reaches {} at {}); at 6× its {} is {} "
           "above interval 6's best (FORA + TCC mm, {}), which spends {} more",
           "scenes_plans.json: targets 3, 4 and 6, plan+tcc against the uniform rows of lowest rel_l2",
           lambda: [fixed(plan_row(SP, 3)["rel_l2"], 3),
                    fixed(best_uniform(SP, 3)["rel_l2"], 3),
                    fixed(best_uniform(SP, 3)["compute_fraction"], 3),
                    fixed(plan_row(SP, 4)["rel_l2"], 3),
                    below(plan_row(SP, 4)["rel_l2"], best_uniform(SP, 4, warmup=0)["rel_l2"]),
                    fixed(best_uniform(SP, 4, warmup=0)["rel_l2"], 3),
                    above(best_uniform(SP, 4, warmup=0)["compute_fraction"], plan_row(SP, 4)["compute_fraction"]),
                    fixed(best_uniform(SP, 4, warmup=1)["rel_l2"], 3),
                    fixed(best_uniform(SP, 4, warmup=1)["compute_fraction"], 3),
                    fixed(plan_row(SP, 6)["rel_l2"], 3),
                    above(plan_row(SP, 6)["rel_l2"], best_uniform(SP, 6)["rel_l2"]),
                    fixed(best_uniform(SP, 6)["rel_l2"], 3),
                    above(best_uniform(SP, 6)["compute_fraction"], plan_row(SP, 6)["compute_fraction"])]),
    Figure("docs/methods.md",
           "So on this model the searched plan is {} below the best uniform policy at 2× and {} above it at 0.21 "
           "(interval 5's compute), with adherence {} against {} at 2× and {} against {} at 0.21, and an FD of {} "
           "against {} at 2× and {} above the uniform row's at 0.21",
           "scenes_plans.json: targets 2 and 4.75, plan+tcc against best_uniform",
           lambda: [plan_change(SP, 2), above(plan_row(SP, 4.75)["rel_l2"], target(SP, 4.75)["best_uniform"]["rel_l2"])]
           + [fixed(v, 2) for s_ in (2, 4.75) for v in (plan_row(SP, s_)["adherence"],
                                                       target(SP, s_)["best_uniform"]["adherence"])]
           + [fixed(plan_row(SP, 2)["fd"], 1), fixed(target(SP, 2)["best_uniform"]["fd"], 1),
              fixed(plan_row(SP, 4.75)["fd"] - target(SP, 4.75)["best_uniform"]["fd"], 1)]),
    Figure("docs/methods.md",
           "The fit costs {} samplings of one seed (the node reports it), against {} for Fit TCC Priors on a given "
           "policy",
           "scenes_plans.json: fit_cost_samplings; comfyui_fit_cost.json: samplings",
           lambda: [spread(fit_samplings(SP), 0), spread(fit_cost(), 1)]),
    Figure("docs/methods.md",
           "the 4× fit's own held-out seed went from {} without them to {} with them",
           "scenes_plans.json: target 4, fit_report held_out_before and held_out_after",
           lambda: [fixed(target(SP, 4)["fit_report"][k], 3) for k in ("held_out_before", "held_out_after")]),
    # methods.md: searched plans in ComfyUI, 30 steps
    Figure("docs/methods.md",
           "The plan is {} below the best uniform policy at 3× ({} against {}, with a better FD, {} against {} and {} "
           "for full computation) and {} below at interval 6's compute ({} against FORA + TCC trend's {}, adherence {} "
           "against {}, FD {} against {}). At 6× itself ({}) its rel_l2 ({}) is below that of every interval-6 policy "
           "without a warm-up step (the best, {}, spends {}; with one, FORA + TCC drift gives {} at {}), but its FD "
           "({}) and the 5.6× plan's ({}) are the worst of the plans",
           "scenes_plans_30.json: targets 3, 5.6 and 6, plan+tcc against best_uniform and the uniform rows",
           lambda: [plan_change(SP30, 3),
                    fixed(plan_row(SP30, 3)["rel_l2"], 3),
                    fixed(target(SP30, 3)["best_uniform"]["rel_l2"], 3),
                    fixed(plan_row(SP30, 3)["fd"], 1),
                    fixed(target(SP30, 3)["best_uniform"]["fd"], 1),
                    fixed(one(target(SP30, 3)["rows"], method="full")["fd"], 1),
                    plan_change(SP30, 5.6),
                    fixed(plan_row(SP30, 5.6)["rel_l2"], 3),
                    fixed(target(SP30, 5.6)["best_uniform"]["rel_l2"], 3),
                    fixed(plan_row(SP30, 5.6)["adherence"], 2),
                    fixed(target(SP30, 5.6)["best_uniform"]["adherence"], 2),
                    fixed(plan_row(SP30, 5.6)["fd"], 1),
                    fixed(target(SP30, 5.6)["best_uniform"]["fd"], 1),
                    fixed(plan_row(SP30, 6)["compute_fraction"], 3),
                    fixed(plan_row(SP30, 6)["rel_l2"], 3),
                    fixed(best_uniform(SP30, 6, warmup=0)["rel_l2"], 3),
                    fixed(best_uniform(SP30, 6, warmup=0)["compute_fraction"], 3),
                    fixed(one(target(SP30, 6)["rows"], method="fora+tcc drift",
                              warmup=1)["rel_l2"], 3),
                    fixed(one(target(SP30, 6)["rows"], method="fora+tcc drift",
                              warmup=1)["compute_fraction"], 3),
                    fixed(plan_row(SP30, 6)["fd"], 1),
                    fixed(max(plan_row(SP30, t["target"])["fd"] for t in result(SP30)["targets"]), 1)]),
    Figure("docs/methods.md",
           "on the fit's own held-out seed they lower the plan's error by {}, {} and {}. A fit costs {} samplings of "
           "one seed here.",
           "scenes_plans_30.json: fit_report held_out_after against held_out_before (3, 5.6, 6); fit_cost_samplings",
           lambda: [held_out_change(SP30, s) for s in (3, 5.6, 6)]
           + [spread(fit_samplings(SP30), 0)]),
    # benchmarks.md
    Figure("docs/benchmarks.md", "classifier features to all 1797 real digits (full computation's own: {};",
           "testbed.json: quality row full, fd", lambda: [fixed(quality("full", None)["fd"], 2)]),
    Figure("docs/benchmarks.md", "it cannot go below {} on this 8-block model",
           "testbed.json: fbcache rows, compute_fraction",
           lambda: [fixed(min(r["compute_fraction"] for r in result("testbed.json")["quality"]["rows"]
                              if r["method"] == "fbcache"), 2)]),
    Figure("docs/benchmarks.md", "Full computation keeps {} of the prompts' promises (real scenes: {})",
           "scenes.json: full rows' adherence; real.adherence",
           lambda: [percents([r["adherence"] for r in result("scenes.json")["rows"] if r["method"] == "full"]),
                    f"{result('scenes.json')['real']['adherence']:.0%}"]),
    Figure("docs/benchmarks.md", "is far above real scenes' {} because",
           "scenes.json: real.fd", lambda: [fixed(result("scenes.json")["real"]["fd"], 1)]),
    Figure("docs/benchmarks.md",
           "euler 20 {} against FORA's {}, Taylor-2's {} and LazyCache's {} (tuned to the same compute); euler 50 {} "
           "against {}, {} and {}",
           "scenes.json: rel_l2 of fora+tcc, fora, taylor2, lazycache at target 0.25, euler 20 and 50",
           lambda: [fixed(scenes(m, 0.25, s)["rel_l2"], 3) for s in ("euler 20", "euler 50")
                    for m in ("fora+tcc", "fora", "taylor2", "lazycache")]),
    Figure("docs/benchmarks.md", "Taylor-2 beats FORA at interval 2 ({} against {})",
           "scenes.json: taylor2 and fora rel_l2 at target 0.5, euler 20",
           lambda: [fixed(scenes(m, 0.5)["rel_l2"], 3) for m in ("taylor2", "fora")]),
    Figure("docs/benchmarks.md", "FoCa is the best forecaster at intervals 2 and 3 ({}, {})",
           "scenes.json: foca rel_l2 at targets 0.5 and 0.33, euler 20",
           lambda: [fixed(scenes("foca", t)["rel_l2"], 3) for t in (0.5, 0.33)]),
    Figure("docs/benchmarks.md",
           "is the fastest pack config ({} at interval 4, 20 steps) and the least accurate at equal compute ({} "
           "against {} for the same forecaster block by block)",
           "scenes.json: taylor2-step wall_speedup, taylor2-step and taylor2 rel_l2 at target 0.25, euler 20",
           lambda: [f"{scenes('taylor2-step', 0.25)['wall_speedup']:.2f}×",
                    fixed(scenes("taylor2-step", 0.25)["rel_l2"], 3), fixed(scenes("taylor2", 0.25)["rel_l2"], 3)]),
    Figure("docs/benchmarks.md",
           "GOC** improves FORA a little at every interval ({} against {} at interval 2). **ICC** (rank 32, plain SVD) "
           "cuts FORA's error by {} at interval 2 ({}, at {} of the compute) but gains little speed on blocks this small "
           "({})",
           "scenes.json: fora+goc, fora, icc-r32-plain at target 0.5, euler 20",
           lambda: [fixed(scenes("fora+goc", 0.5)["rel_l2"], 3), fixed(scenes("fora", 0.5)["rel_l2"], 3),
                    below(scenes("icc-r32-plain", 0.5)["rel_l2"], scenes("fora", 0.5)["rel_l2"]),
                    fixed(scenes("icc-r32-plain", 0.5)["rel_l2"], 3),
                    fixed(scenes("icc-r32-plain", 0.5)["compute_fraction"], 2),
                    f"{scenes('icc-r32-plain', 0.5)['wall_speedup']:.2f}×"]),
    Figure("docs/benchmarks.md",
           "at its default threshold it runs {} of the model calls at 20 steps (rel_l2 {}) and {} at 50 ({})",
           "scenes.json: lazycache-default, euler 20 and 50",
           lambda: [v for s in ("euler 20", "euler 50") for v in
                    (f"{scenes('lazycache-default', None, s)['compute_fraction']:.0%}",
                     fixed(scenes("lazycache-default", None, s)["rel_l2"], 3))]),
    Figure("docs/benchmarks.md",
           "there its images drift ({} at 20 steps). It reaches nearly its ideal speedup ({} at {} of the calls) where "
           "block-level caching reaches {} of its own on a model this small (FORA: {} at interval 2, {} at 4, {} at 6)",
           "scenes.json: lazycache at target 0.25; share_of_ideal of the pack's block-level rows, euler 20",
           lambda: [fixed(scenes("lazycache", 0.25)["rel_l2"], 3), f"{scenes('lazycache', 0.25)['wall_speedup']:.2f}×",
                    fixed(scenes("lazycache", 0.25)["compute_fraction"], 2),
                    block_level_shares()]
           + [fixed(scenes("fora", t)["share_of_ideal"], 2) for t in (0.5, 0.25, 0.17)]),
    Figure("docs/multi-gpu.md", "| USP | {} ms/step | {} ms/step | {} ms/step ({} votes a run) | {} ms/step ({} "
           "collectives a run) |\n| CFG | {} ms/step | {} ms/step | {} ms/step ({} votes a run) | {} ms/step ({} "
           "collectives a run) |", "multi_gpu_cost.json and multi_gpu_cost_cfg.json: ms per step and collectives",
           lambda: [v for name in ("multi_gpu_cost.json", "multi_gpu_cost_cfg.json") for v in (
               [f"{gpu_cost(name, 'uncached')['ms_per_step']:.1f}", f"{gpu_cost(name, 'fixed')['ms_per_step']:.1f}",
                f"{gpu_cost(name, 'fixed_voted')['ms_per_step']:.1f}",
                str(gpu_cost(name, 'fixed_voted')['collectives_per_run']),
                f"{gpu_cost(name, 'dynamic')['ms_per_step']:.1f}", str(gpu_cost(name, 'dynamic')['collectives_per_run'])])]),
    Figure("docs/multi-gpu.md", "skips less ({} of\n96 block evaluations under USP, against the fixed policy's {}), "
           "not because of its votes. Every config's output is\nwithin {} (relative L2)",
           "multi_gpu_cost*.json: blocks skipped; the largest rel_l2 against one process",
           lambda: [str(gpu_cost("multi_gpu_cost.json", "dynamic")["blocks_skipped"]),
                    str(gpu_cost("multi_gpu_cost.json", "fixed")["blocks_skipped"]),
                    f"{largest_gpu_cost_error():.1e}".replace("e-0", "e-")]),
    Figure("docs/benchmarks.md",
           "(10 steps: {} at {}, against FORA + TCC's {} at {} and FORA's {} at {}; 8 steps: {} at {},\n  against FORA + "
           "TCC's {} at {} and FORA's {} at {}). At interval 2 the forecasters and TCC win (FoCa\n  {} at {}, FORA + TCC "
           "{} at {}, Taylor-2 {} at {}, against 11 steps' {} at {})",
           "scenes.json: euler 20 fewer-steps rows against FORA, FORA + TCC, FoCa and Taylor-2",
           lambda: [v for row in (fewer_scenes(10), scenes("fora+tcc", 0.33), scenes("fora", 0.33), fewer_scenes(8),
                                  scenes("fora+tcc", 0.25), scenes("fora", 0.25), scenes("foca", 0.5),
                                  scenes("fora+tcc", 0.5), scenes("taylor2", 0.5), fewer_scenes(11))
                    for v in (fixed(row["rel_l2"], 3), f"{row['wall_speedup']:.2f}×")]),
    Figure("docs/benchmarks.md", "even handed a copy of its input (rel_l2 {},\n  adherence {} against full computation's {})",
           "scenes.json: easycache and easycache-default rows, rel_l2 and adherence; full adherence",
           lambda: [spread([r["rel_l2"] for r in result("scenes.json")["rows"] if r["method"].startswith("easycache")],
                           1),
                    spread([r["adherence"] for r in result("scenes.json")["rows"]
                            if r["method"].startswith("easycache")], 2),
                    spread([r["adherence"] for r in result("scenes.json")["rows"] if r["method"] == "full"], 2)]),
    Figure("docs/benchmarks.md",
           "Module sites lower FORA's error by {} at every interval ({} against {} at interval 4), and Taylor-2's only "
           "at interval 2 (at 3, 4 and 6 it is {} worse",
           "flux_module_sites.json: module against block rel_l2",
           lambda: [percents(module_sites_gain("fora", INTERVALS)),
                    fixed(module_sites("fora", 4, "module")["rel_l2"], 3),
                    fixed(module_sites("fora", 4, "block")["rel_l2"], 3),
                    percents([-gain for gain in module_sites_gain("taylor2", (3, 4, 6))])]),
    Figure("docs/benchmarks.md", "(FORA + TCC: {} at interval 4)",
           "scenes.json: fora+tcc at target 0.25, euler 20", lambda: [fixed(scenes("fora+tcc", 0.25)["rel_l2"], 3)]),
    Figure("docs/benchmarks.md",
           "module sites reached {} of their ideal against {} for whole blocks in spans (`studies/spans_study.py`): at "
           "interval 4, {} against {}, so at module sites' wall speed whole blocks can afford interval 3, whose error "
           "({}) is lower",
           "spans.json: module and spans rows; flux_module_sites.json: FORA block rel_l2 at interval 3",
           lambda: [spans_shares("module"), spans_shares("spans"),
                    f"{spans('fora N=4 module')['wall_speedup']:.2f}×",
                    f"{spans('fora N=4 spans')['wall_speedup']:.2f}×",
                    fixed(module_sites("fora", 3, "block")["rel_l2"], 3)]),
    Figure("docs/benchmarks.md",
           "block-level caching in spans reaches {} of it ({} at compute fraction 0.25), module sites {}.",
           "testbed_speed.json: testbed section, share_of_ideal of the fora/taylor2 -block rows and of the module rows",
           lambda: [spread([speed("testbed", f"{m}-block", n)["share_of_ideal"] for m in ("fora", "taylor2")
                            for n in INTERVALS], 2),
                    spread([speed("testbed", f"{m}-block", 4)["share_of_ideal"] for m in ("fora", "taylor2")], 2),
                    spread([speed("testbed", m, n)["share_of_ideal"] for m in ("fora", "taylor2") for n in INTERVALS],
                           2)]),
    Figure("docs/benchmarks.md", "with spans at compute fractions {}.",
           "comfyui_share.json: SD3 'fora N=…' rows, compute_fraction",
           lambda: [slashed([comfyui_share("comfyui_share.json", "SD3", f"fora N={n}")["compute_fraction"]
                             for n in INTERVALS], 2)]),
    Figure("docs/benchmarks.md",
           "block-level intervals 2–6 spend {} down to {} of the compute, and only whole-step forecasting reaches {}:",
           "comfyui_share_sd3_small.json: compute_fraction of 'fora N=…' and 'fora step N=…'",
           lambda: [fixed(sd3_small("fora N=2")["compute_fraction"], 2),
                    fixed(sd3_small("fora N=6")["compute_fraction"], 2),
                    slashed([sd3_small(f"fora step N={n}")["compute_fraction"] for n in INTERVALS], 2)]),
    Figure("docs/benchmarks.md",
           "Block-level rows reach {} of their ideal, whole steps (FORA) {}.",
           "comfyui_share_sd3_small.json: share_of_ideal of the block rows, and of 'fora step N=…'",
           lambda: [spread([r["share_of_ideal"] for r in result("comfyui_share_sd3_small.json")["rows"]
                            if " step " not in r["config"]], 2),
                    slashed([sd3_small(f"fora step N={n}")["share_of_ideal"] for n in INTERVALS], 2)]),
    Figure("docs/benchmarks.md",
           "where this run gives {}, {}, {} and {}.",
           "comfyui_share_sd3_small.json: wall_speedup of FORA N=2 and 3, Taylor-2 N=3 and 6",
           lambda: [f"{sd3_small(c)['wall_speedup']:.2f}×"
                    for c in ("fora N=2", "fora N=3", "taylor2 N=3", "taylor2 N=6")]),
    Figure("docs/benchmarks.md",
           "(Taylor-2 at interval 6: {} against {}).",
           "comfyui_share_sd3_small.json: wall_speedup of 'taylor2 step N=6' and 'taylor2 N=6'",
           lambda: [f"{sd3_small(c)['wall_speedup']:.2f}×" for c in ("taylor2 step N=6", "taylor2 N=6")]),
    Figure("docs/benchmarks.md",
           "FORA's drift priors halve its held-out error from one request on, and more requests barely help ({} with "
           "1, {} with 128). Taylor-2's mm priors **raise** its held-out error at every count ({} against {} without)",
           "fit_samples.json: held_out and no_priors",
           lambda: [fixed(fit_samples("fora N=3 + drift", n)["held_out"], 4) for n in (1, 128)]
           + [spread([r["held_out"] for r in result("fit_samples.json")["rows"] if r["policy"] == "taylor2 N=3 + mm"],
                     4),
              fixed(fit_samples("taylor2 N=3 + mm", 1)["no_priors"], 4)]),
]


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f"{Path(f.page).name}: {f.text[:40]}")
def test_each_figure_quoted_in_prose_equals_its_result_file(figure):
    page, template, values = flat((ROOT / figure.page).read_text()), flat(figure.text), list(figure.values())
    expected = template.format(*values)
    if expected in page:
        return
    found = re.search(re.escape(template).replace(re.escape("{}"), "(.+?)"), page)
    if found is None:
        pytest.fail(f"{figure.page}: no sentence reads {template!r} any more; if it was reworded, update its entry in "
                    f"tests/test_docs.py (its figures come from {figure.source})")
    differ = [f"{said!r} where the file gives {value!r}"
              for said, value in zip(found.groups(), values) if said != value]
    pytest.fail(f"{figure.page}: {found.group(0)!r} disagrees with {figure.source}: {'; '.join(differ)}. The file's "
                f"figures make it read: {expected!r}")


# Every message the plan search, the speed fit, plans and the Fit and Apply nodes raise or log is in troubleshooting.md:
# its first run of four or more words between placeholders and clause breaks must be quoted there.
MESSAGE_SOURCES = ("calibration/search.py", "calibration/speed_fit.py", "calibration/plan.py", "nodes/fit_node.py",
                   "nodes/apply_node.py")
NOT_A_USERS_MESSAGE = {  # first words: why troubleshooting.md need not quote it
    "aggregate must be one of": "an argument of search() that only the speed fit passes, always a valid one",
    "the plan search models forecasters": "the speed fit searches FORA and TaylorSeer 1 and 2 only, all within range",
    "Fit TCC Priors for": "the log line's frame around the no-gain verdict, which is quoted on its own",
}
PLACEHOLDER = "\0"


def raised_and_logged(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each message given to a raised exception or a log.warning, placeholders as NUL."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        call = node.exc if isinstance(node, ast.Raise) else node
        if not (isinstance(call, ast.Call) and call.args) or not (
                isinstance(node, ast.Raise) or isinstance(call.func, ast.Attribute) and call.func.attr == "warning"):
            continue
        arg = call.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            found.append((node.lineno, arg.value))
        elif isinstance(arg, ast.JoinedStr):
            found.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else PLACEHOLDER
                                               for v in arg.values)))
    return found


def first_words(message: str) -> str | None:
    """The first run of at least four words between placeholders and clause breaks, at most eight of them."""
    text = re.sub(r"%[sdr]|%\.\d+f", PLACEHOLDER, message.removeprefix("calibrated_cache: "))
    for piece in re.split(rf"{PLACEHOLDER}|[:;,.]\s|[()]", text):
        words = piece.split()
        if len(words) >= 4:
            return " ".join(words[:8])
    return None


@pytest.mark.parametrize("source", MESSAGE_SOURCES)
def test_every_plan_fit_and_apply_message_is_in_troubleshooting(source):
    page = flat((ROOT / "docs" / "troubleshooting.md").read_text())
    missing = []
    for line, message in raised_and_logged(ROOT / source):
        words = first_words(message)
        if words is None or any(words.startswith(w) for w in NOT_A_USERS_MESSAGE):
            continue
        if words not in page:
            missing.append(f"line {line}: {words!r}")
    assert missing == [], (f"docs/troubleshooting.md lacks these messages of {source}: add each, quoted, with its cause "
                           f"and fix: {missing}")


def test_each_message_left_out_of_troubleshooting_still_exists():
    words = {first_words(m) for s in MESSAGE_SOURCES for _, m in raised_and_logged(ROOT / s)}
    assert all(any(w and w.startswith(start) for w in words) for start in NOT_A_USERS_MESSAGE)
