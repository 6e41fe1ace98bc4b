"""Human-readable summaries of prior files (`python -m calibrated_cache inspect FILE`)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from ..calibration.plan import BlockPlan
from .format import PriorFile


def summarize(prior: PriorFile, per_site: bool = False) -> str:
    meta, priors = prior.meta, prior.priors.priors
    lines = [f"{k:<13} {meta[k] if k not in ('sigmas',) else _sigmas(meta[k])}" for k in
             ("method", "variant", "policy_tag", "sampler", "scheduler", "steps", "sigmas", "cfg", "samples",
              "pack_version", "created")]
    if meta.get("comfyui_version"):  # the ComfyUI the fit ran on (older files do not record it)
        lines.append(f"{'comfyui':<13} {meta['comfyui_version']}")
    lines.append(f"{'model':<13} " + ", ".join(f"{k} {v}" for k, v in meta["model"].items()))
    lines += _errors(meta)
    if meta.get("report"):
        lines.append(f"{'report':<13} " + ", ".join(f"{k} {_num(v)}" for k, v in meta["report"].items()))
    plan = meta["policy"].get("plan")
    if plan:  # a searched plan (fit-priors --target-speedup): blocks down, steps across
        searched = BlockPlan.from_dict(plan)
        lines.append(f"{'plan':<13} {searched.blocks} blocks x {searched.steps} steps, {searched.fraction():.3f} of "
                     "block evaluations computed ('#' computed, '.' forecast)")
        lines += searched.picture().splitlines()
    channels = {p.a.numel() for p in priors.values()}
    lines.append(f"{'sites':<13} {len(priors)} ({', '.join(sorted({k[0] for k in priors}))}), "
                 f"{'/'.join(str(c) for c in sorted(channels))} channels")
    if prior.channels:
        stats = meta.get("icc_stats") or {}
        lines.append(f"{'icc stats':<13} {len(prior.channels)} Linears, source {stats.get('source', '?')}, "
                     f"{stats.get('samples', '?')} samples")
    rows: dict[tuple[str, int, float], list] = defaultdict(list)
    for (role, round_, _, _), p in priors.items():
        rows[(role, round_, p.sigma)].append(p)
    # sites are keyed by model evaluation: the schedule's step for one-evaluation samplers (Euler, ComfyUI's
    # default); an evaluation past the last step means several per step (Heun's two), so the column says so
    index = "step" if all(r < int(meta["steps"]) for _, r, _ in rows) else "eval"
    lines.append("")
    lines.append(f"{'role':<8} {index:>5} {'sigma':>7} {'sites':>5} {'mse before':>11} {'mse after':>11} "
                 f"{'mean |g|':>9} {'mean |b|':>9}")
    for (role, round_, sigma), ps in sorted(rows.items()):
        before = sum(p.before for p in ps) / len(ps)
        after = sum(p.after for p in ps) / len(ps)
        g = sum(float(p.g.abs().mean()) for p in ps) / len(ps)
        b = sum(float(p.b.abs().mean()) for p in ps) / len(ps)
        lines.append(f"{role:<8} {round_:>5} {sigma:>7.4f} {len(ps):>5} {_num(before):>11} {_num(after):>11} "
                     f"{g:>9.4f} {b:>9.4f}")
    if per_site:
        lines.append("")
        for key, p in sorted(priors.items()):
            lines.append(f"{'/'.join(map(str, key)):<40} a {float(p.a.mean()):.4f} g {float(p.g.mean()):.4f} "
                         f"b {float(p.b.abs().mean()):.4f} mse {_num(p.before)} -> {_num(p.after)}")
    return "\n".join(lines)


def _errors(meta: dict[str, Any]) -> list[str]:
    """The fit's error against full computation without and with the priors: on held-out requests (what to expect on
    new prompts and seeds), and in-sample where it was measured (optimistic: the priors were fitted there)."""
    report, lines = meta.get("report") or {}, []
    fitted = f"fitted on {_requests(meta['samples'])} (seeds {_seeds(meta.get('seeds'))})"
    if "held_out_before" in report:
        lines.append(f"{'held-out':<13} {_change(report['held_out_before'], report['held_out_after'])} on "
                     f"{_requests(meta.get('held_out', '?'))} (seeds {_seeds(meta.get('held_out_seeds'))}); {fitted}")
    else:
        lines.append(f"{'held-out':<13} not measured: this file was written before fits held requests out; {fitted}")
    for key, label in (("in_sample", "in-sample"), ("rel_l2", "in-sample")):
        if f"{key}_before" in report:
            lines.append(f"{label:<13} {_change(report[f'{key}_before'], report[f'{key}_after'])} on the fitted "
                         "requests (optimistic)")
    return lines


def _requests(count: Any) -> str:
    return f"{count} request{'' if count == 1 else 's'}"


def _change(before: float, after: float) -> str:
    change = f" ({after / before - 1:+.0%})" if before > 0 and math.isfinite(after) else ""
    return f"error {_num(before)} without priors -> {_num(after)} with{change}"


def _seeds(values: Any) -> str:
    if not values:
        return "?"
    shown = ", ".join(str(v) for v in values[:6])
    return shown + (f", … {len(values)} in all" if len(values) > 6 else "")


def _sigmas(values: list[float]) -> str:
    return f"{len(values)} values, {values[0]:.4g} → {values[-1]:.4g}"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)
