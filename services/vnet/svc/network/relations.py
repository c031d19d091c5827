"""Topology between networks: connections (``connect`` / ``disconnect``) and mesh groups."""

from __future__ import annotations

from typing import Any

from vnet.contracts.network import (
    ConnectionEvent,
    ConnectReply,
    MeshCreate,
    MeshEvent,
    MeshGroup,
    MeshList,
    MeshListRequest,
    MeshMember,
    MeshMemberReply,
    MeshRef,
    MeshReply,
    NetworkPair,
)
from vnet.core import errors as E
from vnet.core import reach, topology
from vnet.core.model import VirtualNetwork
from vnet.runtime.ports import NetworkStorePort
from vnet.runtime.service import Ctx
from vnet.svc.network.common import (
    _event,
    _idempotent,
    _mesh_reply,
    _must_get,
    _not_found,
    _now,
    _reach,
    _store,
    _with_connection,
    _with_mesh,
)

# --- topology: connections ----------------------------------------------------------------

async def _pair(st: NetworkStorePort, req: NetworkPair) -> tuple[VirtualNetwork, VirtualNetwork]:
    a, b = await st.get_many([req.network_a, req.network_b])
    if a is None:
        raise _not_found(req.network_a)
    if b is None:
        raise _not_found(req.network_b)
    topology.check_connect(a, b)
    return a, b


async def _connect(ctx: Ctx, req: NetworkPair, on: bool) -> ConnectReply:
    st = _store(ctx)
    a, b = await _pair(st, req)
    would = (b.id in a.connected) != on
    wa, wb = _with_connection(a, b.id, on), _with_connection(b, a.id, on)
    if req.dry_run:
        diff = await _reach(ctx, [wa, wb], must=True) if would else reach.ReachDiff()
        return ConnectReply(network_a=wa, network_b=wb, changed=would, dry_run=True, reach=diff)
    diff = await _reach(ctx, [wa, wb], must=False) if would else None
    missing, changed, na, nb = await st.connect(a.id, b.id, on=on)
    if na is None or nb is None:
        raise _not_found(missing)
    diff = diff if changed else None
    if changed:
        await _event(ctx, "connected" if on else "disconnected", na.id,
                     ConnectionEvent(network_a=na.id, network_b=nb.id, reach=diff))
    return ConnectReply(network_a=na, network_b=nb, changed=changed, reach=diff)


async def connect(ctx: Ctx, req: NetworkPair) -> ConnectReply:
    if req.dry_run:
        return await _connect(ctx, req, True)
    return await _idempotent(ctx, "connect", req.request_id, ConnectReply, lambda: _connect(ctx, req, True))


async def disconnect(ctx: Ctx, req: NetworkPair) -> ConnectReply:
    if req.dry_run:
        return await _connect(ctx, req, False)
    return await _idempotent(ctx, "disconnect", req.request_id, ConnectReply, lambda: _connect(ctx, req, False))


# --- topology: mesh groups ----------------------------------------------------------------

def _mesh_group(m: Any) -> MeshGroup:
    return MeshGroup(name=m.name, members=list(m.members), created_at=m.created_at)


def _mesh_not_found(name: str) -> E.VNetError:
    return E.make(E.MESH_NOT_FOUND, f"no mesh group is named {name!r}; `vnetctl network mesh ls` lists them",
                  mesh=name)


def _mesh_exists(name: str, members: int) -> E.VNetError:
    return E.make(E.NAME_TAKEN, f"a mesh group named {name!r} already exists ({members} "
                  "member(s)); add networks to it or pick another name", mesh=name)


async def mesh_create(ctx: Ctx, req: MeshCreate) -> MeshReply:
    async def go() -> MeshReply:
        st = _store(ctx)
        nets = await st.get_many(list(req.members))
        for ref, n in zip(req.members, nets, strict=True):
            if n is None:
                raise _not_found(ref)
        ids = sorted({n.id for n in nets if n is not None})
        members = {n.id: n for n in nets if n is not None}
        would = [_with_mesh(n, req.name, True) for n in members.values()]
        if req.dry_run:
            got = await st.meshes([req.name])
            if got:
                raise _mesh_exists(req.name, len(got[0].members))
            return _mesh_reply(MeshGroup(name=req.name, members=ids), dry_run=True,
                               diff=await _reach(ctx, would, must=True))
        diff = await _reach(ctx, would, must=False) if len(ids) > 1 else reach.ReachDiff()
        status, m = await st.mesh_create(req.name, ids, _now())
        if status == "exists":
            assert not isinstance(m, str) and m is not None
            raise _mesh_exists(req.name, len(m.members))
        if status == "missing":
            raise _not_found(str(m))
        assert m is not None and not isinstance(m, str)
        group = _mesh_group(m)
        await _event(ctx, "mesh_created", req.name, MeshEvent(mesh=req.name, members=group.members, reach=diff))
        return _mesh_reply(group, diff=diff)

    if req.dry_run:
        return await go()
    return await _idempotent(ctx, "mesh.create", req.request_id, MeshReply, go)


async def _mesh_member(ctx: Ctx, req: MeshMember, add: bool) -> MeshMemberReply:
    st = _store(ctx)
    net = await _must_get(st, req.network)
    would = (req.mesh in net.mesh_groups) != add
    diff: reach.ReachDiff | None = None
    if req.dry_run:
        got = await st.meshes([req.mesh])
        if not got:
            raise _mesh_not_found(req.mesh)
        others = sorted(set(got[0].members) - {net.id})
        members = sorted([*others, net.id]) if add else others
        diff = await _reach(ctx, [_with_mesh(net, req.mesh, add)], must=True) if would else reach.ReachDiff()
        return MeshMemberReply(mesh=MeshGroup(name=req.mesh, members=members, created_at=got[0].created_at),
                               changed=would, dry_run=True, reach=diff)
    if would:
        diff = await _reach(ctx, [_with_mesh(net, req.mesh, add)], must=False)
    status, changed, m = await st.mesh_member(req.mesh, net.id, add=add)
    if status == "no_mesh":
        raise _mesh_not_found(req.mesh)
    if status == "missing" or m is None:
        raise _not_found(req.network)
    group = _mesh_group(m)
    diff = diff if changed else None
    if changed:
        await _event(ctx, "mesh_member_added" if add else "mesh_member_removed", req.mesh,
                     MeshEvent(mesh=req.mesh, members=group.members, network=net.id, reach=diff))
    return MeshMemberReply(mesh=group, changed=changed, reach=diff)


async def mesh_add(ctx: Ctx, req: MeshMember) -> MeshMemberReply:
    if req.dry_run:
        return await _mesh_member(ctx, req, True)
    return await _idempotent(ctx, "mesh.add", req.request_id, MeshMemberReply, lambda: _mesh_member(ctx, req, True))


async def mesh_remove(ctx: Ctx, req: MeshMember) -> MeshMemberReply:
    if req.dry_run:
        return await _mesh_member(ctx, req, False)
    return await _idempotent(ctx, "mesh.remove", req.request_id, MeshMemberReply,
                             lambda: _mesh_member(ctx, req, False))


async def mesh_delete(ctx: Ctx, req: MeshRef) -> MeshReply:
    async def members_without() -> tuple[MeshGroup, list[VirtualNetwork]]:
        st = _store(ctx)
        got = await st.meshes([req.mesh])
        if not got:
            raise _mesh_not_found(req.mesh)
        nets = [n for n in await st.get_many(list(got[0].members)) if n is not None]
        return _mesh_group(got[0]), [_with_mesh(n, req.mesh, False) for n in nets]

    if req.dry_run:
        group, would = await members_without()
        return _mesh_reply(group, dry_run=True, diff=await _reach(ctx, would, must=True))

    async def go() -> MeshReply:
        diff: reach.ReachDiff | None = None
        try:
            _, would = await members_without()
            diff = await _reach(ctx, would, must=False)
        except E.VNetError:
            pass  # not found: the delete below says so
        m = await _store(ctx).mesh_delete(req.mesh)
        if m is None:
            raise _mesh_not_found(req.mesh)
        group = _mesh_group(m)
        await _event(ctx, "mesh_deleted", req.mesh, MeshEvent(mesh=req.mesh, members=group.members, reach=diff))
        return _mesh_reply(group, diff=diff)

    return await _idempotent(ctx, "mesh.delete", req.request_id, MeshReply, go)


async def mesh_get(ctx: Ctx, req: MeshRef) -> MeshGroup:
    got = await _store(ctx).meshes([req.mesh])
    if not got:
        raise _mesh_not_found(req.mesh)
    return _mesh_group(got[0])


async def mesh_list(ctx: Ctx, req: MeshListRequest) -> MeshList:
    """Mesh groups in name order, ``limit`` per page; the cursor is the last name of the page
    before (a mesh deleted meanwhile is skipped, one created meanwhile after it is listed)."""
    st = _store(ctx)
    names = await st.mesh_names(after=req.cursor, count=req.limit + 1)
    page = names[:req.limit]
    meshes = await st.meshes(page) if page else []
    return MeshList(meshes=[_mesh_group(m) for m in meshes],
                    next_cursor=page[-1] if len(names) > req.limit else None)
