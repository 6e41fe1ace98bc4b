"""calibrated_cache: calibrated feature caching for diffusion transformers, as a ComfyUI node pack.

Importing this package never imports ComfyUI: the nodes are loaded lazily by ComfyUI through `comfy_entrypoint`.
"""

__version__ = "0.1.0"
