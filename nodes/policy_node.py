"""Cache Policy: which blocks and steps are computed, and how skipped ones are produced."""

from __future__ import annotations

from comfy_api.latest import io

from ..calibration import CachePolicy, PolicyError
from ..calibration.policy import SET_MODES, TIME_UNITS

CachePolicyType = io.Custom("CACHE_POLICY")
CATEGORY = "sampling/calibrated cache"
# The engine also runs Spectrum and DMD; they are benchmark peers, not offered here (docs/methods.md, "Which
# forecaster": Spectrum trails FORA on short runs, DMD leads only at interval 2 and costs the most wall time).
OFFERED = ("reuse", "taylor", "foca")


class CachePolicyNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = CachePolicy()
        return io.Schema(
            node_id="CalibratedCache_CachePolicy",
            display_name="Cache Policy",
            category=CATEGORY,
            description="How the DiT's blocks are cached: which steps are computed, and how skipped ones are filled "
                        "in (reuse as FORA, TaylorSeer forecasting, FoCa forecast-then-calibrate). Connect it to "
                        "Apply Calibrated Cache.",
            inputs=[
                io.Combo.Input("mode", options=list(SET_MODES), default=d.mode,
                               tooltip="fixed: compute every N-th step (FORA schedule). dynamic: compute the first "
                                       "block every step and skip the rest while its residual barely changes "
                                       "(First-Block-Cache)."),
                io.Combo.Input("forecaster", options=list(OFFERED), default="taylor",
                               tooltip="How a skipped block is produced. reuse: last computed value (FORA). taylor: "
                                       "TaylorSeer extrapolation. foca: FoCa, which integrates each block's feature "
                                       "ODE step by step (BDF2 predictor, Heun corrector), bounded on long skips."),
                io.Int.Input("interval", default=3, min=1, max=64,
                             tooltip="fixed mode: compute one step in N. 1 computes everything; 2-4 is mild, "
                                     "5-6 aggressive."),
                io.Int.Input("warmup_steps", default=d.warmup_steps, min=0, max=1000,
                             tooltip="Steps at the start that are always computed; they set the image layout."),
                io.Float.Input("start", default=d.start, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching starts at this fraction of the sampler's steps."),
                io.Float.Input("end", default=d.end, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching stops at this fraction of the sampler's steps; later steps are "
                                       "computed (e.g. 0.9 keeps the final details exact)."),
                io.Int.Input("first_blocks", default=d.first_blocks, min=0, max=256,
                             tooltip="The first k blocks are always computed (dynamic mode uses at least 1 as "
                                     "its probe)."),
                io.Int.Input("last_blocks", default=d.last_blocks, min=0, max=256,
                             tooltip="The last k blocks are always computed; they correct the cached middle."),
                io.Float.Input("threshold", default=d.threshold, min=0.001, max=10.0, step=0.001,
                               tooltip="dynamic mode: skip while the probe residual changes by less than this "
                                       "(relative L1). Higher skips more."),
                io.Int.Input("max_skips", default=d.max_skips, min=1, max=64,
                             tooltip="dynamic mode: at most this many steps in a row are skipped."),
                io.Int.Input("order", default=2, min=1, max=3,
                             tooltip="taylor: order of the Taylor series (1 = linear). Higher needs more anchors "
                                     "and memory."),
                io.Combo.Input("time_unit", options=list(TIME_UNITS), default=d.time_unit,
                               tooltip="Time axis of taylor/foca forecasts: step index (as TaylorSeer) or sigma "
                                       "(better on strongly non-uniform schedules)."),
                io.Float.Input("foca_lambda", default=d.foca_lambda, min=0.0, max=1.0, step=0.05,
                               tooltip="foca: how much of the relaxation the anchors show the integrated feature ODE "
                                       "keeps (1 = all; 0 = none: a first-order forecast with the BDF2 slope)."),
                io.Combo.Input("granularity", options=["block", "step"], default="block", optional=True,
                               tooltip="block: each skipped block's residual is forecast. step (fixed mode, no "
                                       "first/last blocks): a step that skips every block forecasts the model's "
                                       "output instead, so embedders, final layer and block calls are skipped too: "
                                       "faster on small models, a little less close on large intervals."),
            ],
            outputs=[CachePolicyType.Output(display_name="policy")],
        )

    @classmethod
    def validate_inputs(cls, **settings) -> bool | str:
        try:
            CachePolicy(**settings)
        except PolicyError as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, **settings) -> io.NodeOutput:
        return io.NodeOutput(CachePolicy(**settings))
