"""ComfyUI nodes. Only this package imports comfy; ComfyUI loads it lazily through `comfy_entrypoint`."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import folders, routes
from .apply_node import ApplyCalibratedCacheNode
from .fit_node import FitTccPriorsNode
from .goc_node import GocCorrectorNode
from .policy_node import CachePolicyNode
from .raylight import ApplyCalibratedCacheRaylightNode, raylight_installed

folders.register()
routes.register()


class CalibratedCacheExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        nodes = [CachePolicyNode, GocCorrectorNode, ApplyCalibratedCacheNode, FitTccPriorsNode]
        return nodes + [ApplyCalibratedCacheRaylightNode] if raylight_installed() else nodes
