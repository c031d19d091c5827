"""VNetManager methods of the ipam service.

::

    async with VNetManager(cfg) as vnet:
        await vnet.create_pool("net1", "10.1.0.0/24", gateway="10.1.0.1")
        a = await vnet.request_address("net1", owner="ep-42")      # 10.1.0.2
        await vnet.release_address("net1", owner="ep-42")
"""

from __future__ import annotations

from collections.abc import Sequence

from vnet.api.base import ClientBase
from vnet.contracts import subjects
from vnet.contracts.ipam import (
    AddrRelease,
    AddrReply,
    AddrRequest,
    CheckReply,
    CheckRequest,
    GcReply,
    GcRequest,
    PoolCreate,
    PoolDelete,
    PoolDeleteReply,
    PoolExclude,
    PoolInfo,
    PoolList,
    PoolRef,
    PoolsReply,
    ReleaseReply,
)


class IpamAPI(ClientBase):
    async def create_pool(self, network_id: str, cidr: str, gateway: str | None = None, *,
                          reserved: Sequence[str] = (), excluded: Sequence[str] = (),
                          request_id: str | None = None) -> PoolInfo:
        """Create the pool of one network and family (the CIDR's); idempotent for the same arguments."""
        req = PoolCreate(network_id=network_id, cidr=cidr, gateway=gateway, reserved=list(reserved),
                         excluded=list(excluded), request_id=request_id)
        return await self.call(subjects.IPAM_POOL_CREATE, req, PoolInfo)

    async def delete_pool(self, network_id: str, family: int | None = None, *, force: bool = False,
                          request_id: str | None = None) -> PoolDeleteReply:
        """Delete a network's pool(s); 409 ``pool_in_use`` while addresses are allocated unless ``force``."""
        req = PoolDelete(network_id=network_id, family=family, force=force, request_id=request_id)
        return await self.call(subjects.IPAM_POOL_DELETE, req, PoolDeleteReply)

    async def exclude_from_pool(self, network_id: str, add: Sequence[str] = (), remove: Sequence[str] = (), *,
                                request_id: str | None = None) -> PoolInfo:
        """Carve child subnets out of a network's pool (``add``) or give them back (``remove``)."""
        req = PoolExclude(network_id=network_id, add=list(add), remove=list(remove), request_id=request_id)
        return await self.call(subjects.IPAM_POOL_EXCLUDE, req, PoolInfo)

    async def pool(self, network_id: str, family: int | None = None) -> list[PoolInfo]:
        """The pools of one network (404 ``pool_not_found`` if it has none)."""
        rep = await self.call(subjects.IPAM_POOL_GET, PoolRef(network_id=network_id, family=family), PoolsReply)
        return rep.pools

    async def pools(self, network_id: str | None = None, family: int | None = None, *,
                    page_size: int = 200) -> list[PoolInfo]:
        """Every pool (or those of one network): capacity, used, free, cursor (every page)."""
        out: list[PoolInfo] = []
        cursor: str | None = None
        while True:
            rep = await self.call(subjects.IPAM_POOL_LIST, PoolList(network_id=network_id, family=family,
                                                                    limit=page_size, cursor=cursor), PoolsReply)
            out += rep.pools
            if rep.next_cursor is None:
                return out
            cursor = rep.next_cursor

    async def request_address(self, network_id: str, owner: str, *, family: int = 4, address: str | None = None,
                              request_id: str | None = None) -> AddrReply:
        """Allocate an address to ``owner`` (the next free one, or ``address``); idempotent per owner."""
        req = AddrRequest(network_id=network_id, owner=owner, family=family, address=address, request_id=request_id)
        return await self.call(subjects.IPAM_ADDR_REQUEST, req, AddrReply)

    async def release_address(self, network_id: str, owner: str, *, request_id: str | None = None) -> list[str]:
        """Release what ``owner`` holds in the network (every family); returns the addresses released."""
        req = AddrRelease(network_id=network_id, owner=owner, request_id=request_id)
        rep = await self.call(subjects.IPAM_ADDR_RELEASE, req, ReleaseReply)
        return rep.released

    async def ipam_gc_page(self, *, grace_s: float | None = None, network_id: str | None = None,
                           limit: int = 1000, cursor: str | None = None) -> GcReply:
        """One page of the collection (at most ``limit`` releases and pool deletions)."""
        req = GcRequest(grace_s=grace_s, network_id=network_id, limit=limit, cursor=cursor)
        return await self.call(subjects.IPAM_GC, req, GcReply, timeout=max(self.config.request_timeout_s, 60.0))

    async def ipam_gc(self, *, grace_s: float | None = None, network_id: str | None = None,
                      page_size: int = 1000) -> GcReply:
        """Release allocations whose endpoint is gone and pools whose network is gone (older than
        the grace): every page, merged into one reply."""
        out: GcReply | None = None
        cursor: str | None = None
        while True:
            page = await self.ipam_gc_page(grace_s=grace_s, network_id=network_id, limit=page_size, cursor=cursor)
            if out is None:
                out = page
            else:
                out.released += page.released
                out.pools_deleted += page.pools_deleted
                out.index_repaired += page.index_repaired
                out.skipped += [s for s in page.skipped if s not in out.skipped]
            cursor = page.next_cursor
            if cursor is None:
                out.next_cursor = None
                return out

    async def ipam_check_page(self, *, network_id: str | None = None, grace_s: float | None = None,
                              limit: int = 1000, cursor: str | None = None) -> CheckReply:
        """One page of the check (at most ``limit`` findings); ``next_cursor`` fetches the next."""
        req = CheckRequest(network_id=network_id, grace_s=grace_s, limit=limit, cursor=cursor)
        return await self.call(subjects.IPAM_CHECK, req, CheckReply, timeout=max(self.config.request_timeout_s, 60.0))

    async def ipam_check(self, *, network_id: str | None = None, grace_s: float | None = None,
                         page_size: int = 1000) -> CheckReply:
        """Leaks and inconsistencies, without changing anything: every page, merged into one."""
        out: CheckReply | None = None
        cursor: str | None = None
        while True:
            page = await self.ipam_check_page(network_id=network_id, grace_s=grace_s, limit=page_size, cursor=cursor)
            if out is None:
                out = page
            else:
                out.clean = out.clean and page.clean
                out.pools_checked += page.pools_checked
                out.allocations += page.allocations
                out.leaks += page.leaks
                out.inconsistencies += page.inconsistencies
                out.orphan_pools += page.orphan_pools
                out.notes += [n for n in page.notes if n not in out.notes]
            if page.next_cursor is None:
                out.next_cursor = None
                return out
            cursor = page.next_cursor
