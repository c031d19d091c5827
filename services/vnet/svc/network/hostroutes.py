"""Host routes the node workers report: stored with a TTL for carving to skip, and checked
against the top-level networks (``route_overlap`` events).
"""

from __future__ import annotations

import logging

from vnet.contracts.network import (
    HostRoutesInfo,
    HostRoutesReply,
    HostRoutesReport,
    HostRoutesRequest,
    NodeRoutes,
    RouteOverlap,
)
from vnet.core import addr, routes
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork
from vnet.runtime.ports import NetworkStorePort
from vnet.runtime.service import Ctx
from vnet.svc.network.common import HOSTROUTES_MIN_TTL_S, REACH_PAGE, _event, _now, _store

# Prefixes per page of hostroutes.list (~40 bytes each with the JSON around them: ~330 KB)
HOSTROUTES_PAGE_PREFIXES = 8192

log = logging.getLogger(__name__)


# --- host routes --------------------------------------------------------------------------

async def hostroutes_report(ctx: Ctx, req: HostRoutesReport) -> HostRoutesReply:
    if req.node != ctx.params.get("node"):  # the bus lets a node publish only on its own subject
        raise E.make(E.INVALID_REQUEST, f"node {req.node!r} must report its host routes on its own subject "
                     f"vnet.network.hostroutes.report.{req.node}, not {ctx.subject}", node=req.node)
    kept = [str(n) for n in addr.host_prefixes(req.prefixes)]
    ttl = max(HOSTROUTES_MIN_TTL_S, 3 * req.interval_s)
    st = _store(ctx)
    foreign = None if req.foreign is None else [str(n) for n in addr.host_prefixes(req.foreign)]
    before = set((await st.foreign_routes([req.node])).get(req.node, [])) if foreign is not None else set()
    await st.put_host_routes(req.node, kept, ttl, foreign)
    new = sorted(set(foreign or []) - before)
    if new:  # a route the node did not have at its last report: does it overlap a network?
        await _route_overlap_events(ctx, req.node, new)
    return HostRoutesReply(node=req.node, accepted=len(kept), ttl_s=ttl)


async def _top_level(st: NetworkStorePort) -> list[VirtualNetwork]:
    nets: list[VirtualNetwork] = []
    cursor: str | None = None
    while True:
        page, cursor = await st.list_page(labels={}, parent=None, limit=REACH_PAGE, cursor=cursor)
        nets += [n for n in page if n.parent is None]
        if cursor is None:
            return nets


async def _route_overlap_events(ctx: Ctx, node: str, prefixes: list[str]) -> None:
    """One ``route_overlap`` event per (new prefix, network) it overlaps; the report is stored
    already, so a failure here is logged (``vnetctl network hostroutes`` still shows it)."""
    try:
        found = routes.overlapping(prefixes, await _top_level(_store(ctx)))
    except Exception as exc:
        log.warning("could not check node %s's new host routes against the networks: %s", node, exc)
        return
    now = _now()
    for prefix, net, cidr in found:
        log.warning("node %s: host route %s overlaps network %r (%s, %s)", node, prefix, net.name, net.id, cidr)
        await _event(ctx, "route_overlap", net.id, RouteOverlap(node=node, prefix=prefix, network=net.id,
                                                                network_name=net.name, cidr=cidr, at=now))


async def hostroutes_list(ctx: Ctx, req: HostRoutesRequest) -> HostRoutesInfo:
    """Nodes in name order, ``limit`` per page, fewer when their prefixes pass
    :data:`HOSTROUTES_PAGE_PREFIXES` (a node may report 16,384: a page of 100 such nodes
    would be tens of MB); the cursor is the last node of the page before."""
    st = _store(ctx)
    got = await st.host_routes(after=req.cursor, count=req.limit + 1)
    names = sorted(got)
    page: list[str] = []
    size = 0
    for n in names[:req.limit]:
        if page and size + len(got[n][0]) > HOSTROUTES_PAGE_PREFIXES:
            break
        page.append(n)
        size += len(got[n][0])
    foreign = await st.foreign_routes(page)
    nets = await _top_level(st) if any(foreign.values()) else []
    out = []
    for n in page:
        p, t = got[n]
        overlaps = [RouteOverlap(node=n, prefix=pre, network=net.id, network_name=net.name, cidr=cidr)
                    for pre, net, cidr in routes.overlapping(foreign.get(n, []), nets)]
        out.append(NodeRoutes(node=n, prefixes=p, expires_in_s=round(t, 1), overlaps=overlaps))
    return HostRoutesInfo(nodes=out, next_cursor=page[-1] if len(names) > len(page) else None)
