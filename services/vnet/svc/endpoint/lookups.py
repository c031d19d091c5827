"""What an attach looks up that rarely changes: network records and the registered nodes,
kept by each endpoint service replica and dropped when an event says they changed.

Why: every create asked the network service for the network (a NATS round trip to a
service that reads Redis: 2.5 ms of a ~20 ms attach in ``profile_attach``), and every
delete asked again to address its event; a create without a node read every node's
record (a ZRANGE and an MGET of all of them) to pick the only one. Felix and Typha keep
such records the same way: a cache that events keep current, and a bound on how stale it
may be when an event is lost.

How it stays right:

* every ``vnet.evt.network.>`` event (created, updated, deleted, (dis)connected, mesh
  changes: all rare) empties the network cache, and every ``vnet.evt.node.joined|left``
  event empties the node cache; this replica's own registrations do it at once too;
* a lookup that started before such an event does not store what it read (a generation
  number), so a reader can never put back the record an event has just retired;
* the client's reconnect counter is compared at every lookup: after a reconnect (events
  may have been missed) both caches start empty;
* an entry lives at most ``NETWORK_TTL_S`` / ``NODES_TTL_S`` whatever happens.

Every lookup counts in ``vnet_endpoint_lookups_total{what=network|nodes|node, result=hit|miss}``.

What staleness remains is the time between a change's commit and its event reaching this
replica (well under a millisecond on one bus), the same window that already lay between a
create's network lookup and its commit. The commit itself still refuses an endpoint for a
network deleted meanwhile (``network_not_found``), and the node's desired state and the
reads of ``desired.get`` never use these caches.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Generic, TypeVar

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from vnet.contracts import subjects
from vnet.contracts.endpoint import NodeInfo
from vnet.contracts.network import NetworkRef
from vnet.core.model import VirtualNetwork
from vnet.runtime.service import Ctx, Runtime
from vnet.svc.endpoint.common import _store

log = logging.getLogger(__name__)

NETWORK_TTL_S = 2.0
NODES_TTL_S = 1.0
MAX_ENTRIES = 4096  # more than that (a burst of distinct names): start again rather than grow

V = TypeVar("V")


class TtlCache(Generic[V]):
    """Entries for at most ``ttl_s``; :meth:`clear` retires everything, including what
    lookups already on their way would store (they pass the generation they started in)."""

    def __init__(self, ttl_s: float, clock: Any = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.gen = 0
        self._d: dict[str, tuple[float, V]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> V | None:
        got = self._d.get(key)
        if got is None or self.clock() - got[0] > self.ttl_s:
            self.misses += 1
            return None
        self.hits += 1
        return got[1]

    def put(self, gen: int, value: V, *keys: str) -> None:
        if gen != self.gen:  # an event came while this was read: what was read may be the old record
            return
        if len(self._d) >= MAX_ENTRIES:
            self._d.clear()
        now = self.clock()
        for k in keys:
            self._d[k] = (now, value)

    def clear(self) -> None:
        self.gen += 1
        self._d.clear()


class Lookups:
    """The caches of one replica, and the subscription that keeps them."""

    def __init__(self) -> None:
        self.networks: TtlCache[VirtualNetwork] = TtlCache(NETWORK_TTL_S)
        self.nodes: TtlCache[Any] = TtlCache(NODES_TTL_S)  # "*" -> list[NodeInfo], name -> NodeInfo
        self.subs: list[Subscription] = []
        self.reconnects = 0

    async def start(self, rt: Runtime) -> None:
        self.reconnects = _reconnects(rt)

        async def on_network(msg: Msg) -> None:
            self.networks.clear()

        async def on_node(msg: Msg) -> None:
            self.nodes.clear()

        self.subs = [await rt.nc.subscribe(subjects.EVT_NETWORK.template, cb=on_network),
                     await rt.nc.subscribe(subjects.EVT_NODE_JOINED.wildcard(), cb=on_node),
                     await rt.nc.subscribe(subjects.EVT_NODE_LEFT.wildcard(), cb=on_node)]

    async def stop(self) -> None:
        for s in self.subs:
            try:
                await s.unsubscribe()
            except Exception as exc:  # closed or reconnecting: nothing more arrives anyway
                log.debug("unsubscribe: %s", exc)
        self.subs = []

    def fresh(self, rt: Runtime) -> None:
        """After a reconnect the events of the gap may be lost: forget everything."""
        n = _reconnects(rt)
        if n != self.reconnects:
            self.reconnects = n
            self.networks.clear()
            self.nodes.clear()


def _reconnects(rt: Runtime) -> int:
    stats: Any = getattr(rt.nc, "stats", None)
    return int(stats.get("reconnects", 0)) if isinstance(stats, dict) else 0


def _counted(ctx: Ctx, what: str, hit: bool) -> None:
    ctx.rt.metrics.count("vnet_endpoint_lookups", what=what, result="hit" if hit else "miss")


def _of(rt: Runtime) -> Lookups | None:
    got: Lookups | None = rt.state.get("lookups")
    if got is not None:
        got.fresh(rt)
    return got


async def network(ctx: Ctx, ref: str) -> VirtualNetwork:
    """The network with id or name ``ref`` (``network_not_found`` as the network service says)."""
    lk = _of(ctx.rt)
    if lk is None:
        return await ctx.request(subjects.NETWORK_GET, NetworkRef(network=ref), VirtualNetwork)
    got = lk.networks.get(ref)
    _counted(ctx, "network", got is not None)
    if got is not None:
        return got
    gen = lk.networks.gen
    net = await ctx.request(subjects.NETWORK_GET, NetworkRef(network=ref), VirtualNetwork)
    lk.networks.put(gen, net, ref, net.id)
    return net


async def live_nodes(ctx: Ctx) -> list[NodeInfo]:
    """The registered (alive) nodes, without their endpoint counts."""
    lk = _of(ctx.rt)
    if lk is None:
        return await _store(ctx).nodes(counts=False)
    got: list[NodeInfo] | None = lk.nodes.get("*")
    _counted(ctx, "nodes", got is not None)
    if got is not None:
        return got
    gen = lk.nodes.gen
    nodes = await _store(ctx).nodes(counts=False)
    lk.nodes.put(gen, nodes, "*")
    return nodes


async def live_node(ctx: Ctx, node: str) -> NodeInfo | None:
    """Node ``node`` if it is registered (alive)."""
    lk = _of(ctx.rt)
    if lk is None:
        return await _store(ctx).node(node)
    got: NodeInfo | None = lk.nodes.get(node)
    _counted(ctx, "node", got is not None)
    if got is not None:
        return got
    gen = lk.nodes.gen
    info = await _store(ctx).node(node)
    if info is not None:  # an absent node is not remembered: it may register any moment
        lk.nodes.put(gen, info, node)
    return info


def node_changed(rt: Runtime) -> None:
    """This replica stored a registration that adds a node (or one that left): forget the list."""
    lk: Lookups | None = rt.state.get("lookups")
    if lk is not None:
        lk.nodes.clear()
