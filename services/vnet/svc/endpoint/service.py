"""Endpoints: containers attached to networks, and the registry of node workers.

Operations (subjects in ``contracts/subjects.py``, types in ``contracts/endpoint.py``):
create, get, list, delete; ``desired.get`` (a node's desired state) and ``node.list``.
Node workers register on ``vnet.node.<node>.register`` (request/reply, repeated as a
heartbeat); that subject is served by a plain queue subscription rather than an
operation because clients may not publish on it (ops/nats/nats.conf), and every
operation must be callable by a client.

How a create goes (details in ``docs/endpoints.md``)::

    validate (MAC, interface name, namespace)       no I/O
    network.get                                     404 network_not_found
    node registered? driver available there?        404 node_not_found / 503 driver_unavailable
    node: does the namespace exist?                 404 netns_not_found   (vnet.node.<node>.netns.check)
    IPAM: IPv4 (+ IPv6)  owner = endpoint id        409 address_in_use naming the holder
    netep SADD, commit (one Lua script)             dup -> release and return the first result
    event vnet.evt.endpoint.created.<id>            the node reconciles and reports status

No partial state: anything failing after the allocation releases it; a crash in
between leaves an allocation whose owner is not in the endpoint index, which the
IPAM garbage collector releases after its grace period.

Statuses: the node worker publishes ``vnet.evt.endpoint.status.<node>.<id>`` (ready, failed
with a reason, or deleted); a durable JetStream consumer shared by the replicas folds
them into the records (later versions win). A request with ``wait`` also listens on
that subject itself, so it answers as soon as the node has.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import ipaddress
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable
from typing import Any, cast

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from vnet.contracts import codec, subjects
from vnet.contracts import headers as H
from vnet.contracts.endpoint import (
    DesiredReply,
    DesiredRequest,
    EndpointCreate,
    EndpointDelete,
    EndpointDeleted,
    EndpointDns,
    EndpointEvent,
    EndpointInfo,
    EndpointList,
    EndpointPage,
    EndpointRef,
    EndpointStatusEvent,
    EndpointUpdate,
    EndpointUpdated,
    EndpointUpdatedEvent,
    NetnsCheck,
    NetnsCheckReply,
    NodeDeregister,
    NodeInfo,
    NodeList,
    NodeListRequest,
    NodeMembership,
    NodeRegister,
    NodeRegistered,
    PortMapping,
    RuntimeDetach,
    RuntimeDetached,
    node_desired,
    remote_of,
    to_desired,
)
from vnet.contracts.ipam import AddrRelease, AddrReply, AddrRequest, ReleaseReply
from vnet.contracts.network import MeshGroup, MeshRef, NetworkList, NetworkPage, NetworkRef
from vnet.contracts.policy import RuleList, RulePage, policy_endpoint, policy_network
from vnet.core import drivers as core_drivers
from vnet.core import errors as E
from vnet.core import naming, reach
from vnet.core.dataplane_model import NetDesired, NodeDesired, PeerHost
from vnet.core.dns import search_domains
from vnet.core.model import DriverType, VirtualNetwork
from vnet.core.policy import Policy
from vnet.runtime.ports import EndpointStorePort as EndpointStore
from vnet.runtime.ports import claim_port, describe_holder
from vnet.runtime.service import Ctx, Runtime, ServiceDef
from vnet.telemetry import tracing

log = logging.getLogger(__name__)

SERVICE = ServiceDef("endpoint", "Endpoints: attach and detach containers; the node registry")

HEARTBEAT_MISSES = 3  # a node is gone after this many missed heartbeats
NODE_WATCH_S = 0.25  # how often expired node registrations are looked for
NODE_CALL_TIMEOUT_S = 2.0
WAIT_POLL_S = 1.0  # a waiting request also re-reads the record this often
# v2: the status subject gained the node id (vnet.evt.endpoint.status.<node>.<id>); a durable
# made for the old filter would keep it, so the new one has a new name.
STATUS_DURABLE = "vnet-endpoint-status-v2"
NETDEL_DURABLE = "vnet-endpoint-netdel"
PORT_REPAIR_S = 300.0  # how often the host-port claims are checked against the records (GC)
UPDATE_RETRIES = 20  # optimistic retries of an update without expected_revision under contention
HOST_NETNS_DEFAULT = "/proc/1/ns/net"

_IFNAME_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _store(ctx: Ctx | Runtime) -> EndpointStore:
    rt = ctx.rt if isinstance(ctx, Ctx) else ctx
    st: EndpointStore = rt.state["store"]
    return st


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso_us(us: int) -> str:
    t = dt.datetime.fromtimestamp(us / 1e6, dt.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- start / stop ---------------------------------------------------------------------------

@SERVICE.starting
async def _start(rt: Runtime) -> None:
    store = rt.adapters.endpoint_store()
    await store.load()
    rt.state["store"] = store
    # Tell IPAM GC this index is maintained even when it is empty (Redis drops empty sets).
    await rt.adapters.mark_index_maintained("endpoints")
    async def on_register(msg: Msg) -> None:
        await _on_register(rt, msg)

    async def on_status(msg: Msg) -> None:
        await _on_status(rt, msg)

    async def on_network_deleted(msg: Msg) -> None:
        await _on_network_deleted(rt, msg)

    async def on_deregister(msg: Msg) -> None:
        await _on_deregister(rt, msg)

    consumers = [
        rt.adapters.event_consumer(STATUS_DURABLE, subjects.EVT_ENDPOINT_STATUS.wildcard(), deliver_all=False),
        rt.adapters.event_consumer(NETDEL_DURABLE, subjects.EVT.wildcard().replace("*.*.*", "network.deleted.*"),
                                   deliver_all=False),
    ]
    rt.state["consumers"] = consumers
    try:
        rt.state["register_sub"] = await rt.nc.subscribe(subjects.NODE_REGISTER.wildcard(),
                                                         queue=f"vnet-{SERVICE.name}", cb=on_register)
        rt.state["deregister_sub"] = await rt.nc.subscribe(subjects.NODE_DEREGISTER.wildcard(),
                                                           queue=f"vnet-{SERVICE.name}", cb=on_deregister)
        await consumers[0].start(on_status)
        await consumers[1].start(on_network_deleted)
        rt.spawn(_watch_nodes(rt), "endpoint-node-watch")
        rt.spawn(_repair_ports_loop(rt), "endpoint-port-repair")
    except BaseException:  # the runtime does not call stop hooks after a failed start
        await _stop(rt)
        raise


@SERVICE.stopping
async def _stop(rt: Runtime) -> None:
    for key in ("register_sub", "deregister_sub"):
        sub: Subscription | None = rt.state.pop(key, None)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe %s: %s", key, exc)
    for c in rt.state.pop("consumers", []):
        await c.stop()


async def _store_check(rt: Runtime) -> tuple[str, str]:
    return "endpoint_store", "ok" if "store" in rt.state else "not started"


SERVICE.health_checks.append(_store_check)


# --- validation (no I/O) ------------------------------------------------------------------------

def _check_mac(mac: str) -> str:
    try:
        return naming.normalize_mac(mac)
    except naming.InvalidName as exc:
        raise E.make(E.INVALID_MAC, f"mac {exc}", mac=mac[:64]) from None


def _check_ifname(name: str) -> str:
    try:
        naming.check_ifname(name)
    except naming.InvalidName as exc:
        raise E.make(E.INVALID_IFNAME, f"{exc} (the kernel's limit is {naming.MAX_IFNAME} bytes)",
                     ifname=name[:64]) from None
    if not _IFNAME_CHARS.match(name):
        raise E.make(E.INVALID_IFNAME, f"interface name {name!r} may only contain letters, digits, '_', '.' and "
                     "'-', and must start with a letter or digit", ifname=name)
    return name


def check_netns(ref: str) -> str:
    """A name under /run/netns, or an absolute path without ``..``."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in ref):  # a NUL would reach open() and fail there (500)
        raise E.make(E.INVALID_NETNS, f"namespace {ref!r} contains a control character (NUL, newline, ...); "
                     "give a name under /run/netns or an absolute path", netns=ref)
    if ref.startswith("/"):
        parts = ref.split("/")
        if ".." in parts or "." in parts or "" in parts[1:]:
            raise E.make(E.INVALID_NETNS, f"namespace path {ref!r} must be a plain absolute path (no '.', '..' or "
                         "'//'), e.g. /proc/1234/ns/net or /run/netns/web-1", netns=ref)
        return ref
    if ref in (".", "..") or "/" in ref or any(c.isspace() for c in ref) or len(ref) > 255:
        raise E.make(E.INVALID_NETNS, f"namespace {ref!r} is neither a name under /run/netns nor an absolute path",
                     netns=ref)
    return ref


def _parse_ip(value: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        if "%" in value:  # an IPv6 zone id: Python accepts it, an endpoint's address has none
            raise ValueError(value)
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise E.make(E.INVALID_REQUEST, f"{what} {value!r} is not an IP address (give one without a prefix, "
                     "e.g. 172.20.1.10)", field=what, value=value) from None


# --- node registry --------------------------------------------------------------------------

def subject_node(subject: str, position: int = 2) -> str:
    """The node id token of a node-scoped subject (``vnet.node.<node>.register``)."""
    parts = subject.split(".")
    return parts[position] if len(parts) > position else ""


async def _on_register(rt: Runtime, msg: Msg) -> None:
    """``vnet.node.<node>.register``: request/reply by hand (see the module docstring).

    The bus lets a node identity publish only on its own subject; a body naming another
    node is refused, so one node cannot register (or re-address) another."""
    tmpl = subjects.NODE_REGISTER.template
    with tracing.process_span(tmpl, msg.subject, msg.headers) as span:
        headers: dict[str, str] = {}
        try:
            req = codec.decode(msg.data, NodeRegister)
            if req.node != subject_node(msg.subject):
                raise E.make(E.INVALID_REQUEST, f"node {req.node!r} must register on its own subject "
                             f"{subjects.NODE_REGISTER.template.replace('{node}', req.node)}, not {msg.subject}",
                             node=req.node)
            body = codec.encode(await register_node(rt, req))
        except E.VNetError as err:
            tracing.mark_error(span, err.code, err.message)
            body = codec.error_body(err)
            headers = {H.ERROR: err.message[:512], H.ERROR_CODE: str(err.status)}
        except Exception as exc:
            log.exception("node registration failed")
            span.record_exception(exc)
            internal = E.make(E.INTERNAL, "internal error in endpoint while registering a node; the logs have details")
            body = codec.error_body(internal)
            headers = {H.ERROR: internal.message, H.ERROR_CODE: str(internal.status)}
        trace_id = tracing.trace_id_hex(span)
        if trace_id:
            headers[H.TRACE_ID] = trace_id
        if msg.reply:
            try:
                await rt.nc.publish(msg.reply, body, headers=headers or None)
            except Exception as exc:
                log.warning("could not answer a node registration: %s", exc)


async def register_node(rt: Runtime, req: NodeRegister) -> NodeRegistered:
    store = _store(rt)
    ttl = req.heartbeat_s * HEARTBEAT_MISSES
    info = NodeInfo(node=req.node, instance=req.instance, underlay=req.underlay, underlay_ifname=req.underlay_ifname,
                    host_netns=req.host_netns,
                    privileged=req.privileged, dataplane=req.dataplane, drivers=dict(req.drivers),
                    capabilities=dict(req.capabilities),
                    kinds=dict(req.kinds), heartbeat_s=req.heartbeat_s, version=req.version,
                    registered_at=_now(), last_seen=time.time(), alive=True, isolation=req.isolation,
                    dns_domain=req.dns_domain, dns_search=list(req.dns_search), dns_options=list(req.dns_options))
    wg_address = None
    if req.wg_public_key is not None:  # its place in the WireGuard mesh of encrypted overlays
        try:
            wg_address = await store.wg_address(req.node, rt.config.node_wg_mesh)
        except RuntimeError as exc:
            raise E.make(E.LIMIT_REACHED, f"{exc}; widen node_wg_mesh", node=req.node) from None
        info = msgspec.structs.replace(info, wg_public_key=req.wg_public_key, wg_address=wg_address,
                                       wg_port=req.wg_port)
    was = await store.node(req.node)
    await store.register_node(info, ttl)
    if was is None:  # (re)joined: the other hosts' overlays get it at once, not at their next resync
        await _membership(rt, "joined", NodeMembership(node=req.node, reason="registered", last_seen=info.last_seen))
    if was is None or was.instance != req.instance:
        log.info("node %s registered (instance %s, drivers available: %s)", req.node, req.instance,
                 ", ".join(sorted(d for d, s in req.drivers.items() if s.available)) or "none")
    return NodeRegistered(node=req.node, ttl_s=ttl, endpoints=await store.count_on(req.node), wg_address=wg_address)


async def _membership(rt: Runtime, event: str, body: NodeMembership) -> None:
    """``vnet.evt.node.<event>.<node>``, and a copy to each node sharing an overlay with it
    (``vnet.evt.to.<other>.node.<event>.<node>``: their remotes and peers change; the others'
    do not, and a node with no endpoint yet, a first join, concerns nobody); replicas
    publishing the same change are deduplicated by the stream (same message ids)."""
    msg_id = f"node.{event}.{body.node}.{body.last_seen}"
    try:
        await rt.publish_event("node", event, body.node, body, msg_id=msg_id)
        ctx = Ctx(rt, subjects.EVT_NODE_TO_NODE.template, subjects.EVT_NODE_TO_NODE.template, {}, {}, None)
        others = sorted(await _overlay_peers(ctx, body.node))
        res = await asyncio.gather(*(rt.publish_event("node", event, body.node, body, msg_id=f"{msg_id}.to.{n}",
                                                      to=subjects.EVT_NODE_TO_NODE, node=n) for n in others),
                                   return_exceptions=True)
        for r in res:
            if isinstance(r, BaseException):
                raise r
    except Exception as exc:  # the workers' next full resync covers it
        log.warning("could not publish node %s %s: %s", body.node, event, exc)


async def _overlay_peers(ctx: Ctx, node: str) -> set[str]:
    """The other nodes holding an endpoint of an overlay (or of a network related to one) that
    ``node`` has an endpoint in."""
    store = _store(ctx)
    nets = {e.network_id for e in await store.get_many(await store.ids_of_node(node))
            if e is not None and core_drivers.get(e.driver).spans_hosts}
    related: set[str] = set()
    for nid in sorted(nets):
        related |= await _related(ctx, nid)
    return await _hosts_of(store, related) - {node} if related else set()


async def _on_deregister(rt: Runtime, msg: Msg) -> None:
    """``vnet.node.<node>.deregister`` (fire and forget): a graceful stop removes the node now."""
    try:
        req = codec.decode(msg.data, NodeDeregister)
    except E.VNetError as err:
        log.info("ignoring a malformed node deregistration: %s", err.message)
        return
    if req.node != subject_node(msg.subject):  # only a node's own identity may take it out
        log.warning("ignoring a deregistration of node %s sent on %s", req.node, msg.subject)
        return
    info = await _store(rt).deregister_node(req.node, req.instance)
    if info is not None:
        log.info("node %s deregistered (instance %s)", req.node, req.instance)
        rt.state.setdefault("alive_nodes", set()).discard(req.node)
        await _membership(rt, "left", NodeMembership(node=req.node, reason="deregistered", last_seen=info.last_seen))


async def _watch_nodes(rt: Runtime) -> None:
    """Notice nodes whose registration expired (silent past their timeout) and announce them:
    every worker re-fetches its desired state, so their entries leave at once."""
    store = _store(rt)
    first = True
    while True:
        try:
            now = await store.liveness()
            alive = {n for n, (up, _) in now.items() if up}
            known: set[str] = rt.state.get("alive_nodes", set())  # a deregistration takes its node out
            for n in [] if first else sorted(known - alive):
                if n in now:
                    log.info("node %s is silent past its timeout: removing it from the overlays", n)
                    await _membership(rt, "left", NodeMembership(node=n, reason="timeout", last_seen=now[n][1]))
            rt.state["alive_nodes"] = alive
            first = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("node watch: %s", exc)
        await asyncio.sleep(NODE_WATCH_S)


@SERVICE.op("node.list", subjects.ENDPOINT_NODE_LIST, NodeListRequest)
async def node_list(ctx: Ctx, req: NodeListRequest) -> NodeList:
    """The registered node workers: capabilities, last heartbeat, endpoint counts."""
    # Paged in node id order (the store still reads every node; the reply stays bounded).
    nodes = sorted(await _store(ctx).nodes(include_gone=req.include_gone), key=lambda n: n.node)
    start = bisect.bisect_right([n.node for n in nodes], req.cursor) if req.cursor else 0
    page = nodes[start:start + req.limit]
    more = start + req.limit < len(nodes)
    return NodeList(nodes=page, next_cursor=page[-1].node if more and page else None)


@SERVICE.op("desired.get", subjects.ENDPOINT_DESIRED, DesiredRequest,
            page_hint="ask for fewer endpoints per page with `limit` and follow `next_cursor`")
async def desired_get(ctx: Ctx, req: DesiredRequest) -> DesiredReply:
    """What a node must realise: its endpoints and their networks (the data plane's types),
    one page of ``req.limit`` endpoints in id order (a page reads only its own records)."""
    store = _store(ctx)
    ids = await store.ids_of_node(req.node)
    start = bisect.bisect_right(ids, req.cursor) if req.cursor else 0
    page_ids = ids[start:start + req.limit]
    more = start + req.limit < len(ids)
    eps = [e for e in await store.get_many(page_ids) if e is not None]
    desired = node_desired(eps)
    next_cursor = page_ids[-1] if more and page_ids else None
    if any(n.driver == DriverType.OVERLAY for n in desired.networks):
        # Each page names the overlays related to its own networks; one that also has an
        # endpoint here on another page is the same record there (merge_desired keeps one).
        routed = await _routed_overlays(ctx, store, desired)
        if routed:
            nets = sorted([*desired.networks, *routed], key=lambda n: n.id)
            desired = NodeDesired(networks=nets, endpoints=desired.endpoints, peers=desired.peers)
        desired = await _with_remotes(store, req.node, desired)
    return DesiredReply(node=req.node, desired=desired, statuses={e.id: e.status for e in eps},
                        reasons={e.id: e.reason for e in eps if e.reason}, next_cursor=next_cursor)


async def _routed_overlays(ctx: Ctx, store: EndpointStore, desired: NodeDesired) -> list[NetDesired]:
    """Overlay networks with no endpoint on this node but related (connected, parent/child,
    a shared mesh group) to an overlay that has one: the distributed gateway routes to them
    on this host, so it needs their bridge, gateway and remote entries too (isolation is the
    ruleset's business: a PeerOnly side gets the bridge but no allowed pair)."""
    here = {n.id for n in desired.networks}
    related: set[str] = set()
    for n in desired.networks:
        if n.driver != DriverType.OVERLAY:
            continue
        try:
            net = await ctx.request(subjects.NETWORK_GET, NetworkRef(network=n.id), VirtualNetwork)
        except E.VNetError as err:  # this resync goes without; the next one tries again
            log.info("desired state: relations of network %s unknown: %s", n.id, err.message)
            continue
        related |= set(net.connected) | set(net.children) | ({net.parent} if net.parent else set())
        for g in net.mesh_groups:
            try:
                related |= set((await ctx.request(subjects.NETWORK_MESH_GET, MeshRef(mesh=g), MeshGroup)).members)
            except E.VNetError as err:
                log.info("desired state: mesh group %s unknown: %s", g, err.message)
    out: list[NetDesired] = []
    for nid in sorted(related - here):
        eps = [e for e in await store.get_many(await store.of_network(nid)) if e is not None]
        if eps:
            if eps[0].driver == DriverType.OVERLAY:
                out.append(to_desired(eps[0])[0])
            continue
        # No endpoint anywhere yet: this host still needs the network's bridge and VXLAN
        # device, so that the create event of its first endpoint (on another host) is a
        # remote of a network the worker already has, applied at once (not at the resync).
        try:
            rel = await ctx.request(subjects.NETWORK_GET, NetworkRef(network=nid), VirtualNetwork)
        except E.VNetError as err:
            log.info("desired state: related network %s unknown: %s", nid, err.message)
            continue
        if rel.driver_type == DriverType.OVERLAY:
            out.append(_net_desired(rel))
    return out


def _net_desired(net: VirtualNetwork) -> NetDesired:
    """A network's data-plane view from its record, the same as :func:`to_desired` makes
    from one of its endpoints (gateway with the subnet's prefix, MTU, VNI, options)."""
    def gw(gateway: str | None, cidr: str | None) -> str | None:
        if not gateway or not cidr:
            return None
        return f"{gateway}/{ipaddress.ip_network(cidr, strict=False).prefixlen}"

    opts = net.options
    vni = opts.get("vni")
    return NetDesired(id=net.id, driver=net.driver_type, gateway4=gw(net.gateway, net.cidr),
                      gateway6=gw(net.gateway_v6, net.cidr_v6), mtu=_mtu(net),
                      vni=int(vni) if vni is not None and vni.isdigit() else None,
                      encrypted=opts.get("encrypted", "false") == "true", parent=opts.get("parent"),
                      mode=opts.get("mode"))


async def _with_remotes(store: EndpointStore, node: str, desired: NodeDesired) -> NodeDesired:
    """Overlay networks: their endpoints on other hosts, and those hosts' underlay addresses
    (and WireGuard public keys and mesh addresses). Hosts that are gone (deregistered, or
    silent past 3 heartbeats) are left out, so their entries leave every other host."""
    nets = []
    infos: dict[str, NodeInfo | None] = {}
    for n in desired.networks:
        if n.driver != DriverType.OVERLAY:
            nets.append(n)
            continue
        others = [e for e in await store.get_many(await store.of_network(n.id)) if e is not None and e.node != node]
        for h in {e.node for e in others} - infos.keys():
            info = await store.node(h)
            infos[h] = info if info is not None and info.underlay else None
        nets.append(msgspec.structs.replace(n, remotes=tuple(remote_of(e) for e in others if infos[e.node])))
    peers = [PeerHost(name=h, address=info.underlay, wg_public_key=info.wg_public_key,
                      wg_address=info.wg_address.split("/")[0] if info.wg_address else None, wg_port=info.wg_port)
             for h, info in sorted(infos.items()) if info is not None and info.underlay]
    return NodeDesired(networks=nets, endpoints=desired.endpoints, peers=peers)


# --- node-addressed event copies (docs/scale.md) -----------------------------------------------

async def _related(ctx: Ctx, network_id: str, net: VirtualNetwork | None = None) -> set[str]:
    """The network and those related to it (connected, parent/children, a shared mesh group):
    the hosts of either route to the other (:func:`_routed_overlays`)."""
    if net is None:
        try:
            net = await ctx.request(subjects.NETWORK_GET, NetworkRef(network=network_id), VirtualNetwork)
        except E.VNetError as err:  # gone (its endpoints being removed): its own hosts still hear
            log.debug("event addressing: network %s unknown: %s", network_id, err.message)
            return {network_id}
    out = {network_id, *net.connected, *net.children, *({net.parent} if net.parent else set())}
    for g in net.mesh_groups:
        try:
            out |= set((await ctx.request(subjects.NETWORK_MESH_GET, MeshRef(mesh=g), MeshGroup)).members)
        except E.VNetError as err:
            log.debug("event addressing: mesh group %s unknown: %s", g, err.message)
    return out


async def _hosts_of(store: EndpointStore, network_ids: set[str]) -> set[str]:
    """The nodes holding an endpoint of any of these networks."""
    ids = [i for nid in sorted(network_ids) for i in await store.of_network(nid)]
    return {e.node for e in await store.get_many(ids) if e is not None}


async def event_nodes(ctx: Ctx, event: str, info: EndpointInfo, net: VirtualNetwork | None = None) -> set[str]:
    """The nodes that must act on an event of endpoint ``info``: its own node and, for a
    network spanning hosts (overlay), every node with an endpoint of it or of a related
    network (their remotes and peers). ``updated`` (labels, published ports) concerns the
    endpoint's node only: on the others it changes nothing but rule sets, which a node whose
    rules select endpoints takes from every endpoint event (its ``-all`` consumer)."""
    nodes = {info.node}
    if event != "updated" and core_drivers.get(info.driver).spans_hosts:
        nodes |= await _hosts_of(_store(ctx), await _related(ctx, info.network_id, net))
    return nodes


async def _publish_endpoint_event(ctx: Ctx, event: str, info: EndpointInfo, payload: Any, *, msg_id: str,
                                  net: VirtualNetwork | None = None) -> None:
    """The event on ``vnet.evt.endpoint.<event>.<id>`` (every service and watcher) and a copy
    addressed to each node that must act on it (``vnet.evt.to.<node>.endpoint.<event>.<id>``,
    :func:`event_nodes`): a node worker consumes only its own, so what it receives grows with
    what changes on it, not with the cluster. Published together; the first failure raises
    (the node's next full resync covers a copy that did not land)."""
    nodes = sorted(await event_nodes(ctx, event, info, net))
    res = await asyncio.gather(
        ctx.publish_event("endpoint", event, info.id, payload, msg_id=msg_id),
        *(ctx.publish_event("endpoint", event, info.id, payload, msg_id=f"{msg_id}.to.{n}",
                            to=subjects.EVT_ENDPOINT_TO_NODE, node=n) for n in nodes),
        return_exceptions=True)
    for r in res:
        if isinstance(r, BaseException):
            raise r


async def _pick_node(ctx: Ctx, wanted: str | None) -> NodeInfo:
    store = _store(ctx)
    if wanted is not None:
        info = await store.node(wanted)
        if info is None:
            gone = await store.node(wanted, include_gone=True)
            when = f"; its last heartbeat was {time.time() - gone.last_seen:.0f}s ago" if gone else ""
            raise E.make(E.NODE_NOT_FOUND, f"node {wanted!r} is not registered{when}; is its node worker "
                         "(vnet-node) running? `vnetctl endpoint nodes` lists the registered nodes", node=wanted)
        return info
    nodes = await store.nodes(counts=False)
    if len(nodes) == 1:
        return nodes[0]
    own = ctx.rt.config.node_id
    if own is not None and any(n.node == own for n in nodes):
        return next(n for n in nodes if n.node == own)
    if not nodes:
        raise E.make(E.NODE_NOT_FOUND, "no node worker is registered, so there is no host to attach the container "
                     "on; start one (`vnet-node`, or `vnetctl up` for a local stack)")
    names = ", ".join(n.node for n in nodes[:10])
    raise E.make(E.INVALID_REQUEST, f"{len(nodes)} nodes are registered ({names}); say which one runs the container "
                 "(node)", nodes=[n.node for n in nodes[:100]])


def _check_driver(node: NodeInfo, net: VirtualNetwork) -> None:
    driver = net.driver_type.value
    sup = node.drivers.get(driver)
    if sup is not None and sup.available:
        return
    reason = sup.reason if sup is not None else "the node did not report this driver"
    raise E.make(E.DRIVER_UNAVAILABLE, f"network {net.name!r} uses the {driver} driver, which is unavailable on node "
                 f"{node.node}: {reason}", node=node.node, driver=driver, reason=reason)


async def _check_netns_on_node(ctx: Ctx, node: str, netns: str) -> None:
    """Refuse a namespace the node does not have. A registered node that does not answer
    right now (restarting) is not asked: the endpoint is recorded and the node realises
    it, or reports it failed, when it is back — its records are its desired state."""
    try:
        rep = await ctx.request(subjects.NODE_NETNS_CHECK, NetnsCheck(netns=netns), NetnsCheckReply,
                                params={"node": node}, timeout=NODE_CALL_TIMEOUT_S)
    except E.VNetError as err:
        if err.status in (503, 504):
            log.info("node %s did not answer the namespace check (%s); recording the endpoint anyway", node,
                     err.message)
            return
        raise
    if not rep.exists:
        raise E.make(E.NETNS_NOT_FOUND, f"the container's network namespace {netns!r} does not exist on node {node} "
                     f"({rep.reason or rep.path}); create the container first (`vnetctl container create`), or "
                     "pass its namespace (netns)", netns=netns, node=node, path=rep.path)


# --- create ---------------------------------------------------------------------------------------

def status_event(msg: Msg) -> EndpointStatusEvent | None:
    """The status report in ``msg`` if it may be believed, else None (logged).

    ``vnet.evt.endpoint.status.<node>.<id>``: the bus lets only node ``<node>`` publish there
    (vnet.contracts.permissions), so the body must name that node and that endpoint; the
    store then folds it in only if the endpoint lives on that node and the version is newer.
    """
    try:
        ev = msgspec.json.decode(msg.data, type=EndpointStatusEvent)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("ignoring a malformed status event on %s: %s", msg.subject, exc)
        return None
    parts = msg.subject.split(".")
    if len(parts) != 6 or parts[4] != ev.node or parts[5] != ev.endpoint_id:
        log.warning("ignoring a status event for endpoint %s from node %s sent on %s", ev.endpoint_id, ev.node,
                    msg.subject)
        return None
    return ev


class _StatusWaiter:
    """Listens on ``vnet.evt.endpoint.status.<node>.<id>`` of the endpoint's own node (core
    NATS sees JetStream publishes too)."""

    def __init__(self, rt: Runtime, ident: str, wanted: frozenset[str]) -> None:
        self.rt = rt
        self.ident = ident
        self.wanted = wanted
        self.got: asyncio.Future[EndpointStatusEvent] = asyncio.get_running_loop().create_future()
        self.sub: Subscription | None = None
        self.node: str | None = None

    async def start(self) -> None:
        info = await _store(self.rt).get(self.ident)
        if info is None:  # nothing to wait for: the caller's poll of the record sees that
            return
        self.node = info.node
        self.sub = await self.rt.nc.subscribe(subjects.EVT_ENDPOINT_STATUS.format(node=info.node, id=self.ident),
                                              cb=self._cb)

    async def _cb(self, msg: Msg) -> None:
        ev = status_event(msg)
        if ev is None or ev.node != self.node:
            return
        if ev.status in self.wanted and not self.got.done():
            self.got.set_result(ev)

    async def close(self) -> None:
        if self.sub is not None:
            try:
                await self.sub.unsubscribe()
            except Exception:
                pass
            self.sub = None


async def _wait_status(ctx: Ctx, info: EndpointInfo | None, waiter: _StatusWaiter,
                       timeout: float) -> EndpointInfo | None:
    """Until the node reported ready/failed (folded into the record) or ``timeout``; the record
    (``info`` is the record as last read; it is read again every ``WAIT_POLL_S``)."""
    store = _store(ctx)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if info is None or info.status != "pending":
            return info
        left = deadline - loop.time()
        if left <= 0:
            return info
        try:
            ev = await asyncio.wait_for(asyncio.shield(waiter.got), min(left, WAIT_POLL_S))
        except TimeoutError:
            info = await store.get(info.id)
            continue
        if await _apply_status(store, ev) == "ok":
            at = _iso_us(ev.version) if ev.version else _now()
            return msgspec.structs.replace(info, status=ev.status, reason=ev.reason,
                                           status_code=ev.code, status_at=at)
        return await store.get(info.id)


async def _apply_status(store: EndpointStore, ev: EndpointStatusEvent) -> str:
    if ev.status == "deleted":
        return "ignored"
    return await store.set_status(ev.endpoint_id, ev.node, ev.status, ev.reason, ev.code, ev.version,
                                  _iso_us(ev.version) if ev.version else _now())


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
    if req.netns is not None and info.driver != DriverType.HOST:
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
                asked = (await ctx.request(subjects.NETWORK_GET, NetworkRef(network=req.network_id),
                                           VirtualNetwork)).id
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
            waiter = _StatusWaiter(ctx.rt, ident, frozenset({"ready", "failed"}))
            await waiter.start()
            try:
                info = await _wait_status(ctx, await store.get(ident), waiter, req.wait_timeout_s)
            finally:
                await waiter.close()
    if info is None:
        raise E.make(E.ENDPOINT_GONE, f"{how} already created endpoint {ident}, which has since been deleted; use a "
                     "new request_id to attach again", endpoint=ident)
    return info


# Without an mtu option: a bridge's interfaces get 1500; an overlay's leave room for the VXLAN
# header (50 bytes) on a 1500-byte underlay, and for WireGuard's too (80) when encrypted.
DEFAULT_MTU = 1500
OVERLAY_MTU = 1450
ENCRYPTED_OVERLAY_MTU = 1370


def _mtu(net: VirtualNetwork) -> int:
    default = DEFAULT_MTU
    if net.driver_type == DriverType.OVERLAY:
        default = ENCRYPTED_OVERLAY_MTU if net.options.get("encrypted") == "true" else OVERLAY_MTU
    try:
        return int(net.options.get("mtu", default))
    except ValueError:
        return default


async def _allocate(ctx: Ctx, net: VirtualNetwork, ident: str, family: int, address: str | None) -> AddrReply:
    store = _store(ctx)
    try:
        return await ctx.request(subjects.IPAM_ADDR_REQUEST,
                                 AddrRequest(network_id=net.id, owner=ident, family=family, address=address),
                                 AddrReply)
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


async def _release(ctx: Ctx, network_id: str, ident: str) -> tuple[list[str], str | None]:
    """Release what ``ident`` holds; a failure is a warning (IPAM GC collects it later)."""
    try:
        rep = await ctx.request(subjects.IPAM_ADDR_RELEASE, AddrRelease(network_id=network_id, owner=ident),
                                ReleaseReply)
        return rep.released, None
    except E.VNetError as err:
        log.warning("could not release the addresses of endpoint %s: %s", ident, err)
        return [], (f"the addresses of {ident} were not released ({err.message}); the IPAM garbage collector "
                    "releases them after its grace period")


@SERVICE.op("create", subjects.ENDPOINT_CREATE, EndpointCreate)
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

    if req.request_id:
        prev = await store.id_for_request(req.request_id)
        if prev is not None:
            return await _existing(ctx, prev, req, f"request_id {req.request_id!r}")
    net = await ctx.request(subjects.NETWORK_GET, NetworkRef(network=req.network_id), VirtualNetwork)
    prev = await store.id_for_container(req.container_id, net.id)
    if prev is not None:
        return await _existing(ctx, prev, req, f"container {req.container_id!r} in network {net.name!r}")
    node = await _pick_node(ctx, req.node)
    _check_driver(node, net)
    host = net.driver_type == DriverType.HOST
    if host:
        netns = node.host_netns or HOST_NETNS_DEFAULT
        if ip4 or ip6 or mac or ifname or req.ports:
            raise E.make(E.INVALID_REQUEST, f"network {net.name!r} uses the host driver: the container shares the "
                         "host's namespace, so ip, ipv6, mac, ifname and ports do not apply")
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

    ident = uuid.uuid4().hex[:16]
    info = EndpointInfo(id=ident, container_id=req.container_id, network_id=net.id, ip_address="",
                        mac_address="" if host else (mac or naming.local_mac(os.urandom(6))),
                        interface_name="" if host else (ifname or ""), created_at=_now(), node=node.node,
                        netns=netns, labels=dict(req.labels), driver=net.driver_type, mtu=_mtu(net),
                        network_options=dict(net.options), request_id=req.request_id, ports=list(req.ports),
                        aliases=sorted({a.lower() for a in req.aliases}))
    allocated = False
    try:
        if not host:
            # The namespace check and the allocations run together (each is a round trip);
            # if any fails, whatever was allocated is released below.
            allocated = True
            jobs: list[Awaitable[Any]] = [_check_netns_on_node(ctx, node.node, netns),
                                          _allocate(ctx, net, ident, 4, ip4)]
            if net.cidr_v6 is not None:
                jobs.append(_allocate(ctx, net, ident, 6, ip6))
            results = await asyncio.gather(*jobs, return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                raise failure
            a4 = cast(AddrReply, results[1])
            info = msgspec.structs.replace(info, ip_address=a4.address, prefix_len=a4.prefix_len, gateway=a4.gateway)
            if net.cidr_v6 is not None:
                a6r = cast(AddrReply, results[2])
                info = msgspec.structs.replace(info, ipv6_address=a6r.address, prefix_len_v6=a6r.prefix_len,
                                               gateway_v6=a6r.gateway)
        info = msgspec.structs.replace(info, dns=_dns_for(node, net, info))
        info = await _commit(ctx, store, info, net, auto_ifname=not host and ifname is None,
                             auto_mac=not host and mac is None, request_id=req.request_id)
    except BaseException as exc:
        if allocated:
            await _release(ctx, net.id, ident)
        if isinstance(exc, _Duplicate):
            return await _existing(ctx, exc.ident, req, exc.how)
        raise

    waiter = None
    if req.wait:
        waiter = _StatusWaiter(ctx.rt, ident, frozenset({"ready", "failed"}))
        await waiter.start()
    try:
        try:
            await _publish_endpoint_event(ctx, "created", info, EndpointEvent(endpoint=info),
                                          msg_id=f"endpoint.created.{ident}", net=net)
        except Exception as exc:  # committed: the node finds it at its next resync
            log.warning("could not publish endpoint.created for %s (the node picks it up at its next resync): %s",
                        ident, exc)
        if waiter is not None:
            got = await _wait_status(ctx, info, waiter, req.wait_timeout_s)
            if got is not None:
                info = got
    finally:
        if waiter is not None:
            await waiter.close()
    return info


def _dns_for(node: NodeInfo, net: VirtualNetwork, info: EndpointInfo) -> EndpointDns | None:
    """The node's resolver on the gateway, when the node runs one and the driver puts the
    gateway on the host (bridge, overlay; macvlan and ipvlan use the LAN's)."""
    if node.dns_domain is None or net.driver_type not in (DriverType.BRIDGE, DriverType.OVERLAY):
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
    fast, early answer only: the claim itself is taken in the commit script (two creates
    racing past this check cannot both record the port; the loser gets ``port_in_use``)."""
    wanted = {(p.protocol, p.host_port) for p in ports}
    for other in await store.of_node(node):
        if other.id == exclude:
            continue
        for p in other.ports:
            if (p.protocol, p.host_port) in wanted:
                raise E.make(E.PORT_IN_USE, f"host port {p.host_port}/{p.protocol} on node {node!r} is already "
                             f"published by {describe_holder(other, other.id)}; pick another host port",
                             host_port=p.host_port, protocol=p.protocol, node=node, holder=other.id)


def _ifname_in_use(ifname: str, container: str, holder: str) -> E.VNetError:
    return E.make(E.IFNAME_IN_USE, f"container {container!r} already has an interface {ifname} (endpoint {holder}); "
                  "pick another name or omit it for the next free ethN", ifname=ifname, container=container,
                  holder=holder)


async def _commit(ctx: Ctx, store: EndpointStore, info: EndpointInfo, net: VirtualNetwork, *, auto_ifname: bool,
                  auto_mac: bool, request_id: str | None) -> EndpointInfo:
    await store.netep_add(net.id, info.id)
    try:
        for _ in range(5):
            res = await store.commit(info, auto_ifname=auto_ifname, request_id=request_id)
            if res.status == "ok":
                return msgspec.structs.replace(info, interface_name=res.value)
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


# --- read ----------------------------------------------------------------------------------------

def _not_found(ident: str) -> E.VNetError:
    return E.make(E.ENDPOINT_NOT_FOUND, f"no endpoint has id {ident!r}; `vnetctl endpoint ls` lists them",
                  endpoint=ident)


@SERVICE.op("get", subjects.ENDPOINT_GET, EndpointRef)
async def get(ctx: Ctx, req: EndpointRef) -> EndpointInfo:
    """One endpoint with its current status."""
    info = await _store(ctx).get(req.endpoint_id)
    if info is None:
        raise _not_found(req.endpoint_id)
    return info


@SERVICE.op("list", subjects.ENDPOINT_LIST, EndpointList)
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
        for e in await store.get_many(chunk):
            if e is None:
                continue
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

async def remove(ctx: Ctx, ident: str, *, wait: bool, timeout: float) -> EndpointDeleted:
    store = _store(ctx)
    info = await store.get(ident)
    if info is None:
        raise _not_found(ident)
    warnings: list[str] = []
    waiter = None
    if wait:
        node = await store.node(info.node)
        if node is None:
            warnings.append(f"node {info.node} is not registered: its interface is removed when its worker comes "
                            "back (full resync)")
        else:
            waiter = _StatusWaiter(ctx.rt, ident, frozenset({"deleted", "failed"}))
            await waiter.start()
    try:
        old = await store.delete(info)
        if old is None:
            raise _not_found(ident)
        await store.netep_remove(old.network_id, ident)
        try:
            await _publish_endpoint_event(ctx, "deleted", old, EndpointEvent(endpoint=old),
                                          msg_id=f"endpoint.deleted.{ident}")
        except Exception as exc:
            log.warning("could not publish endpoint.deleted for %s: %s", ident, exc)
            warnings.append(f"the node was not told ({exc}); its next full resync removes the interface")
        released: list[str] = []
        if old.driver != DriverType.HOST:
            released, warn = await _release(ctx, old.network_id, ident)
            if warn:
                warnings.append(warn)
        confirmed = False
        if waiter is not None:
            try:
                ev = await asyncio.wait_for(asyncio.shield(waiter.got), timeout)
            except TimeoutError:
                warnings.append(f"node {old.node} did not confirm the teardown within {timeout:.0f}s")
            else:
                confirmed = ev.status == "deleted"
                if not confirmed:
                    warnings.append(f"node {old.node} could not tear the interface down: {ev.reason}")
    finally:
        if waiter is not None:
            await waiter.close()
    return EndpointDeleted(endpoint=old, released=released, node_confirmed=confirmed, warnings=warnings)


@SERVICE.op("delete", subjects.ENDPOINT_DELETE, EndpointDelete)
async def delete(ctx: Ctx, req: EndpointDelete) -> EndpointDeleted:
    """Detach: the node tears down, the address is released, the record and indexes go."""
    store = _store(ctx)
    if req.request_id:
        prev = await store.delete_reply(req.request_id)
        if prev is not None:
            return msgspec.json.decode(prev, type=EndpointDeleted)
    rep = await remove(ctx, req.endpoint_id, wait=req.wait and not req.force, timeout=req.wait_timeout_s)
    if req.request_id:
        await store.put_delete_reply(req.request_id, msgspec.json.encode(rep))
    return rep


# --- update (labels, published ports) ------------------------------------------------------------

def _labels_after(info: EndpointInfo, req: EndpointUpdate) -> dict[str, str]:
    labels = dict(info.labels) if req.labels is None else dict(req.labels)
    labels.update(req.set_labels)
    for k in req.remove_labels:
        labels.pop(k, None)
    return labels


def _port_key(p: PortMapping) -> tuple[str, int, int]:
    return p.protocol, p.host_port, p.container_port


def _changes(before: EndpointInfo, after: EndpointInfo) -> list[str]:
    out = []
    if before.labels != after.labels:
        out.append("labels")
    if sorted(map(_port_key, before.ports)) != sorted(map(_port_key, after.ports)):
        out.append("ports")
    return out


async def _fabric(ctx: Ctx, store: EndpointStore) -> Policy:
    """The policy engine over the whole fabric as it is now: networks and rules from their
    services, endpoints from this store (the same inputs the policy service compiles from)."""
    nets: list[VirtualNetwork] = []
    cursor: str | None = None
    while True:
        page = await ctx.request(subjects.NETWORK_LIST, NetworkList(limit=1000, cursor=cursor), NetworkPage)
        nets += page.networks
        cursor = page.next_cursor
        if cursor is None:
            break
    rules = []
    cursor = None
    while True:
        rp = await ctx.request(subjects.POLICY_RULE_LIST, RuleList(cursor=cursor), RulePage)
        rules += rp.rules
        cursor = rp.next_cursor
        if cursor is None:
            break
    ids = await store.ids()
    eps: list[EndpointInfo] = []
    for i in range(0, len(ids), 500):
        eps += [e for e in await store.get_many(ids[i:i + 500]) if e is not None]
    return Policy([policy_network(n) for n in nets], [policy_endpoint(e) for e in eps], rules)


async def _reach(ctx: Ctx, store: EndpointStore, after: EndpointInfo, *, must: bool) -> reach.ReachDiff | None:
    """What replacing the endpoint's record with ``after`` opens and closes (labels select it
    into rules; published ports admit external flows). ``must`` (a dry run): a failure is the
    caller's error; otherwise the change goes on with ``reach: null``."""
    try:
        before = await _fabric(ctx, store)
        would = reach.with_endpoints(before, [policy_endpoint(after)])
        return await asyncio.to_thread(reach.diff, before, would)  # CPU work: off the event loop
    except Exception as exc:
        if must:
            raise
        log.warning("no reachability diff for the update of endpoint %s: %s", after.id, exc)
        return None


def _would_be(info: EndpointInfo, req: EndpointUpdate) -> EndpointInfo:
    ports = list(info.ports) if req.ports is None else list(req.ports)
    return msgspec.structs.replace(info, labels=_labels_after(info, req), ports=ports)


async def _check_update(ctx: Ctx, store: EndpointStore, info: EndpointInfo, req: EndpointUpdate) -> EndpointInfo:
    if req.expected_revision is not None and req.expected_revision != info.revision:
        raise E.make(E.STALE_REVISION, f"endpoint {info.id} is at revision {info.revision}, not "
                     f"{req.expected_revision}; read it again (`vnetctl endpoint show {info.id}`) and retry",
                     endpoint=info.id, revision=info.revision, expected=req.expected_revision)
    after = _would_be(info, req)
    if len(after.labels) > 64:
        raise E.make(E.INVALID_REQUEST, f"an endpoint has at most 64 labels; this update would leave "
                     f"{len(after.labels)}", endpoint=info.id)
    if req.ports:
        if info.driver == DriverType.HOST:
            raise E.make(E.INVALID_REQUEST, f"endpoint {info.id} uses the host driver: the container shares the "
                         "host's namespace, so ports do not apply", endpoint=info.id)
        _check_ports(req.ports)
        await _check_ports_free(store, info.node, req.ports, exclude=info.id)
    return after


@SERVICE.op("update", subjects.ENDPOINT_UPDATE, EndpointUpdate)
async def update(ctx: Ctx, req: EndpointUpdate) -> EndpointUpdated:
    """Change labels and/or published ports of a live endpoint (idempotent by request id)."""
    store = _store(ctx)
    if req.dry_run:  # no idempotency record: a dry run changes nothing, repeating it is free
        info = await store.get(req.endpoint_id)
        if info is None:
            raise _not_found(req.endpoint_id)
        after = await _check_update(ctx, store, info, req)
        changes = _changes(info, after)
        diff = await _reach(ctx, store, after, must=True) if changes else reach.ReachDiff()
        return EndpointUpdated(endpoint=after, changes=changes, dry_run=True, reach=diff)
    if req.request_id:
        prev = await store.update_reply(req.request_id)
        if prev is not None:
            return msgspec.json.decode(prev, type=EndpointUpdated)
    for _ in range(UPDATE_RETRIES):
        info = await store.get(req.endpoint_id)
        if info is None:
            raise _not_found(req.endpoint_id)
        after = await _check_update(ctx, store, info, req)
        changes = _changes(info, after)
        if not changes:
            rep = EndpointUpdated(endpoint=info)
            break
        diff = await _reach(ctx, store, after, must=False)
        res = await store.update(info, after)
        if res.status == "missing":
            raise _not_found(req.endpoint_id)
        if res.status == "port_in_use":
            raise _port_in_use(info.node, res.claim, res.value, await store.get(res.value))
        if res.status == "stale":  # another writer in between: re-read and re-apply (or refuse)
            continue
        if res.status != "ok":
            raise E.make(E.INTERNAL, f"unexpected answer {res.status!r} from the endpoint update script")
        now = msgspec.structs.replace(after, revision=int(res.value))
        try:
            await _publish_endpoint_event(
                ctx, "updated", now, EndpointUpdatedEvent(endpoint=now, previous=info, changes=changes, reach=diff),
                msg_id=f"endpoint.updated.{now.id}.{now.revision}")
        except Exception as exc:  # committed: every node's next full resync applies it
            log.warning("could not publish endpoint.updated for %s (nodes apply it at their next resync): %s",
                        now.id, exc)
        rep = EndpointUpdated(endpoint=now, changes=changes, reach=diff)
        break
    else:
        raise E.make(E.LOCKED, f"endpoint {req.endpoint_id} kept changing under this update "
                     f"({UPDATE_RETRIES} tries); retry", endpoint=req.endpoint_id)
    if req.request_id:
        await store.put_update_reply(req.request_id, msgspec.json.encode(rep))
    return rep


async def _repair_ports_loop(rt: Runtime) -> None:
    """GC of the host-port claims: every node's claims against its records (a claim left by a
    crash, a record from before claims existed). Once at start, then every PORT_REPAIR_S."""
    store = _store(rt)
    while True:
        try:
            for n in await store.nodes(include_gone=True, counts=False):
                dropped, added = await store.repair_port_claims(n.node)
                if dropped or added:
                    log.info("host-port claims of node %s repaired: %d dropped, %d added", n.node, dropped, added)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("host-port claim repair: %s", exc)
        await asyncio.sleep(PORT_REPAIR_S)


# --- a node acting for a container runtime on itself (the CNI plugin) ---------------------------
# The node comes from the subject (vnet.endpoint.runtime.<node>.*), which the bus lets only that
# node publish: a node attaches, detaches and lists containers on itself and nowhere else.

@SERVICE.op("runtime.attach", subjects.ENDPOINT_RUNTIME_ATTACH, EndpointCreate)
async def runtime_attach(ctx: Ctx, req: EndpointCreate) -> EndpointInfo:
    """A runtime's ADD on node ``{node}``: ``create`` with the node fixed to the caller's own."""
    node = ctx.params["node"]
    if req.node is not None and req.node != node:
        raise E.make(E.INVALID_REQUEST, f"node {node} may attach containers only on itself, not on {req.node}",
                     node=req.node)
    info: EndpointInfo = await create(ctx, msgspec.structs.replace(req, node=node))
    return info


async def _runtime_find(ctx: Ctx, node: str, container: str, network: str, ifname: str | None) -> list[EndpointInfo]:
    page: EndpointPage = await list_endpoints(ctx, EndpointList(node=node, container=container, network=network,
                                                                 limit=1000))
    return [e for e in page.endpoints if ifname is None or e.interface_name == ifname]


@SERVICE.op("runtime.detach", subjects.ENDPOINT_RUNTIME_DETACH, RuntimeDetach)
async def runtime_detach(ctx: Ctx, req: RuntimeDetach) -> RuntimeDetached:
    """A runtime's DEL on node ``{node}``: detach the container from the network; nothing there is success."""
    found = await _runtime_find(ctx, ctx.params["node"], req.container_id, req.network_id, req.ifname)
    if not found:
        return RuntimeDetached(found=False)
    try:
        rep = await remove(ctx, found[0].id, wait=req.wait, timeout=req.wait_timeout_s)
    except E.VNetError as err:
        if err.code == E.ENDPOINT_NOT_FOUND.code:  # a concurrent DEL won
            return RuntimeDetached(found=False)
        raise
    return RuntimeDetached(found=True, deleted=rep)


@SERVICE.op("runtime.list", subjects.ENDPOINT_RUNTIME_LIST, EndpointList)
async def runtime_list(ctx: Ctx, req: EndpointList) -> EndpointPage:
    """``list`` limited to the endpoints of node ``{node}``."""
    page: EndpointPage = await list_endpoints(ctx, msgspec.structs.replace(req, node=ctx.params["node"]))
    return page


# --- events ---------------------------------------------------------------------------------------

async def _on_status(rt: Runtime, msg: Msg) -> None:
    ev = status_event(msg)
    if ev is None:
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

