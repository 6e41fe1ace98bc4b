// calibrated_cache in the graph editor: what the cache did in the last run, the live progress of a fit, and what a
// chosen prior file was fitted for. Everything arrives through the server's websocket events (sent by the pack's
// nodes) or the pack's route /calibrated_cache/prior_info; nothing polls.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const APPLY = "CalibratedCache_Apply";
const POLICY = "CalibratedCache_CachePolicy";
const FIT = "CalibratedCache_FitTCCPriors";
const PANEL = "calibrated_cache_panel";
const MODEL_FILE_WIDGETS = ["unet_name", "ckpt_name", "model_name"];
const LINE_PX = 16;

const STYLE = `
.cc-panel { font: 11px/16px ui-monospace, monospace; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border-radius: 4px; padding: 4px 6px; box-sizing: border-box;
  white-space: pre-wrap; overflow: hidden; }
.cc-panel .cc-head { color: var(--descrip-text, #999); }
.cc-panel > div:not(:empty) ~ div:not(:empty) { border-top: 1px solid #555; margin-top: 3px; padding-top: 3px; }
.cc-panel .cc-match { color: #4caf50; } .cc-panel .cc-mismatch { color: #ef5350; }
.cc-panel .cc-unknown { color: #e0b84c; } .cc-panel .cc-error { color: #ef5350; }
.cc-panel .cc-bar { height: 5px; background: #444; border-radius: 2px; margin: 2px 0; }
.cc-panel .cc-bar > div { height: 100%; background: #4caf50; border-radius: 2px; }
`;

function addStyle() {
  const style = document.createElement("style");
  style.textContent = STYLE;
  document.head.append(style);
}

// A node from an event's node id; nodes inside subgraphs have ids "outer:inner".
function findNode(id) {
  let graph = app.graph;
  let node = null;
  for (const part of String(id ?? "").split(":")) {
    node = graph?.getNodeById(Number(part));
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

// The node's panel: a DOM widget that is neither saved in the workflow nor sent with the prompt.
function panel(node) {
  const existing = node.widgets?.find((w) => w.name === PANEL);
  if (existing) return existing;
  const element = document.createElement("div");
  element.className = "cc-panel";
  element.dataset.ccPanel = node.comfyClass;
  const sections = {};
  for (const name of ["prior", "note", "stats", "fit"]) {
    sections[name] = document.createElement("div");
    sections[name].dataset.cc = name;
    element.append(sections[name]);
  }
  const widget = node.addDOMWidget(PANEL, "calibrated_cache", element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    // wrapped lines make the content taller than its line count, and scrollHeight measures it at the node's width
    getMinHeight: () => Math.max(element.clientWidth ? element.scrollHeight : 0, countLines(element) * LINE_PX) + LINE_PX,
  });
  widget.serialize = false;
  widget.sections = sections;
  const waiting = node.comfyClass === FIT
    ? "queue the prompt to fit: live progress, then the error before and after calibration"
    : "after a run: computed and skipped block evaluations, compute fraction, wall time, est. speedup";
  sections[node.comfyClass === FIT ? "fit" : "stats"].append(line(waiting, "cc-head"));
  return widget;
}

function countLines(element) {
  return [...element.querySelectorAll("[data-line]")].length;
}

function line(text, cls) {
  const div = document.createElement("div");
  div.dataset.line = "";
  div.textContent = text;
  if (cls) div.className = cls;
  return div;
}

function show(node, section, children, state = "") {
  const widget = panel(node);
  widget.sections[section].replaceChildren(...children);
  widget.sections[section].dataset.state = state;
  const [width, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
  node.setDirtyCanvas(true, true);
}

const pct = (x) => `${(100 * x).toFixed(0)}%`;
const secs = (s) => (s >= 100 ? `${s.toFixed(0)} s` : `${s.toFixed(1)} s`);
const mib = (b) => `${(b / 2 ** 20).toFixed(1)} MiB`;
const err = (x) => (x == null ? "n/a" : x.toPrecision(3));

function showStats(node, r) {
  const head = line(`last run · ${r.family} · ${r.policy}`, "cc-head");
  // what Apply set aside (a connected policy a plan file replaced): with every report, not only when the node ran
  const notes = (r.notes ?? []).map((note) => line(note, "cc-unknown"));
  if (r.uncached) {
    show(node, "stats", [head, line(`not cached: ${r.uncached}`, "cc-unknown"), ...notes]);
    return;
  }
  const total = r.blocks_computed + r.blocks_skipped;
  const lines = [
    head,
    ...notes,
    line(`computed ${r.blocks_computed} · skipped ${r.blocks_skipped} of ${total} block evaluations`),
    line(`compute fraction ${r.compute_fraction.toFixed(3)} · est. speedup ${r.estimated_speedup.toFixed(2)}×`),
    line(`wall ${secs(r.wall_s)} · ${r.steps} steps · ${r.model_calls} model calls · peak cache ${mib(r.peak_cache_bytes)}` +
      (r.cache_offloaded ? " in CPU memory" : "")),
  ];
  if (r.blocks_over_limit) {
    lines.push(line(`${r.blocks_over_limit} blocks computed every step: caching them would pass the ` +
      `${mib(r.cache_limit_bytes)} cache limit`, "cc-unknown"));
  }
  if (r.priors) lines.push(line(`priors ${r.priors}${r.prior_check ? `: ${r.prior_check}` : ""}`));
  for (const note of r.prior_notes ?? []) lines.push(line(note, "cc-unknown"));
  show(node, "stats", lines);
}

// The model file upstream of the node's `model` input, through LoRA loaders and other model patches.
function connectedModel(node) {
  let current = node;
  let slot = node.inputs?.findIndex((i) => i.name === "model") ?? -1;
  let lora = false;
  const seen = new Set();
  while (current && slot >= 0 && !seen.has(current.id)) {
    seen.add(current.id);
    const upstream = current.getInputNode(slot);
    if (!upstream) break;
    const isLora = /lora/i.test(upstream.comfyClass ?? upstream.type ?? "");
    lora ||= isLora;
    const file = isLora ? null : upstream.widgets?.find((w) => MODEL_FILE_WIDGETS.includes(w.name));
    if (file) return { file: String(file.value), lora };
    slot = upstream.inputs?.findIndex((i) => i.type === "MODEL") ?? -1;
    current = upstream;
  }
  return { file: null, lora: null };
}

// what the prior file says its priors do: on held-out seeds, or in-sample for files written before held-out fits
function fitError(c) {
  if (!c.error_on) return `error not recorded (${c.variant})`;
  return `${c.error_on} error ${err(c.error_before)} → ${err(c.error_after)} (rel L2, ${c.variant})`;
}

async function showPrior(node) {
  const name = node.widgets?.find((w) => w.name === "prior_file")?.value;
  const token = (node.ccPriorToken = (node.ccPriorToken ?? 0) + 1);
  if (!name || name === "none") {
    show(node, "prior", []);
    return;
  }
  const { file, lora } = connectedModel(node);
  const query = new URLSearchParams({ name });
  if (file) query.set("model", file);
  if (lora !== null) query.set("lora", lora ? "1" : "0");
  let body;
  try {
    body = await (await api.fetchApi(`/calibrated_cache/prior_info?${query}`)).json();
  } catch (e) {
    body = { error: `could not read the prior file's details (${e})` };
  }
  if (token !== node.ccPriorToken) return; // a newer choice was made meanwhile
  if (body.error) {
    show(node, "prior", [line(`prior file: ${body.error}`, "cc-error")]);
    return;
  }
  const c = body.card;
  const m = body.match;
  const mark = { match: "✓", mismatch: "✗", unknown: "?" }[m.verdict];
  show(node, "prior", [
    line(`prior file ${body.name}`, "cc-head"),
    line(`model ${c.model} (${c.family}${c.lora ? ", with LoRAs" : ""}) · ${c.policy}`),
    line(`${c.steps} steps · ${c.sampler}/${c.scheduler} · cfg ${c.cfg} · ${c.samples} seed${c.samples === 1 ? "" : "s"}${c.held_out ? ` + ${c.held_out} held out` : ""} · ${c.created}`),
    line(`${fitError(c)}${c.icc_statistics ? " · ICC statistics" : ""}`),
    line(`${mark} ${m.reason}`, `cc-${m.verdict}`),
  ]);
}

function showFitProgress(node, p) {
  const bar = document.createElement("div");
  bar.className = "cc-bar";
  bar.dataset.line = "";
  const fill = document.createElement("div");
  fill.style.width = pct(p.done / p.total);
  bar.append(fill);
  show(node, "fit", [
    line(`fitting · run ${p.run}/${p.runs}: ${p.phase} · seed ${p.seed}`, "cc-head"),
    bar,
    line(`${p.done}/${p.total} steps (${pct(p.done / p.total)}) · ${secs(p.elapsed_s)} elapsed, ~${secs(p.eta_s)} left`),
  ], "progress");
}

const change = (before, after) =>
  before > 0 ? ` (${after >= before ? "+" : "−"}${pct(Math.abs(after / before - 1))})` : "";
const seeds = (list) => (list.length <= 4 ? list.join(", ") : `${list[0]}-${list[list.length - 1]}`);

function showFitResult(node, r) {
  const lines = [
    line(`fitted in ${secs(r.elapsed_s)}${r.cost_samplings ? ` (${r.cost_samplings.toFixed(1)} samplings)` : ""} · ` +
      `${r.sites} sites · seeds ${seeds(r.fitted_seeds)}`, "cc-head"),
    line(`held-out seed${r.held_out_seeds.length > 1 ? "s" : ""} ${seeds(r.held_out_seeds)}: error vs full ` +
      `computation ${err(r.error_before)} without priors → ${err(r.error_after)} with${change(r.error_before, r.error_after)}`),
  ];
  if (r.in_sample_before != null) {
    lines.push(line(`fitting seeds (optimistic): ${err(r.in_sample_before)} → ${err(r.in_sample_after)}` +
      change(r.in_sample_before, r.in_sample_after)));
  }
  if (r.plan) {
    // a fit for a target speedup: the searched plan, blocks down and steps across ('#' computed, '.' forecast)
    lines.push(line(`searched plan · compute fraction ${r.fraction_predicted.toFixed(3)} predicted, ` +
      `${r.fraction_measured.toFixed(3)} measured on the fitting seeds`));
    const picture = line(r.plan);
    Object.assign(picture.style, { fontFamily: "monospace", whiteSpace: "pre", lineHeight: "1.1" });
    lines.push(picture);
  }
  lines.push(Object.assign(line(`saved as ${r.path.split(/[\\/]/).pop()}`), { title: r.path }));
  show(node, "fit", lines, "result");
}

function showStopped(node, message) {
  show(node, "fit", [line(`fit stopped: ${message}; no prior file was written`, "cc-error")], "stopped");
}

// What Apply Calibrated Cache said when it ran (its ui text): that a plan file replaced the connected policy.
function showNote(node, message) {
  const text = message?.text ?? [];
  show(node, "note", text.map((t) => line(t, "cc-unknown")));
}

// Cache Policy inputs that act only for some modes or forecasters; the others always act. A hidden widget keeps its
// value, which is saved and sent as before, so a workflow loads and runs unchanged.
const ACTS = {
  interval: (s) => s.mode === "fixed",
  threshold: (s) => s.mode === "dynamic",
  max_skips: (s) => s.mode === "dynamic",
  order: (s) => s.forecaster === "taylor",
  time_unit: (s) => s.forecaster !== "reuse",
  foca_lambda: (s) => s.forecaster === "foca",
};

function quietPolicy(node) {
  const value = (name) => node.widgets?.find((w) => w.name === name)?.value;
  const settings = { mode: value("mode"), forecaster: value("forecaster") };
  let changed = false;
  for (const widget of node.widgets ?? []) {
    const hidden = ACTS[widget.name] ? !ACTS[widget.name](settings) : false;
    if (Boolean(widget.hidden) !== hidden) {
      widget.hidden = hidden;
      // the frontend skips drawing a hidden widget but may still lay out its row: give it no height while hidden
      if (hidden) {
        widget.ccComputeSize = widget.computeSize;
        widget.computeSize = () => [0, -4];
      } else {
        widget.computeSize = widget.ccComputeSize;
        delete widget.ccComputeSize;
      }
      changed = true;
    }
  }
  if (changed) {
    node.setSize([node.size[0], node.computeSize()[1]]);
    node.setDirtyCanvas?.(true, true);
  }
}

function watchPolicy(node) {
  for (const name of ["mode", "forecaster"]) {
    const widget = node.widgets?.find((w) => w.name === name);
    if (!widget) continue;
    const callback = widget.callback;
    widget.callback = function (...args) {
      const result = callback?.apply(this, args);
      quietPolicy(node);
      return result;
    };
  }
  quietPolicy(node);
}

app.registerExtension({
  name: "calibrated_cache.panels",
  setup() {
    addStyle();
    api.addEventListener("calibrated_cache.stats", ({ detail }) => {
      const node = findNode(detail.node);
      if (node?.comfyClass === APPLY) showStats(node, detail);
    });
    api.addEventListener("calibrated_cache.fit", ({ detail }) => {
      const node = findNode(detail.node);
      if (node?.comfyClass !== FIT) return;
      if (detail.finished) showFitResult(node, detail);
      else showFitProgress(node, detail);
    });
    for (const type of ["execution_error", "execution_interrupted"]) {
      api.addEventListener(type, ({ detail }) => {
        const node = findNode(detail.node_id);
        if (node?.comfyClass === FIT) showStopped(node, detail.exception_message ?? "interrupted");
      });
    }
    api.addEventListener("execution_start", () => {
      for (const node of app.graph.nodes) {
        if (node.comfyClass !== APPLY) continue;
        showPrior(node);
        showNote(node, null); // the node's ui text comes back when it runs, or from ComfyUI's cache of it
      }
    });
  },
  nodeCreated(node) {
    const file = node.widgets?.find((w) => MODEL_FILE_WIDGETS.includes(w.name));
    if (file) {
      // another model file upstream changes whether the chosen priors match
      const callback = file.callback;
      file.callback = function (...args) {
        const result = callback?.apply(this, args);
        for (const apply of app.graph.nodes) if (apply.comfyClass === APPLY) showPrior(apply);
        return result;
      };
    }
    if (node.comfyClass === POLICY) {
      watchPolicy(node);
      return;
    }
    if (node.comfyClass === FIT) {
      panel(node);
      const onExecuted = node.onExecuted;
      node.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        // a fit whose output was cached sends no events: its saved report is all there is to show
        const section = panel(this).sections.fit;
        if (message?.text?.length && section.dataset.state !== "result") {
          show(this, "fit", message.text.join("\n").split("\n").map((t) => line(t)), "result");
        }
      };
      return;
    }
    if (node.comfyClass !== APPLY) return;
    panel(node);
    const onExecuted = node.onExecuted;
    node.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      showNote(this, message);
    };
    const prior = node.widgets?.find((w) => w.name === "prior_file");
    if (prior) {
      const callback = prior.callback;
      prior.callback = function (...args) {
        const result = callback?.apply(this, args);
        showPrior(node);
        return result;
      };
    }
    const onConnectionsChange = node.onConnectionsChange;
    node.onConnectionsChange = function (...args) {
      const result = onConnectionsChange?.apply(this, args);
      if (this.graph) showPrior(this);
      return result;
    };
  },
  loadedGraphNode(node) {
    if (node.comfyClass === POLICY) quietPolicy(node);
    if (node.comfyClass === APPLY) showPrior(node);
  },
});
