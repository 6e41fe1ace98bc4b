"""calibrated_cache: calibrated feature caching for diffusion transformers, as a ComfyUI node pack.

Importing this package never imports ComfyUI: ComfyUI calls `comfy_entrypoint`, which loads the nodes.
"""

__version__ = "0.2.0"
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import CalibratedCacheExtension

    return CalibratedCacheExtension()
