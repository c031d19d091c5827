"""The node registry: registrations and heartbeats on ``vnet.node.<node>.register``, deregistration,
expiry, ``node.list``, and picking and checking the node an endpoint goes to.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time

import msgspec
from nats.aio.msg import Msg

from vnet.contracts import codec, subjects
from vnet.contracts import headers as H
from vnet.contracts.endpoint import (
    NetnsCheck,
    NetnsCheckReply,
    NodeDeregister,
    NodeInfo,
    NodeList,
    NodeListRequest,
    NodeMembership,
    NodeRegister,
    NodeRegistered,
)
from vnet.core import drivers as core_drivers
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork
from vnet.runtime.ports import EndpointStorePort
from vnet.runtime.service import Ctx, Runtime
from vnet.svc.endpoint import lookups
from vnet.svc.endpoint.common import (
    HEARTBEAT_MISSES,
    NODE_CALL_TIMEOUT_S,
    NODE_WATCH_FULL_S,
    NODE_WATCH_S,
    _now,
    _store,
)
from vnet.svc.endpoint.events import _hosts_of, _related, note_dns_node
from vnet.telemetry import tracing

log = logging.getLogger(__name__)


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
    info, was, endpoints = await store.register_node(info, ttl)
    _note_alive(rt, req.node, ttl)
    note_dns_node(rt, req.node, req.dns_domain is not None)  # names reach its resolver from now on
    if was is None:  # (re)joined: the other hosts' overlays get it at once, not at their next resync
        await _membership(rt, "joined", NodeMembership(node=req.node, reason="registered", last_seen=info.last_seen))
    if was is None or was.instance != req.instance:
        log.info("node %s registered (instance %s, drivers available: %s)", req.node, req.instance,
                 ", ".join(sorted(d for d, s in req.drivers.items() if s.available)) or "none")
    return NodeRegistered(node=req.node, ttl_s=ttl, endpoints=endpoints, wg_address=wg_address,
                          resync_s=fleet_resync_s(await _live_nodes(rt, store)))


RESYNC_FETCHES_PER_S = 20.0  # the whole cluster's full resyncs a second the control plane plans for
LIVE_NODES_CACHE_S = 5.0
LIVE_WINDOW_S = 60.0  # a heartbeat within this long: counted (nodes time out after 3 heartbeats, 30 s)


def fleet_resync_s(live_nodes: int, fetches_per_s: float | None = None) -> float:
    """The resync period that keeps ``live_nodes`` nodes' full resyncs at ``fetches_per_s``
    together (0 up to that many nodes: each node's own period, 10 s by default, is longer).
    Felix spaces its dataplane refreshes the same way, at 90 s by default."""
    per_s = RESYNC_FETCHES_PER_S if fetches_per_s is None else fetches_per_s
    return live_nodes / per_s if per_s > 0 else 0.0


async def _live_nodes(rt: Runtime, store: EndpointStorePort) -> int:
    """Nodes seen within their timeout, counted at most every LIVE_NODES_CACHE_S (a heartbeat of
    every node, 100 a second at 1,000 nodes, would otherwise count them every time)."""
    now = time.monotonic()
    cached: tuple[float, int] | None = rt.state.get("live_nodes")
    if cached is not None and now - cached[0] < LIVE_NODES_CACHE_S:
        return cached[1]
    n = await store.count_seen_nodes(time.time() - LIVE_WINDOW_S)
    rt.state["live_nodes"] = (now, n)
    return n


async def _membership(rt: Runtime, event: str, body: NodeMembership) -> None:
    """``vnet.evt.node.<event>.<node>``, and a copy to each node sharing an overlay with it
    (``vnet.node.<other>.evt.node.<event>.<node>``, core NATS: their remotes and peers change;
    the others' do not, and a node with no endpoint yet, a first join, concerns nobody);
    replicas publishing the same change are deduplicated by the stream (same message ids),
    their copies are not (a second copy costs its node one more fetch of the same state)."""
    msg_id = f"node.{event}.{body.node}.{body.last_seen}"
    lookups.node_changed(rt)  # this replica at once; the others when the event reaches them
    try:
        await rt.publish_event("node", event, body.node, body, msg_id=msg_id)
        ctx = Ctx(rt, subjects.EVT_NODE_TO_NODE.template, subjects.EVT_NODE_TO_NODE.template, {}, {}, None)
        others = sorted(await _overlay_peers(ctx, body.node))
        res = await asyncio.gather(*(rt.publish_event("node", event, body.node, body, to=subjects.EVT_NODE_TO_NODE,
                                                      node=n) for n in others),
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
    every worker re-fetches its desired state, so their entries leave at once.

    Every ``NODE_WATCH_FULL_S`` the whole registry's expiries are read (integers only); in
    between, every ``NODE_WATCH_S``, only the nodes whose registration was due to expire by
    now are looked at again (usually none). Reading every node's record four times a second
    was 7 % of the service's time at 1,000 nodes (bench_scale)."""
    store = _store(rt)
    first = True
    deadlines: dict[str, float] = rt.state.setdefault("node_deadlines", {})  # node -> expiry (epoch s)
    next_full = 0.0
    while True:
        try:
            now = time.time()
            full = now >= next_full
            if full:
                got = await store.node_ttls()
                next_full = now + NODE_WATCH_FULL_S
            else:
                due = [n for n, d in deadlines.items() if d <= now]
                got = await store.node_ttls(due) if due else {}
            alive = {n for n, (left, _) in got.items() if left is not None}
            if full:
                deadlines.clear()
            for n, (left, _) in got.items():
                if left is None:
                    deadlines.pop(n, None)
                else:
                    deadlines[n] = now + left
            known: set[str] = rt.state.get("alive_nodes", set())  # a deregistration takes its node out
            for n in [] if first else sorted(known & (set(got) - alive)):
                log.info("node %s is silent past its timeout: removing it from the overlays", n)
                await _membership(rt, "left", NodeMembership(node=n, reason="timeout", last_seen=got[n][1]))
            rt.state["alive_nodes"] = alive if full else (known | alive) - (set(got) - alive)
            first = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("node watch: %s", exc)
        await asyncio.sleep(NODE_WATCH_S)


def _note_alive(rt: Runtime, node: str, ttl_s: float) -> None:
    """A heartbeat this instance stored: the watch looks at ``node`` again when it is due."""
    rt.state.setdefault("node_deadlines", {})[node] = time.time() + ttl_s
    rt.state.setdefault("alive_nodes", set()).add(node)


async def node_list(ctx: Ctx, req: NodeListRequest) -> NodeList:
    """The registered node workers: capabilities, last heartbeat, endpoint counts."""
    # Paged in node id order (the store still reads every node; the reply stays bounded).
    nodes = sorted(await _store(ctx).nodes(include_gone=req.include_gone), key=lambda n: n.node)
    start = bisect.bisect_right([n.node for n in nodes], req.cursor) if req.cursor else 0
    page = nodes[start:start + req.limit]
    more = start + req.limit < len(nodes)
    return NodeList(nodes=page, next_cursor=page[-1].node if more and page else None)


async def _pick_node(ctx: Ctx, wanted: str | None) -> NodeInfo:
    store = _store(ctx)
    if wanted is not None:
        info = await lookups.live_node(ctx, wanted)
        if info is None:
            gone = await store.node(wanted, include_gone=True)
            when = f"; its last heartbeat was {time.time() - gone.last_seen:.0f}s ago" if gone else ""
            raise E.make(E.NODE_NOT_FOUND, f"node {wanted!r} is not registered{when}; is its node worker "
                         "(vnet-node) running? `vnetctl endpoint nodes` lists the registered nodes", node=wanted)
        return info
    nodes = await lookups.live_nodes(ctx)
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
        raise netns_not_found(netns, node, rep.reason or rep.path, rep.path)


def netns_not_found(netns: str, node: str, why: str, path: str) -> E.VNetError:
    return E.make(E.NETNS_NOT_FOUND, f"the container's network namespace {netns!r} does not exist on node {node} "
                  f"({why}); create the container first (`vnetctl container create`), or pass its namespace "
                  "(netns)", netns=netns, node=node, path=path)
