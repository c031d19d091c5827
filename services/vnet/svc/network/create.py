"""``network.create``: defaults, subnet choice, pools, the atomic commit and its retries."""

from __future__ import annotations

import asyncio
import logging
import random

from vnet.contracts.network import (
    NetworkCreate,
    NetworkEvent,
    NetworkReply,
)
from vnet.core import addr, drivers, reach, topology
from vnet.core import errors as E
from vnet.core.model import DriverType, IsolationMode, VirtualNetwork
from vnet.core.policy import PolicyNetwork
from vnet.runtime.ports import NetworkDoc, NetworkStorePort, new_id
from vnet.runtime.service import Ctx
from vnet.svc.network.carving import (
    _carve,
    _host_taken,
    _overlap_error,
    _parent_space,
    _precheck_overlap,
    _Want,
    _wants,
)
from vnet.svc.network.common import CARVE_ATTEMPTS, _event, _fabric, _net_reply, _now, _store
from vnet.svc.network.pools import _create_pools, _delete_pools, _resync_parent, _sync_parent_exclusions, _with_lock

log = logging.getLogger(__name__)


async def create(ctx: Ctx, req: NetworkCreate) -> NetworkReply:
    st = _store(ctx)
    cfg = ctx.rt.config
    rid = f"create:{req.request_id}" if req.request_id else None
    if rid is not None and not req.dry_run:
        prev = await st.idem_get(rid)
        if prev is not None:
            net = await st.get(prev.decode())
            if net is not None:
                return _net_reply(net)
    driver = drivers.parse_driver(req.driver) if req.driver is not None else cfg.default_driver
    isolation = topology.parse_isolation(req.isolation) if req.isolation is not None else cfg.default_isolation
    options = drivers.validate_options(driver, req.options)
    parent: VirtualNetwork | None = None
    if req.parent is not None:
        parent = await st.get(req.parent)
        if parent is None:
            raise E.make(E.PARENT_NOT_FOUND, f"parent network {req.parent!r} does not exist; `vnetctl network ls` "
                         "lists the networks", parent=req.parent)
    wants = _wants(ctx, req, parent)
    scope = parent.id if parent is not None else "root"
    holder = await st.name_holder(req.name)
    if holder is not None:
        raise _name_taken(req.name, holder)
    for w in wants:
        if w.given is not None:
            await _precheck_overlap(st, scope, w.given, parent)
    if await st.count() >= cfg.max_networks:
        raise _limit(cfg.max_networks, await st.count())
    if req.dry_run:  # no idempotency record and no lock: a dry run changes nothing
        would = await _would_create(st, req, wants, scope, parent, driver, isolation, options)
        return _net_reply(would, dry_run=True, diff=await _reach_create(ctx, would, parent, must=True))

    lock = f"children:{parent.id}" if parent is not None else None
    token = await _with_lock(st, lock, f"the children of {parent.name!r}") if lock and parent else None
    try:
        net = await _create_locked(ctx, st, req, wants, scope, parent, driver, isolation, options, rid)
    finally:
        if lock and token:
            await st.unlock(lock, token)
    # A child: after the commit (the id and subnet exist only now), the fabric with it against
    # the fabric without it — the same engine and question as the dry run. A top-level network
    # relates to nothing when created, so its diff is empty by construction: no fabric read
    # (a read of every network and endpoint) on the common path.
    diff = await _reach_create(ctx, net, None, must=False) if parent is not None else None
    await _event(ctx, "created", net.id, NetworkEvent(network=net, reach=diff), msg_id=f"network.created.{net.id}")
    if parent is not None:
        p = await st.get(parent.id)
        if p is not None:
            await _event(ctx, "updated", p.id, NetworkEvent(network=p, changes=["children"]))
    return _net_reply(net, diff=diff)


async def _would_create(st: NetworkStorePort, req: NetworkCreate, wants: list[_Want], scope: str,
                        parent: VirtualNetwork | None, driver: DriverType, isolation: IsolationMode,
                        options: dict[str, str]) -> VirtualNetwork:
    """The record a create would make now: the given subnet, or the one carving picks (a
    concurrent create may take it first; the real create then carves the next)."""
    host = await _host_taken(st) if parent is None and any(w.given is None for w in wants) else []
    chosen: dict[int, tuple[addr.IPNet, addr.IPAddr]] = {}
    for w in wants:
        if w.given is not None:
            net = w.given
            gw = addr.parse_gateway(w.gateway, net) if w.gateway else addr.default_gateway(net)
        else:
            extra = list(host)
            if parent is not None:
                space = _parent_space(parent, w.family)
                assert space is not None
                extra.append(addr.parse_prefix(f"{space[1]}/{space[1].max_prefixlen}"))
            net = await _carve(st, w, scope, extra)
            gw = addr.default_gateway(net)
        chosen[w.family] = (net, gw)
    net4, gw4 = chosen[4]
    net6, gw6 = chosen.get(6, (None, None))
    now = _now()
    return VirtualNetwork(id=new_id(), name=req.name, cidr=str(net4), gateway=str(gw4), driver_type=driver,
                          isolation_mode=isolation, options=options, labels=dict(req.labels), created_at=now,
                          updated_at=now, cidr_v6=str(net6) if net6 else None, gateway_v6=str(gw6) if gw6 else None,
                          parent=parent.id if parent is not None else None)


async def _reach_create(ctx: Ctx, net: VirtualNetwork, parent: VirtualNetwork | None, *,
                        must: bool) -> reach.ReachDiff | None:
    """What creating ``net`` opens. ``parent`` given (a dry run): the fabric now against the
    fabric with ``net`` added under it; None (after the commit): the fabric without ``net``
    against the fabric now."""
    try:
        now = await _fabric(ctx)
        if parent is not None:
            pp, pc = reach.child_added(PolicyNetwork.from_record(parent), PolicyNetwork.from_record(net))
            before, after = now, reach.with_networks(now, [pp, pc])
        elif net.id in now.networks:
            before, after = reach.without_network(now, net.id), now
        else:  # a dry run of a top-level network
            before, after = now, reach.with_networks(now, [PolicyNetwork.from_record(net)])
        return await asyncio.to_thread(reach.diff, before, after)
    except Exception as exc:
        if must:
            raise
        log.warning("no reachability diff for the create of %s: %s", net.id, exc)
        return None


def _name_taken(name: str, holder: str) -> E.VNetError:
    return E.make(E.NAME_TAKEN, f"a network named {name!r} already exists (id {holder}); pick another name or "
                  "delete that network first", name=name, existing_id=holder)


def _limit(limit: int, count: int) -> E.VNetError:
    return E.make(E.LIMIT_REACHED, f"max_networks ({limit}) is reached: {count} networks exist; delete unused "
                  "networks or raise max_networks (VNET_MAX_NETWORKS)", limit=limit, count=count)


async def _create_locked(ctx: Ctx, st: NetworkStorePort, req: NetworkCreate, wants: list[_Want], scope: str,
                         parent: VirtualNetwork | None, driver: DriverType, isolation: IsolationMode,
                         options: dict[str, str],
                         rid: str | None) -> VirtualNetwork:
    cfg = ctx.rt.config
    siblings: list[VirtualNetwork] = []
    if parent is not None:
        parent = await st.get(parent.id)  # fresh children list under the lock
        if parent is None:
            raise E.make(E.PARENT_NOT_FOUND, f"parent network {req.parent!r} was deleted meanwhile",
                         parent=req.parent)
        siblings = [s for s in await st.get_many(parent.children) if s is not None]
        for w in wants:  # a sibling committed while we waited for the lock: refuse before touching IPAM
            if w.given is not None:
                await _precheck_overlap(st, scope, w.given, parent)
    host = await _host_taken(st) if parent is None and any(w.given is None for w in wants) else []
    tried: list[addr.IPNet] = []  # carved subnets a concurrent create took: skipped on the retry
    busy: list[addr.IPNet] = []  # carved child subnets holding addresses of the parent's pool
    races = 0  # commits lost to a concurrent create: retries spread out over the next free subnets
    for _attempt in range(CARVE_ATTEMPTS):
        if races:
            await asyncio.sleep(random.uniform(0, 0.002 * races))
        skip = random.randrange(1 << min(races, 5))
        chosen: dict[int, tuple[addr.IPNet, addr.IPAddr]] = {}
        for w in wants:
            if w.given is not None:
                net = w.given
                gw = addr.parse_gateway(w.gateway, net) if w.gateway else addr.default_gateway(net)
            else:
                extra = list(host)
                if parent is not None:
                    space = _parent_space(parent, w.family)
                    assert space is not None
                    extra.append(addr.parse_prefix(f"{space[1]}/{space[1].max_prefixlen}"))
                try:
                    net = await _carve(st, w, scope, extra + tried, skip)
                except E.VNetError as err:
                    if err.code != E.SUBNET_POOL_EXHAUSTED.code or not busy or parent is None:
                        raise
                    raise E.make(E.ADDRESS_IN_USE, f"{w.pool_desc} has no free /{w.prefix_len} left that holds none "
                                 f"of the parent's allocated addresses (tried {addr.describe(busy)}); release "
                                 f"addresses of {parent.name!r}, give a smaller {w.field.replace('cidr', 'prefix_len')}"
                                 f", or free space", parent=parent.id, tried=[str(b) for b in busy]) from None
                gw = addr.default_gateway(net)
            chosen[w.family] = (net, gw)
        ident = new_id()
        net4, gw4 = chosen[4]
        net6, gw6 = chosen.get(6, (None, None))
        now = _now()
        doc = NetworkDoc(id=ident, name=req.name, cidr=str(net4), gateway=str(gw4), driver_type=driver,
                         isolation_mode=isolation, options=options, labels=dict(req.labels),
                         created_at=now, updated_at=now, cidr_v6=str(net6) if net6 else None,
                         gateway_v6=str(gw6) if gw6 else None, parent=parent.id if parent else None)
        if parent is not None:
            fake = VirtualNetwork(id=ident, name=req.name, cidr=doc.cidr, gateway=doc.gateway,
                                  driver_type=doc.driver_type, isolation_mode=doc.isolation_mode,
                                  cidr_v6=doc.cidr_v6, gateway_v6=doc.gateway_v6)
            try:
                await _sync_parent_exclusions(ctx, parent, [*siblings, fake])
            except E.VNetError as err:
                fam = int(err.details.get("family", 0))
                if err.code != E.ADDRESS_IN_USE.code or not any(w.given is None and w.family == fam for w in wants):
                    await _resync_parent(ctx, st, parent.id)
                    raise
                # A carved range holds addresses the parent handed out: carve another one.
                await _resync_parent(ctx, st, parent.id)
                tried.append(chosen[fam][0])
                busy.append(chosen[fam][0])
                continue
        try:
            await _create_pools(ctx, ident, [chosen[f] for f in sorted(chosen)])
        except BaseException:
            if parent is not None:
                await _resync_parent(ctx, st, parent.id)
            raise
        try:
            res = await st.create(doc, max_networks=cfg.max_networks, scope=scope,
                                  m4=addr.index_member(net4, ident), span4=addr.index_bounds(net4),
                                  m6=addr.index_member(net6, ident) if net6 else None,
                                  span6=addr.index_bounds(net6) if net6 else None, request_id=rid,
                                  vni=options.get("vni", "auto") if drivers.get(driver).spans_hosts else "",
                                  vni_range=(cfg.overlay_vni_min, cfg.overlay_vni_max))
        except BaseException:
            # An error here does not say the script did not run: a timeout or a lost connection
            # may come after Redis ran it, or Redis may run it once it thaws — and a retry with
            # the same request_id then answers that network. Deleting the pools now would leave
            # it without addresses for good, so they stay: if the network never lands, they are
            # pools of a network that does not exist, which the IPAM GC collects.
            log.warning("network %s (%s): the commit's outcome is unknown; its pools are kept for it or for the "
                        "IPAM GC", req.name, ident)
            if parent is not None:
                await _resync_parent(ctx, st, parent.id)
            raise
        if res.status == "ok":
            for w in wants:
                if w.given is None and w.pool is not None:
                    carved = chosen[w.family][0]
                    await st.set_carve_cursor(w.family, scope, str(w.pool), addr.span(carved)[1] + 1)
            got = await st.get(ident)
            assert got is not None
            return got
        if res.status == "dup" and res.id == ident:  # this very script ran before (a resent command)
            got = await st.get(ident)
            if got is not None:
                return got
        await _delete_pools(ctx, ident)
        if parent is not None:  # the exclusion made for this attempt goes again
            await _resync_parent(ctx, st, parent.id)
        if res.status == "dup":
            first = await st.get(res.id)
            if first is not None:
                return first
            raise E.make(E.CONFLICT, f"request_id {req.request_id!r} already created network {res.id}, which has "
                         "since been deleted; use a new request_id")
        if res.status == "name_taken":
            raise _name_taken(req.name, res.id)
        if res.status == "vni_taken":
            holder_net = await st.get(res.id)
            who = f"{holder_net.name!r} ({res.id})" if holder_net is not None else res.id
            raise E.make(E.CONFLICT, f"VNI {res.vni} is already held by overlay network {who}; pick another vni "
                         "or omit it to have one allocated", vni=res.vni, holder=res.id)
        if res.status == "vni_exhausted":
            raise E.make(E.LIMIT_REACHED, f"no VXLAN network identifier is free: all {res.count} of "
                         f"{cfg.overlay_vni_min}..{cfg.overlay_vni_max} are held by overlay networks; delete "
                         "unused overlay networks or widen overlay_vni_min/overlay_vni_max", limit=res.count,
                         vni_min=cfg.overlay_vni_min, vni_max=cfg.overlay_vni_max)
        if res.status == "limit":
            raise _limit(cfg.max_networks, res.count)
        if res.status == "no_parent":
            raise E.make(E.PARENT_NOT_FOUND, f"parent network {req.parent!r} was deleted meanwhile",
                         parent=req.parent)
        if res.status == "id_taken":
            continue
        assert res.status == "overlap"
        carved_family = any(w.given is None and w.family == res.family for w in wants)
        if not carved_family:
            raise _overlap_error(res, {f: n for f, (n, _) in chosen.items()}, parent is not None)
        tried.append(chosen[res.family][0])
        races += 1
        log.info("carved subnet taken by a concurrent create (%d so far); carving again", races)
    raise E.make(E.CONFLICT, f"could not carve a subnet for {req.name!r}: {CARVE_ATTEMPTS} attempts collided with "
                 "concurrent creates" + (f" or held addresses of the parent ({addr.describe(busy)})" if busy else "")
                 + "; retry")
