"""``endpoint.get`` / ``list`` / ``delete``, and the reactions to events: statuses folded into
the records, a deleted network's endpoints removed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from nats.aio.msg import Msg

from vnet.contracts import subjects
from vnet.contracts.endpoint import (
    EndpointDelete,
    EndpointDeleted,
    EndpointInfo,
    EndpointList,
    EndpointPage,
    EndpointRef,
)
from vnet.contracts.network import NetworkRef
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork
from vnet.runtime.idempotency import run_once
from vnet.runtime.ports import ReplyStorePort
from vnet.runtime.service import Ctx, Runtime
from vnet.svc.endpoint.common import _not_found, _store
from vnet.svc.endpoint.events import (
    _apply_status,
    folded_here,
    heard,
    status_event,
)
from vnet.svc.endpoint.removal import remove

log = logging.getLogger(__name__)


def _replies(ctx: Ctx) -> ReplyStorePort:
    """Claims and replies of the endpoint mutations other than create (whose commit script
    records its request_id itself): delete here, update in the sibling module."""
    st: ReplyStorePort | None = ctx.rt.state.get("replies")
    if st is None:
        st = ctx.rt.state["replies"] = ctx.rt.adapters.reply_store("endpoint")
    return st


async def get(ctx: Ctx, req: EndpointRef) -> EndpointInfo:
    """One endpoint with its current status."""
    info = await _store(ctx).get(req.endpoint_id)
    if info is None:
        raise _not_found(req.endpoint_id)
    return heard(ctx.rt, info)


async def list_endpoints(ctx: Ctx, req: EndpointList) -> EndpointPage:
    """Endpoints filtered by network, node, container, labels and status; paged by id."""
    store = _store(ctx)
    network_id = req.network
    if req.network is not None and not await store.network_size(req.network):  # maybe a name, not an id
        try:
            network_id = (await ctx.request(subjects.NETWORK_GET, NetworkRef(network=req.network),
                                            VirtualNetwork)).id
        except E.VNetError as err:
            if err.code != E.NETWORK_NOT_FOUND.code:
                raise
    ids = await store.ids(node=req.node, network_id=network_id, container=req.container)
    if req.cursor:
        ids = [i for i in ids if i > req.cursor]
    out: list[EndpointInfo] = []
    labels = dict(req.labels)
    pos = 0
    while pos < len(ids) and len(out) < req.limit:
        chunk = ids[pos:pos + 500]
        pos += len(chunk)
        for got in await store.get_many(chunk):
            if got is None:
                continue
            e = heard(ctx.rt, got)
            if network_id is not None and e.network_id != network_id:
                continue
            if req.node is not None and e.node != req.node:
                continue
            if req.container is not None and e.container_id != req.container:
                continue
            if req.status is not None and e.status != req.status:
                continue
            if any(e.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(e)
            if len(out) >= req.limit:
                break
    nxt = out[-1].id if len(out) >= req.limit and out[-1].id != ids[-1] else None
    return EndpointPage(endpoints=out, next_cursor=nxt)


# --- delete --------------------------------------------------------------------------------------


async def delete(ctx: Ctx, req: EndpointDelete) -> EndpointDeleted:
    """Detach: the node tears down, the address is released, the record and indexes go."""
    def go() -> Awaitable[EndpointDeleted]:
        return remove(ctx, req.endpoint_id, wait=req.wait and not req.force, timeout=req.wait_timeout_s)

    if not req.request_id:
        return await go()
    # Claimed before the change, so a repeat that overlaps the first waits for its reply
    # instead of deleting again (404) (vnet.runtime.idempotency).
    return await run_once(_replies(ctx), f"epdel:{req.request_id}", EndpointDeleted, go, deadline=ctx.deadline,
                          what="endpoint.delete")


# --- events ---------------------------------------------------------------------------------------


async def _on_status(rt: Runtime, msg: Msg) -> None:
    ev = status_event(msg)
    if ev is None or await folded_here(rt, ev):
        return
    res = await _apply_status(_store(rt), ev)
    if res not in ("ok", "ignored", "stale", "missing"):
        log.info("status of %s from node %s not applied: %s", ev.endpoint_id, ev.node, res)


async def _on_network_deleted(rt: Runtime, msg: Msg) -> None:
    """A network went: endpoints recorded in it meanwhile (a create racing the delete) go too."""
    network_id = msg.subject.rsplit(".", 1)[-1]
    store = _store(rt)
    ids = await store.of_network(network_id)
    if not ids:
        return
    ctx = Ctx(rt, msg.subject, subjects.EVT.template, dict(msg.headers or {}), {}, None)
    for ident in ids:
        try:
            await remove(ctx, ident, wait=False, timeout=0)
            log.info("deleted endpoint %s: its network %s was deleted", ident, network_id)
        except E.VNetError as err:
            if err.code != E.ENDPOINT_NOT_FOUND.code:
                raise
