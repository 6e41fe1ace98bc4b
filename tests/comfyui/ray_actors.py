"""A Ray actor that keeps Raylight's contract with patch nodes (`raylight/distributed_worker/ray_worker.py`,
`RayWorker.model_function_runner`), holding a tiny ComfyUI model instead of a GPU's shard: the Raylight node's test
starts two of them. Imported by name on the actors (tests/comfyui is on their PYTHONPATH)."""

from __future__ import annotations


class TinyWorker:
    def __init__(self, family: str) -> None:
        from comfy_boot import bootstrap_comfy

        bootstrap_comfy()
        import tiny_models

        self.bundle = tiny_models.build_family(family)
        self.model = self.bundle.model_patcher

    def model_function_runner(self, fn, *args, **kwargs) -> None:
        self.model = fn(self.model, *args, **kwargs)

    def model_function_runner_get_values(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)

    def sample(self, steps: int):
        """This actor's model sampled, and what the pack's session says of the run (None: the model is unpatched)."""
        import tiny_models

        out = tiny_models.run_sampler(self.model, self.bundle.positive, self.bundle.negative, self.bundle.latent,
                                      steps=steps, cfg=2.0, seed=1)
        wrappers = self.model.wrappers.get("outer_sample", {}).get("calibrated_cache")
        if not wrappers:
            return out, None
        session = wrappers[0].__self__
        return out, {"tag": session.policy.tag(), "consensus": session.ranks.__name__,
                     "skipped": session.last_report["blocks_skipped"], "module": type(session).__module__,
                     "sessions": len(wrappers)}
