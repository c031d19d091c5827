"""IPAM: address pools per network and family, allocation, release, GC and check.

Every decision is one Lua script call on the pool's keys (``vnet.adapters.ipam_store``);
``addr.request`` and ``addr.release`` run ``vnet.runtime.addresses``, which the endpoint
service calls too for an attach and a detach (no round trip through this service);
the rules themselves (offset math, serial next-free, what is never handed out, the
check) are pure code in ``vnet.core.ipam``. Replicas share nothing but Redis, so any
number of them may run.

Garbage collection (``vnet.ipam.gc`` on request, and every ``ipam_gc_interval_s`` in
one replica at a time) releases allocations whose owner is not in the endpoint index
``vnet:{global:idx}:endpoints`` and deletes pools whose network is not in
``vnet:{global:idx}:networks`` — only what is older than the grace period
(``ipam_gc_grace_s``, default 60 s), so an endpoint or network being created right now
is not collected. A missing index (no endpoint / network ever registered) disables that
half of the collection instead of treating everything as orphaned.

Forecasts (``docs/operations.md``): allocations and releases are counted per pool in
one-minute buckets (``vnet.adapters.ipam_rates``); ``pool.get`` / ``pool.list`` answer
each pool's ``forecast`` (rates over the last 15 minutes and the time to exhaustion,
:func:`vnet.core.forecast.forecast`), and an allocation that takes a pool to 80 % or
95 % publishes ``vnet.evt.ipam.pool_fullness.<id>`` once per crossing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from vnet.contracts import subjects
from vnet.contracts.ipam import (
    AddrRelease,
    AddrReply,
    AddrRequest,
    Allocation,
    CheckReply,
    CheckRequest,
    GcPool,
    GcReply,
    GcRequest,
    Inconsistency,
    Leak,
    OrphanPool,
    PoolCreate,
    PoolDelete,
    PoolDeleteReply,
    PoolEvent,
    PoolExclude,
    PoolInfo,
    PoolList,
    PoolRef,
    PoolsReply,
    ReleaseReply,
)
from vnet.core import errors as E
from vnet.core import forecast as fc
from vnet.core import ipam as core
from vnet.runtime import addresses
from vnet.runtime import ports as st
from vnet.runtime.ports import IpamRatesPort as IpamRates
from vnet.runtime.ports import IpamStorePort as IpamStore
from vnet.runtime.ports import PoolMeta
from vnet.runtime.service import Ctx, Runtime, ServiceDef

log = logging.getLogger(__name__)

SERVICE = ServiceDef("ipam", "IP address management: pools, allocation, release, GC")

# Documented defaults; the live values are VNetConfig.ipam_gc_interval_s / ipam_gc_grace_s.
GC_INTERVAL_S = 30.0  # 0 disables the periodic collection
GC_GRACE_S = 60.0

def gc_settings(rt: Runtime) -> tuple[float, float]:
    interval = rt.config.ipam_gc_interval_s
    grace = rt.config.ipam_gc_grace_s
    return interval, grace


def _store(ctx: Ctx | Runtime) -> IpamStore:
    return addresses.store(ctx)


@SERVICE.starting
async def _start(rt: Runtime) -> None:
    await addresses.start(rt)
    interval, _ = gc_settings(rt)
    if interval > 0:
        rt.spawn(_gc_loop(rt), "gc")


async def _gc_loop(rt: Runtime) -> None:
    store = _store(rt)
    while True:
        interval, grace = gc_settings(rt)
        await asyncio.sleep(interval * random.uniform(0.9, 1.1))
        try:
            # One replica per period does the work; the others find the lock taken.
            if not await store.try_lock(st.GC_LOCK, rt.instance or "ipam", interval * 0.8):
                continue
            rep = await collect(store, grace)
            await _note_collected(rt, rep)
            if rep.released or rep.pools_deleted or rep.index_repaired:
                log.info("IPAM GC released %d allocations, deleted %d orphan pools, repaired %d index entries",
                         len(rep.released), len(rep.pools_deleted), rep.index_repaired)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("periodic IPAM GC failed (it runs again in %.0fs): %s", interval, exc)


def pool_info(m: PoolMeta) -> PoolInfo:
    lay = m.layout
    return PoolInfo(network_id=m.network_id, family=m.family, cidr=lay.cidr,
                    gateway=str(lay.gateway) if lay.gateway is not None else None, capacity=lay.capacity,
                    used=m.used, free=m.free, cursor=m.cursor_address, window=lay.window,
                    reserved=[str(a) for a in lay.reserved], excluded=[str(n) for n in lay.excluded],
                    created_at=m.created_at)


async def _event(ctx: Ctx, name: str, m: PoolMeta, released: int = 0) -> None:
    ident = addresses.event_ident(m.network_id, m.family)
    payload = PoolEvent(network_id=m.network_id, family=m.family, cidr=m.layout.cidr, capacity=m.layout.capacity,
                        released=released)
    try:
        await ctx.publish_event("ipam", name, ident, payload, msg_id=f"ipam.{name}.{ident}.{m.gen}")
    except Exception as exc:  # the pool change is done; a lost event must not undo or fail it
        log.warning("could not publish ipam %s event for %s: %s", name, m.network_id, exc)


def _rates(ctx: Ctx | Runtime) -> IpamRates:
    return addresses.rates(ctx)


async def _with_forecasts(ctx: Ctx, metas: list[PoolMeta]) -> list[PoolInfo]:
    """Pool infos with their forecasts (one pipelined read for the page)."""
    now = time.time()
    infos = [pool_info(m) for m in metas]
    try:
        got = await _rates(ctx).buckets([(m.network_id, m.family) for m in metas], now)
    except Exception as exc:  # a forecast is an extra: the pools are still the answer
        log.warning("no forecasts: %s", exc)
        return infos
    for info, m, b in zip(infos, metas, got, strict=True):
        info.forecast = fc.forecast(b, now=now, used=m.used, capacity=m.layout.capacity, created_at=m.created_at)
    return infos


# --- pools ------------------------------------------------------------------------------

@SERVICE.op("pool.create", subjects.IPAM_POOL_CREATE, PoolCreate)
async def pool_create(ctx: Ctx, req: PoolCreate) -> PoolInfo:
    layout = core.build_layout(req.network_id, req.cidr, req.gateway, req.reserved, req.excluded)
    created, meta = await _store(ctx).create_pool(layout)
    if created:
        await _event(ctx, "pool_created", meta)
    return pool_info(meta)


@SERVICE.op("pool.delete", subjects.IPAM_POOL_DELETE, PoolDelete)
async def pool_delete(ctx: Ctx, req: PoolDelete) -> PoolDeleteReply:
    store = _store(ctx)
    families = (req.family,) if req.family else (4, 6)
    if not req.force and len(families) > 1:
        # Refuse before deleting anything: a network's pools go together or not at all.
        for m in await store.pools(req.network_id):
            if m.used:
                await store.delete_pool(req.network_id, m.family, force=False)  # raises pool_in_use
    deleted: list[PoolInfo] = []
    released = 0
    for fam in families:
        res = await store.delete_pool(req.network_id, fam, force=req.force)
        if res is None:
            continue
        meta, n = res
        released += n
        deleted.append(pool_info(meta))
        await _event(ctx, "pool_deleted", meta, n)
    return PoolDeleteReply(pools=deleted, released=released)


@SERVICE.op("pool.exclude", subjects.IPAM_POOL_EXCLUDE, PoolExclude)
async def pool_exclude(ctx: Ctx, req: PoolExclude) -> PoolInfo:
    nets = [core.parse_network(c, "excluded subnet") for c in (*req.add, *req.remove)]
    if not nets:
        raise E.make(E.INVALID_REQUEST, "pool.exclude needs at least one CIDR in add or remove")
    families = {n.version for n in nets}
    if len(families) > 1:
        raise E.make(E.INVALID_REQUEST, "add and remove must all be of one family (one pool); send one request "
                     "per family")
    meta = await _store(ctx).change_excluded(req.network_id, families.pop(), req.add, req.remove)
    return pool_info(meta)


@SERVICE.op("pool.get", subjects.IPAM_POOL_GET, PoolRef)
async def pool_get(ctx: Ctx, req: PoolRef) -> PoolsReply:
    pools = await _store(ctx).pools(req.network_id, req.family)
    if not pools:
        if req.family:
            raise st.pool_not_found(req.network_id, req.family)
        raise E.make(E.POOL_NOT_FOUND, f"network {req.network_id} has no IPAM pool; the network service creates "
                     "them with the network (`vnetctl ipam pools` lists every pool)", network_id=req.network_id)
    return PoolsReply(pools=await _with_forecasts(ctx, pools))


@SERVICE.op("pool.list", subjects.IPAM_POOL_LIST, PoolList,
            page_hint="ask for fewer pools per page with `limit` and follow `next_cursor`")
async def pool_list(ctx: Ctx, req: PoolList) -> PoolsReply:
    pools = sorted(await _store(ctx).pools(req.network_id, req.family), key=lambda m: (m.network_id, m.family))
    if req.cursor:
        after, _ = _parse_cursor(req.cursor)
        pools = [m for m in pools if (m.network_id, m.family) > after]
    page = pools[:req.limit]
    more = len(pools) > req.limit
    last = page[-1] if more else None
    return PoolsReply(pools=await _with_forecasts(ctx, page),
                      next_cursor=_cursor(last.network_id, last.family, 0) if last is not None else None)


# --- addresses --------------------------------------------------------------------------

@SERVICE.op("addr.request", subjects.IPAM_ADDR_REQUEST, AddrRequest)
async def addr_request(ctx: Ctx, req: AddrRequest) -> AddrReply:
    return await addresses.allocate(ctx, req.network_id, req.family, req.owner, req.address, req.request_id)


@SERVICE.op("addr.release", subjects.IPAM_ADDR_RELEASE, AddrRelease)
async def addr_release(ctx: Ctx, req: AddrRelease) -> ReleaseReply:
    return ReleaseReply(released=await addresses.release(ctx, req.network_id, req.owner))


# --- GC and check -----------------------------------------------------------------------

async def _pools_with_index(store: IpamStore, network_id: str | None
                            ) -> tuple[list[PoolMeta], list[tuple[str, int, float]]]:
    """The pools to look at, and index entries that have no pool behind them."""
    index = await store.index()
    if network_id is not None:
        index = [e for e in index if e[0] == network_id]
    pools = await store.pools(network_id)
    have = {(m.network_id, m.family) for m in pools}
    dangling = [e for e in index if (e[0], e[1]) not in have]
    return pools, dangling


async def collect(store: IpamStore, grace_s: float, network_id: str | None = None, *,
                  limit: int | None = None, cursor: str | None = None) -> GcReply:
    """Release orphaned allocations and delete orphaned pools older than ``grace_s``.

    Pools go in (network_id, family) order. With ``limit``, the collection stops once it
    released or deleted that many things and answers ``next_cursor`` (the pool it stopped
    in): a call with it carries on there, so one reply stays below the bus's message limit
    however much leaked. The periodic collection has no limit (its reply goes nowhere)."""
    now = await store.now()
    cutoff = now - grace_s
    pools, dangling = await _pools_with_index(store, network_id)
    pools.sort(key=lambda m: (m.network_id, m.family))
    if cursor:
        start, _ = _parse_cursor(cursor)
        pools = [m for m in pools if (m.network_id, m.family) >= start]
    skipped: list[str] = []
    repaired = 0
    for nid, fam, added in dangling:
        if added <= cutoff:
            await store.remove_index_entry(nid, fam)
            repaired += 1
    deleted: list[GcPool] = []
    released: list[Allocation] = []
    stop_at: PoolMeta | None = None  # the pool a limited page ended in

    def full() -> bool:
        return limit is not None and len(released) + len(deleted) >= limit

    live: list[PoolMeta] = pools
    if await store.set_exists(st.NETWORKS_INDEX):
        exists = await store.members(st.NETWORKS_INDEX, [m.network_id for m in pools])
        live = []
        for m, ok in zip(pools, exists, strict=True):
            if ok or m.created_at > cutoff:
                live.append(m)
                continue
            if full():
                stop_at = m
                break
            res = await store.delete_pool(m.network_id, m.family, force=True, expect_gen=m.gen)
            if res is not None:
                deleted.append(GcPool(network_id=m.network_id, family=m.family, cidr=m.layout.cidr, released=res[1]))
                log.info("GC deleted the %s pool of network %s (%s): the network no longer exists",
                         core.family_name(m.family), m.network_id, m.layout.cidr)
    else:
        skipped.append(f"pools: the network index {st.NETWORKS_INDEX} does not exist (no network registered), "
                       "so no pool is treated as orphaned")
    if stop_at is not None:  # the allocations of pools past the stop wait for the next page
        live = [m for m in live if (m.network_id, m.family) < (stop_at.network_id, stop_at.family)]
    if await store.set_exists(st.ENDPOINTS_INDEX):
        for m in live:
            if full():  # this pool's allocations (and every later pool) wait for the next page
                stop_at = m
                break
            async for chunk in store.owners(m.network_id, m.family):
                if full():
                    break
                old = [row for row in chunk if row[2] <= cutoff]
                if not old:
                    continue
                exists = await store.members(st.ENDPOINTS_INDEX, [row[0] for row in old])
                for (owner, off, _ts), ok in zip(old, exists, strict=True):
                    if ok:
                        continue
                    if full():
                        break
                    r = await store.release(m.network_id, m.family, owner, expect_offset=off, allocated_before=cutoff)
                    if r is not None:
                        released.append(Allocation(network_id=r.network_id, family=r.family, address=r.address,
                                                   owner=r.owner, allocated_at=r.allocated_at))
            if full():  # stopped in (or at the end of) this pool: the next page starts here
                stop_at = m
                break
    else:
        skipped.append(f"allocations: the endpoint index {st.ENDPOINTS_INDEX} does not exist (no endpoint "
                       "registered), so no allocation is treated as orphaned")
    return GcReply(grace_s=grace_s, pools_scanned=len(pools), released=released, pools_deleted=deleted,
                   index_repaired=repaired, skipped=skipped,
                   next_cursor=_cursor(stop_at.network_id, stop_at.family, 0) if stop_at is not None else None)


Finding = Leak | Inconsistency | OrphanPool
CHECK_PAGE = 1000  # findings per check reply by default: ~250 KB, a quarter of the bus limit


def _cursor(network_id: str, family: int, skip: int) -> str:
    return f"{network_id}/{family}/{skip}"


def _parse_cursor(cursor: str) -> tuple[tuple[str, int], int]:
    try:
        nid, fam, skip = cursor.rsplit("/", 2)
        key, n = (nid, int(fam)), int(skip)
    except ValueError:
        raise E.make(E.INVALID_REQUEST, f"cursor {cursor!r} is not one a check reply gave; pass next_cursor "
                     "unchanged (or no cursor to start over)", cursor=cursor) from None
    if not nid or n < 0:
        raise E.make(E.INVALID_REQUEST, f"cursor {cursor!r} is not one a check reply gave", cursor=cursor)
    return key, n


async def inspect(store: IpamStore, grace_s: float, network_id: str | None = None, *,
                  limit: int | None = None, cursor: str | None = None) -> CheckReply:
    """Leaks, inconsistencies and orphan pools — read only — one page of at most ``limit``.

    Pools (and pool-index entries without a pool) are visited in (network_id, family)
    order; each one's findings in a fixed order, so ``next_cursor`` (the pool and how
    many of its findings were returned) resumes exactly where the page ended. Without
    ``limit`` everything comes in one reply (for callers inside this process).
    """
    now = await store.now()
    pools, dangling = await _pools_with_index(store, network_id)
    notes: list[str] = []
    has_endpoints = await store.set_exists(st.ENDPOINTS_INDEX)
    if not has_endpoints:
        notes.append(f"the endpoint index {st.ENDPOINTS_INDEX} does not exist: leaks not looked for")
    has_networks = await store.set_exists(st.NETWORKS_INDEX)
    if not has_networks:
        notes.append(f"the network index {st.NETWORKS_INDEX} does not exist: orphan pools not looked for")
    orphans: dict[tuple[str, int], OrphanPool] = {}
    if has_networks and pools:
        exists = await store.members(st.NETWORKS_INDEX, [m.network_id for m in pools])
        for m, ok in zip(pools, exists, strict=True):
            if not ok:
                age = now - m.created_at
                orphans[(m.network_id, m.family)] = OrphanPool(
                    network_id=m.network_id, family=m.family, cidr=m.layout.cidr, used=m.used, age_s=round(age, 3),
                    collectable=age > grace_s)
    by_key = {(m.network_id, m.family): m for m in pools}
    lost = {(nid, fam): added for nid, fam, added in dangling}
    no_pool: dict[tuple[str, int], Inconsistency] = {}
    if has_networks:
        for nid in await _networks_without_pool(store, network_id, {m.network_id for m in pools}):
            no_pool[(nid, 4)] = Inconsistency(
                network_id=nid, family=4, kind="network_without_pool",
                message=f"network {nid} is registered ({st.NETWORKS_INDEX}) but has no IPAM pool, so its endpoints "
                "get no address; GC cannot repair this: delete and recreate the network (or its pool with "
                "`ipam.pool.create`); seen right after a network create was interrupted by a store failure")
    keys = sorted(set(by_key) | set(lost) | set(no_pool))
    start: tuple[str, int] | None = None
    skip = 0
    if cursor:
        start, skip = _parse_cursor(cursor)
    page: list[Finding] = []
    checked = 0
    allocations = 0
    next_cursor: str | None = None
    for k in keys:
        if start is not None and k < start:
            continue
        first = skip if k == start else 0
        if limit is not None and len(page) >= limit:
            next_cursor = _cursor(k[0], k[1], first)
            break
        found: list[Finding] = []
        if k in no_pool:
            found.append(no_pool[k])
        if k in lost:
            found.append(Inconsistency(network_id=k[0], family=k[1], kind="index_without_pool",
                                       message=f"the pool index lists {k[0]}/{k[1]} (added {now - lost[k]:.0f}s ago) "
                                       "but the pool does not exist; GC removes the entry"))
        if k in orphans:
            found.append(orphans[k])
        meta = by_key.get(k)
        if meta is not None:
            n = await _pool_findings(store, meta, now, grace_s, network_id is not None, has_endpoints, found)
            if n is not None and first == 0:  # a pool split over pages counts on its first
                checked += 1
                allocations += n
        rest = found[first:]
        if limit is not None and len(rest) > limit - len(page):
            room = limit - len(page)
            page.extend(rest[:room])
            next_cursor = _cursor(k[0], k[1], first + room)
            break
        page.extend(rest)
    leaks = [f for f in page if isinstance(f, Leak)]
    issues = [f for f in page if isinstance(f, Inconsistency)]
    orphan_list = [f for f in page if isinstance(f, OrphanPool)]
    return CheckReply(clean=not page, pools_checked=checked, allocations=allocations, leaks=leaks,
                      inconsistencies=issues, orphan_pools=orphan_list, notes=notes, next_cursor=next_cursor)


async def _networks_without_pool(store: IpamStore, network_id: str | None, have: set[str]) -> list[str]:
    """Registered networks (one, or all) without any pool, checked pool by pool (a pool that
    exists but is missing from the pool index is another finding, not this one)."""
    if network_id is not None:
        registered = [network_id] if (await store.members(st.NETWORKS_INDEX, [network_id]))[0] else []
    else:
        raw: Any = await store.r.smembers(st.NETWORKS_INDEX)
        registered = sorted(x.decode() if isinstance(x, bytes) else str(x) for x in raw)
    out = []
    for nid in registered:
        if nid not in have and not await store.pools(nid):
            out.append(nid)
    return out


async def _pool_findings(store: IpamStore, m: PoolMeta, now: float, grace_s: float, look_at_index: bool,
                         has_endpoints: bool, found: list[Finding]) -> int | None:
    """Append one pool's inconsistencies, then its leaks, to ``found``; returns its number of
    allocations (None: the pool was deleted meanwhile)."""
    snap = await store.snapshot(m.network_id, m.family)
    if snap is None:
        return None
    lay = snap.meta.layout
    if look_at_index and not await _indexed(store, m):
        found.append(Inconsistency(network_id=m.network_id, family=m.family, kind="pool_not_indexed",
                                   message="the pool exists but is missing from the pool index "
                                   f"{st.POOLS_INDEX}: `vnetctl ipam pools` does not list it"))
    for text in snap.bad_records:
        found.append(Inconsistency(network_id=m.network_id, family=m.family, kind="bad_record", message=text))
    problems = core.check_pool(lay, snap.bits, snap.summary, {o: v[0] for o, v in snap.owners.items()},
                               snap.holders, snap.meta.used)
    for p in problems:
        address = str(lay.address_at(p.offset)) if p.offset is not None and 0 <= p.offset < lay.window else None
        found.append(Inconsistency(network_id=m.network_id, family=m.family, kind=p.kind,
                                   message=f"{lay.describe()}: {p.message}", address=address, owner=p.owner))
    if has_endpoints and snap.owners:
        owners = sorted(snap.owners)  # a fixed order: a cursor inside this pool resumes exactly
        for i in range(0, len(owners), 1000):
            part = owners[i:i + 1000]
            for owner, ok in zip(part, await store.members(st.ENDPOINTS_INDEX, part), strict=True):
                if ok:
                    continue
                off, ts = snap.owners[owner]
                age = now - ts
                found.append(Leak(network_id=m.network_id, family=m.family,
                                  address=str(lay.address_at(off)) if 0 <= off < lay.window else f"offset {off}",
                                  owner=owner, allocated_at=ts, age_s=round(age, 3), collectable=age > grace_s))
    return len(snap.owners)


async def _indexed(store: IpamStore, m: PoolMeta) -> bool:
    score: Any = await store.r.zscore(st.POOLS_INDEX, st.index_member(m.network_id, m.family))
    return score is not None


@SERVICE.op("gc", subjects.IPAM_GC, GcRequest,
            page_hint="collect less per reply with `limit` and call again with `next_cursor`")
async def gc(ctx: Ctx, req: GcRequest) -> GcReply:
    _, grace = gc_settings(ctx.rt)
    rep = await collect(_store(ctx), grace if req.grace_s is None else req.grace_s, req.network_id,
                        limit=req.limit, cursor=req.cursor)
    await _note_collected(ctx.rt, rep)
    return rep


async def _note_collected(rt: Runtime, rep: GcReply) -> None:
    """What the collector released counts as releases in the forecasts (best effort)."""
    per_pool: dict[tuple[str, int], int] = {}
    for a in rep.released:
        per_pool[(a.network_id, a.family)] = per_pool.get((a.network_id, a.family), 0) + 1
    now = time.time()
    for (nid, fam), n in sorted(per_pool.items()):
        try:
            await _rates(rt).note(nid, fam, now=now, releases=n)
        except Exception as exc:
            log.warning("could not count %d collected release(s) of pool %s/%d: %s", n, nid, fam, exc)


@SERVICE.op("check", subjects.IPAM_CHECK, CheckRequest,
            page_hint="ask for fewer findings per page with `limit` and follow `next_cursor`, or check one "
            "network (`network_id`)")
async def check(ctx: Ctx, req: CheckRequest) -> CheckReply:
    _, grace = gc_settings(ctx.rt)
    return await inspect(_store(ctx), grace if req.grace_s is None else req.grace_s, req.network_id,
                         limit=req.limit, cursor=req.cursor)


async def _pools_check(rt: Runtime) -> tuple[str, str]:
    return "ipam_store", "ok" if "ipam_store" in rt.state else "not started"


SERVICE.health_checks.append(_pools_check)
