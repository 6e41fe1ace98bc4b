"""ComfyUI tier: torch.compile on a patched model, through the wrapper ComfyUI's TorchCompileModel node registers, in
either order with Apply Calibrated Cache: the output is the eager patched model's, blocks are skipped as before, the
computed blocks run compiled, and a new seed compiles nothing new (skipped without COMFYUI_PATH)."""

import logging

import pytest
import torch

from dynamo_counting import Counting

from .test_nodes import SETTINGS, bundle, session_of
from .tiny_models import run_sampler


def patched(pack, model, **inputs):
    policy_node, apply_node = pack
    return apply_node.execute(model, policy_node.execute(**SETTINGS).result[0], **inputs).result[0]


def compiled(model, backend):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    m = model.clone()
    set_torch_compile_wrapper(model=m, backend=backend)
    return m


@pytest.mark.parametrize("inputs", [{}, {"icc_rank": 8, "icc_svd": "plain"}], ids=["fora", "icc"])
@pytest.mark.parametrize("family", ["Flux", "PixArt"])  # block replacement, and object-patched `forward`
@pytest.mark.parametrize("order", ["apply-then-compile", "compile-then-apply"])
def test_a_compiled_patched_model_samples_as_the_eager_one_with_its_blocks_compiled(pack, bundles, family, order,
                                                                                      inputs, monkeypatch):
    monkeypatch.setenv("CALIBRATED_CACHE_ICC_ANY_SIZE", "1")  # tiny PixArt: too small for ICC to pay off
    torch._dynamo.reset()
    model, positive, negative, latent = bundle(bundles, family)
    eager = patched(pack, model, **inputs)
    reference = run_sampler(eager, positive, negative, latent, steps=6, cfg=2.0, seed=1)
    backend = Counting()
    both = (compiled(patched(pack, model, **inputs), backend) if order == "apply-then-compile"
            else patched(pack, compiled(model, backend), **inputs))
    out = run_sampler(both, positive, negative, latent, steps=6, cfg=2.0, seed=1)
    report = session_of(both).last_report
    assert torch.equal(out, reference)
    assert report["blocks_skipped"] == session_of(eager).last_report["blocks_skipped"] > 0
    graphs, calls = backend.graphs, backend.calls
    run_sampler(both, positive, negative, latent, steps=6, cfg=2.0, seed=2)
    assert backend.graphs == graphs  # a new seed, and every step and block of it, reuse the first run's graphs
    if not inputs:  # with ICC the blocks' Linears run the cache's increments, outside compiled graphs
        assert backend.calls - calls >= report["blocks_computed"] // 2  # cond and uncond batched: one call a block


def test_the_compile_node_with_inductor_runs_cached_and_close_to_eager(pack, bundles):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    torch._dynamo.reset()
    model, positive, negative, latent = bundle(bundles, "Flux")
    eager = patched(pack, model)
    reference = run_sampler(eager, positive, negative, latent, steps=6, cfg=2.0, seed=1)
    both = TorchCompileModel.execute(patched(pack, model), "inductor").result[0]
    out = run_sampler(both, positive, negative, latent, steps=6, cfg=2.0, seed=1)
    assert session_of(both).last_report["blocks_skipped"] == session_of(eager).last_report["blocks_skipped"] > 0
    assert torch.allclose(out, reference, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("kwargs", [{"backend": "cudagraphs"}, {"backend": "inductor", "mode": "reduce-overhead"}])
def test_cuda_graph_compiles_leave_the_cached_blocks_uncompiled_with_a_warning(pack, kwargs, caplog):
    import sys

    compiled_module = next(m for name, m in sys.modules.items() if name.endswith(".nodes.compiled")
                           and hasattr(m, "block_compiler"))
    with caplog.at_level(logging.WARNING, logger="calibrated_cache"):
        assert compiled_module.block_compiler({compiled_module.COMPILE_KWARGS: kwargs}) is None
    assert "CUDA graphs" in caplog.text and "run uncompiled" in caplog.text
    assert compiled_module.block_compiler({compiled_module.COMPILE_KWARGS: {"backend": "inductor"}}) is not None
    assert compiled_module.block_compiler({}) is None
