"""``endpoint.create``: checks, the address allocation, the atomic commit (MAC, interface name and
host ports unique) and the wait for the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Awaitable
from typing import Any, NoReturn, cast

import msgspec

from vnet.contracts.endpoint import (
    EndpointCreate,
    EndpointDns,
    EndpointEvent,
    EndpointInfo,
    NodeInfo,
    PortMapping,
)
from vnet.contracts.ipam import AddrReply
from vnet.core import drivers, naming
from vnet.core import errors as E
from vnet.core.dns import search_domains
from vnet.core.model import VirtualNetwork
from vnet.runtime import addresses
from vnet.runtime.ports import EndpointStorePort as EndpointStore
from vnet.runtime.ports import claim_port, describe_holder
from vnet.runtime.service import Ctx
from vnet.svc.endpoint import lookups
from vnet.svc.endpoint.common import (
    HOST_NETNS_DEFAULT,
    _check_ifname,
    _check_mac,
    _mtu,
    _now,
    _parse_ip,
    _store,
    check_netns,
)
from vnet.svc.endpoint.events import _publish_endpoint_event, _StatusWaiter, _wait_status
from vnet.svc.endpoint.nodes import _check_driver, _check_netns_on_node, _pick_node, netns_not_found
from vnet.svc.endpoint.removal import _release, remove

log = logging.getLogger(__name__)


def _repeat_differences(req: EndpointCreate, info: EndpointInfo) -> dict[str, dict[str, Any]]:
    """What a repeated create asks for that the existing endpoint does not have, by field
    (``{"ip": {"existing": ..., "requested": ...}}``). A field the repeat leaves out (None,
    no labels, no ports) means "whatever you pick", so only the fields it names count."""
    diff: dict[str, dict[str, Any]] = {}

    def differs(field: str, existing: Any, requested: Any) -> None:
        if existing != requested:
            diff[field] = {"existing": existing, "requested": requested}

    if req.container_id != info.container_id:  # only a repeated request_id can get here with another one
        differs("container", info.container_id, req.container_id)
    if req.ip is not None:
        a = _parse_ip(req.ip, "ip")
        differs("ip", info.ip_address if a.version == 4 else info.ipv6_address, str(a))
    if req.ipv6 is not None:
        differs("ipv6", info.ipv6_address, str(_parse_ip(req.ipv6, "ipv6")))
    if req.mac is not None:
        differs("mac", naming.normalize_mac(info.mac_address) if info.mac_address else info.mac_address,
                _check_mac(req.mac))
    if req.ifname is not None:
        differs("ifname", info.interface_name, _check_ifname(req.ifname))
    if req.netns is not None and drivers.get(info.driver).container_iface:
        differs("netns", info.netns, check_netns(req.netns))
    if req.node is not None:
        differs("node", info.node, req.node)
    if req.labels:
        differs("labels", dict(info.labels), dict(req.labels))
    if req.aliases:
        differs("aliases", sorted(info.aliases), sorted({a.lower() for a in req.aliases}))
    if req.ports:
        key = (lambda p: (p.protocol, p.host_port, p.container_port))  # noqa: E731
        if sorted(map(key, info.ports)) != sorted(map(key, req.ports)):
            diff["ports"] = {"existing": [msgspec.to_builtins(p) for p in info.ports],
                             "requested": [msgspec.to_builtins(p) for p in req.ports]}
    return diff


async def _existing(ctx: Ctx, ident: str, req: EndpointCreate, how: str) -> EndpointInfo:
    """The first result of a repeated create (waiting for its status if asked); a repeat that
    asks for something else is a conflict naming the fields that differ."""
    store = _store(ctx)
    info = await store.get(ident)
    if info is not None:
        diff = _repeat_differences(req, info)
        if req.network_id != info.network_id:  # a name, or (a repeated request_id) another network
            try:
                asked = (await lookups.network(ctx, req.network_id)).id
            except E.VNetError:
                asked = req.network_id
            if asked != info.network_id:
                diff["network"] = {"existing": info.network_id, "requested": req.network_id}
        if diff:
            said = "; ".join(f"{f} is {v['existing']!r}, asked {v['requested']!r}" for f, v in diff.items())
            raise E.make(E.CONFLICT, f"{how} already created endpoint {ident} with other parameters ({said}); repeat "
                         f"the request as it was, or detach it first (`vnetctl endpoint rm {ident}`) and attach "
                         "again", endpoint=ident, fields=sorted(diff), differences=diff)
        if req.wait:
            waiter = _StatusWaiter(ctx.rt, ident, frozenset({"ready", "failed"}), folds=True)
            await waiter.start()
            try:
                info = await _wait_status(ctx, await store.get(ident), waiter, req.wait_timeout_s)
            finally:
                await waiter.close()
            if info is not None and _netns_missing(info):  # the first of these requests undoes it
                raise _netns_missing_error(info)
    if info is None:
        raise E.make(E.ENDPOINT_GONE, f"{how} already created endpoint {ident}, which has since been deleted; use a "
                     "new request_id to attach again", endpoint=ident)
    return info


async def _allocate(ctx: Ctx, net: VirtualNetwork, ident: str, family: int, address: str | None) -> AddrReply:
    store = _store(ctx)
    try:
        return await addresses.allocate(ctx, net.id, family, ident, address)
    except E.VNetError as err:
        if err.code == E.ADDRESS_IN_USE.code and address is not None:
            holder = str(err.details.get("holder") or "")
            info = await store.get(holder) if holder else None
            who = describe_holder(info, holder) if holder else "another endpoint"
            raise E.make(E.ADDRESS_IN_USE, f"{address} is already in use in network {net.name!r} by {who}; pick "
                         "another address or omit it for the next free one",
                         **{**err.details, "address": address, "holder": holder,
                            "holder_container": info.container_id if info else None}) from None
        if err.status in (503, 504) and err.code not in (E.POOL_EXHAUSTED.code,):
            raise E.make(E.UNAVAILABLE, f"IPAM could not allocate an address ({err.message}); nothing was created, "
                         "retry") from None
        raise


async def create(ctx: Ctx, req: EndpointCreate) -> EndpointInfo:
    """Attach a container to a network on a node (idempotent per (container, network) and request id)."""
    store = _store(ctx)
    # Input first: a bad request costs no I/O and leaves nothing behind.
    mac = _check_mac(req.mac) if req.mac is not None else None
    ifname = _check_ifname(req.ifname) if req.ifname is not None else None
    netns = check_netns(req.netns if req.netns is not None else req.container_id)
    ip4 = ip6 = None
    if req.ip is not None:
        a = _parse_ip(req.ip, "ip")
        if a.version == 4:
            ip4 = str(a)
        else:
            ip6 = str(a)
    if req.ipv6 is not None:
        a6 = _parse_ip(req.ipv6, "ipv6")
        if a6.version != 6:
            raise E.make(E.INVALID_REQUEST, f"ipv6 {req.ipv6!r} is an IPv4 address; give it as ip")
        if ip6 is not None and str(a6) != ip6:
            raise E.make(E.INVALID_REQUEST, "ip is an IPv6 address and ipv6 another one; give one of them")
        ip6 = str(a6)
    _check_ports(req.ports)

    ident = uuid.uuid4().hex[:16]
    if req.request_id:
        # Noted under the request id before anything is allocated for it: if this instance dies
        # mid-create, the attempt that commits (a resend, on another instance) releases it.
        prev = await store.begin_attempt(req.request_id, ident)
        if prev is not None:
            return await _existing(ctx, prev, req, f"request_id {req.request_id!r}")
    # The node is picked while the network is looked up: neither needs the other. Both usually
    # come from this replica's lookups (svc/endpoint/lookups.py); on a miss, Redis reads and a
    # round trip to the network service run side by side.
    picking = asyncio.ensure_future(_pick_node(ctx, req.node))
    try:
        net = await lookups.network(ctx, req.network_id)
    except BaseException:
        picking.cancel()
        await asyncio.gather(picking, return_exceptions=True)
        raise
    try:
        node = await picking
        return await _create(ctx, req, ident, net, node, mac, ifname, netns, ip4, ip6)
    except E.VNetError:
        # Whether this container is already in the network (a repeated attach) is read only
        # when the attach is refused: a repeat is rare, and the commit script answers a repeat
        # that got that far with the first endpoint anyway (``_Duplicate``); a repeat refused
        # before its commit (its own address, MAC or name "in use") is answered here with the
        # first endpoint rather than with that error. (One Redis read less on every attach.)
        try:
            prev = await store.id_for_container(req.container_id, net.id)
        except Exception:  # not known: the error stands
            prev = None
        if prev is None:
            raise
        return await _existing(ctx, prev, req, f"container {req.container_id!r} in network {net.name!r}")


async def _create(ctx: Ctx, req: EndpointCreate, ident: str, net: VirtualNetwork, node: NodeInfo,
                  mac: str | None, ifname: str | None, netns: str, ip4: str | None, ip6: str | None
                  ) -> EndpointInfo:
    store = _store(ctx)
    _check_driver(node, net)
    host = not drivers.get(net.driver_type).container_iface  # the container shares the host's namespace
    if host:
        netns = node.host_netns or HOST_NETNS_DEFAULT
        if ip4 or ip6 or mac or ifname or req.ports:
            raise E.make(E.INVALID_REQUEST, f"network {net.name!r} uses the {net.driver_type.value} driver: the "
                         "container shares the host's namespace, so ip, ipv6, mac, ifname and ports do not apply")
    else:
        if ip6 is not None and net.cidr_v6 is None:
            raise E.make(E.NO_IPV6_POOL, f"ipv6 {ip6} was asked for but network {net.name!r} has no IPv6 subnet",
                         network=net.id)
        if mac is not None:
            holder = await store.mac_holder(net.id, mac)
            if holder is not None:
                raise _mac_in_use(mac, net, holder, await store.get(holder))
        if ifname is not None:
            holder = await store.ifname_holder(req.container_id, ifname)
            if holder is not None:
                raise _ifname_in_use(ifname, req.container_id, holder)
        if req.ports:
            await _check_ports_free(store, node.node, req.ports)

    info = EndpointInfo(id=ident, container_id=req.container_id, network_id=net.id, ip_address="",
                        mac_address="" if host else (mac or naming.local_mac(os.urandom(6))),
                        interface_name="" if host else (ifname or ""), created_at=_now(), node=node.node,
                        netns=netns, labels=dict(req.labels), driver=net.driver_type, mtu=_mtu(net),
                        network_options=dict(net.options), request_id=req.request_id, ports=list(req.ports),
                        aliases=sorted({a.lower() for a in req.aliases}))
    allocated = False
    # A create that waits for its node asks it nothing before: the node's own attempt finds a
    # namespace that is not there, and the create undoes itself (_undo_missing_netns). The
    # question was a round trip through the node on every attach for the rare bad one (1.5-3 ms
    # of CPU per attach over the stack, cpu_attach, 4 Dec); one that does not wait still asks.
    precheck = not host and not req.wait
    try:
        if not host:
            # The namespace check and the allocations run together (each is a round trip);
            # if any fails, whatever was allocated is released below.
            allocated = True
            jobs: list[Awaitable[Any]] = [_check_netns_on_node(ctx, node.node, netns)] if precheck else []
            first = len(jobs)
            jobs.append(_allocate(ctx, net, ident, 4, ip4))
            if net.cidr_v6 is not None:
                jobs.append(_allocate(ctx, net, ident, 6, ip6))
            results = await asyncio.gather(*jobs, return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                raise failure
            a4 = cast(AddrReply, results[first])
            info = msgspec.structs.replace(info, ip_address=a4.address, prefix_len=a4.prefix_len, gateway=a4.gateway,
                                           ip_first_use=a4.first_use)
            if net.cidr_v6 is not None:
                a6r = cast(AddrReply, results[first + 1])
                info = msgspec.structs.replace(info, ipv6_address=a6r.address, prefix_len_v6=a6r.prefix_len,
                                               gateway_v6=a6r.gateway)
        info = msgspec.structs.replace(info, dns=_dns_for(node, net, info))
        info, hosts = await _commit(ctx, store, info, net, auto_ifname=not host and ifname is None,
                                    auto_mac=not host and mac is None, request_id=req.request_id)
    except BaseException as exc:
        cleaned = True
        if allocated:
            _, unreleased = await _release(ctx, net.id, ident)
            cleaned = unreleased is None
        if req.request_id and cleaned:  # else the attempt that commits releases it again
            with contextlib.suppress(Exception):
                await store.attempt_done(req.request_id, ident)
        if isinstance(exc, _Duplicate):
            return await _existing(ctx, exc.ident, req, exc.how)
        raise

    waiter = None
    if req.wait:
        waiter = _StatusWaiter(ctx.rt, ident, frozenset({"ready", "failed"}), folds=True)
        waiter.listen(info.node)  # the record just committed names the node: no read back
    try:
        settling = (asyncio.ensure_future(_settle_attempts(ctx, req.request_id, info, net.id, host))
                    if req.request_id else None)
        try:
            await _publish_endpoint_event(ctx, "created", info, EndpointEvent(endpoint=info),
                                          msg_id=f"endpoint.created.{ident}", net=net, hosts=hosts,
                                          reply=ctx.reply if req.wait else "")
        except Exception as exc:  # committed: the node finds it at its next resync
            log.warning("could not publish endpoint.created for %s (the node picks it up at its next resync): %s",
                        ident, exc)
        if settling is not None:
            await settling
        if waiter is not None:
            got = await _wait_status(ctx, info, waiter, req.wait_timeout_s)
            if got is not None:
                info = got
    finally:
        if waiter is not None:
            await waiter.close()
    if not host and not precheck and _netns_missing(info):
        await _undo_missing_netns(ctx, info, req.request_id)
    return info


def _netns_missing(info: EndpointInfo) -> bool:
    """The node reported that the endpoint's namespace does not exist (its planner's code)."""
    return info.status == "failed" and info.status_code == E.NETNS_NOT_FOUND.code


def _netns_missing_error(info: EndpointInfo) -> E.VNetError:
    path = info.netns if info.netns.startswith("/") else f"/run/netns/{info.netns}"
    return netns_not_found(info.netns, info.node, f"the node found no namespace at {path}", path)


async def _undo_missing_netns(ctx: Ctx, info: EndpointInfo, request_id: str | None) -> NoReturn:
    """The node found no namespace ``info.netns`` and made nothing: the endpoint goes as if
    it had never been asked for (its record and indexes, its address, its request id, and a
    ``deleted`` event after the ``created`` one), and the caller gets the error a check
    before the commit gave: ``netns_not_found``."""
    store = _store(ctx)
    left = ""
    try:
        await remove(ctx, info.id, wait=False, timeout=0)
    except Exception as exc:  # Redis or the bus gone too: the namespace error still comes first
        if not (isinstance(exc, E.VNetError) and exc.code == E.ENDPOINT_NOT_FOUND.code):  # a repeat undid it
            log.warning("could not remove endpoint %s after its node found no namespace %s: %s", info.id,
                        info.netns, exc)
            why = exc.message if isinstance(exc, E.VNetError) else f"{type(exc).__name__}: {exc}"
            left = (f"; endpoint {info.id} is recorded as failed and could not be removed ({why}): "
                    f"remove it with `vnetctl endpoint rm {info.id}`")
    if request_id and not left:
        try:
            await store.forget_request(request_id, info.id)
        except Exception as exc:  # the repeat then answers endpoint_gone: a new request id attaches
            log.warning("could not free request id %s of endpoint %s: %s", request_id, info.id, exc)
    err = _netns_missing_error(info)
    if left:
        err.message += left
    raise err


async def _settle_attempts(ctx: Ctx, request_id: str, info: EndpointInfo, network_id: str, host: bool) -> None:
    """``info`` committed for ``request_id``: release what the request's other attempts hold.
    They can no longer commit (the request id is taken); one whose instance was SIGKILLed
    between its allocation and its commit would otherwise leave its address allocated to an
    endpoint that never exists (a leak until IPAM GC, and a stray id in the network's
    ``netep`` set). A live one releases its own too when its commit finds the request id
    taken; a second release is a no-op. Never raises: the create is done either way."""
    store = _store(ctx)
    try:
        others = await store.settle_attempts(request_id, info.id)
        for other in others:
            if not host:
                await _release(ctx, network_id, other)
            await store.netep_remove(network_id, other)
    except Exception as exc:
        log.warning("could not release the other attempts of request %s (IPAM GC collects them): %s", request_id,
                    exc)
        return
    if others:
        log.info("endpoint %s (request %s): released the addresses of %d earlier attempt(s): %s", info.id,
                 request_id, len(others), ", ".join(others))


def _dns_for(node: NodeInfo, net: VirtualNetwork, info: EndpointInfo) -> EndpointDns | None:
    """The node's resolver on the gateway, when the node runs one and the driver puts the
    gateway on the host (bridge, overlay; macvlan and ipvlan use the LAN's)."""
    if node.dns_domain is None or not drivers.get(net.driver_type).bridged:
        return None
    servers = [g for g in (info.gateway, info.gateway_v6) if g]
    if not servers:
        return None
    search = search_domains(net.name, node.dns_domain, node.dns_search)[:6]  # resolv.conf reads at most 6
    return EndpointDns(nameservers=servers, search=search, options=list(node.dns_options))


class _Duplicate(Exception):
    def __init__(self, ident: str, how: str) -> None:
        super().__init__(ident)
        self.ident = ident
        self.how = how


def _mac_in_use(mac: str, net: VirtualNetwork, holder: str, info: EndpointInfo | None) -> E.VNetError:
    return E.make(E.MAC_IN_USE, f"MAC {mac} is already used in network {net.name!r} by "
                  f"{describe_holder(info, holder)}; pick another or omit it for a random one",
                  mac=mac, network=net.id, holder=holder)


def _check_ports(ports: list[PortMapping]) -> None:
    """Ranges and protocols are checked by the contract; a host port twice in one request is not."""
    seen: set[tuple[str, int]] = set()
    for p in ports:
        k = (p.protocol, p.host_port)
        if k in seen:
            raise E.make(E.INVALID_REQUEST, f"host port {p.host_port}/{p.protocol} is published twice in this request",
                         host_port=p.host_port, protocol=p.protocol)
        seen.add(k)


async def _check_ports_free(store: EndpointStore, node: str, ports: list[PortMapping], exclude: str = "") -> None:
    """A host port (per protocol) maps to one endpoint of a node: 409 naming the holder. A
    fast, early answer only, read from the node's port claims (one read, not every endpoint
    of the node): the claim itself is taken in the commit script (two creates racing past
    this check cannot both record the port; the loser gets ``port_in_use``)."""
    for claim, holder in sorted((await store.port_holders(node, ports)).items()):
        if holder == exclude:
            continue
        raise _port_in_use(node, claim, holder, await store.get(holder))


def _ifname_in_use(ifname: str, container: str, holder: str) -> E.VNetError:
    return E.make(E.IFNAME_IN_USE, f"container {container!r} already has an interface {ifname} (endpoint {holder}); "
                  "pick another name or omit it for the next free ethN", ifname=ifname, container=container,
                  holder=holder)


async def _commit(ctx: Ctx, store: EndpointStore, info: EndpointInfo, net: VirtualNetwork, *, auto_ifname: bool,
                  auto_mac: bool, request_id: str | None) -> tuple[EndpointInfo, set[str] | None]:
    """The record committed, and the nodes holding an endpoint of its network since (read by
    the commit script: the event's addressing needs no read of its own)."""
    try:
        for attempt in range(5):
            # the first try adds the id to the network's netep set in the same round trip
            res = await store.commit(info, auto_ifname=auto_ifname, request_id=request_id, netep_first=attempt == 0)
            if res.status == "ok":
                return msgspec.structs.replace(info, interface_name=res.value), res.hosts
            if res.status == "mac_in_use" and auto_mac:  # a random MAC collided: draw again
                info = msgspec.structs.replace(info, mac_address=naming.local_mac(os.urandom(6)))
                continue
            break
    except BaseException:
        await store.netep_remove(net.id, info.id)
        raise
    await store.netep_remove(net.id, info.id)
    if res.status == "dup_rid":
        raise _Duplicate(res.value, f"request_id {request_id!r}")
    if res.status == "dup_ctr":
        raise _Duplicate(res.value, f"container {info.container_id!r} in network {net.name!r}")
    if res.status == "no_network":
        raise E.make(E.NETWORK_NOT_FOUND, f"network {net.name!r} was deleted while attaching; nothing was created",
                     network=net.id)
    if res.status == "mac_in_use":
        raise _mac_in_use(info.mac_address, net, res.value, await store.get(res.value))
    if res.status == "ifname_in_use":
        raise _ifname_in_use(info.interface_name, info.container_id, res.value)
    if res.status == "port_in_use":
        raise _port_in_use(info.node, res.claim, res.value, await store.get(res.value))
    raise E.make(E.INTERNAL, f"unexpected answer {res.status!r} from the endpoint commit script")


def _port_in_use(node: str, claim: str, holder: str, info: EndpointInfo | None) -> E.VNetError:
    proto, port = claim_port(claim)
    return E.make(E.PORT_IN_USE, f"host port {port}/{proto} on node {node!r} is already published by "
                  f"{describe_holder(info, holder)}; pick another host port", host_port=port, protocol=proto,
                  node=node, holder=holder)
