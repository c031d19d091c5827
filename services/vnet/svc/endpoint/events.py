"""Endpoint events: the node-addressed copies (docs/scale.md) and the statuses node workers report
(folded into the records; a waiting request listens too).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from vnet.contracts import subjects
from vnet.contracts.endpoint import (
    EndpointInfo,
    EndpointStatusEvent,
    status_time,
)
from vnet.contracts.network import MeshGroup, MeshRef, NetworkRef
from vnet.contracts.policy import policy_endpoint
from vnet.core import drivers as core_drivers
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork
from vnet.core.policy_inputs import AllowRule
from vnet.core.ruleset import selects
from vnet.runtime.ports import EndpointStorePort as EndpointStore
from vnet.runtime.ports import PolicyStorePort
from vnet.runtime.service import Ctx, Runtime
from vnet.svc.endpoint import lookups
from vnet.svc.endpoint.common import WAIT_POLL_S, _now, _store

log = logging.getLogger(__name__)


# --- node-addressed event copies (docs/scale.md) -----------------------------------------------


async def _related(ctx: Ctx, network_id: str, net: VirtualNetwork | None = None) -> set[str]:
    """The network and those related to it (connected, parent/children, a shared mesh group):
    the hosts of either route to the other (:func:`_routed_overlays`)."""
    if net is None:
        try:
            net = await lookups.network(ctx, network_id)
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
    """The nodes holding an endpoint of any of these networks (a count per node and network,
    kept with the records: reading every endpoint per event made an attach cost grow with its
    network, 1,000th/10th 1.25x -> 5.4x)."""
    return await store.nodes_of_networks(network_ids)


# How long a replica trusts its list of the nodes that run a resolver (``NodeInfo.dns_domain``):
# read whole at most this often (one MGET), and added to at once when a registration comes here.
DNS_NODES_S = 5.0


async def _dns_nodes(ctx: Ctx) -> set[str]:
    """The nodes that run a resolver (``vnet-node --dns``), registered or gone (a node that comes
    back keeps its place: its resolver must not miss a name while this replica re-reads)."""
    state = ctx.rt.state
    cached: tuple[float, set[str]] | None = state.get("dns_nodes")
    if cached is not None and time.monotonic() - cached[0] < DNS_NODES_S:
        return cached[1]
    # One read at a time: the events in flight when the copy expires wait for the same read
    # (each reading every node itself: endpoint service RSS 59-60 MB instead of 45 at 300 nodes).
    task: asyncio.Task[set[str]] | None = state.get("dns_nodes_read")
    if task is None or task.done():
        task = state["dns_nodes_read"] = asyncio.get_running_loop().create_task(_read_dns_nodes(ctx.rt))
    return set(await asyncio.shield(task))


async def _read_dns_nodes(rt: Runtime) -> set[str]:
    now = time.monotonic()
    noted: set[str] = rt.state.setdefault("dns_noted", set())
    noted.clear()  # registrations handled here while the read is on its way are kept
    got = {n.node for n in await _store(rt).nodes(include_gone=True, counts=False) if n.dns_domain is not None}
    rt.state["dns_nodes"] = (now, got | noted)
    return got | noted


def note_dns_node(rt: Runtime, node: str, dns: bool) -> None:
    """A registration handled by this replica: whether ``node`` runs a resolver, known at once."""
    cached: tuple[float, set[str]] | None = rt.state.get("dns_nodes")
    noted: set[str] = rt.state.setdefault("dns_noted", set())
    for known in (noted, cached[1] if cached is not None else set()):
        (known.add if dns else known.discard)(node)


async def _selected(ctx: Ctx, eps: list[EndpointInfo]) -> bool:
    """Whether an allow rule selects one of ``eps`` as an endpoint (labels, network, endpoint id,
    an address range combined with those): then it is a member of address sets on every node in
    play for its network. Read from the rule hash at the time of the event, not from a copy, so a
    rule committed before the event is always seen: a node that hears of the rule later fetches
    its whole ruleset after the rule's commit, which holds any endpoint committed before it."""
    rules = await _rules(ctx)
    sels = [x for r in rules for x in (*r.from_, *r.to) if not x.only_cidr()]
    if not sels:
        return False
    for e in eps:
        pe = policy_endpoint(e)
        for a in pe.ips:
            ip = ipaddress.ip_address(a)
            if any(selects(x, pe, ip) for x in sels):
                return True
    return False


async def _rules(ctx: Ctx) -> list[AllowRule]:
    st: PolicyStorePort | None = ctx.rt.state.get("rule_store")
    if st is None:
        st = ctx.rt.state["rule_store"] = ctx.rt.adapters.policy_store()
    return await st.rules()


async def _driver_of(ctx: Ctx, network_id: str) -> str | None:
    """A network's driver (it never changes: remembered), None when the network is gone."""
    drivers: dict[str, str] = ctx.rt.state.setdefault("net_drivers", {})
    got = drivers.get(network_id)
    if got is None:
        try:
            net = await ctx.request(subjects.NETWORK_GET, NetworkRef(network=network_id), VirtualNetwork)
        except E.VNetError:
            return None
        if len(drivers) > 65536:  # bounded (networks are at most max_networks; deleted ones stay)
            drivers.clear()
        got = drivers[net.id] = net.driver_type.value
    return got


async def _in_container_tables(ctx: Ctx, info: EndpointInfo, related: set[str]) -> bool:
    """Whether a network in ``related`` (the endpoint's own included) enforces in its containers
    (macvlan): those tables list every endpoint of the networks related to theirs."""
    if core_drivers.get(info.driver).enforced_in_container:
        return True
    for nid in sorted(related - {info.network_id}):
        drv = await _driver_of(ctx, nid)
        if drv is not None and core_drivers.get(drv).enforced_in_container:
            return True
    return False


async def event_nodes(ctx: Ctx, event: str, info: EndpointInfo, net: VirtualNetwork | None = None,
                      previous: EndpointInfo | None = None, hosts: set[str] | None = None) -> set[str]:
    """The nodes that must act on an event of endpoint ``info``: its own node and the nodes
    holding an endpoint of its network or of a related one ("in play" there: a path exists)
    when the event changes something on them —

    * an overlay (created, deleted): their remotes and peers;
    * an endpoint an allow rule selects (before or after an update): a member of their address
      sets; a network that enforces in its containers (macvlan), or is related to one: the
      members of those tables;
    * nodes running a resolver: the names their containers may resolve (DESIGN: a name resolves
      only where a flow is allowed, and never without a path).

    Nothing else reaches another node, so what a node receives grows with what changes in the
    networks it takes part in, not with the cluster (docs/scale.md)."""
    nodes = {info.node}
    related: set[str] | None = None

    async def rel() -> set[str]:
        nonlocal related
        if related is None:
            related = await _related(ctx, info.network_id, net)
        return related

    drv = core_drivers.get(info.driver)
    # The hosts first: where the endpoint's own node is the only one in play (a network on one
    # host, the common case), no other node can need the event, and the rules need not be read
    # and matched (a Redis read and every rule decoded, on each attach). Read at the event's
    # time like the rules, so a node that joins the network after this read fetches its state
    # after this endpoint's commit, which holds it.
    # ``hosts``: the nodes of the endpoint's network as its commit left them, read by the commit
    # script (a create): the same guarantee, since a node that joins after the commit joins
    # after that read too; used when no other network is related, else read for all of them.
    related_now = await rel()
    if hosts is None or related_now != {info.network_id}:
        hosts = await _hosts_of(_store(ctx), related_now)
    if not hosts - nodes:
        return nodes
    every = event != "updated" and drv.spans_hosts
    if not every:
        every = await _selected(ctx, [info] if previous is None else [info, previous])
    if not every and (drv.enforced_in_container or net is None or _has_relations(net)):
        every = await _in_container_tables(ctx, info, await rel())
    if every:
        return nodes | hosts
    return nodes | (hosts & await _dns_nodes(ctx))


def _has_relations(net: VirtualNetwork) -> bool:
    return bool(net.connected or net.children or net.parent or net.mesh_groups)


async def _publish_endpoint_event(ctx: Ctx, event: str, info: EndpointInfo, payload: Any, *, msg_id: str,
                                  net: VirtualNetwork | None = None, hosts: set[str] | None = None,
                                  reply: str = "") -> None:
    """The event on ``vnet.evt.endpoint.<event>.<id>`` (every service and watcher) and a copy
    addressed to each node that must act on it (``vnet.node.<node>.evt.endpoint.<event>.<id>``,
    :func:`event_nodes`, core NATS): a node worker hears only its own, so what it receives grows
    with what changes on it, not with the cluster. The first failure raises (the node's next
    full resync covers a copy that did not land, and a node that was disconnected resyncs when
    it reconnects).

    The endpoint's own node acts on every event of it, so its copy goes out first, before the
    addressing of the others reads the rules and the hosts (two Redis round trips an attach
    that waits for its node would otherwise wait for too); the stream's publish runs beside
    that addressing."""
    previous = getattr(payload, "previous", None)  # an update: the endpoint as it was (its labels)
    await ctx.publish_event("endpoint", event, info.id, payload, to=subjects.EVT_ENDPOINT_TO_NODE, node=info.node,
                            reply=reply)
    stream = asyncio.ensure_future(ctx.publish_event("endpoint", event, info.id, payload, msg_id=msg_id))
    try:
        others = sorted(await event_nodes(ctx, event, info, net, previous, hosts) - {info.node})
    except BaseException:
        await asyncio.gather(stream, return_exceptions=True)
        raise
    res = await asyncio.gather(
        stream,
        *(ctx.publish_event("endpoint", event, info.id, payload, to=subjects.EVT_ENDPOINT_TO_NODE, node=n)
          for n in others),
        return_exceptions=True)
    for r in res:
        if isinstance(r, BaseException):
            raise r


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


HEARD_KEEP = 4096  # the last reports a replica keeps for its reads (StatusBoard.latest)


class StatusBoard:
    """Every status report of every node, heard by this replica on one core subscription
    (``vnet.evt.endpoint.status.>``; core NATS sees JetStream publishes too).

    Each report goes to this replica's requests waiting for one (a create or a delete with
    ``wait``, :class:`_StatusWaiter`): one subscription for them all, not one made and
    dropped per request. The last :data:`HEARD_KEEP` are kept for reads (:func:`heard`): a
    node answers a waiting create itself as soon as its endpoint is ready (docs/endpoints.md,
    "Who answers a create"), before any replica has folded the report into the record. The
    node publishes the report before that answer, so the server hands it to every replica
    before the caller has the answer, let alone asks again: a read that finds the record still
    ``pending`` takes the report heard."""

    def __init__(self) -> None:
        self.waiters: dict[str, list[_StatusWaiter]] = {}
        self.latest: OrderedDict[str, EndpointStatusEvent] = OrderedDict()
        self.sub: Subscription | None = None

    async def start(self, rt: Runtime) -> None:
        self.sub = await rt.nc.subscribe(subjects.EVT_ENDPOINT_STATUS.wildcard(), cb=self._on)

    async def stop(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.debug("status board: unsubscribe: %s", exc)

    async def _on(self, msg: Msg) -> None:
        ev = status_event(msg)
        if ev is None:
            return
        self.latest[ev.endpoint_id] = ev
        self.latest.move_to_end(ev.endpoint_id)
        while len(self.latest) > HEARD_KEEP:
            self.latest.popitem(last=False)
        for w in list(self.waiters.get(ev.endpoint_id, ())):
            w.take(ev)

    def add(self, w: _StatusWaiter) -> None:
        self.waiters.setdefault(w.ident, []).append(w)

    def remove(self, w: _StatusWaiter) -> None:
        ws = self.waiters.get(w.ident)
        if ws is not None and w in ws:
            ws.remove(w)
            if not ws:
                del self.waiters[w.ident]


def board(rt: Runtime) -> StatusBoard:
    b: StatusBoard | None = rt.state.get("board")
    if b is None:
        b = rt.state["board"] = StatusBoard()
    return b


def heard(rt: Runtime, info: EndpointInfo) -> EndpointInfo:
    """``info`` with the report its node published and this replica heard, while the record
    still says ``pending`` (not folded yet: :class:`StatusBoard`)."""
    if info.status != "pending":
        return info
    b: StatusBoard | None = rt.state.get("board")
    ev = b.latest.get(info.id) if b is not None else None
    if ev is None or ev.node != info.node or ev.status not in ("ready", "failed"):
        return info
    return msgspec.structs.replace(info, status=ev.status, reason=ev.reason, status_code=ev.code,
                                   status_at=status_time(ev.version) if ev.version else info.status_at)


class _StatusWaiter:
    """Takes the reports of the endpoint's own node for one endpoint (from this replica's
    :class:`StatusBoard`).

    ``folds``: the waiting request folds the report into the record itself (a create). The
    report it takes is claimed at once (:func:`claim_fold`): the durable consumer gets the same
    report a moment later, and without the claim it folded it a second time while the fold it
    raced was still out, on the event loop the reply waits for."""

    def __init__(self, rt: Runtime, ident: str, wanted: frozenset[str], *, folds: bool = False) -> None:
        self.rt = rt
        self.ident = ident
        self.wanted = wanted
        self.folds = folds
        self.got: asyncio.Future[EndpointStatusEvent] = asyncio.get_running_loop().create_future()
        self.claim: asyncio.Future[bool] | None = None
        self.closed = False
        self.listening = False
        self.node: str | None = None

    async def start(self) -> None:
        info = await _store(self.rt).get(self.ident)
        if info is None:  # nothing to wait for: the caller's poll of the record sees that
            return
        self.listen(info.node)

    def listen(self, node: str) -> None:
        """Take the reports of ``node`` from now on (the board's subscription is already there:
        nothing to wait for before publishing what the node will answer)."""
        self.node = node
        if not self.listening:
            board(self.rt).add(self)
            self.listening = True

    def take(self, ev: EndpointStatusEvent) -> None:
        if ev.node != self.node:
            return
        if ev.status in self.wanted and not self.got.done():
            if self.folds and not self.closed:
                self.claim = claim_fold(self.rt, ev)
            self.got.set_result(ev)

    def folded(self, ok: bool) -> None:
        """The claimed report was folded (``ok``), or not: then the durable consumer folds it."""
        if self.claim is not None and not self.claim.done():
            self.claim.set_result(ok)

    async def close(self) -> None:
        self.closed = True
        self.folded(False)  # a claim never folded (the wait ended first) goes back to the consumer
        if self.listening:
            board(self.rt).remove(self)
            self.listening = False


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
        try:
            res = await _apply_status(store, ev)
        except BaseException:
            waiter.folded(False)
            raise
        waiter.folded(True)  # folded, or answered why not: the durable consumer would get the same answer
        if res == "ok":
            at = status_time(ev.version) if ev.version else _now()
            return msgspec.structs.replace(info, status=ev.status, reason=ev.reason,
                                           status_code=ev.code, status_at=at)
        return await store.get(info.id)


# Reports a waiting create of this replica claimed, (endpoint, version) -> whether it folded
# them: the durable consumer gets the same report a moment later and need not fold it again
# (it would find it stale after a Redis round trip: one script less per attach). Bounded: the
# oldest go first.
FOLDED_KEEP = 4096
CLAIM_WAIT_S = 5.0


def claim_fold(rt: Runtime, ev: EndpointStatusEvent) -> asyncio.Future[bool] | None:
    """Claim ``ev`` for the create that waits for it; the future says whether it was folded."""
    if not ev.version:  # a report without a version cannot be told from the next one
        return None
    folded: OrderedDict[tuple[str, int], asyncio.Future[bool]] = rt.state.setdefault("folded", OrderedDict())
    fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    folded[(ev.endpoint_id, ev.version)] = fut
    while len(folded) > FOLDED_KEEP:
        _, old = folded.popitem(last=False)
        if not old.done():  # its consumer copy, if it comes, is folded (a second fold is stale)
            old.set_result(False)
    return fut


async def folded_here(rt: Runtime, ev: EndpointStatusEvent) -> bool:
    """Whether a create of this replica folded this very report in (waiting for a fold under
    way; then forgotten: it comes once)."""
    folded: OrderedDict[tuple[str, int], asyncio.Future[bool]] | None = rt.state.get("folded")
    if folded is None or not ev.version:
        return False
    fut = folded.pop((ev.endpoint_id, ev.version), None)
    if fut is None:
        return False
    try:  # bounded: a claim is settled when its create's wait ends, this is a safety net
        return await asyncio.wait_for(asyncio.shield(fut), CLAIM_WAIT_S)
    except TimeoutError:
        return False


async def _apply_status(store: EndpointStore, ev: EndpointStatusEvent) -> str:
    if ev.status == "deleted":
        return "ignored"
    return await store.set_status(ev.endpoint_id, ev.node, ev.status, ev.reason, ev.code, ev.version,
                                  status_time(ev.version) if ev.version else _now())
