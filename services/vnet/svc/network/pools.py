"""A network's IPAM pools and its parent's exclusions, changed under the parent's lock."""

from __future__ import annotations

import asyncio
import logging

from vnet.contracts import subjects
from vnet.contracts.ipam import (
    PoolCreate,
    PoolDelete,
    PoolDeleteReply,
    PoolExclude,
    PoolInfo,
    PoolRef,
    PoolsReply,
)
from vnet.core import addr
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork
from vnet.runtime.ports import NetworkStorePort
from vnet.runtime.service import Ctx
from vnet.svc.network.carving import _parent_space
from vnet.svc.network.common import LOCK_TTL_S, LOCK_WAIT_S

log = logging.getLogger(__name__)


async def _create_pools(ctx: Ctx, ident: str, nets: list[tuple[addr.IPNet, addr.IPAddr]]) -> None:
    made: list[int] = []
    try:
        for net, gw in nets:
            await ctx.request(subjects.IPAM_POOL_CREATE, PoolCreate(network_id=ident, cidr=str(net), gateway=str(gw)),
                              PoolInfo)
            made.append(net.version)
    except E.VNetError as err:
        if made:
            await _delete_pools(ctx, ident)
        if err.status in (503, 504):
            raise E.make(E.UNAVAILABLE, f"the IPAM service could not create the address pool ({err.message}); "
                         "nothing was created, retry when it is up") from None
        raise


async def _delete_pools(ctx: Ctx, ident: str, family: int | None = None) -> str | None:
    """Delete a network's pools; a failure is returned as a warning (the IPAM GC collects
    pools of networks that no longer exist)."""
    try:
        await ctx.request(subjects.IPAM_POOL_DELETE, PoolDelete(network_id=ident, family=family, force=True),
                          PoolDeleteReply)
    except E.VNetError as err:
        log.warning("could not delete the IPAM pools of %s: %s", ident, err)
        return (f"the IPAM pools of {ident} were not deleted ({err.message}); the IPAM garbage collector removes "
                "them after its grace period")
    return None


async def _with_lock(st: NetworkStorePort, name: str, what: str) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOCK_WAIT_S
    while True:
        token = await st.lock(name, LOCK_TTL_S)
        if token is not None:
            return token
        if loop.time() > deadline:
            raise E.make(E.LOCKED, f"{what} is being changed by another request; retry", lock=name)
        await asyncio.sleep(0.05)


async def _sync_parent_exclusions(ctx: Ctx, parent: VirtualNetwork, children: list[VirtualNetwork]) -> None:
    """Make the parent's pools exclude exactly its children's subnets (``vnet.ipam.pool.exclude``:
    IPAM refuses, with 409 ``address_in_use`` naming the holders, to exclude a range in which an
    address is allocated). Run under the parent's lock; diffing against what the pool has also
    repairs an exclusion left behind by a create that died half-way."""
    for fam in (4, 6):
        space = _parent_space(parent, fam)
        if space is None:
            continue
        pnet, pgw = space
        wanted = {cidr for c in children if (cidr := c.cidr if fam == 4 else c.cidr_v6) is not None}
        try:
            pools = await ctx.request(subjects.IPAM_POOL_GET, PoolRef(network_id=parent.id, family=fam), PoolsReply)
        except E.VNetError as err:
            if err.code != E.POOL_NOT_FOUND.code:
                raise
            # The parent's pool is gone (it should not be): make it again, exclusions included.
            await ctx.request(subjects.IPAM_POOL_CREATE, PoolCreate(network_id=parent.id, cidr=str(pnet),
                                                                    gateway=str(pgw), excluded=sorted(wanted)),
                              PoolInfo)
            continue
        have = {x for p in pools.pools if p.family == fam for x in p.excluded}
        add, remove = sorted(wanted - have), sorted(have - wanted)
        if not add and not remove:
            continue
        try:
            await ctx.request(subjects.IPAM_POOL_EXCLUDE, PoolExclude(network_id=parent.id, add=add, remove=remove),
                              PoolInfo)
        except E.VNetError as err:
            if err.code == E.ADDRESS_IN_USE.code:
                details = {**err.details, "parent": parent.id, "family": fam}
                raise E.make(E.ADDRESS_IN_USE, f"cannot carve {', '.join(add)} out of parent {parent.name!r}: "
                             f"{err.message}. Pick another range for the child (or release those addresses)",
                             **details) from None
            raise


async def _resync_parent(ctx: Ctx, st: NetworkStorePort, parent_id: str) -> str | None:
    """Best effort after a failure: exclusions = the children that exist."""
    try:
        parent = await st.get(parent_id)
        if parent is None:
            return None
        children = [c for c in await st.get_many(parent.children) if c is not None]
        await _sync_parent_exclusions(ctx, parent, children)
    except E.VNetError as err:
        log.warning("could not update the pool exclusions of parent %s: %s", parent_id, err)
        return (f"the exclusions of parent {parent_id}'s address pool could not be updated ({err.message}); they "
                "are corrected at the parent's next child change")
    return None
