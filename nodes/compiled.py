"""torch.compile on a patched model (ComfyUI's TorchCompileModel, in either order with Apply Calibrated Cache).

The engine runs outside compiled graphs: its per-step Python state (which block, which step, what is cached) would make
dynamo recompile for every block and step until it gives up, and a graph break inside the DiT's block loop makes
dynamo run the whole loop eagerly. So the pack's block hook is excluded from tracing, and the blocks the engine
computes are compiled here instead, with TorchCompileModel's own arguments: the model is compiled where the compute is.
CUDA graphs (backend cudagraphs, modes reduce-overhead and max-autotune) replay static output buffers, which one
graph shared by every block would overwrite while the cache still holds them: there the blocks run uncompiled.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

COMPILE_KWARGS = "torch_compile_kwargs"  # the model option where TorchCompileModel keeps its torch.compile arguments
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
BlockRunner = Callable[[Callable[[], dict]], dict]
log = logging.getLogger("calibrated_cache")
_compiled: dict[str, BlockRunner | None] = {}


def _run_block(run: Callable[[], dict]) -> dict:
    return run()


def block_compiler(model_options: dict[str, Any]) -> BlockRunner | None:
    """What runs a computed block when the model is compiled (None: it is not, or the blocks run eagerly). Decided
    once per set of compile arguments, so a long queue gets one warning, not one per prompt."""
    kwargs = model_options.get(COMPILE_KWARGS)
    if not kwargs:
        return None
    key = repr(sorted(kwargs.items()))
    if key not in _compiled:
        _compiled[key] = _block_runner(kwargs)
    return _compiled[key]


def _block_runner(kwargs: dict[str, Any]) -> BlockRunner | None:
    if kwargs.get("backend") == "cudagraphs" or kwargs.get("mode") in CUDA_GRAPH_MODES:
        log.warning("calibrated_cache: torch.compile with CUDA graphs (%s) would overwrite cached block outputs; the "
                    "cached blocks run uncompiled and the rest of the model compiled. Use backend inductor with mode "
                    "default or max-autotune-no-cudagraphs to compile them too.",
                    kwargs.get("mode") or kwargs.get("backend"))
        return None
    return torch.compile(_run_block, **kwargs)
