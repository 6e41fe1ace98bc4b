"""The pack's HTTP route for the graph editor: a prior file's provenance and its match with the connected model.

Only names the prior folders list are answered, so a request cannot read another path; only the file's header is read.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..priors import PriorFileError, read_metadata
from ..priors.card import match_connected, prior_card
from . import folders

PRIOR_INFO = "/calibrated_cache/prior_info"


def register() -> None:
    """Add the route to a running server; scripts and in-process tests have none."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.routes.get(PRIOR_INFO)(prior_info)


async def prior_info(request: web.Request) -> web.Response:
    """`?name=<prior file>&model=<loader file upstream>&lora=0|1`: the file's card and the name-level verdict."""
    name = request.query.get("name", "")
    if name not in folders.prior_files():
        return web.json_response({"error": f"{name or 'no file'} is not in the cache_priors folders or beside the "
                                           "checkpoints; press r to refresh the node list"}, status=404)
    lora = {"1": True, "0": False}.get(request.query.get("lora", ""))
    try:
        meta = await asyncio.to_thread(read_metadata, folders.find_prior(name))
    except (PriorFileError, ValueError) as err:
        return web.json_response({"error": str(err)}, status=422)
    return web.json_response({"name": name, "card": prior_card(meta),
                              "match": match_connected(meta, request.query.get("model") or None, lora)})
