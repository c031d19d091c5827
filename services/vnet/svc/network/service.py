"""Network lifecycle and topology.

Operations (subjects in ``contracts/subjects.py``, types in ``contracts/network.py``):
create, get, list, update, delete; connect / disconnect; mesh create / add / remove /
delete / get / list; host-route reports from the node workers.

Decisions worth knowing (details in ``docs/networks.md``):

* **Defaults** — a request without ``driver`` / ``isolation`` gets *this service's*
  ``default_driver`` / ``default_isolation``: the service's configuration is the
  cluster's policy, the client's is not consulted.
* **Atomicity** — name uniqueness, ``max_networks``, the overlap check and the record
  write are one Lua script (``adapters/network_store.py``), so two replicas racing on
  overlapping subnets cannot both win; overlap costs one O(log n) index lookup.
* **No partial state** — the IPAM pools are created *before* the commit with the new
  network's id; if the commit says no they are deleted again; if its outcome is unknown
  (a store timeout: the script may still run) or this process dies in between, they stay,
  and if the network never lands they belong to a network that does not exist, which the
  IPAM garbage collector removes after its grace period. Delete commits first and deletes the
  pools after, for the same reason.
* **Carving** is next-fit from a cursor (like serial address allocation): a deleted
  network's subnet is not handed out again while other space is free. It skips existing
  networks and the prefixes node workers report from their hosts; a concurrent winner
  is seen on the retry.
* **Reachability** — create (a child carved from its parent, or any network), delete,
  update (isolation), connect / disconnect and the mesh operations take
  ``dry_run``: nothing changes and the reply is the record(s) as they would be with
  ``reach``, the paths the change would open and close (:func:`vnet.core.reach.diff` over
  the fabric: networks from this store, endpoints and rules from their services). A real
  call computes the same diff before it commits — best effort: if the endpoint or policy
  service does not answer, the change goes ahead with ``reach: null`` — and puts it in its
  reply and its event.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from vnet.adapters.ipam_store import registry_marker
from vnet.adapters.network_store import CreateResult, NetworkDoc, NetworkStore, new_id
from vnet.adapters.redis import global_key
from vnet.contracts import subjects
from vnet.contracts.endpoint import EndpointList, EndpointPage
from vnet.contracts.ipam import (
    PoolCreate,
    PoolDelete,
    PoolDeleteReply,
    PoolExclude,
    PoolInfo,
    PoolRef,
    PoolsReply,
)
from vnet.contracts.messages import Empty
from vnet.contracts.network import (
    ConnectionEvent,
    ConnectReply,
    HostRoutesInfo,
    HostRoutesReply,
    HostRoutesReport,
    MeshCreate,
    MeshEvent,
    MeshGroup,
    MeshList,
    MeshMember,
    MeshMemberReply,
    MeshRef,
    MeshReply,
    NetworkCreate,
    NetworkDelete,
    NetworkDeleted,
    NetworkEvent,
    NetworkList,
    NetworkPage,
    NetworkPair,
    NetworkRef,
    NetworkReply,
    NetworkUpdate,
    NodeRoutes,
    RouteOverlap,
)
from vnet.contracts.policy import RuleList, RulePage, policy_endpoint, policy_network
from vnet.core import addr, drivers, reach, routes, topology
from vnet.core import errors as E
from vnet.core.model import DriverType, IsolationMode, VirtualNetwork
from vnet.core.policy import AllowRule, Policy, PolicyNetwork
from vnet.runtime.service import Ctx, Runtime, ServiceDef

log = logging.getLogger(__name__)

SERVICE = ServiceDef("network", "Networks: create, inspect, update, delete, topology")

CARVE_BATCH = 128  # index members read per round trip while carving
CARVE_ATTEMPTS = 16  # retries when a concurrent create took the carved subnet
LOCK_TTL_S = 30.0  # per-parent lock while the parent's pool exclusions change
LOCK_WAIT_S = 10.0
ENDPOINT_DELETE_CONCURRENCY = 16
HOSTROUTES_MIN_TTL_S = 30.0

T = TypeVar("T")


@SERVICE.starting
async def _start(rt: Runtime) -> None:
    store = NetworkStore(rt.redis)
    await store.load()
    rt.state["store"] = store
    # Tell IPAM GC this index is maintained even when it is empty (Redis drops empty sets).
    await rt.redis.set(registry_marker(global_key("networks")), b"1")


def _store(ctx: Ctx) -> NetworkStore:
    st: NetworkStore = ctx.rt.state["store"]
    return st


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _event(ctx: Ctx, event: str, ident: str, payload: Any, msg_id: str | None = None) -> None:
    """Publish; the change is already committed, so a failed publish is logged, not raised."""
    try:
        await ctx.publish_event("network", event, ident, payload, msg_id=msg_id)
    except Exception as exc:
        log.error("could not publish network.%s for %s: %s", event, ident, exc)


def _not_found(ref: str) -> E.VNetError:
    return E.make(E.NETWORK_NOT_FOUND, f"no network has id or name {ref!r}; `vnetctl network ls` lists them",
                  network=ref)


async def _must_get(st: NetworkStore, ref: str) -> VirtualNetwork:
    net = await st.get(ref)
    if net is None:
        raise _not_found(ref)
    return net


async def _idempotent(ctx: Ctx, op: str, request_id: str | None, reply_type: type[T],
                      fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` once per ``request_id``: a repeat gets the first reply."""
    if not request_id:
        return await fn()
    st = _store(ctx)
    rid = f"{op}:{request_id}"
    prev = await st.idem_get(rid)
    if prev is not None:
        return msgspec.json.decode(prev, type=reply_type)
    result = await fn()
    await st.idem_put(rid, msgspec.json.encode(result))
    return result


# --- reachability diffs (dry runs, and the diff a real change carries) -------------------

REACH_PAGE = 1000


async def _fabric(ctx: Ctx) -> Policy:
    """The policy engine over the whole fabric as it is now."""
    st = _store(ctx)
    nets: list[VirtualNetwork] = []
    cursor: str | None = None
    while True:
        page, cursor = await st.list_page(labels={}, parent=None, limit=REACH_PAGE, cursor=cursor)
        nets += page
        if cursor is None:
            break
    eps = []
    cursor = None
    while True:
        ep_page = await ctx.request(subjects.ENDPOINT_LIST, EndpointList(limit=REACH_PAGE, cursor=cursor),
                                    EndpointPage)
        eps += ep_page.endpoints
        cursor = ep_page.next_cursor
        if cursor is None:
            break
    rules: list[AllowRule] = []
    cursor = None
    while True:
        rule_page = await ctx.request(subjects.POLICY_RULE_LIST, RuleList(cursor=cursor), RulePage)
        rules += rule_page.rules
        cursor = rule_page.next_cursor
        if cursor is None:
            break
    return Policy([policy_network(n) for n in nets], [policy_endpoint(e) for e in eps], rules)


async def _reach(ctx: Ctx, changed: list[VirtualNetwork], *, must: bool) -> reach.ReachDiff | None:
    """What replacing these networks' records with ``changed`` opens and closes. ``must``
    (a dry run): a failure is the caller's error; otherwise the change goes on without it."""
    try:
        before = await _fabric(ctx)
        after = reach.with_networks(before, [PolicyNetwork.from_record(n) for n in changed])
        # CPU work bounded by the endpoints of the touched networks: off the event loop
        return await asyncio.to_thread(reach.diff, before, after)
    except Exception as exc:
        if must:
            raise
        log.warning("no reachability diff for %s: %s", ", ".join(n.id for n in changed), exc)
        return None


def _net_reply(net: VirtualNetwork, *, dry_run: bool = False, diff: reach.ReachDiff | None = None) -> NetworkReply:
    return NetworkReply(**msgspec.structs.asdict(net), dry_run=dry_run, reach=diff)


def _mesh_reply(m: MeshGroup, *, dry_run: bool = False, diff: reach.ReachDiff | None = None) -> MeshReply:
    return MeshReply(name=m.name, members=list(m.members), created_at=m.created_at, dry_run=dry_run, reach=diff)


def _with_mesh(n: VirtualNetwork, mesh: str, member: bool) -> VirtualNetwork:
    rest = [g for g in n.mesh_groups if g != mesh]
    return msgspec.structs.replace(n, mesh_groups=sorted([*rest, mesh]) if member else rest)


def _with_connection(n: VirtualNetwork, other: str, on: bool) -> VirtualNetwork:
    rest = [c for c in n.connected if c != other]
    return msgspec.structs.replace(n, connected=sorted([*rest, other]) if on else rest)


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


async def _host_taken(st: NetworkStore) -> list[addr.IPNet]:
    prefixes: list[str] = []
    for plist, _ in (await st.host_routes()).values():
        prefixes.extend(plist)
    return addr.host_prefixes(prefixes)


async def _carve(st: NetworkStore, w: _Want, scope: str, extra: list[addr.IPNet], skip: int = 0) -> addr.IPNet:
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
    used = await st.r.zlexcount(st.k("netcidx", str(fam), scope), f"[{addr.hex_addr(p0, fam)}",
                                f"({end_hex};")
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


async def _precheck_overlap(st: NetworkStore, scope: str, net: addr.IPNet, parent: VirtualNetwork | None) -> None:
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


async def _with_lock(st: NetworkStore, name: str, what: str) -> str:
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


@SERVICE.op("create", subjects.NETWORK_CREATE, NetworkCreate)
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


async def _would_create(st: NetworkStore, req: NetworkCreate, wants: list[_Want], scope: str,
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


def _name_taken(name: str, holder: str) -> E.VNetError:
    return E.make(E.NAME_TAKEN, f"a network named {name!r} already exists (id {holder}); pick another name or "
                  "delete that network first", name=name, existing_id=holder)


def _limit(limit: int, count: int) -> E.VNetError:
    return E.make(E.LIMIT_REACHED, f"max_networks ({limit}) is reached: {count} networks exist; delete unused "
                  "networks or raise max_networks (VNET_MAX_NETWORKS)", limit=limit, count=count)


async def _create_locked(ctx: Ctx, st: NetworkStore, req: NetworkCreate, wants: list[_Want], scope: str,
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


async def _resync_parent(ctx: Ctx, st: NetworkStore, parent_id: str) -> str | None:
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


# --- read ---------------------------------------------------------------------------------

@SERVICE.op("get", subjects.NETWORK_GET, NetworkRef)
async def get(ctx: Ctx, req: NetworkRef) -> VirtualNetwork:
    return await _must_get(_store(ctx), req.network)


@SERVICE.op("list", subjects.NETWORK_LIST, NetworkList)
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


@SERVICE.op("update", subjects.NETWORK_UPDATE, NetworkUpdate)
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


@SERVICE.op("delete", subjects.NETWORK_DELETE, NetworkDelete)
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


# --- topology: connections ----------------------------------------------------------------

async def _pair(st: NetworkStore, req: NetworkPair) -> tuple[VirtualNetwork, VirtualNetwork]:
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


@SERVICE.op("connect", subjects.NETWORK_CONNECT, NetworkPair)
async def connect(ctx: Ctx, req: NetworkPair) -> ConnectReply:
    if req.dry_run:
        return await _connect(ctx, req, True)
    return await _idempotent(ctx, "connect", req.request_id, ConnectReply, lambda: _connect(ctx, req, True))


@SERVICE.op("disconnect", subjects.NETWORK_DISCONNECT, NetworkPair)
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


@SERVICE.op("mesh.create", subjects.NETWORK_MESH_CREATE, MeshCreate)
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


@SERVICE.op("mesh.add", subjects.NETWORK_MESH_ADD, MeshMember)
async def mesh_add(ctx: Ctx, req: MeshMember) -> MeshMemberReply:
    if req.dry_run:
        return await _mesh_member(ctx, req, True)
    return await _idempotent(ctx, "mesh.add", req.request_id, MeshMemberReply, lambda: _mesh_member(ctx, req, True))


@SERVICE.op("mesh.remove", subjects.NETWORK_MESH_REMOVE, MeshMember)
async def mesh_remove(ctx: Ctx, req: MeshMember) -> MeshMemberReply:
    if req.dry_run:
        return await _mesh_member(ctx, req, False)
    return await _idempotent(ctx, "mesh.remove", req.request_id, MeshMemberReply,
                             lambda: _mesh_member(ctx, req, False))


@SERVICE.op("mesh.delete", subjects.NETWORK_MESH_DELETE, MeshRef)
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


@SERVICE.op("mesh.get", subjects.NETWORK_MESH_GET, MeshRef)
async def mesh_get(ctx: Ctx, req: MeshRef) -> MeshGroup:
    got = await _store(ctx).meshes([req.mesh])
    if not got:
        raise _mesh_not_found(req.mesh)
    return _mesh_group(got[0])


@SERVICE.op("mesh.list", subjects.NETWORK_MESH_LIST, Empty)
async def mesh_list(ctx: Ctx, req: Empty) -> MeshList:
    return MeshList(meshes=[_mesh_group(m) for m in await _store(ctx).meshes()])


# --- host routes --------------------------------------------------------------------------

@SERVICE.op("hostroutes.report", subjects.NETWORK_HOSTROUTES_REPORT, HostRoutesReport, max_bytes=1024 * 1024)
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


async def _top_level(st: NetworkStore) -> list[VirtualNetwork]:
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


@SERVICE.op("hostroutes.list", subjects.NETWORK_HOSTROUTES_LIST, Empty)
async def hostroutes_list(ctx: Ctx, req: Empty) -> HostRoutesInfo:
    st = _store(ctx)
    got = await st.host_routes()
    foreign = await st.foreign_routes(sorted(got))
    nets = await _top_level(st) if any(foreign.values()) else []
    out = []
    for n, (p, t) in sorted(got.items()):
        overlaps = [RouteOverlap(node=n, prefix=pre, network=net.id, network_name=net.name, cidr=cidr)
                    for pre, net, cidr in routes.overlapping(foreign.get(n, []), nets)]
        out.append(NodeRoutes(node=n, prefixes=p, expires_in_s=round(t, 1), overlaps=overlaps))
    return HostRoutesInfo(nodes=out)
