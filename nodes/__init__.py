"""ComfyUI nodes. Only this package imports comfy; it is imported lazily by comfy_entrypoint."""
