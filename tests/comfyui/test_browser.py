"""ComfyUI tier: the pack's web extension in headless Chromium (Debian's `chromium`, driven by Playwright) against a
real ComfyUI server. It loads without console errors; Fit TCC Priors shows its live progress and then its error before
and after calibration; choosing a prior file shows what it was fitted for and whether it matches the connected model;
after a run queued from the page, Apply Calibrated Cache shows the run's report, the same figures the server logged.

Set CC_SCREENSHOT_DIR to keep the screenshots (README's picture of the nodes is one)."""

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

from harness import POLICY
from tiny_models import SPECS, save_tiny_unet

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (it drives Debian's chromium)")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM}: apt install chromium, or set CHROMIUM", allow_module_level=True)
# the flags this machine's closed network needs: no background connections that would fail and log errors
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
APP = "window.comfyAPI.app.app"
APPLY_PANEL = "[data-cc-panel=CalibratedCache_Apply]"
FIT_PANEL = "[data-cc-panel=CalibratedCache_FitTCCPriors]"
PRIORS = "tiny_wan.FORA_N2_W1_G2.tcc.safetensors"
# where each node of the test graph sits on the canvas, so that the screenshot shows the panels
LAYOUT = {"1": (20, 20), "2": (20, 140), "4": (20, 560), "5": (20, 730), "6": (20, 830), "9": (360, 20),
          "3": (760, 20), "7": (1160, 20), "8": (1160, 420)}


def graph(model_name: str) -> dict:
    """Fit TCC Priors and Apply Calibrated Cache on a tiny Wan model, in one API-format prompt."""
    policy = {**POLICY, "forecaster": "reuse", "interval": 2}
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default"}},
        "2": {"class_type": "CalibratedCache_CachePolicy", "inputs": policy},
        "9": {"class_type": "CalibratedCache_FitTCCPriors", "inputs": {
            "model": ["1", 0], "policy": ["2", 0], "positive": ["4", 0], "negative": ["5", 0], "latent": ["6", 0],
            "samples": 3, "seed": 0, "steps": 9, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "variant": "drift", "checkpoint": model_name, "save_to": "cache_priors folder", "overwrite": True,
            "icc_rank": 0, "icc_svd": "channel-aware", "held_out": 1, "verify": False}},
        "3": {"class_type": "CalibratedCache_Apply", "inputs": {
            "model": ["1", 0], "policy": ["2", 0], "priors": ["9", 0], "prior_file": "none", "icc_rank": 0,
            "icc_svd": "channel-aware"}},
        "4": {"class_type": "CCTest_ZeroConditioning", "inputs": {"tokens": 16, "dim": 4096, "pooled_dim": 0,
                                                                   "seed": 0}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 1,
                                                                   "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": 1, "steps": 9, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "cc_browser"}},
    }


class Page:
    """One browser page on the server's graph editor, with every console error and uncaught exception it saw."""

    def __init__(self, page, url: str):
        self.page, self.url = page, url
        self.errors: list[str] = []
        self.failed: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"{m.text} @ {m.location.get('url')}"))
        page.on("pageerror", lambda e: self.errors.append(f"{e}\n{e.stack}"))
        self.loaded: list[str] = []
        page.on("response", lambda r: (self.loaded if r.ok else self.failed).append(f"{r.status} {r.url}"))

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def text(self, selector: str) -> str:
        return self.js("(s) => document.querySelector(s)?.innerText ?? ''", selector)

    def wait_text(self, selector: str, needle: str, timeout_s: float = 120) -> str:
        self.page.wait_for_function("([s, n]) => document.querySelector(s)?.innerText.includes(n)", arg=[selector, needle],
                                    timeout=timeout_s * 1000)
        return self.text(selector)

    def ours(self) -> list[str]:
        """The errors and failed requests that come from the pack: its script, its route, its events."""
        return [e for e in self.errors + self.failed if "calibrated_cache" in e]


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    url = server.url
    # a first visit opens the template browser over the canvas: mark the tutorial done, as a returning user
    request = urllib.request.Request(f"{url}/settings/Comfy.TutorialCompleted", b"true",
                                     {"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            tab = Page(browser.new_page(viewport={"width": 1600, "height": 1000}), url)
            tab.page.goto(url)
            # ready when the node definitions from /object_info are registered and extensions have run
            tab.page.wait_for_function(f"() => !!({APP}?.vueAppReady && window.LiteGraph?.registered_node_types"
                                       "?.CalibratedCache_Apply)", timeout=120_000)
            yield tab
        finally:
            browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("CC_SCREENSHOT_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_the_extension_loads_without_console_errors(page):
    assert page.js(f"() => {APP}.extensions.some((e) => e.name === 'calibrated_cache.panels')")
    scripts = [u for u in page.loaded if "calibrated_cache.js" in u]
    assert scripts and scripts[0].startswith("200 ") and scripts[0].endswith("/calibrated_cache.js"), page.loaded
    assert page.ours() == []


def test_a_queued_run_shows_fit_progress_its_errors_and_the_cache_report(page, server, shots):
    page.js(f"(wf) => {APP}.loadApiJson(wf, 'calibrated_cache browser test')", graph(server.model_name))
    page.js(f"""(layout) => {{
        for (const [id, pos] of Object.entries(layout)) {APP}.graph.getNodeById(Number(id)).pos = pos;
        {APP}.canvas.ds.scale = 1; {APP}.canvas.ds.offset = [10, 10]; {APP}.graph.setDirtyCanvas(true, true);
        // what the fit panel showed after each fit event, to prove it was live
        window.ccFitSeen = [];
        window.ccRuns = 0;
        // the fit's own cached runs report too, with no node: count the Apply node's reports only
        window.comfyAPI.api.api.addEventListener("calibrated_cache.stats", (e) => e.detail.node === "3" && window.ccRuns++);
        // fixed seeds: the next queue must not refit because the conditioning's seed changed
        for (const node of {APP}.graph.nodes)
            for (const w of node.widgets ?? []) if (w.name === "control_after_generate") w.value = "fixed";
        window.comfyAPI.api.api.addEventListener("calibrated_cache.fit", () =>
            window.ccFitSeen.push(document.querySelector("{FIT_PANEL}").innerText));
    }}""", LAYOUT)
    log_start = len(server.log.read_text())
    page.js(f"() => {APP}.queuePrompt(0, 1)")
    stats = page.wait_text(f"{APPLY_PANEL} [data-cc=stats]", "last run ·")

    seen = page.js("() => window.ccFitSeen")
    progress = [s for s in seen if "fitting · run" in s]
    assert progress and any(re.search(r"\d+/\d+ steps \(\d+%\)", s) for s in progress), seen
    assert any("fitting (fitting seeds)" in s for s in progress), seen
    assert any("full computation (held-out seeds)" in s for s in progress), seen
    assert any("with the fitted priors (held-out seeds)" in s for s in progress), seen
    fit = page.text(f"{FIT_PANEL} [data-cc=fit]")
    assert re.search(r"\(\d+\.\d samplings\) · \d+ sites · seeds 0, 1", fit), fit
    assert re.search(r"held-out seed 2: error vs full computation [\d.e-]+ without priors → [\d.e-]+ with", fit), fit
    assert f"saved as {PRIORS}" in fit, fit
    path = page.js(f"() => document.querySelector('{FIT_PANEL} [title]').title")
    assert path == str(server.log.parent / "models" / "cache_priors" / PRIORS)

    # the panel shows the figures the server logged for the sampler's run (the fit's runs log theirs too)
    logged = re.findall(r"calibrated_cache \[FORA_N2_W1_G2\] Wan: computed (\d+) of (\d+) block evaluations .*"
                        r"compute fraction ([\d.]+), estimated speedup ([\d.]+)x.*, priors " + re.escape(PRIORS),
                        server.log.read_text()[log_start:])
    assert len(logged) == 1, server.log.read_text()[log_start:][-3000:]
    computed, total, fraction, speedup = logged[0]
    skipped = int(total) - int(computed)
    assert f"computed {computed} · skipped {skipped} of {total} block evaluations" in stats, stats
    assert f"compute fraction {fraction} · est. speedup {float(speedup):.2f}×" in stats, stats
    assert re.search(r"wall [\d.]+ s · 9 steps", stats) and f"priors {PRIORS}: family" in stats, stats
    page.page.screenshot(path=str(shots / "fit_and_run.png"))
    assert page.ours() == []


def test_choosing_a_prior_file_shows_its_provenance_and_whether_it_fits_the_model(page, server, shots):
    other = Path(save_tiny_unet(SPECS["Wan"], str(server.log.parent / "models"), seed=1)).name
    page.js(f"""async () => {{
        const apply = {APP}.graph.getNodeById(3);
        apply.disconnectInput(apply.inputs.findIndex((i) => i.name === "priors"));
        await {APP}.refreshComboInNodes();
    }}""")
    choose = f"""([id, name, value]) => {{
        const w = {APP}.graph.getNodeById(id).widgets.find((w) => w.name === name);
        w.value = value; w.callback?.(value);
    }}"""
    page.js(choose, [3, "prior_file", PRIORS])
    prior = page.wait_text(f"{APPLY_PANEL} [data-cc=prior]", f"✓ fitted for {server.model_name}")
    assert f"prior file {PRIORS}" in prior and f"model {server.model_name} (Wan) · FORA_N2_W1_G2" in prior, prior
    assert re.search(r"9 steps · euler/simple · cfg 2(\.0)? · 2 seeds \+ 1 held out · \d{4}-\d\d-\d\dT", prior), prior
    assert re.search(r"held-out error [\d.e-]+ → [\d.e-]+ \(rel L2, drift\)", prior), prior

    page.js(choose, [1, "unet_name", other])
    prior = page.wait_text(f"{APPLY_PANEL} [data-cc=prior]", "✗ fitted for")
    assert f"the connected model is {other}" in prior, prior
    assert page.js(f"() => document.querySelector('{APPLY_PANEL} .cc-mismatch') !== null")

    page.js(choose, [1, "unet_name", server.model_name])
    page.wait_text(f"{APPLY_PANEL} [data-cc=prior]", "✓ fitted for")
    runs = page.js("() => window.ccRuns")
    page.js(f"() => {APP}.queuePrompt(0, 1)")
    page.page.wait_for_function("(n) => window.ccRuns > n", arg=runs, timeout=120_000)
    stats = page.text(f"{APPLY_PANEL} [data-cc=stats]")
    assert f"priors {PRIORS}: family, architecture, weights, patches match the model" in stats, stats
    assert "fitting" not in page.text(f"{FIT_PANEL} [data-cc=fit]"), "the fit ran again though its inputs are the same"
    page.js("() => document.querySelectorAll('.p-toast-close-button').forEach((b) => b.click())")
    page.page.wait_for_timeout(500)
    page.page.screenshot(path=str(shots / "nodes.png"))
    assert page.ours() == []


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_loads_in_the_graph_editor_and_saves_back_unchanged(page, server, shots, path):
    workflow = json.loads(path.read_text())
    saved = page.js(f"""async (wf) => {{
        document.querySelectorAll(".p-toast-close-button").forEach((b) => b.click());
        await {APP}.loadGraphData(wf, true, true, "example");
        {APP}.canvas.ds.scale = 0.75; {APP}.canvas.ds.offset = [40, 40]; {APP}.graph.setDirtyCanvas(true, true);
        return {APP}.graph.serialize();
    }}""", workflow)
    ours = {n["id"]: n["widgets_values"] for n in workflow["nodes"] if n["type"].startswith("CalibratedCache_")}
    assert {n["id"]: n["widgets_values"] for n in saved["nodes"] if n["id"] in ours} == ours
    assert len(saved["nodes"]) == len(workflow["nodes"]) and len(saved["links"]) == len(workflow["links"])
    queued = page.js(f"async () => (await {APP}.graphToPrompt()).output")
    for node_id in ours:  # the panels are neither saved nor sent
        assert "calibrated_cache_panel" not in queued[str(node_id)]["inputs"], queued[str(node_id)]
    # the editor checks a loaded workflow against its own schema and says so in a toast, not on the console
    toasts = page.js("() => [...document.querySelectorAll('.p-toast-message')].map((t) => t.innerText)")
    assert not [t for t in toasts if "invalid" in t.lower() or "error" in t.lower()], toasts
    page.page.screenshot(path=str(shots / f"{path.stem}.jpg"), type="jpeg", quality=80)
    assert page.ours() == []


def test_cache_policy_shows_only_the_inputs_that_act_and_keeps_every_value(page, server, shots):
    """fixed + reuse hides threshold, max_skips, order, time_unit and foca_lambda; each choice shows what acts for
    it. Hidden widgets keep their values: the saved workflow and the queued prompt carry all of them."""
    page.js(f"""async () => {{
        {APP}.graph.clear();
        const node = window.LiteGraph.createNode("CalibratedCache_CachePolicy");
        node.pos = [40, 40];
        {APP}.graph.add(node);
        window.__policy = node;
    }}""")
    visible = """(choice) => {
        const node = window.__policy;
        for (const [name, value] of Object.entries(choice)) {
            const widget = node.widgets.find((w) => w.name === name);
            widget.value = value;
            widget.callback?.(value);
        }
        return node.widgets.filter((w) => node.isWidgetVisible(w)).map((w) => w.name);
    }"""
    always = {"mode", "forecaster", "warmup_steps", "start", "end", "first_blocks", "last_blocks", "granularity"}
    expected = {
        ("fixed", "reuse"): always | {"interval"},
        ("fixed", "taylor"): always | {"interval", "order", "time_unit"},
        ("fixed", "foca"): always | {"interval", "time_unit", "foca_lambda"},
        ("dynamic", "reuse"): always | {"threshold", "max_skips"},
        ("dynamic", "taylor"): always | {"threshold", "max_skips", "order", "time_unit"},
    }
    heights = {}
    for (mode, forecaster), names in expected.items():
        assert set(page.js(visible, {"mode": mode, "forecaster": forecaster})) == names, (mode, forecaster)
        heights[mode, forecaster] = page.js("() => window.__policy.size[1]")
    # the node shrinks to what it shows: hidden inputs leave no empty rows
    assert heights["fixed", "reuse"] < heights["fixed", "taylor"] < heights["dynamic", "taylor"]
    page.js(visible, {"mode": "fixed", "forecaster": "reuse", "order": 3, "foca_lambda": 0.25, "threshold": 0.07})
    saved = page.js(f"() => {APP}.graph.serialize().nodes[0].widgets_values")
    names = page.js("() => window.__policy.widgets.map((w) => w.name)")
    values = dict(zip(names, saved))
    assert (values["order"], values["foca_lambda"], values["threshold"]) == (3, 0.25, 0.07)
    queued = page.js(f"async () => Object.values((await {APP}.graphToPrompt()).output)[0].inputs")
    assert (queued["order"], queued["foca_lambda"], queued["threshold"]) == (3, 0.25, 0.07)
    page.page.screenshot(path=str(shots / "cache_policy_quiet.jpg"), type="jpeg", quality=80)
    assert page.ours() == []


def test_apply_shows_a_replaced_policy_and_a_run_that_went_uncached_as_the_server_sends_them(page, server, shots):
    """The node's text when a plan file replaced the connected Cache Policy (ComfyUI's `executed` message), and a run
    report whose run went uncached (a schedule the cache cannot follow), each carrying that note: the panel says
    both, marked as warnings; a next run of the prompt clears the node's text until the node sends it again."""
    page.js(f"""() => {{
        {APP}.graph.clear();
        const node = window.LiteGraph.createNode("CalibratedCache_Apply");
        node.pos = [40, 40];
        {APP}.graph.add(node);
        window.__apply = node;
    }}""")
    note = ("the connected Cache Policy (FORA_N2_W1) was replaced by the plan of prior file tiny.SPEEDUP2_G2.tcc"
            ".safetensors (FORA_PLAN47-f3afc5bf_G2), searched for a target speedup: disconnect the policy to keep "
            "the plan, or choose a prior file without a plan (or none) to sample with the policy")
    reason = "this sampler's schedule cannot be cached (the sigma schedule must be non-increasing (noisiest first))"
    page.js("""([note, reason]) => {
        const api = window.comfyAPI.api.api;
        const node = String(window.__apply.id);
        api.dispatchCustomEvent("executed", {node, display_node: node, output: {text: [note]}, prompt_id: "cc"});
        api.dispatchCustomEvent("calibrated_cache.stats", {node, family: "Wan", policy: "FORA_PLAN47-f3afc5bf_G2",
            priors: null, prior_check: null, notes: [note], prior_notes: [], uncached: reason, wall_s: 0.1});
    }""", [note, reason])
    shown = page.wait_text(f"{APPLY_PANEL} [data-cc=note]", "was replaced", timeout_s=10)
    assert shown.strip() == note
    stats = page.wait_text(f"{APPLY_PANEL} [data-cc=stats]", "not cached: ", timeout_s=10)
    assert stats.splitlines() == ["last run · Wan · FORA_PLAN47-f3afc5bf_G2", f"not cached: {reason}", note], stats
    warned = f"() => [...document.querySelectorAll('{APPLY_PANEL} .cc-unknown')].map((e) => e.innerText)"
    assert page.js(warned) == [note, f"not cached: {reason}", note]
    page.js("""() => window.comfyAPI.api.api.dispatchCustomEvent("execution_start", {prompt_id: "cc2"})""")
    page.page.wait_for_function(f"() => document.querySelector('{APPLY_PANEL} [data-cc=note]').innerText === ''",
                                timeout=10_000)
    page.page.screenshot(path=str(shots / "apply_notes.jpg"), type="jpeg", quality=80)
    assert page.ours() == []
