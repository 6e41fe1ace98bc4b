"""ComfyUI tier: a model through Apply Calibrated Cache holds no tensors, at node time and after a sampling run.

Newer ComfyUI pages weights in and out (dynamic VRAM) and moves, copies or drops what patches and model options hold,
so a pack that keeps tensors there breaks it. The pack's caches, priors and ICC factors are built on the compute
device inside the run and dropped at its end; between runs the patched ModelPatcher reaches only configuration and
the model's own modules (the targets of its object patches). These tests walk everything the patched model's options,
wrappers, callbacks and object patches reach (attributes, containers, closures, partials, bound methods, arrays'
buffers) for every kind of input that could carry tensors (skipped without COMFYUI_PATH).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import types
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from .test_priors import FIT, SETTINGS, pack  # noqa: F401
from .tiny_models import build_family, comfyui_nodes, run_sampler, session_of

ROOTS = ("model_options", "wrappers", "callbacks", "object_patches", "attachments", "injections", "additional_models")
LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None), type, types.ModuleType, types.CodeType,
          torch.device, torch.dtype, torch.Size)
FORA = {**SETTINGS, "forecaster": "reuse", "interval": 2, "warmup_steps": 0}
GOC = dict(weight=0.8, inflection="auto", threshold=-1.0, steps="")


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    """What `obj` keeps alive, each by the path a message names it with; not a function's globals nor a class's
    attributes (module state, which no patch carries), nor what a weak reference points to (it keeps nothing alive)."""
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            yield f"[{key!r}]", value
            yield f".key({key!r})", key
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from ((f"[{i}]", item) for i, item in enumerate(list(obj)))
    elif isinstance(obj, functools.partial):
        yield ".func", obj.func
        yield ".args", obj.args
        yield ".keywords", obj.keywords
    elif isinstance(obj, types.MethodType):
        yield ".__self__", obj.__self__
        yield ".__func__", obj.__func__
    elif isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            try:
                yield f"<closure {obj.__qualname__}:{name}>", cell.cell_contents
            except ValueError:  # an empty cell
                continue
        yield ".__defaults__", obj.__defaults__
        yield ".__kwdefaults__", obj.__kwdefaults__
    elif isinstance(obj, types.BuiltinMethodType) and not isinstance(obj.__self__, types.ModuleType):
        yield ".__self__", obj.__self__
    if isinstance(obj, np.ndarray):  # an array may view a tensor's buffer, which it then keeps alive
        yield ".base", obj.base
        return
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict) and not isinstance(obj, (type, types.ModuleType)):
        yield from ((f".{name}", value) for name, value in list(attributes.items()))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                yield f".{name}", getattr(obj, name)


def reachable_tensors(roots: dict[str, Any], own_modules: set[int], depth: int = 64) -> dict[int, str]:
    """Every tensor reachable from `roots` (by id, with the path to it), cycle-safe; the modules in `own_modules` (the
    model's own, reached through object patches) are not entered. A path deeper than `depth` fails the walk rather
    than hide what lies below it."""
    found: dict[int, str] = {}
    seen: set[int] = set()
    queue = collections.deque((obj, name, 0) for name, obj in roots.items())  # breadth first: the shortest paths
    while queue:
        obj, path, level = queue.popleft()
        if id(obj) in seen or isinstance(obj, LEAVES):
            continue
        assert level <= depth, f"the walk reached depth {depth} at {path}: raise the bound"
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = path
            continue
        if isinstance(obj, torch.nn.Module) and id(obj) in own_modules:
            continue
        queue.extend((child, path + label, level + 1) for label, child in _children(obj))
    return found


def held_by(model) -> dict[int, str]:
    """The tensors a ModelPatcher's options, wrappers, callbacks, object patches, attachments and injections reach,
    outside the modules of its own model."""
    own = {id(m) for m in model.model.modules()}
    return reachable_tensors({name: getattr(model, name, None) for name in ROOTS}, own)


def pack_held(patched, source) -> list[str]:
    """Where the tensors are that the patched model reaches and its input model did not (those are the pack's)."""
    before = held_by(source)
    return sorted(path for key, path in held_by(patched).items() if key not in before)


# ----------------------------------------------------------------------------------------------------------------------
# The walk itself finds a tensor wherever a patch could hide one


@dataclasses.dataclass(frozen=True)
class _Frozen:
    value: Any


class _Slotted:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _closure(value: Any):
    def inner() -> Any:
        return value

    return inner


class _Holder:
    def __init__(self, value: Any) -> None:
        self.value = value

    def method(self) -> Any:
        return self.value


HIDING_PLACES = {
    "closure cell": lambda t: _closure(t),
    "partial argument": lambda t: functools.partial(print, t),
    "partial keyword": lambda t: functools.partial(print, end=t),
    "bound method's object": lambda t: _Holder(t).method,
    "frozen dataclass field": lambda t: _Frozen(t),
    "slot": lambda t: _Slotted(t),
    "nested containers": lambda t: {"a": [({"b": {t}},)]},
    "dict key": lambda t: {t: 1},
    "default argument": lambda t: (lambda x=t: x),
    "array viewing a tensor": lambda t: t.numpy(),
    "foreign module": lambda t: torch.nn.Linear(2, 2),
    "closure over a bound method over a dataclass": lambda t: _closure(_Holder(_Frozen([t])).method),
}


@pytest.mark.parametrize("place", HIDING_PLACES)
def test_the_walk_finds_a_tensor_wherever_a_patch_could_hold_one(place):
    tensor = torch.zeros(3)
    options = {"transformer_options": {"patches_replace": {"dit": {("double_block", 0): HIDING_PLACES[place](tensor)}}}}
    assert reachable_tensors({"model_options": options}, set()), place


def test_the_walk_does_not_enter_the_models_own_modules_and_survives_cycles():
    own = torch.nn.Linear(2, 2)
    cycle: list = []
    cycle.append(cycle)
    options = {"forward": own.forward, "cycle": cycle, "self": _Holder(None)}
    options["self"].value = options
    assert reachable_tensors({"object_patches": options}, {id(own)}) == {}
    assert len(reachable_tensors({"object_patches": options}, set())) == 2  # the foreign Linear's weight and bias


# ----------------------------------------------------------------------------------------------------------------------
# The pack's patched models


@pytest.fixture(scope="module")
def flux():
    return build_family("Flux")


@pytest.fixture(scope="module")
def pixart():
    return build_family("PixArt")


@pytest.fixture(scope="module")
def prior_folder(tmp_path_factory):
    """An empty cache_priors folder for this module's fits (none is written into the checkout)."""
    import folder_paths

    path = tmp_path_factory.mktemp("cache_priors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(folder_paths.folder_names_and_paths, "cache_priors", ([str(path)], {".safetensors"}))
        yield path


@pytest.fixture(autouse=True)
def icc_any_size(monkeypatch):
    """The tiny blocks are too small for ICC to pay off, which the pack refuses; here it only has to run."""
    monkeypatch.setenv("CALIBRATED_CACHE_ICC_ANY_SIZE", "1")


def policy(pack, **settings):
    return pack[0].execute(**{**SETTINGS, **settings}).result[0]


def fitted(pack, bundle, settings: dict, **options):
    model, positive, negative, latent = bundle
    return pack[2].execute(model, policy(pack, **settings), positive, negative, {"samples": latent},
                           **{**FIT, "steps": 6, **options}).result[0]


@pytest.fixture(scope="module")
def fora_priors(pack, flux, prior_folder):
    """TCC priors fitted for FORA; their file also holds ICC's channel statistics."""
    return fitted(pack, flux, FORA)


@pytest.fixture(scope="module")
def icc_priors(pack, flux, prior_folder):
    """TCC priors fitted on FORA with channel-aware ICC (rank 16), with their channel statistics."""
    return fitted(pack, flux, FORA, icc_rank=16)


@pytest.fixture(scope="module")
def plan_priors(pack, flux, prior_folder):
    """A plan searched for a 2x target speedup, with its priors where they helped."""
    return fitted(pack, flux, {}, target_speedup=2.0)


def compiled(model):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from dynamo_counting import Counting

    m = model.clone()
    set_torch_compile_wrapper(model=m, backend=Counting())
    return m


def _goc(pack):
    return comfyui_nodes().NODE_CLASS_MAPPINGS["CalibratedCache_GOC"].execute(policy(pack, **FORA), **GOC).result[0]


# Each case: the bundle it patches, and the Apply inputs (policy and the rest) built from the pack and the fixtures.
CASES = {
    "taylor policy (dit replace)": ("flux", lambda pack, r: dict(policy=policy(pack))),
    "taylor policy (object patches)": ("pixart", lambda pack, r: dict(policy=policy(pack))),
    "dynamic policy": ("flux", lambda pack, r: dict(policy=policy(pack, mode="dynamic", threshold=5.0))),
    "foca by sigma, step granularity": ("flux", lambda pack, r: dict(
        policy=policy(pack, forecaster="foca", time_unit="sigma", granularity="step"))),
    "GOC corrector": ("flux", lambda pack, r: dict(policy=_goc(pack))),
    "offload and a cache limit": ("flux", lambda pack, r: dict(policy=policy(pack), cache_offload=True,
                                                               cache_limit_mb=64)),
    "TCC priors through the socket": ("flux", lambda pack, r: dict(policy=policy(pack, **FORA),
                                                                   priors=r("fora_priors"))),
    "TCC priors from a file": ("flux", lambda pack, r: dict(policy=policy(pack, **FORA),
                                                            prior_file=r("fora_priors").name)),
    "plain ICC": ("flux", lambda pack, r: dict(policy=policy(pack, **FORA), icc_rank=16, icc_svd="plain")),
    "channel-aware ICC from a file's statistics": ("flux", lambda pack, r: dict(
        policy=policy(pack, **FORA), prior_file=r("fora_priors").name, icc_rank=16)),
    "channel-aware ICC with its TCC priors": ("flux", lambda pack, r: dict(
        policy=policy(pack, **FORA), priors=r("icc_priors"), icc_rank=16)),
    "searched plan file": ("flux", lambda pack, r: dict(prior_file=r("plan_priors").name)),
    "compiled model": ("compiled flux", lambda pack, r: dict(policy=policy(pack))),
}


@pytest.mark.parametrize("case", CASES)
def test_the_patched_model_holds_no_tensors_at_node_time_nor_after_a_run(pack, flux, pixart, case, request):
    name, inputs = CASES[case]
    bundle = pixart if name == "pixart" else flux
    source = bundle[0]
    if name == "compiled flux":
        torch._dynamo.reset()
        source = compiled(source)
    patched = pack[1].execute(source, **inputs(pack, request.getfixturevalue)).result[0]
    assert pack_held(patched, source) == [], "at node time"
    _, positive, negative, latent = bundle
    run_sampler(patched, positive, negative, latent, steps=6, cfg=2.0, seed=1)
    report = session_of(patched).last_report
    assert report["uncached"] is None and report["compute_fraction"] < 1.0, report  # cached: its caches existed
    assert pack_held(patched, source) == [], "after a sampling run"


@pytest.mark.parametrize("fit", ["fora_priors", "plan_priors"])
def test_fit_tcc_priors_outputs_its_priors_values_and_nothing_its_runs_derived_from_them(fit, request):
    """ComfyUI keeps a node's output between prompts: the priors Fit TCC Priors gives carry their values per site (and
    the channel statistics), not the stacks its held-out runs moved to the device to correct with."""
    fitted = request.getfixturevalue(fit)
    values = {id(t) for prior in fitted.priors.priors.values() for t in (prior.a, prior.g, prior.b)}
    values |= {id(t) for sides in (fitted.channels or {}).values() for t in sides}
    assert values or fit == "plan_priors"
    assert sorted(path for key, path in reachable_tensors({"priors": fitted}, set()).items() if key not in values) == []
