"""ComfyUI tier: torch.compile on a patched model, through the wrapper ComfyUI's TorchCompileModel node registers, in
either order with Apply Calibrated Cache: the output is the eager patched model's, blocks are skipped as before, the
computed blocks run compiled, and a new seed compiles nothing new (skipped without COMFYUI_PATH)."""

import logging

import pytest
import torch

from .tiny_models import FAMILIES, load_pack, run_sampler

SETTINGS = dict(mode="fixed", forecaster="reuse", interval=2, warmup_steps=1, start=0.0, end=1.0, first_blocks=0,
                last_blocks=0, threshold=0.1, max_skips=3, order=2, time_unit="step", foca_lambda=0.0)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return load_pack(str(tmp_path_factory.mktemp("custom_nodes")))


@pytest.fixture(scope="module")
def bundles():
    return {}


class Counting:
    """A dynamo backend that runs each graph as traced and counts the graphs it compiles and the calls they get."""

    def __init__(self) -> None:
        self.graphs = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


def patched(pack, model, **inputs):
    policy_node, apply_node = pack
    return apply_node.execute(model, policy_node.execute(**SETTINGS).result[0], **inputs).result[0]


def session_of(model):
    return model.wrappers["outer_sample"]["calibrated_cache"][0].__self__


def compiled(model, backend):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    m = model.clone()
    set_torch_compile_wrapper(model=m, backend=backend)
    return m


@pytest.mark.parametrize("inputs", [{}, {"icc_rank": 8, "icc_svd": "plain"}], ids=["fora", "icc"])
@pytest.mark.parametrize("family", ["Flux", "PixArt"])  # block replacement, and object-patched `forward`
@pytest.mark.parametrize("order", ["apply-then-compile", "compile-then-apply"])
def test_a_compiled_patched_model_samples_as_the_eager_one_with_its_blocks_compiled(pack, bundles, family, order,
                                                                                      inputs):
    torch._dynamo.reset()
    if family not in bundles:
        bundles[family] = FAMILIES[family]()
    model, positive, negative, latent = bundles[family]
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
    if "Flux" not in bundles:
        bundles["Flux"] = FAMILIES["Flux"]()
    model, positive, negative, latent = bundles["Flux"]
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
