"""GOC Corrector: attach gradient-optimized cache correction to a cache policy (it acts where the policy reuses)."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..calibration import CachePolicy, PolicyError
from ..calibration.goc import INFLECTION_MODES, MAX_WEIGHT, GocSettings, parse_steps
from .policy_node import CATEGORY, CachePolicyType


def settings(weight: float, inflection: str, threshold: float, steps: str) -> GocSettings:
    """The node's inputs as validated settings (a PolicyError names what is wrong)."""
    return GocSettings(weight, inflection, threshold, parse_steps(steps))


class GocCorrectorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = GocSettings()
        return io.Schema(
            node_id="CalibratedCache_GOC",
            display_name="GOC Corrector",
            category=CATEGORY,
            description="Gradient-optimized cache correction: pushes each reused block value along the difference "
                        "between the block's newest computed value and the value used before it, which feeds the "
                        "cache's own error back, except where the feature trajectory turns. Chain Cache Policy "
                        "(forecaster reuse) → GOC Corrector → Apply Calibrated Cache; fit TCC priors with it active.",
            inputs=[
                CachePolicyType.Input("policy", tooltip="From a Cache Policy node with forecaster reuse (FORA)."),
                io.Float.Input("weight", default=d.weight, min=0.05, max=MAX_WEIGHT, step=0.05,
                               tooltip="How far to push along the gradient. 0.8 is best at interval 2 and improves "
                                       "on TCC priors alone at every interval. At interval 2, weights of 1 and "
                                       "above feed the cache error back with a growing gain; at interval 3 and "
                                       "above, up to 1.2 helps further."),
                io.Combo.Input("inflection", options=list(INFLECTION_MODES), default=d.inflection,
                               tooltip="auto: per image, drop the push where the block's trajectory reversed "
                                       "direction at the last computed step. off: push at every cached step. "
                                       "manual: drop the push at the steps listed below."),
                io.Float.Input("threshold", default=d.threshold, min=-1.0, max=1.0, step=0.05,
                               tooltip="auto: a turn is an inflection when the cosine between the block's last two "
                                       "computed increments is below this (0 = the direction reversed)."),
                io.String.Input("steps", default="", multiline=False,
                                tooltip="manual: steps without the push, e.g. '9, 17' (0 is the first step the "
                                        "sampler runs)."),
            ],
            outputs=[CachePolicyType.Output(display_name="policy")],
        )

    @classmethod
    def validate_inputs(cls, weight: float = 0.8, inflection: str = "auto", threshold: float = 0.0,
                        steps: str = "", **_) -> bool | str:
        try:
            settings(weight, inflection, threshold, steps)
        except PolicyError as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, policy: CachePolicy, weight: float, inflection: str, threshold: float,
                steps: str = "") -> io.NodeOutput:
        # A forecasting policy raises its PolicyError here: GOC corrects reuse.
        return io.NodeOutput(dataclasses.replace(policy, goc=settings(weight, inflection, threshold, steps)))
