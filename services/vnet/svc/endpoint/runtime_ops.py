"""A node acting for a container runtime on itself (the CNI plugin): ``runtime.attach`` /
``detach`` / ``list``.
"""

from __future__ import annotations

import msgspec

from vnet.contracts.endpoint import (
    EndpointCreate,
    EndpointInfo,
    EndpointList,
    EndpointPage,
    RuntimeDetach,
    RuntimeDetached,
)
from vnet.core import errors as E
from vnet.runtime.service import Ctx
from vnet.svc.endpoint.create import create
from vnet.svc.endpoint.records import list_endpoints
from vnet.svc.endpoint.removal import remove

# --- a node acting for a container runtime on itself (the CNI plugin) ---------------------------
# The node comes from the subject (vnet.endpoint.runtime.<node>.*), which the bus lets only that
# node publish: a node attaches, detaches and lists containers on itself and nowhere else.


async def runtime_attach(ctx: Ctx, req: EndpointCreate) -> EndpointInfo:
    """A runtime's ADD on node ``{node}``: ``create`` with the node fixed to the caller's own."""
    node = ctx.params["node"]
    if req.node is not None and req.node != node:
        raise E.make(E.INVALID_REQUEST, f"node {node} may attach containers only on itself, not on {req.node}",
                     node=req.node)
    info: EndpointInfo = await create(ctx, msgspec.structs.replace(req, node=node))
    return info


async def _runtime_find(ctx: Ctx, node: str, container: str, network: str, ifname: str | None) -> list[EndpointInfo]:
    page: EndpointPage = await list_endpoints(ctx, EndpointList(node=node, container=container, network=network,
                                                                 limit=1000))
    return [e for e in page.endpoints if ifname is None or e.interface_name == ifname]


async def runtime_detach(ctx: Ctx, req: RuntimeDetach) -> RuntimeDetached:
    """A runtime's DEL on node ``{node}``: detach the container from the network; nothing there is success."""
    found = await _runtime_find(ctx, ctx.params["node"], req.container_id, req.network_id, req.ifname)
    if not found:
        return RuntimeDetached(found=False)
    try:
        rep = await remove(ctx, found[0].id, wait=req.wait, timeout=req.wait_timeout_s)
    except E.VNetError as err:
        if err.code == E.ENDPOINT_NOT_FOUND.code:  # a concurrent DEL won
            return RuntimeDetached(found=False)
        raise
    return RuntimeDetached(found=True, deleted=rep)


async def runtime_list(ctx: Ctx, req: EndpointList) -> EndpointPage:
    """``list`` limited to the endpoints of node ``{node}``."""
    page: EndpointPage = await list_endpoints(ctx, msgspec.structs.replace(req, node=ctx.params["node"]))
    return page
