"""ComfyUI tier: the pack in a server that stays up, as users run it. The pack keeps state between prompts (a patched
model and its cache session live in ComfyUI's executor cache from one prompt to the next) and within one (Wan 2.2's two
experts, each with its own Apply Calibrated Cache). These tests drive a real headless server through its HTTP API and
websocket:

- a queue of 100 prompts with varying models, seeds, batch sizes, step counts, samplers, schedulers, cfg and cache
  policies runs without error, cached, without memory growth, and every output is bit-identical to the same prompt
  run alone on a server that forgot everything (POST /free);
- an interrupt during sampling or during Fit TCC Priors leaves nothing behind: the next runs are complete and equal
  clean runs, and no prior file (nor a temporary one) is written;
- two experts in one workflow, on two models or twice on one, keep separate cache states.

The server's memory is read from /proc; CC_REPORT_DIR=<dir> writes the soak's figures to <dir>/soak.json.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pytest
import safetensors.torch
import torch

from calibrated_cache.calibration import CachePolicy
from calibrated_cache.priors import load_priors
from harness import POLICY, Listener, failure, fit_workflow, rss_bytes, saved_latent, send, server_pid
from tiny_models import SPECS, save_tiny_unet, unet_file_name

SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "lms")
SCHEDULERS = ("simple", "normal", "karras", "sgm_uniform", "beta")
POLICY_KINDS = ("reuse", "reuse with ICC", "taylor", "foca", "dynamic")
MODELS = (("Wan", 0), ("SD3", 0), ("HunyuanVideo", 0), ("Wan", 1))  # (family, weight seed); Wan 1: other weights
WAN, SD3, OTHER_WAN = unet_file_name("Wan"), unet_file_name("SD3"), unet_file_name("Wan", 1)
SOAK, WARM = 100, 10  # prompts in the soak; memory after the first WARM is the reference
ERRORS = ("Traceback", "!!! Exception")


class Job(NamedTuple):
    """What one prompt samples: the model and every setting the soak varies."""

    model: str
    family: str
    seed: int
    batch_size: int
    steps: int
    sampler_name: str
    scheduler: str
    cfg: float
    policy: dict  # Cache Policy inputs
    icc_rank: int
    kind: str  # which of POLICY_KINDS


@pytest.fixture(scope="module")
def models(server) -> dict[str, str]:
    """Tiny models in the server's diffusion_models folder, file name -> family, in MODELS' order."""
    folder = str(server.log.parent / "models")
    return {Path(save_tiny_unet(SPECS[family], folder, seed)).name: family for family, seed in MODELS}


@pytest.fixture(scope="module")
def listener(server) -> Iterator[Listener]:
    with Listener(server.url) as listening:
        yield listening


def conditioning(family: str) -> dict:
    """CCTest_ZeroConditioning inputs with the widths of the family's text encoder."""
    spec = SPECS[family]
    return {"tokens": spec.context_shape[1], "dim": spec.context_shape[2],
            "pooled_dim": spec.cond_extras.get("pooled_output", 0), "seed": 0}


def empty_latent(family: str, batch_size: int) -> dict:
    """A small empty latent in the family's layout: video (one frame of 8x8) or image (16x16)."""
    if len(SPECS[family].latent_shape) == 5:
        return {"class_type": "EmptyHunyuanLatentVideo",
                "inputs": {"width": 64, "height": 64, "length": 1, "batch_size": batch_size}}
    return {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": batch_size}}


def sampling_prompt(job: Job, prefix: str) -> dict:
    """UNETLoader -> Cache Policy -> Apply Calibrated Cache -> KSampler -> SaveLatent."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": job.model, "weight_dtype": "default"}},
        "2": {"class_type": "CalibratedCache_CachePolicy", "inputs": job.policy},
        "3": {"class_type": "CalibratedCache_Apply",
              "inputs": {"model": ["1", 0], "policy": ["2", 0], "icc_rank": job.icc_rank, "icc_svd": "plain"}},
        "4": {"class_type": "CCTest_ZeroConditioning", "inputs": conditioning(job.family)},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "6": empty_latent(job.family, job.batch_size),
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": job.seed, "steps": job.steps, "cfg": job.cfg, "sampler_name": job.sampler_name,
            "scheduler": job.scheduler, "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }


def random_policy(rng: random.Random, kind: str) -> tuple[dict, int]:
    """Cache Policy inputs of a kind, and the ICC rank (ICC needs reuse)."""
    policy = {**POLICY, "interval": rng.randint(2, 4), "warmup_steps": rng.randint(0, 2), "order": rng.randint(1, 2),
              "forecaster": {"taylor": "taylor", "foca": "foca"}.get(kind, "reuse"),
              "foca_lambda": rng.choice((0.0, 0.5, 1.0)), "time_unit": rng.choice(("step", "sigma"))}
    if kind == "dynamic":
        policy.update(mode="dynamic", threshold=rng.choice((0.05, 0.1, 0.2)), max_skips=rng.randint(2, 3))
    return policy, 8 if kind == "reuse with ICC" else 0


def soak_jobs(models: dict[str, str], count: int, seed: int = 0) -> list[Job]:
    """`count` varied jobs, the same every time. They come in streaks of 1-3 on one model, policy and ICC rank with
    other sampler settings, as a user re-queues a graph: ComfyUI then reuses the patched model and its cache session
    from the prompt before. The streaks take the models in turn, so the first 10 jobs use every model."""
    rng = random.Random(seed)
    names = list(models)
    jobs: list[Job] = []
    for streak in itertools.count():
        if len(jobs) == count:
            return jobs
        model = names[streak % len(names)]
        kind = rng.choice(POLICY_KINDS)
        policy, icc_rank = random_policy(rng, kind)
        for _ in range(min(rng.randint(1, 3), count - len(jobs))):
            jobs.append(Job(model, models[model], rng.randrange(2**32), rng.randint(1, 3), rng.randint(4, 12),
                            rng.choice(SAMPLERS), rng.choice(SCHEDULERS), rng.choice((1.0, 2.0, 3.5)), policy,
                            icc_rank, kind))


def continues_streak(jobs: list[Job], i: int) -> bool:
    """Whether job i patches the model as the job before it did (same model, policy and ICC rank)."""
    return i > 0 and (jobs[i].model, jobs[i].policy, jobs[i].icc_rank) == (jobs[i - 1].model, jobs[i - 1].policy,
                                                                          jobs[i - 1].icc_rank)


def forget(listener: Listener) -> None:
    """Make the server unload its models and reset its executor cache before the next prompt queued.

    main.py's worker handles /free's flags when it finds its queue empty, or after the prompt it runs. An idle worker
    can lose the race to a prompt queued right after /free, so a barrier prompt (sharing no node with the others) is
    queued after it: the flags are handled before the barrier runs or right after it, before the next prompt.
    """
    send(f"{listener.url}/free", {"unload_models": True, "free_memory": True})
    latent = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    listener.queue({"1": latent, "2": {"class_type": "SaveLatent",
                                       "inputs": {"samples": ["1", 0], "filename_prefix": "cc_barrier"}}})


def cached_nodes(result: dict) -> list[str]:
    """The nodes whose outputs a prompt took from the executor cache."""
    (nodes,) = [data["nodes"] for event, data in result["status"]["messages"] if event == "execution_cached"]
    return nodes


def run_reports(listener: Listener, prompt_id: str) -> list[dict]:
    """The pack's run reports (one per cached sampler run) sent while a prompt ran, without their wall times."""
    return [{k: v for k, v in stats.items() if k != "wall_s"}
            for stats in listener.of(prompt_id, "calibrated_cache.stats")]


def run_alone(listener: Listener, prompt: dict) -> tuple[dict, str]:
    """Run a prompt on a server that forgot every model and cached output; its history entry and prompt id."""
    forget(listener)
    prompt_id = listener.queue(prompt)
    result = listener.wait(prompt_id)
    assert cached_nodes(result) == [], "the prompt reused cached outputs: it did not run alone"
    return result, prompt_id


def log_since(server, start: int) -> str:
    """What the server logged from the `start`-th character on."""
    return server.log.read_text()[start:]


def mib(n: int) -> float:
    """Bytes in MiB, to a tenth."""
    return round(n / 2**20, 1)


def write_report(name: str, figures: dict) -> None:
    """Write the figures as JSON to $CC_REPORT_DIR/<name> when CC_REPORT_DIR is set."""
    folder = os.environ.get("CC_REPORT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_text(json.dumps(figures, indent=2) + "\n")


def run_phase(listener: Listener, jobs: list[Job], first: int) -> tuple[list[str], list[dict]]:
    """Queue the jobs at once (prefixes cc_soak_<index>) and wait for them all; their prompt ids and history entries."""
    ids = [listener.queue(sampling_prompt(job, f"cc_soak_{i:03d}")) for i, job in enumerate(jobs, first)]
    return ids, [listener.wait(prompt_id) for prompt_id in ids]


def test_a_queue_of_100_varied_prompts_runs_cached_without_error_or_memory_growth_and_each_matches_its_run_alone(
        server, models, listener):
    jobs = soak_jobs(models, SOAK)
    pid = server_pid(server)
    start = len(server.log.read_text())
    ids, results, phases = [], [], []
    for phase in (jobs[:WARM], jobs[WARM:]):
        began = time.monotonic()
        phase_ids, phase_results = run_phase(listener, phase, len(ids))
        phases.append({"prompts": len(phase), "wall_s": round(time.monotonic() - began, 2), "rss": rss_bytes(pid)})
        ids, results = ids + phase_ids, results + phase_results
    log = log_since(server, start)
    errors = [line for line in log.splitlines() if line.startswith(ERRORS)]
    failed = [(i, r["status"]) for i, r in enumerate(results) if r["status"]["status_str"] != "success"]
    logged_steps = [int(n) for n in re.findall(r"^calibrated_cache \[\S+\] \S+: computed .* over (\d+) steps", log,
                                               re.MULTILINE)]
    soak_reports = [run_reports(listener, prompt_id) for prompt_id in ids]
    reused = [i for i, r in enumerate(results) if "3" in cached_nodes(r)]

    began, different, reports_differ = time.monotonic(), [], []
    for i, job in enumerate(jobs):
        result, alone_id = run_alone(listener, sampling_prompt(job, f"cc_alone_{i:03d}"))
        assert result["status"]["status_str"] == "success", (job, failure(result))
        soak, alone = (saved_latent(server.log.parent, f"cc_{run}_{i:03d}") for run in ("soak", "alone"))
        if not torch.equal(soak, alone):
            different.append((i, job, (soak - alone).abs().max().item()))
        if run_reports(listener, alone_id) != soak_reports[i]:
            reports_differ.append((i, job, soak_reports[i], run_reports(listener, alone_id)))
    alone_s = time.monotonic() - began

    rss_warm, rss_all = phases[0]["rss"], phases[1]["rss"]
    write_report("soak.json", {
        "prompts": [p["prompts"] for p in phases], "wall_s": [p["wall_s"] for p in phases],
        "alone_wall_s": round(alone_s, 2), f"rss_after_{WARM}_mib": mib(rss_warm),
        f"rss_after_{SOAK}_mib": mib(rss_all), "rss_ratio": round(rss_all / rss_warm, 4), "failed": len(failed),
        "log_errors": len(errors), "cache_reports_logged": len(logged_steps), "sessions_reused": len(reused),
        "outputs_compared": len(jobs), "outputs_identical": len(jobs) - len(different),
        "run_reports_identical": len(jobs) - len(reports_differ),
        "mix": {field: dict(Counter(str(getattr(job, field)) for job in jobs))
                for field in ("model", "kind", "sampler_name", "scheduler", "batch_size", "steps", "cfg", "icc_rank")},
    })
    assert failed == [] and errors == []
    assert logged_steps == [job.steps for job in jobs]
    assert [[r["steps"] for r in reports] for reports in soak_reports] == [[job.steps] for job in jobs]
    assert all(r["blocks_skipped"] > 0 for (r,), job in zip(soak_reports, jobs) if job.policy["mode"] == "fixed")
    assert reused == [i for i in range(len(jobs)) if continues_streak(jobs, i)]
    assert different == [], f"{len(different)} of {len(jobs)} outputs differ from the prompt run alone: {different}"
    assert reports_differ == [], [(i, job.policy, {k: (a.get(k), b.get(k)) for a, b in zip(soak, alone)
                                                   for k in a.keys() | b.keys() if a.get(k) != b.get(k)})
                                  for i, job, soak, alone in reports_differ]
    assert rss_all <= 1.05 * rss_warm, f"server RSS grew from {mib(rss_warm)} to {mib(rss_all)} MiB"


def listing(folder: Path) -> list[str]:
    """Every name in a folder, hidden ones (temporary prior files) included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def ended_interrupted(result: dict) -> bool:
    """Whether a prompt's history entry says it was interrupted."""
    events = [event for event, _ in result["status"]["messages"]]
    return result["status"]["status_str"] == "error" and "execution_interrupted" in events


def interrupt_when(listener: Listener, prompt: dict, started: Callable[[dict], bool]) -> tuple[str, dict]:
    """Queue a prompt, interrupt it at the first of its messages that `started` accepts; its id and history entry."""
    start = len(listener.messages)
    prompt_id = listener.queue(prompt)
    listener.wait_for(started, start)
    send(f"{listener.url}/interrupt", {"prompt_id": prompt_id})
    return prompt_id, listener.wait(prompt_id)


def test_an_interrupt_during_sampling_leaves_the_next_runs_complete_and_equal_to_clean_runs(server, models, listener):
    long = Job(WAN, "Wan", 7, 1, 200, "euler", "simple", 2.0, POLICY, 0, "taylor")
    other = Job(SD3, "SD3", 8, 2, 8, "dpmpp_2m", "karras", 3.5, {**POLICY, "forecaster": "reuse", "interval": 2}, 0,
                "reuse")
    interrupted, result = interrupt_when(listener, sampling_prompt(long, "cc_interrupted"), lambda m: (
        m["type"] == "progress" and m["data"]["node"] == "7" and m["data"]["value"] >= 5))
    assert ended_interrupted(result), result["status"]
    assert max(p["value"] for p in listener.of(interrupted, "progress")) < long.steps  # it stopped while sampling
    output = server.log.parent / "output"
    assert list(output.glob("cc_interrupted_*")) == []

    start = len(server.log.read_text())
    after = {name: listener.queue(sampling_prompt(job, f"cc_after_interrupt_{name}"))
             for name, job in (("same", long), ("other", other))}
    results = {name: listener.wait(prompt_id) for name, prompt_id in after.items()}
    assert [r["status"]["status_str"] for r in results.values()] == ["success", "success"]
    assert "3" in cached_nodes(results["same"])  # it ran on the very session the interrupt stopped
    lines = re.findall(r"^calibrated_cache \[\S+\] \S+: computed .* over (\d+) steps", log_since(server, start),
                       re.MULTILINE)
    assert lines == [str(long.steps), str(other.steps)]
    for name, job in (("same", long), ("other", other)):
        _, clean = run_alone(listener, sampling_prompt(job, f"cc_clean_{name}"))
        assert run_reports(listener, after[name]) == run_reports(listener, clean)
        assert torch.equal(saved_latent(server.log.parent, f"cc_after_interrupt_{name}"),
                           saved_latent(server.log.parent, f"cc_clean_{name}")), name


def test_an_interrupt_during_fit_tcc_priors_writes_no_file_and_the_next_fit_equals_a_clean_one(server, models,
                                                                                                listener):
    prompt = fit_workflow(OTHER_WAN)  # no other test fits priors for this model
    prompt["9"]["inputs"]["steps"] = 40  # one fitting run, then three of the held-out seed: a few seconds
    folder = server.log.parent / "models" / "cache_priors"
    before = listing(folder)
    interrupted, result = interrupt_when(listener, prompt, lambda m: (
        m["type"] == "calibrated_cache.fit" and m["data"].get("phase", "").startswith("fitting")))
    assert ended_interrupted(result), result["status"]
    progress = listener.of(interrupted, "calibrated_cache.fit")
    assert progress[-1]["phase"].startswith("fitting") and not any(p.get("finished") for p in progress)
    assert listing(folder) == before

    fitted = listener.run(prompt)
    assert fitted["status"]["status_str"] == "success", failure(fitted)
    (name,) = set(listing(folder)) - set(before)
    assert name.startswith(f"{Path(OTHER_WAN).stem}.") and name.endswith(".tcc.safetensors")
    priors = load_priors(folder / name)
    assert (priors.meta["steps"], priors.meta["samples"], priors.meta["held_out"]) == (40, 1, 1) and priors.priors.priors
    after_interrupt = safetensors.torch.load_file(str(folder / name))

    prompt["9"]["inputs"]["overwrite"] = True
    clean, _ = run_alone(listener, prompt)
    assert clean["status"]["status_str"] == "success", failure(clean)
    assert set(listing(folder)) - set(before) == {name}
    refitted = safetensors.torch.load_file(str(folder / name))
    assert after_interrupt.keys() == refitted.keys()
    assert all(torch.equal(after_interrupt[k], refitted[k]) for k in refitted)


HIGH_NOISE = POLICY  # Taylor order 2, interval 3, warm-up 1
LOW_NOISE = {**POLICY, "forecaster": "reuse", "interval": 2, "warmup_steps": 0}


def expert_prompt(high: str, low: str | None, prefix: str) -> dict:
    """Wan 2.2's two experts: steps 0-5 of 10 on the high-noise model, 5-10 on the low-noise one, each through its own
    Cache Policy and Apply Calibrated Cache. `low` None: both experts patch the high-noise model's one loader."""
    job = Job(high, "Wan", 3, 1, 10, "euler", "simple", 2.0, HIGH_NOISE, 0, "taylor")
    advanced = {"noise_seed": job.seed, "steps": job.steps, "cfg": job.cfg, "sampler_name": job.sampler_name,
                "scheduler": job.scheduler, "positive": ["4", 0], "negative": ["5", 0]}
    return sampling_prompt(job, prefix) | {
        "11": {"class_type": "UNETLoader", "inputs": {"unet_name": low or high, "weight_dtype": "default"}},
        "12": {"class_type": "CalibratedCache_CachePolicy", "inputs": LOW_NOISE},
        "13": {"class_type": "CalibratedCache_Apply",
               "inputs": {"model": ["1" if low is None else "11", 0], "policy": ["12", 0]}},
        "7": {"class_type": "KSamplerAdvanced", "inputs": {
            **advanced, "model": ["3", 0], "add_noise": "enable", "latent_image": ["6", 0], "start_at_step": 0,
            "end_at_step": 5, "return_with_leftover_noise": "enable"}},
        "17": {"class_type": "KSamplerAdvanced", "inputs": {
            **advanced, "model": ["13", 0], "add_noise": "disable", "latent_image": ["7", 0], "start_at_step": 5,
            "end_at_step": 10, "return_with_leftover_noise": "disable"}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["17", 0], "filename_prefix": prefix}},
    }


@pytest.mark.parametrize("shared", [False, True], ids=["two-models", "one-model-patched-twice"])
def test_two_experts_in_one_workflow_keep_separate_cache_states_and_repeat_bit_for_bit(server, models, listener,
                                                                                       shared):
    low = None if shared else OTHER_WAN
    prefix = f"cc_experts_{'shared' if shared else 'two'}"
    result, prompt_id = run_alone(listener, expert_prompt(WAN, low, f"{prefix}_first"))
    assert result["status"]["status_str"] == "success", failure(result)
    reports = run_reports(listener, prompt_id)
    assert sorted(r["node"] for r in reports) == ["13", "3"], reports
    for r in reports:
        policy = HIGH_NOISE if r["node"] == "3" else LOW_NOISE
        assert r["policy"] == CachePolicy(**policy, granularity="block").tag(), r
        assert r["steps"] == 5 and r["blocks_skipped"] > 0, r

    again, again_id = run_alone(listener, expert_prompt(WAN, low, f"{prefix}_again"))
    assert again["status"]["status_str"] == "success", failure(again)
    assert run_reports(listener, again_id) == reports
    assert torch.equal(saved_latent(server.log.parent, f"{prefix}_first"),
                       saved_latent(server.log.parent, f"{prefix}_again"))
