"""``network.get`` / ``list`` / ``update`` / ``delete``."""

from __future__ import annotations

import asyncio
import logging

import msgspec

from vnet.contracts import subjects
from vnet.contracts.network import (
    ConnectionEvent,
    MeshEvent,
    NetworkDelete,
    NetworkDeleted,
    NetworkEvent,
    NetworkList,
    NetworkPage,
    NetworkRef,
    NetworkReply,
    NetworkUpdate,
)
from vnet.core import errors as E
from vnet.core import reach, topology
from vnet.core.model import IsolationMode, VirtualNetwork
from vnet.runtime.service import Ctx
from vnet.svc.network.common import (
    ENDPOINT_DELETE_CONCURRENCY,
    _event,
    _fabric,
    _idempotent,
    _must_get,
    _net_reply,
    _not_found,
    _now,
    _reach,
    _store,
)
from vnet.svc.network.pools import _delete_pools, _resync_parent, _with_lock

log = logging.getLogger(__name__)


async def _reach_delete(ctx: Ctx, net: VirtualNetwork, *, must: bool) -> reach.ReachDiff | None:
    """What deleting ``net`` (its endpoints with it) closes."""
    try:
        now = await _fabric(ctx)
        return await asyncio.to_thread(reach.diff, now, reach.without_network(now, net.id))
    except Exception as exc:
        if must:
            raise
        log.warning("no reachability diff for the delete of %s: %s", net.id, exc)
        return None


# --- read ---------------------------------------------------------------------------------

async def get(ctx: Ctx, req: NetworkRef) -> VirtualNetwork:
    return await _must_get(_store(ctx), req.network)


async def list_networks(ctx: Ctx, req: NetworkList) -> NetworkPage:
    st = _store(ctx)
    parent_id = None
    if req.parent is not None:
        parent_id = (await _must_get(st, req.parent)).id
    nets, nxt = await st.list_page(labels=dict(req.labels), parent=parent_id, limit=req.limit, cursor=req.cursor)
    return NetworkPage(networks=nets, next_cursor=nxt)


# --- update -------------------------------------------------------------------------------

def _labels_after(before: VirtualNetwork, req: NetworkUpdate) -> dict[str, str]:
    labels = dict(before.labels) if req.labels is None else dict(req.labels)
    labels.update(req.set_labels)
    for k in req.remove_labels:
        labels.pop(k, None)
    return labels


async def update(ctx: Ctx, req: NetworkUpdate) -> NetworkReply:
    if req.dry_run:
        st = _store(ctx)
        isolation = topology.parse_isolation(req.isolation).value if req.isolation is not None else None
        before = await _must_get(st, req.network)
        would = msgspec.structs.replace(before, labels=_labels_after(before, req),
                                        isolation_mode=IsolationMode(isolation or before.isolation_mode))
        diff = (await _reach(ctx, [would], must=True) if would.isolation_mode != before.isolation_mode
                else reach.ReachDiff())
        return _net_reply(would, dry_run=True, diff=diff)

    async def go() -> NetworkReply:
        st = _store(ctx)
        isolation = topology.parse_isolation(req.isolation).value if req.isolation is not None else None
        before = await _must_get(st, req.network)
        diff = None
        if isolation is not None and isolation != before.isolation_mode.value:
            diff = await _reach(ctx, [msgspec.structs.replace(before, isolation_mode=IsolationMode(isolation))],
                                must=False)
        status, net = await st.update(before.id, labels=None if req.labels is None else dict(req.labels),
                                      set_labels=dict(req.set_labels), remove_labels=list(req.remove_labels),
                                      isolation=isolation, now=_now())
        if status == "missing" or net is None:
            if status == "too_many_labels":
                raise E.make(E.INVALID_REQUEST, "a network has at most 64 labels; remove some first")
            raise _not_found(req.network)
        changes = []
        if net.labels != before.labels:
            changes.append("labels")
        if net.isolation_mode != before.isolation_mode:
            changes.append("isolation")
        else:
            diff = None  # a concurrent update set the same mode first: this one changed nothing
        if changes:
            await _event(ctx, "updated", net.id, NetworkEvent(network=net, changes=changes, reach=diff))
        return _net_reply(net, diff=diff)

    return await _idempotent(ctx, "update", req.request_id, NetworkReply, go)


# --- delete -------------------------------------------------------------------------------

async def _delete_endpoints(ctx: Ctx, net: VirtualNetwork, eps: list[str]) -> None:
    sem = asyncio.Semaphore(ENDPOINT_DELETE_CONCURRENCY)

    async def one(ep: str) -> None:
        async with sem:
            try:
                await ctx.request(subjects.ENDPOINT_DELETE, {"endpoint_id": ep, "force": True}, msgspec.Raw)
            except E.VNetError as err:
                if err.code in (E.ENDPOINT_NOT_FOUND.code, E.NOT_FOUND.code):
                    return
                raise

    results = await asyncio.gather(*(one(e) for e in eps), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if not failures:
        return
    first = failures[0]
    if not isinstance(first, E.VNetError):
        raise first
    if first.status in (503, 504):
        raise E.make(E.UNAVAILABLE, f"the endpoint service did not answer ({first.message}); network {net.name!r} "
                     f"was not deleted and still has its endpoints. Retry when the endpoint service is up",
                     network=net.id, endpoints=len(eps))
    raise E.make(E.CONFLICT, f"could not delete endpoint(s) of network {net.name!r}: {first.message} "
                 f"[{first.code}]; the network was not deleted", network=net.id, failed=len(failures))


async def delete(ctx: Ctx, req: NetworkDelete) -> NetworkDeleted:
    async def go() -> NetworkDeleted:
        st = _store(ctx)
        net = await _must_get(st, req.network)
        eps = await st.endpoints_of(net.id)
        if eps and not req.force:
            shown = ", ".join(eps[:5]) + (", ..." if len(eps) > 5 else "")
            raise E.make(E.NETWORK_IN_USE, f"network {net.name!r} has {len(eps)} endpoint(s) ({shown}); detach them "
                         "first, or delete with force (`vnetctl network rm --force`) to remove them too",
                         network=net.id, endpoints=len(eps))
        if req.dry_run:
            return NetworkDeleted(network=net, endpoints_deleted=eps, children_detached=list(net.children),
                                  dry_run=True, reach=await _reach_delete(ctx, net, must=True))
        diff = await _reach_delete(ctx, net, must=False)
        done: list[str] = []
        for _ in range(3):
            if not eps:
                break
            await _delete_endpoints(ctx, net, eps)
            done.extend(eps)
            eps = [e for e in await st.endpoints_of(net.id) if e not in done]
        if eps:
            raise E.make(E.CONFLICT, f"endpoints keep being added to network {net.name!r} while deleting it; stop "
                         "attaching containers and retry", network=net.id)
        # Own children first, then the parent's: always deeper before shallower, so no cycle.
        locks = [f"children:{net.id}"] + ([f"children:{net.parent}"] if net.parent else [])
        held: list[tuple[str, str]] = []
        try:
            for name in locks:
                held.append((name, await _with_lock(st, name, f"network {net.name!r} or its parent")))
            deleted = await st.delete(net.id, _now())
            if deleted is None:
                raise _not_found(req.network)
            warnings: list[str] = []
            if net.parent is not None:
                w = await _resync_parent(ctx, st, net.parent)
                if w:
                    warnings.append(w)
        finally:
            for name, token in reversed(held):
                await st.unlock(name, token)
        w = await _delete_pools(ctx, net.id)
        if w:
            warnings.append(w)
        await st.drop_endpoints_set(net.id)
        reply = NetworkDeleted(network=deleted.network, endpoints_deleted=done, children_detached=deleted.children,
                               warnings=warnings, reach=diff)
        await _event(ctx, "deleted", net.id, reply, msg_id=f"network.deleted.{net.id}")
        for child in await st.get_many(deleted.children):
            if child is not None:
                await _event(ctx, "updated", child.id, NetworkEvent(network=child, changes=["parent"]))
        for peer in deleted.network.connected:
            await _event(ctx, "disconnected", peer, ConnectionEvent(network_a=peer, network_b=net.id))
        if deleted.network.mesh_groups:
            for g in await st.meshes(list(deleted.network.mesh_groups)):
                await _event(ctx, "mesh_member_removed", g.name,
                             MeshEvent(mesh=g.name, members=list(g.members), network=net.id))
        return reply

    if req.dry_run:  # no idempotency record: a dry run changes nothing, repeating it is free
        return await go()
    return await _idempotent(ctx, "delete", req.request_id, NetworkDeleted, go)
