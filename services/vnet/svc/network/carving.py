"""Which subnet a new network gets: the requested one checked against its parent and the
others, or one carved next-fit from the parent's or the default pool.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vnet.contracts.network import (
    NetworkCreate,
)
from vnet.core import addr, topology
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork
from vnet.runtime.ports import CreateResult, NetworkStorePort
from vnet.runtime.service import Ctx
from vnet.svc.network.common import CARVE_BATCH

# --- create -------------------------------------------------------------------------------

@dataclass
class _Want:
    """One family of a network being created: a given subnet, or where to carve one."""

    family: int
    given: addr.IPNet | None
    gateway: str | None
    pool: addr.IPNet | None = None  # carve from here when nothing is given
    prefix_len: int = 0
    pool_desc: str = ""
    field: str = "cidr"


def _check_child_range(net: addr.IPNet, parent: VirtualNetwork, pnet: addr.IPNet, pgw: addr.IPAddr,
                       field: str) -> None:
    if not addr.is_strict_subnet(net, pnet):
        raise E.make(E.CIDR_OUTSIDE_PARENT, f"{field} {net} is not inside parent {parent.name!r} ({pnet}); a child's "
                     f"subnet is a smaller part of its parent's (omit {field} to carve one)",
                     cidr=str(net), parent=parent.id, parent_cidr=str(pnet))
    if pgw in net:
        raise E.make(E.CIDR_OUTSIDE_PARENT, f"{field} {net} contains the gateway {pgw} of parent {parent.name!r}; "
                     f"pick a part of {pnet} without it (omit {field} to carve one)",
                     cidr=str(net), parent=parent.id, parent_gateway=str(pgw))


def _parent_space(parent: VirtualNetwork, family: int) -> tuple[addr.IPNet, addr.IPAddr] | None:
    cidr = parent.cidr if family == 4 else parent.cidr_v6
    gw = parent.gateway if family == 4 else parent.gateway_v6
    if cidr is None or gw is None:
        return None
    net = addr.parse_prefix(cidr)
    return net, addr.parse_gateway(gw, net)


def _wants(ctx: Ctx, req: NetworkCreate, parent: VirtualNetwork | None) -> list[_Want]:
    cfg = ctx.rt.config
    out: list[_Want] = []
    # IPv4: always.
    if req.cidr is not None:
        net = addr.parse_cidr(req.cidr, field="cidr", family=4)
        if req.prefix_len is not None and req.prefix_len != net.prefixlen:
            raise E.make(E.INVALID_REQUEST, f"cidr {net} and prefix_len {req.prefix_len} disagree; give one of them")
        if parent is not None:
            space = _parent_space(parent, 4)
            assert space is not None
            _check_child_range(net, parent, space[0], space[1], "cidr")
        if req.gateway is not None:
            addr.parse_gateway(req.gateway, net)
        out.append(_Want(4, net, req.gateway))
    else:
        if req.gateway is not None:
            raise E.make(E.INVALID_REQUEST, "a gateway needs a cidr: give both, or neither for an automatic subnet "
                         "with the first usable address as gateway")
        if parent is not None:
            pool = addr.parse_prefix(parent.cidr)
            plen = req.prefix_len or topology.child_prefix_len(pool.prefixlen, cfg.default_prefix_len,
                                                               addr.MAX_PREFIX[4])
            desc = f"parent {parent.name!r} ({pool})"
        else:
            pool = addr.parse_prefix(cfg.default_subnet)
            plen = req.prefix_len or cfg.default_prefix_len
            desc = f"default_subnet {pool}"
        addr.check_prefix_len(pool, plen)
        out.append(_Want(4, None, None, pool, plen, desc))
    # IPv6: asked for, given, or on by configuration.
    if req.ipv6 is False and (req.cidr_v6 is not None or req.gateway_v6 is not None):
        raise E.make(E.INVALID_REQUEST, "ipv6 is false but cidr_v6/gateway_v6 is given; drop one of them")
    explicit = req.ipv6 is True or req.cidr_v6 is not None or req.prefix_len_v6 is not None
    want6 = explicit or (req.ipv6 is None and cfg.ipv6_enabled)
    if not want6:
        return out
    pspace = _parent_space(parent, 6) if parent is not None else None
    if parent is not None and pspace is None:
        if explicit:
            raise E.make(E.NO_IPV6_POOL, f"parent {parent.name!r} has no IPv6 subnet, and a child's IPv6 subnet "
                         "comes from its parent's; create the child without IPv6 (ipv6: false)", parent=parent.id)
        return out
    if req.cidr_v6 is not None:
        net6 = addr.parse_cidr(req.cidr_v6, field="cidr_v6", family=6)
        if req.prefix_len_v6 is not None and req.prefix_len_v6 != net6.prefixlen:
            raise E.make(E.INVALID_REQUEST, f"cidr_v6 {net6} and prefix_len_v6 {req.prefix_len_v6} disagree; "
                         "give one of them")
        if parent is not None and pspace is not None:
            _check_child_range(net6, parent, pspace[0], pspace[1], "cidr_v6")
        if req.gateway_v6 is not None:
            addr.parse_gateway(req.gateway_v6, net6, field="gateway_v6")
        out.append(_Want(6, net6, req.gateway_v6, field="cidr_v6"))
        return out
    if req.gateway_v6 is not None:
        raise E.make(E.INVALID_REQUEST, "gateway_v6 needs cidr_v6: give both, or neither")
    if parent is not None and pspace is not None:
        pool6 = pspace[0]
        plen6 = req.prefix_len_v6 or topology.child_prefix_len(pool6.prefixlen, cfg.default_prefix_len_v6,
                                                                addr.MAX_PREFIX[6])
        desc6 = f"parent {parent.name!r} ({pool6})"
    elif cfg.default_subnet_v6 is not None:
        pool6 = addr.parse_prefix(cfg.default_subnet_v6)
        plen6 = req.prefix_len_v6 or cfg.default_prefix_len_v6
        desc6 = f"default_subnet_v6 {pool6}"
    else:
        raise E.make(E.NO_IPV6_POOL, "IPv6 is on for this network but no cidr_v6 was given and the service has no "
                     "default_subnet_v6 to carve one from; pass cidr_v6 (e.g. fd00:20:1::/64) or set "
                     "VNET_DEFAULT_SUBNET_V6" + ("" if explicit else ", or create it with ipv6: false"))
    addr.check_prefix_len(pool6, plen6, what="prefix_len_v6")
    out.append(_Want(6, None, None, pool6, plen6, desc6, field="cidr_v6"))
    return out


async def _host_taken(st: NetworkStorePort) -> list[addr.IPNet]:
    prefixes: list[str] = []
    for plist, _ in (await st.host_routes()).values():
        prefixes.extend(plist)
    return addr.host_prefixes(prefixes)


async def _carve(st: NetworkStorePort, w: _Want, scope: str, extra: list[addr.IPNet], skip: int = 0) -> addr.IPNet:
    """Next-fit: from the cursor to the end of the pool, then from its start.

    ``skip`` passes over that many free subnets first (retries after a collision spread
    out instead of all racing for the same one again); if fewer are free, the last free
    one found is taken.
    """
    assert w.pool is not None
    pool, plen, fam = w.pool, w.prefix_len, w.family
    p0, p1 = addr.span(pool)
    size = 1 << ((32 if fam == 4 else 128) - plen)
    extra_spans = [addr.span(n) for n in extra if n.version == pool.version and addr.overlaps(n, pool)]
    cursor = await st.carve_cursor(fam, scope, str(pool))
    starts = [cursor, p0] if cursor is not None and p0 < cursor <= p1 else [p0]
    end_hex = addr.hex_addr(p1, fam)
    last_found: int | None = None
    for lo in starts:
        pos = lo
        while pos <= p1:
            before, window = await st.index_window(fam, scope, addr.hex_addr(pos, fam), end_hex, CARVE_BATCH)
            taken = list(extra_spans)
            for m in ([before] if before else []) + window:
                first, last, _ = addr.parse_index_member(m)
                taken.append((first, last))
            full = len(window) == CARVE_BATCH
            # Every member starting at or before the horizon is in `taken`: candidates that end
            # by then are decided; one that reaches past it overlaps the window's last member.
            horizon = addr.parse_index_member(window[-1])[0] - 1 if full else p1
            while True:
                found = addr.find_free_span(pool, plen, taken, lo=pos, hi=horizon)
                if found is None:
                    break
                if skip == 0:
                    return addr.net_from_span(found, plen, fam)
                skip -= 1
                last_found = found
                pos = found + size
            if not full:
                break
            pos = horizon + 1
    if last_found is not None:
        return addr.net_from_span(last_found, plen, fam)
    used = await st.index_count(fam, scope, addr.hex_addr(p0, fam), end_hex)
    blockers = [n for n in extra if n.version == pool.version and addr.overlaps(n, pool)]
    hosts = f"; host routes/addresses in it: {addr.describe(blockers[:8])}" if blockers and scope == "root" else ""
    what = "prefix_len_v6" if fam == 6 else "prefix_len"
    change = ("delete unused children, give a smaller " + what if scope != "root" else
              f"delete unused networks, set a larger default_subnet{'_v6' if fam == 6 else ''} "
              f"(VNET_DEFAULT_SUBNET{'_V6' if fam == 6 else ''}), ask for a smaller {what}")
    raise E.make(E.SUBNET_POOL_EXHAUSTED,
                 f"{w.pool_desc} has no free /{plen} left: it fits {addr.capacity(pool, plen)} of them and "
                 f"{used} network(s) use it{hosts}. To go on: {change}, or give a {w.field} explicitly",
                 pool=str(pool), prefix_len=plen, networks=int(used))


def _overlap_error(res: CreateResult, wants: dict[int, addr.IPNet], child: bool) -> E.VNetError:
    other = res.conflict
    mine = wants[res.family]
    if other is None:  # the index names a network whose record is gone (cannot happen under the script)
        return E.make(E.SUBNET_OVERLAP, f"{mine} overlaps an existing network ({res.conflict_member})")
    theirs = other.cidr if res.family == 4 else (other.cidr_v6 or "?")
    kind = "sibling network" if child else "network"
    hint = "pick another part of the parent" if child else _overlap_hint(mine, theirs, other.name)
    return E.make(E.SUBNET_OVERLAP, f"{mine} overlaps {kind} {other.name!r} (id {other.id}, {theirs}); {hint}",
                  cidr=str(mine), conflict_id=other.id, conflict_name=other.name, conflict_cidr=theirs)


def _overlap_hint(mine: addr.IPNet, theirs: str, other: str) -> str:
    """What to do about a top-level overlap; nesting is suggested only in the direction that
    works: a smaller new network can be a child of the existing one, never its parent."""
    free = "pick a free range (or omit the cidr to get one)"
    try:
        existing = ipaddress.ip_network(theirs)
    except ValueError:
        return free
    if existing.version != mine.version or mine == existing:
        return f"{free}; {theirs} is {other!r}'s"
    if mine.subnet_of(existing):  # type: ignore[arg-type]  # same family, checked above
        return f"{free}, or create it as a child with parent {other!r} (`--parent {other}`)"
    return (f"{free}; it would contain {other!r} ({theirs}), and an existing network cannot become a child: to "
            f"nest it, create this network first and {other!r} again with this one as its parent")


async def _precheck_overlap(st: NetworkStorePort, scope: str, net: addr.IPNet, parent: VirtualNetwork | None) -> None:
    """Cheap early refusal before any pool exists (the script decides for real)."""
    fam = addr.family_of(net)
    first, last = addr.index_bounds(net)
    member = await st.predecessor(fam, scope, last)
    if member is None:
        return
    _, mlast, mid = addr.parse_index_member(member)
    if mlast >= int(first, 16):
        other = await st.get(mid)
        raise _overlap_error(CreateResult("overlap", family=fam, conflict=other, conflict_member=member),
                             {fam: net}, parent is not None)
