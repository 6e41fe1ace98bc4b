"""A real ComfyUI server for the tests: started headless on a free loopback port, with the pack and a test-only
conditioning node under custom_nodes and a tiny Wan model, and the HTTP helpers the server tests share."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import aiohttp
import psutil
import safetensors.torch

from tiny_models import SPECS, save_tiny_unet

REPO = Path(__file__).resolve().parents[2]
POLICY = dict(mode="fixed", forecaster="taylor", interval=3, warmup_steps=1, start=0.0, end=1.0, first_blocks=0,
              last_blocks=0, threshold=0.1, max_skips=3, order=2, time_unit="step", foca_lambda=1.0)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


class Server(NamedTuple):
    url: str
    info: dict  # /object_info
    model_name: str  # the tiny Wan model's file name
    log: Path  # the server's log; its folder is the base directory (models/, output/, custom_nodes/)


@contextmanager
def running_server(base: Path, comfyui_dir: str) -> Iterator[Server]:
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "calibrated_cache").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "cc_test_pack").symlink_to(Path(__file__).parent / "test_pack", target_is_directory=True)
    model = Path(save_tiny_unet(SPECS["Wan"], str(base / "models")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(base / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CALIBRATED_CACHE_ICC_ANY_SIZE": "1"}  # tiny blocks: see test_icc
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base)], cwd=comfyui_dir, stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                info = get(f"{url}/object_info")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not start: {(base / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield Server(url, info, model.name, base / "server.log")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def workflow(model_name: str, seed: int, prefix: str = "cc_test", **apply_inputs) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default"}},
        "2": {"class_type": "CalibratedCache_CachePolicy", "inputs": POLICY},
        "3": {"class_type": "CalibratedCache_Apply",
              "inputs": {"model": ["1", 0], "policy": ["2", 0], **apply_inputs}},
        "4": {"class_type": "CCTest_ZeroConditioning", "inputs": {"tokens": 16, "dim": 4096, "pooled_dim": 0, "seed": 0}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": 64, "height": 64, "length": 1, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": seed, "steps": 9, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }


def fit_workflow(model_name: str) -> dict:
    """Fit TCC priors for the KSampler settings of `workflow` and save them in the cache_priors folder."""
    prompt = workflow(model_name, 0)
    fit = {"model": ["1", 0], "policy": ["2", 0], "positive": ["4", 0], "negative": ["5", 0], "latent": ["6", 0],
           "samples": 2, "seed": 0, "steps": 9, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
           "variant": "drift", "checkpoint": model_name, "save_to": "cache_priors folder", "overwrite": False}
    return {k: prompt[k] for k in ("1", "2", "4", "5", "6")} | {"9": {"class_type": "CalibratedCache_FitTCCPriors",
                                                                     "inputs": fit}}


def saved_latent(base: Path, prefix: str):
    (path,) = (base / "output").glob(f"{prefix}_*.latent")
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def run_prompt(url: str, prompt: dict) -> dict:
    prompt_id = post(f"{url}/prompt", {"prompt": prompt, "client_id": "calibrated-cache-test"})["prompt_id"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        history = get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish")


def failure(result: dict) -> str:
    """Why a prompt failed, as the server reported it: the node, the exception and its traceback's last lines."""
    for kind, data in result["status"].get("messages", []):
        if kind == "execution_error":
            trace = "".join(data.get("traceback", [])[-3:])
            return f"{data.get('node_type')} #{data.get('node_id')}: {data.get('exception_message')}\n{trace}"
    return str(result["status"])


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote")  # the graph editor's own; never sent to the server


def schema_inputs(info: dict, node_type: str) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, required) of a node's inputs in the order the graph editor lays them out."""
    spec = info[node_type]
    rows = []
    for section in ("required", "optional"):
        for name in spec["input_order"].get(section, []):
            kind, *rest = spec["input"][section][name]
            options = dict(rest[0]) if rest else {}
            if isinstance(kind, list):  # the older form of a combo: its options in place of the type
                kind, options["options"] = "COMBO", kind
            rows.append((name, kind, options, section == "required"))
    return rows


def widget_slots(info: dict, node_type: str) -> list[str | None]:
    """The names behind a UI node's `widgets_values`, None for the graph editor's control-after-generate values (it adds
    one after an INT or COMBO that asks for it, and after `seed` / `noise_seed` unless told not to)."""
    slots: list[str | None] = []
    for name, kind, options, _ in schema_inputs(info, node_type):
        if kind in WIDGET_TYPES:
            slots.append(name)
            if options.get("control_after_generate", name in ("seed", "noise_seed")):
                slots.append(None)
    return slots


def api_prompt(workflow: dict, info: dict) -> dict:
    """The API-format prompt the graph editor queues for a UI-format workflow (active nodes only)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) != 0:
            continue
        values = dict(zip(widget_slots(info, node["type"]), node.get("widgets_values", [])))
        inputs = {name: value for name, value in values.items() if name is not None}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def send(url: str, payload: dict) -> None:
    """POST to a route that answers with no body, such as /free and /interrupt (an error status raises)."""
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


def server_pid(server: Server) -> int:
    """The id of the server's process: the child of this one that listens on the server's port."""
    port = server.url.rsplit(":", 1)[1]

    def listens(args: list[str]) -> bool:
        return "main.py" in args and "--port" in args and args[args.index("--port") + 1] == port

    (pid,) = [child.pid for child in psutil.Process().children() if listens(child.cmdline())]
    return pid


def rss_bytes(pid: int) -> int:
    """A process's resident memory now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


class Listener:
    """A websocket client of the server. It collects, in order, every JSON message the server sends it: those for
    prompts queued through `queue` (which run as this client) and the broadcast ones, such as the pack's
    `calibrated_cache.stats` reports. A prompt's messages lie between its `execution_start` and the `executing`
    message with node None that ends it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self._arrived = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        connected = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(connected,), daemon=True)
        self._thread.start()
        if not connected.wait(30):
            raise RuntimeError(f"could not connect to {url}/ws")

    def _run(self, connected: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._listen(connected))
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self._loop.close()

    async def _listen(self, connected: threading.Event) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws{self.url[4:]}/ws?clientId={self.client_id}") as socket_:
                connected.set()
                async for message in socket_:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        with self._arrived:
                            self.messages.append(json.loads(message.data))
                            self._arrived.notify_all()

    def close(self) -> None:
        if self._thread.is_alive():  # else the server closed the socket
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(10)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def queue(self, prompt: dict) -> str:
        """Queue a prompt as this client; its prompt id."""
        return post(f"{self.url}/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait_for(self, match: Callable[[dict], bool], start: int = 0, timeout: float = 240) -> dict:
        """The first message from the `start`-th on (received so far or later) that `match` accepts."""
        deadline, seen = time.monotonic() + timeout, start
        with self._arrived:
            while True:
                for message in self.messages[seen:]:
                    if match(message):
                        return message
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no such message from {self.url} in {timeout} s")
                self._arrived.wait(left)

    def wait(self, prompt_id: str, timeout: float = 240) -> dict:
        """Wait until the prompt has ended (done, failed or interrupted); its history entry."""
        self.wait_for(lambda m: m["type"] == "executing" and m["data"] == {"node": None, "prompt_id": prompt_id},
                      timeout=timeout)
        return get(f"{self.url}/history/{prompt_id}")[prompt_id]

    def run(self, prompt: dict) -> dict:
        """Queue a prompt and wait for it; its history entry."""
        return self.wait(self.queue(prompt))

    def of(self, prompt_id: str, kind: str) -> list[dict]:
        """The data of the messages of type `kind` the server sent while the prompt ran."""
        with self._arrived:
            messages = list(self.messages)
        found, running = [], False
        for message in messages:
            if message["type"] == "execution_start":
                running = message["data"]["prompt_id"] == prompt_id
            if running and message["type"] == kind:
                found.append(message["data"])
            if message["type"] == "executing" and message["data"] == {"node": None, "prompt_id": prompt_id}:
                running = False
        return found
