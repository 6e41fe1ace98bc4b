"""Regenerate every figure table in the docs from the result files committed beside this script.

    python benchmarks/tables.py            # rewrite the generated tables in README.md and docs/*.md
    python benchmarks/tables.py --check    # exit 1 when a table in the docs differs from its result file

A generated table sits between `<!-- table: NAME -->` and `<!-- /table -->`. Its first line names the command that
measured the result file, when, on which commit and machine; the table itself is rendered from that file, so a figure
in the docs cannot drift from the measurement behind it. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs"
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
BENCH = "python -m calibrated_cache bench --skip-speed --json benchmarks/results/testbed.json"
SPEED_BENCH = "python -m calibrated_cache bench --skip-quality --json benchmarks/results/testbed_speed.json"

Column = tuple[str, Callable[[dict[str, Any]], str]]


def number(key: str, digits: int) -> Callable[[dict[str, Any]], str]:
    return lambda r: "" if r.get(key) is None else f"{r[key]:.{digits}f}"


def params(r: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in r.get("params", {}).items() if k != "forecaster")


def speedup(r: dict[str, Any]) -> str:
    low, high = r["spread"]
    return f"{r['wall_speedup']:.2f}× ({low:.2f}–{high:.2f})"


QUALITY: list[Column] = [("method", lambda r: r["method"]), ("params", params),
                         ("compute fraction", number("compute_fraction", 3)), ("rel_l2", number("rel_l2", 4)),
                         ("psnr", lambda r: "exact" if r.get("psnr") is None else f"{r['psnr']:.1f}"),
                         ("fd", number("fd", 2))]
SPEED: list[Column] = [("method", lambda r: r["method"] + (" (node refuses)" if r.get("node_refuses") else "")), ("params", params),
                       ("compute fraction", number("compute_fraction", 3)), ("ideal", number("ideal_speedup", 2)),
                       ("wall speedup (min–max)", speedup), ("share of ideal", number("share_of_ideal", 2)),
                       ("peak cache (MiB)", lambda r: f"{r.get('peak_cache_bytes', 0) / 2 ** 20:.0f}")]
FAMILY_SPEED: list[Column] = [("family", lambda r: r["family"]), ("policy", lambda r: r["config"]),
                              ("compute fraction", number("compute_fraction", 3)), ("ideal", number("ideal", 2)),
                              ("wall speedup (min–max)", speedup), ("share of ideal", number("share_of_ideal", 2))]
FIT_COST: list[Column] = [("family", lambda r: r["family"]), ("policy", lambda r: r["policy"]),
                          ("full sampling (s)", number("full_s", 3)), ("fit (s)", number("fit_s", 2)),
                          ("fit cost (samplings)", number("samplings", 1))]
FIT_SAMPLES: list[Column] = [("policy", lambda r: r["policy"]), ("fitted on (samples)", lambda r: str(r["samples"])),
                             ("held-out rel_l2", number("held_out", 4)), ("in-sample rel_l2", number("in_sample", 4)),
                             ("without priors", number("no_priors", 4)), ("fit (s)", number("fit_s", 1))]


def rows_of(methods: tuple[str, ...], section: str = "rows") -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    def select(report: dict[str, Any]) -> list[dict[str, Any]]:
        found = report["quality"][section]
        found = found["rows"] if isinstance(found, dict) else found
        return [r for r in found if r["method"] in methods]
    return select


def speed_rows(stack: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    return lambda report: report["speed"][stack]["rows"]


def by_interval(methods: tuple[str, ...], metric: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """One row per interval, one column per method: `metric` of that method's quality row."""
    def select(report: dict[str, Any]) -> list[dict[str, Any]]:
        table: dict[int, dict[str, Any]] = {}
        for r in report["quality"]["rows"]:
            interval = r["params"].get("interval")
            if r["method"] in methods and interval and "threshold" not in r["params"]:
                row = table.setdefault(interval, {"interval": interval, "fractions": []})
                row[r["method"]] = r[metric]
                row["fractions"].append(r["compute_fraction"])
        return [table[k] for k in sorted(table)]
    return select


def pivot(methods: tuple[str, ...], digits: int) -> list[Column]:
    first: Column = ("interval (compute fraction)",
                     lambda r: f"{r['interval']} ({min(r['fractions']):.2f}–{max(r['fractions']):.2f})")
    return [first] + [(m, number(m, digits)) for m in methods]


SCENES: list[Column] = [("method", lambda r: r["method"]), ("params", params),
                         ("compute fraction", number("compute_fraction", 3)), ("rel_l2", number("rel_l2", 4)),
                         ("psnr", lambda r: "exact" if r.get("psnr") is None else f"{r['psnr']:.1f}"),
                         ("adherence", number("adherence", 3)), ("fd", number("fd", 2)),
                         ("wall speedup (min–max)", lambda r: speedup(r) if "spread" in r else ""),
                         ("share of ideal", number("share_of_ideal", 2))]


def scenes_rows(setting: str | None = None, target: float | None = None):
    """The scenes benchmark's rows of one setting, or of every setting at one target (with full computation)."""
    def select(report: dict[str, Any]) -> list[dict[str, Any]]:
        return [r for r in report["rows"] if (setting is None or r["setting"] == setting)
                and (target is None or r["target"] in (None, target))]
    return select


HEADLINE_METHODS = ("fora", "taylor2", "foca", "fora+tcc", "fora+goc", "taylor2-step", "fbcache", "lazycache",
                    "lazycache-default", "easycache", "easycache-default", "fewer-steps")


def headline_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Euler 20 at interval 4 (and the peers tuned to it, and at their defaults), with the same configs' rel_l2 at 50
    steps beside."""
    at50 = _numbered([r for r in report["rows"] if r["setting"] == "euler 50" and r["target"] in (None, 0.25)])
    rows = [r for r in report["rows"] if r["setting"] == "euler 20" and (
        r["method"] == "full" or r["method"] in HEADLINE_METHODS and r["target"] in (None, 0.25))]
    return [dict(r, rel_l2_50=at50.get(key, {}).get("rel_l2"), steps_50=at50.get(key, {}).get("params", {}).get("steps"))
            for key, r in _numbered(rows).items()]


def _numbered(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Rows by (method, how many rows of that method came before): fewer-steps rows come two per setting."""
    seen: dict[str, int] = {}
    out = {}
    for r in rows:
        seen[r["method"]] = seen.get(r["method"], -1) + 1
        out[(r["method"], seen[r["method"]])] = r
    return out


HEADLINE: list[Column] = [("config", lambda r: f"full computation, {r['params']['steps']} steps ({r['steps_50']} at 50)"
                           if r["method"] == "fewer-steps" else r["method"]),
                          ("compute fraction", number("compute_fraction", 2)),
                          ("wall speedup", lambda r: f"{r['wall_speedup']:.2f}×" if "wall_speedup" in r else "1"),
                          ("share of ideal", number("share_of_ideal", 2)),
                          ("rel_l2, 20 steps", number("rel_l2", 3)), ("rel_l2, 50 steps", number("rel_l2_50", 3)),
                          ("adherence", number("adherence", 2))]

FORECASTERS = ("fora", "taylor1", "taylor2", "foca", "spectrum", "dmd")
FEWER = ("fewer-steps",)  # full computation at steps / interval: the same cost

SPANS: list[Column] = [("config", lambda r: r["config"]), ("compute fraction", number("compute_fraction", 3)),
                       ("ideal", number("ideal", 2)), ("wall speedup (min–max)", speedup),
                       ("share of ideal", number("share_of_ideal", 2)),
                       ("peak cache (MiB)", lambda r: f"{r['peak_cache_bytes'] / 2 ** 20:.1f}"),
                       ("rel_l2 vs block by block",
                        lambda r: "" if r["rel_l2_vs_block_by_block"] is None else f"{r['rel_l2_vs_block_by_block']:.1e}")]
PROFILE_PARTS = ("computed blocks", "pack, computed calls", "pack, skipped calls", "outside the blocks", "sampler")


def profile_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"config": name, **p} for name, p in report["profile"].items()]


def seconds(part: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{r['seconds'][part]:.3f} ({r['seconds'][part] / r['total_s']:.0%})"


def per_call(part: str, calls: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{1e6 * r['seconds'][part] / r[calls]:.0f}" if r[calls] else ""


PROFILE: list[Column] = ([("config", lambda r: r["config"]), ("total (s)", number("total_s", 3))]
                         + [(f"{p} (s)", seconds(p)) for p in PROFILE_PARTS]
                         + [("pack per skipped call (µs)", per_call("pack, skipped calls", "skipped_calls")),
                            ("block compute per call (µs)", per_call("computed blocks", "computed_calls"))])
COMFYUI_PARTS = ("computed blocks", "pack, computed calls", "pack, skipped calls", "pack, per model call",
                 "model outside blocks", "sampler, guidance, ComfyUI")


def comfyui_seconds(part: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{1e3 * r['seconds'][part]:.0f} ({r['seconds'][part] / r['total_s']:.0%})"


COMFYUI_PROFILE: list[Column] = ([("family", lambda r: r["family"]), ("config", lambda r: r["config"]),
                                  ("total (s)", number("total_s", 3))]
                                 + [(f"{p} (ms)", comfyui_seconds(p)) for p in COMFYUI_PARTS]
                                 + [("pack per skipped call (µs)", number("pack_us_per_skipped_call", 0))])
FAMILY_TABLE: list[Column] = [("tiny model", lambda r: r["family"]), ("cached as", lambda r: r["pack_family"]),
                              ("exact at interval 1", lambda r: "yes" if r["exact_at_interval_1"] else "NO"),
                              ("compute fraction", number("compute_fraction", 3)),
                              ("skipped blocks", lambda r: str(r["blocks_skipped"])),
                              ("FORA rel_l2", number("fora_rel_l2", 4)), ("Taylor-2 rel_l2", number("taylor2_rel_l2", 4)),
                              ("FORA wall speedup (min–max)", speedup),
                              ("full computation at fewer steps: rel_l2, wall speedup",
                               lambda r: "" if "fewer_steps" not in r else
                               f"{r['fewer_steps']} steps: {r['fewer_rel_l2']:.4f}, {r['fewer_wall_speedup']:.2f}×")]
FAMILY_TABLE_080: list[Column] = FAMILY_TABLE + [("spans", lambda r: "yes" if r["spans"] else "no")]
MODULE_SITES: list[Column] = [("forecaster", lambda r: r["forecaster"]), ("interval", lambda r: str(r["interval"])),
                              ("sites", lambda r: r["level"]), ("compute fraction", number("compute_fraction", 3)),
                              ("rel_l2", number("rel_l2", 4)),
                              ("psnr", lambda r: "exact" if r.get("psnr") is None else f"{r['psnr']:.1f}"),
                              ("adherence", number("adherence", 3))]

# name: (result file, command that measured it, rows, columns)
def plan_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per target: the searched plan as fitted (with its priors when kept) against the best uniform row and the
    dynamic policy (studies/plan_study.py)."""
    rows = []
    for r in report["rows"]:
        plan, best, dynamic = r["plan"]["with_tcc"], r["best_uniform"], r["dynamic"]
        rows.append({"target": f"{r['target']:g}×", "plan": r["plan"]["config"].split()[-1].split("_PLAN")[0],
                     "plan_rel_l2": plan["rel_l2"], "plan_fd": plan["fd"], "plan_fraction": plan["fraction"],
                     "uniform": best["config"], "uniform_rel_l2": best["rel_l2"], "uniform_fd": best["fd"],
                     "uniform_fraction": best["fraction"], "change": f"{plan['rel_l2'] / best['rel_l2'] - 1:+.0%}",
                     "dynamic": f"{dynamic['rel_l2']:.4f} ({dynamic['fraction']:.3f})",
                     "fit": f"{r['fit_runs']:.0f} runs, {r['fit_s']:.0f} s"})
    return rows


PLANS: list[Column] = [("target", lambda r: r["target"]), ("searched", lambda r: r["plan"]),
                       ("rel_l2", number("plan_rel_l2", 4)), ("fd", number("plan_fd", 2)),
                       ("fraction", number("plan_fraction", 3)), ("best uniform", lambda r: r["uniform"]),
                       ("its rel_l2", number("uniform_rel_l2", 4)), ("its fd", number("uniform_fd", 2)),
                       ("its fraction", number("uniform_fraction", 3)), ("rel_l2 change", lambda r: r["change"]),
                       ("dynamic (fraction)", lambda r: r["dynamic"]), ("fit", lambda r: r["fit"])]


def oracle_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per target: the uniform interval, the searched plan and the oracle's plan, each with the forecaster that is best
    on the evaluation requests (studies/plan_oracle.py)."""
    def cell(r: dict[str, Any]) -> str:
        return f"`{r['row'].replace('1', '#').replace('0', '.')}` {r['forecaster']} {r['rel_l2']:.4f}"

    return [{"target": f"{r['target']:g}×", "plans": f"{r['plans']} ({r['mode']}, {r['screened_runs']} runs)",
             "uniform": cell(r["uniform"]), "searched": cell(r["searched"]), "oracle": cell(r["oracle"]),
             "searched_change": f"{r['searched']['rel_l2'] / r['uniform']['rel_l2'] - 1:+.0%}",
             "oracle_change": f"{r['oracle']['rel_l2'] / r['uniform']['rel_l2'] - 1:+.0%}"} for r in report["rows"]]


ORACLE: list[Column] = [("target", lambda r: r["target"]), ("aligned plans", lambda r: r["plans"]),
                        ("uniform interval", lambda r: r["uniform"]), ("searched plan", lambda r: r["searched"]),
                        ("change", lambda r: r["searched_change"]), ("oracle", lambda r: r["oracle"]),
                        ("oracle change", lambda r: r["oracle_change"])]


def mib(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{r[key] / 2 ** 20:.1f}" if r[key] < 2 ** 30 else f"{r[key] / 2 ** 30:.1f} Gi"


SEARCH_MEMORY: list[Column] = [("steps", lambda r: str(r["steps"])), ("forecaster", lambda r: r["forecaster"]),
                               ("search (s)", number("seconds", 2)), ("tables (MiB)", mib("tables_bytes")),
                               ("bound (MiB)", mib("bound_bytes")), ("peak RSS added (MiB)", mib("rss_added_bytes")),
                               ("dense tables before (MiB, arithmetic)", mib("dense_bytes"))]


def guard_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row: the computed call's median time with and without the spans run, and their paired ratio."""
    by = {r["config"]: r for r in report["rows"]}
    low, high = report["ratio_spread"]
    return [{"stack": f"width {report['stack']['width']}, depth {report['stack']['depth']}, "
                      f"{report['stack']['tokens']} tokens", "full": by["full"]["median_call_s"] * 1e3,
             "spans": by["spans"]["median_call_s"] * 1e3,
             "ratio": f"{report['ratio_median']:.3f} ({low:.3f}–{high:.3f})"}]


SPANS_GUARD: list[Column] = [("stack", lambda r: r["stack"]), ("full computed call (ms)", number("full", 1)),
                             ("spans computed call (ms)", number("spans", 1)),
                             ("spans / full, paired by round (min–max)", lambda r: r["ratio"])]


def scenes_plan_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per target: the searched plan as fitted, the best uniform row at no more compute, the dynamic policy and
    LazyCache tuned to the plan's compute (studies/scenes_plans.py)."""
    rows = []
    for t in report["targets"]:
        by_method = {r["method"]: r for r in t["rows"]}
        best = t["best_uniform"]
        for label, r in (("searched plan", by_method["plan+tcc"]),
                         (f"best uniform: {best['method']} {params(best)}" if best else "best uniform: none", best),
                         ("dynamic (fbcache)", by_method["fbcache"]), ("LazyCache", by_method["lazycache"])):
            if r is not None:
                rows.append({**r, "speedup": f"{t['target']:g}×", "config": label})
    return rows


SCENES_PLANS: list[Column] = [("target", lambda r: r["speedup"]), ("config", lambda r: r["config"]),
                              ("compute fraction", number("compute_fraction", 3)), ("rel_l2", number("rel_l2", 3)),
                              ("adherence", number("adherence", 2)), ("fd", number("fd", 2))]


def wall_target_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per target: the wall-clock fit as measured, then the best uniform block policy, whole-step policy and fewer-step
    run at least as fast (studies/wall_targets.py)."""
    rows = []
    for t in report["targets"]:
        fit = t["fit"]
        mix = "" if fit.get("plan_steps_computed") is None else (
            f": {fit['plan_steps_computed']:.0f} computed, {fit['plan_steps_blocks_filled']:.0f} filled, "
            f"{fit['plan_steps_forecast_whole']:.0f} whole")
        kind = "mixed" if fit["granularity"] == "block" and fit.get("plan_steps_forecast_whole") else fit["granularity"]
        rows.append({**fit, "target": f"{t['target']:g}×", "of_target": f"{fit['wall_speedup'] / t['target']:.2f}",
                     "config": f"fit: {fit['config']} ({kind}{mix})"})
        for kind in ("block", "whole-step", "fewer steps"):
            best = t[f"best {kind}"]
            rows.append({**(best or {}), "target": "", "config": f"best {kind}: {best['config'] if best else 'none'}",
                         "of_target": ""})
    return rows


WALL_SOURCES = (("scenes Flux, 20 steps", "wall_targets.json"), ("scenes Flux, 30 steps", "wall_targets_30.json"),
                ("small SD3 (random weights), 50 steps", "wall_targets_sd3.json"))


def wall_summary_rows(_: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model and target: the fit's predicted and measured wall speedup, its error and granularity mix,
    beside the best uniform policy (block or whole-step) and fewer steps at least as fast (studies/wall_targets.py)."""
    rows = []
    for model, source in WALL_SOURCES:
        for t in load(source)["targets"]:
            fit, report = t["fit"], t["fit_report"]
            uniform = [b for b in (t["best block"], t["best whole-step"]) if b]
            best = min(uniform, key=lambda b: b["rel_l2"]) if uniform else None
            fewer = t["best fewer steps"]
            mix = "" if fit.get("plan_steps_computed") is None else (
                f"{fit['plan_steps_computed']:.0f} / {fit['plan_steps_blocks_filled']:.0f} / "
                f"{fit['plan_steps_forecast_whole']:.0f}")
            rows.append({"model": model, "target": f"{t['target']:g}×",
                         "speed": f"{report['plan_predicted_speedup']:.2f}× / {fit['wall_speedup']:.2f}× "
                                  f"({fit['wall_speedup'] / t['target']:.2f})",
                         "rel_l2": f"{fit['rel_l2']:.3f}", "mix": mix,
                         "uniform": f"{best['rel_l2']:.3f} ({best['config']})" if best else "none",
                         "fewer": f"{fewer['rel_l2']:.3f} ({fewer['steps']} steps)" if fewer else "none"})
            model = ""
    return rows


WALL_SUMMARY: list[Column] = [("model", lambda r: r["model"]), ("target", lambda r: r["target"]),
                              ("fit: predicted / measured wall speedup (of target)", lambda r: r["speed"]),
                              ("rel_l2", lambda r: r["rel_l2"]),
                              ("steps computed / filled / whole", lambda r: r["mix"]),
                              ("best uniform at that speed", lambda r: r["uniform"]),
                              ("fewer steps at that speed", lambda r: r["fewer"])]


def maybe(key: str, digits: int) -> Callable[[dict[str, Any]], str]:
    return lambda r: "" if key not in r else f"{r[key]:.{digits}f}"


WALL_TARGETS: list[Column] = [("target", lambda r: r["target"]), ("config", lambda r: r["config"]),
                              ("wall speedup", lambda r: "" if "wall_speedup" not in r else
                               f"{r['wall_speedup']:.2f}× ({r['spread'][0]:.2f}–{r['spread'][1]:.2f})"),
                              ("of target", lambda r: r["of_target"]), ("compute fraction", maybe("compute_fraction", 3)),
                              ("rel_l2", maybe("rel_l2", 3)), ("adherence", maybe("adherence", 2)),
                              ("fd", maybe("fd", 2))]
WALL_TARGETS_RANDOM = WALL_TARGETS[:-2]  # a random-weight model: no reader scores its images


TABLES: dict[str, tuple[str, str, Callable[[dict[str, Any]], list[dict[str, Any]]], list[Column]]] = {
    "testbed-forecasters": ("testbed.json", BENCH, rows_of(("full", "engine-all", "fora", "taylor1", "taylor2", "foca",
                                                            "spectrum", "dmd", "fbcache", "fewer-steps")), QUALITY),
    "testbed-forecasters-rel_l2": ("testbed.json", BENCH, by_interval(FORECASTERS + FEWER, "rel_l2"),
                                   pivot(FORECASTERS + FEWER, 4)),
    "testbed-forecasters-fd": ("testbed.json", BENCH, by_interval(FORECASTERS + FEWER, "fd"),
                               pivot(FORECASTERS + FEWER, 2)),
    "testbed-tcc": ("testbed.json", BENCH, rows_of(("fora+tcc", "taylor+tcc", "foca+tcc", "fora+tcc-oneshot")),
                    QUALITY),
    "testbed-goc": ("testbed.json", BENCH, rows_of(("fora+goc", "fora+goc-noinflection", "fora+goc+tcc")), QUALITY),
    "testbed-icc": ("testbed.json", BENCH, rows_of(("icc-r16", "icc-r32", "icc-plain-svd", "icc+tcc")), QUALITY),
    "testbed-ablation": ("testbed.json", BENCH, lambda r: r["quality"]["ablation"], QUALITY),
    "testbed-granularity": ("testbed.json", BENCH, lambda r: r["quality"]["granularity"], QUALITY),
    "testbed-schedule": ("testbed.json", BENCH, lambda r: r["quality"]["schedule"]["rows"], QUALITY),
    "testbed-transfer": ("testbed.json", BENCH, lambda r: r["quality"]["transfer"]["rows"],
                         [("steps", lambda r: str(r["steps"])), ("method", lambda r: r["method"]),
                          ("compute fraction", number("compute_fraction", 3)), ("rel_l2", number("rel_l2", 4)),
                          ("fd", number("fd", 2)), ("interpolated", lambda r: "yes" if r["interpolated"] else "")]),
    "speed-testbed": ("testbed_speed.json", SPEED_BENCH, speed_rows("testbed"), SPEED),
    "speed-stack": ("testbed_speed.json", SPEED_BENCH, speed_rows("stack"), SPEED),
    "headline": ("scenes_080.json", "", headline_rows, HEADLINE),
    "headline-0364": ("scenes.json", "", headline_rows, HEADLINE),
    "scenes-euler-20": ("scenes.json", "", scenes_rows("euler 20"), SCENES),
    "scenes-at-025": ("scenes.json", "", scenes_rows(target=0.25),
                      [("setting", lambda r: r["setting"])] + SCENES[:-2]),
    "comfyui-speed": ("comfyui_share.json", "", lambda r: r["rows"], FAMILY_SPEED),
    "comfyui-speed-before-spans": ("comfyui_share_before_spans.json", "", lambda r: r["rows"], FAMILY_SPEED),
    "comfyui-speed-sd3-small": ("comfyui_share_sd3_small.json", "", lambda r: r["rows"], FAMILY_SPEED),
    "comfyui-profile": ("comfyui_profile.json", "", lambda r: r["rows"], COMFYUI_PROFILE),
    "comfyui-profile-before-spans": ("comfyui_profile_before_spans.json", "", lambda r: r["rows"], COMFYUI_PROFILE),
    "spans-testbed": ("spans.json", "", lambda r: r["rows"], SPANS),
    "spans-profile": ("spans.json", "", profile_rows, PROFILE),
    "families": ("families.json", "", lambda r: r["rows"], FAMILY_TABLE),
    "families-080": ("families_080.json", "", lambda r: r["rows"], FAMILY_TABLE_080),
    "flux-module-sites": ("flux_module_sites.json", "", lambda r: r["rows"], MODULE_SITES),
    "comfyui-fit-cost": ("comfyui_fit_cost.json", "", lambda r: r["rows"], FIT_COST),
    "testbed-fit-samples": ("fit_samples.json", "", lambda r: r["rows"], FIT_SAMPLES),
    "testbed-plans": ("plans.json", "", plan_rows, PLANS),
    "scenes-plans": ("scenes_plans.json", "", scenes_plan_rows, SCENES_PLANS),
    "scenes-plans-30": ("scenes_plans_30.json", "", scenes_plan_rows, SCENES_PLANS),
    "testbed-plan-oracle": ("plan_oracle.json", "", oracle_rows, ORACLE),
    "wall-targets": ("wall_targets.json", "", wall_target_rows, WALL_TARGETS),
    "wall-targets-sd3": ("wall_targets_sd3.json", "", wall_target_rows, WALL_TARGETS_RANDOM),
    "wall-targets-30": ("wall_targets_30.json", "", wall_target_rows, WALL_TARGETS),
    "wall-targets-summary": ("wall_targets.json", "COMFYUI_PATH=… python studies/wall_targets.py [--model sd3] --steps "
                             "20|30|50 --json …", wall_summary_rows, WALL_SUMMARY),
    "search-memory": ("search_memory.json", "python studies/search_memory.py --steps 20 50 100 --json "
                      "benchmarks/results/search_memory.json", lambda r: r["rows"], SEARCH_MEMORY),
    "spans-guard": ("spans_guard.json", "", guard_rows, SPANS_GUARD),
}


class MissingResult(Exception):
    """A table's result file is not there yet: its block is left as it is, and the run fails at the end."""


def load(name: str) -> dict[str, Any]:
    path = RESULTS / name
    if not path.is_file():
        raise MissingResult(f"{path} is missing: run the command that writes it (see {Path(__file__).name}'s TABLES)")
    return json.loads(path.read_text())


def caption(report: dict[str, Any], command: str) -> str:
    m = report["machine"]
    where = f"{m['processor']}, {m['cpu_count']} CPU cores, torch {m['torch']}, device {m['device']}"
    if m.get("gpu"):
        where += f" ({m['gpu']})"
    if report.get("comfyui"):
        where += f", ComfyUI {report['comfyui']}"
    commit = f"{report.get('commit') or 'unknown'}{' with uncommitted changes' if report.get('dirty') else ''}"
    return (f"Command: `{command or report['command']}`. Measured {report.get('date', 'on an unknown date')}, "
            f"commit {commit}, on {where}.")


def render(name: str) -> str:
    source, command, select, columns = TABLES[name]
    report = load(source)
    rows = select(report)
    cells = [[cell(r) for _, cell in columns] for r in rows]
    # a column no result fills yet is left out
    kept = [i for i in range(len(columns)) if any(row[i] for row in cells)] if cells else list(range(len(columns)))
    lines = [caption(report, command), "", "| " + " | ".join(columns[i][0] for i in kept) + " |",
             "|" + "---|" * len(kept)]
    lines += ["| " + " | ".join(row[i] for i in kept) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def regenerate(text: str, missing: list[str]) -> str:
    """The page with every table block rendered anew; a block whose result file is missing stays as it was and its
    message is appended to `missing` (every other table is still refreshed)."""
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"unknown table {name!r}: the names are {', '.join(TABLES)}")
        try:
            return match.group(1) + render(name) + match.group(4)
        except MissingResult as err:
            missing.append(str(err))
            return match.group(0)
    return BLOCK.sub(replace, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    parser.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args()
    stale: list[str] = []
    missing: list[str] = []
    for page in [args.docs.parent / "README.md", *sorted(args.docs.glob("*.md"))]:
        text = page.read_text()
        new = regenerate(text, missing)
        if new != text:
            stale.append(page.name)
            if not args.check:
                partial = page.with_suffix(".md.partial")
                partial.write_text(new)
                partial.replace(page)  # atomic: an interrupted run leaves the page as it was
    for message in dict.fromkeys(missing):
        print(message, file=sys.stderr)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python benchmarks/tables.py", file=sys.stderr)
        return 1
    if missing:
        return 1
    print(("checked" if args.check else "regenerated") + f" the tables in {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
