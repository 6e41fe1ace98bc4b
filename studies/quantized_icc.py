"""ICC on a quantized checkpoint: the tiny HunyuanVideo of the ComfyUI tier saved as scaled fp8 and loaded as UNETLoader
does (tests/comfyui/quantized.py), through the pack's nodes. It counts the block Linears (2-D weights) and how many of
them are nn.Linear, how many Linears ICC routes and factorises, the error against full computation of FORA alone and
with ICC (rank 16, and a full rank that must be exact), and a prior file's round trip: Fit TCC Priors on the fp8 model,
the file read back for a fresh load of the same checkpoint, with its priors and with channel-aware ICC from its
statistics. Quality only: nothing is timed.

    COMFYUI_PATH=… python studies/quantized_icc.py [--json benchmarks/results/quantized_icc.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "comfyui"))

import quantized  # noqa: E402  (boots ComfyUI through tiny_models)
import tiny_models  # noqa: E402

import comfyui_version  # noqa: E402  (the ComfyUI checkout's, first on sys.path)
import folder_paths  # noqa: E402
import torch  # noqa: E402
from calibrated_cache.nodes.linears import is_linear  # noqa: E402
from calibrated_cache.testbed.bench import machine, provenance  # noqa: E402
from calibrated_cache.testbed.results import add_allow_dirty, committed, write_result  # noqa: E402

POLICY = dict(mode="fixed", forecaster="reuse", interval=2, warmup_steps=0, start=0.0, end=1.0, first_blocks=0,
              last_blocks=0, threshold=0.1, max_skips=3, order=2, time_unit="step", foca_lambda=1.0)
STEPS, FIT_STEPS, SEED = 8, 6, 3


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = committed(args.allow_dirty) if args.json else None
    torch.set_num_threads(1)
    os.environ["CALIBRATED_CACHE_ICC_ANY_SIZE"] = "1"  # a tiny model's blocks are below the size ICC pays off at
    policy_node, apply_node = tiny_models.load_pack()
    fit_node = tiny_models.comfyui_nodes().NODE_CLASS_MAPPINGS["CalibratedCache_FitTCCPriors"]
    tmp = tempfile.mkdtemp()
    folder_paths.folder_names_and_paths["cache_priors"] = ([tmp], {".safetensors"})
    checkpoint = quantized.save_checkpoint(tmp, "fp8_scaled")
    model = quantized.load(checkpoint)
    positive, negative, latent = quantized.inputs()
    policy = policy_node.execute(**POLICY).result[0]

    def sample(m, steps: int = STEPS) -> torch.Tensor:
        return tiny_models.run_sampler(m, positive, negative, latent, steps=steps, seed=SEED)

    dm = model.get_model_object("diffusion_model")
    modules = [m for attr in ("double_blocks", "single_blocks") for b in getattr(dm, attr) for m in b.modules()]
    row: dict = {"block_linears": sum(map(is_linear, modules)),
                 "block_nn_linears": sum(isinstance(m, torch.nn.Linear) for m in modules)}
    full = sample(model)
    runs = {"reuse": {}, "icc16": {"icc_rank": 16, "icc_svd": "plain"}, "icc_full_rank": {"icc_rank": 4096,
                                                                                          "icc_svd": "plain"}}
    for name, settings in runs.items():
        patched = apply_node.execute(model, policy, **settings).result[0]
        error = rel(sample(patched), full)
        session = tiny_models.session_of(patched)
        row[name] = {"rel_l2": error, "compute_fraction": session.last_report["compute_fraction"],
                     "blocks_skipped": session.last_report["blocks_skipped"]}
        if settings:
            row[name]["linears_routed"] = sum(key.endswith(".forward") for key in patched.object_patches)
            row[name]["linears_factorised"] = session.factors.factorized
    fitted = fit_node.execute(model, policy, positive, negative, {"samples": latent}, samples=2, seed=0,
                              steps=FIT_STEPS, cfg=2.0, sampler_name="euler", scheduler="simple", variant="drift",
                              checkpoint="none", save_to="cache_priors folder", overwrite=True).result[0]
    fresh = quantized.load(checkpoint)
    name = os.path.basename(fitted.path)
    full_fit = sample(fresh, FIT_STEPS)
    trip = {"file": name, "linear_statistics": len(fitted.channels or {}),
            "held_out": {k: v for k, v in fitted.meta["report"].items() if k.startswith("held_out")}}
    for label, settings in (("reuse", {}), ("priors", {"prior_file": name}),
                            ("priors_and_channel_aware_icc16", {"prior_file": name, "icc_rank": 16})):
        patched = apply_node.execute(fresh, policy, **settings).result[0]
        trip[label] = rel(sample(patched, FIT_STEPS), full_fit)
    row["round_trip"] = trip
    print(f"block Linears {row['block_linears']} (nn.Linear {row['block_nn_linears']}); ICC routes "
          f"{row['icc16']['linears_routed']}, factorises {row['icc16']['linears_factorised']}")
    print(f"rel_l2, FORA interval 2, {STEPS} steps: reuse {row['reuse']['rel_l2']:.4f}, ICC rank 16 "
          f"{row['icc16']['rel_l2']:.4f}, full rank {row['icc_full_rank']['rel_l2']:.2e}")
    print(f"round trip ({FIT_STEPS} steps, fresh load): statistics for {trip['linear_statistics']} Linears; reuse "
          f"{trip['reuse']:.4f}, priors {trip['priors']:.4f}, priors + ICC 16 {trip['priors_and_channel_aware_icc16']:.4f}")
    if tree:
        write_result(args.json, {"study": "quantized_icc", "command": "COMFYUI_PATH=… python " + " ".join(sys.argv),
                                 "machine": machine("cpu"), "comfyui": comfyui_version.__version__, **provenance(),
                                 "steps": STEPS, "fit_steps": FIT_STEPS, "rows": [row]}, tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
