"""The node's resolver: names of endpoints, answered inside the host namespace on the
gateway address of every network with an endpoint on this host (``docs/dns.md``).

It runs in the node worker's process (``dns=on`` in the node's params; ``vnet-node
--dns``) and, like the worker, holds no Redis credentials: it reads networks, endpoints
and allow rules from their services over NATS and builds the same policy engine the
policy service builds, so a name resolves exactly where ``explain`` allows a flow.

What it holds is proportional to what its queriers may resolve, not to the cluster: a name
resolves only where ``explain`` allows a flow, and never without a path, so the table holds the
endpoints of the networks present on this node (those of its own endpoints) and of the
networks related to them ("in play" here, as the node's ruleset has them), read per network.

Freshness is event-driven: every network and policy event marks the table stale (the
networks, rules and endpoints are read again), and every endpoint event *addressed to this
node* (``vnet.node.<node>.evt.endpoint.>``: the endpoint service sends one to each node running
a resolver that holds an endpoint of the endpoint's network or of a related one) marks its
endpoints stale (only the endpoints are read again). A rebuild follows within milliseconds
(events arriving meanwhile are coalesced into that one rebuild); a query that would be
answered NXDOMAIN while a rebuild is pending waits for it (bounded), so a name is there by the
time its endpoint reports ready. A periodic rebuild is the safety net for missed events. The
sockets stay open across rebuilds: an update never drops a query.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any

from nats.aio.msg import Msg

from vnet.contracts import subjects
from vnet.contracts.endpoint import EndpointInfo, EndpointList, EndpointPage
from vnet.contracts.network import NetworkList, NetworkPage
from vnet.contracts.policy import RuleList, RulePage, policy_endpoint, policy_network
from vnet.core import drivers
from vnet.core import errors as E
from vnet.core.dns import Answer, DnsEndpoint, NameTable, parse_resolv_conf
from vnet.core.model import VirtualNetwork
from vnet.core.policy import AllowRule, Policy
from vnet.runtime.service import Runtime

log = logging.getLogger(__name__)

PAGE = 500
# drivers whose gateway address lives on a bridge of this host (macvlan/ipvlan use the LAN's)
_SERVED_DRIVERS = frozenset(d.name for d in drivers.all_drivers() if d.bridged)
STALE_WAIT_S = 0.5
# One more rebuild this long after the first: an endpoint service replica learns that this
# node runs a resolver within 5 s (vnet.svc.endpoint.events.DNS_NODES_S) and addresses names to
# it from then on; what it published before is read by this rebuild.
SETTLE_S = 6.0


def host_resolv_conf(host_netns: str | None) -> str:
    """The host namespace's resolv.conf, as ``ip netns exec`` would show it."""
    for path in ([f"/etc/netns/{host_netns}/resolv.conf"] if host_netns else []) + ["/etc/resolv.conf"]:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            continue
    return ""


class NodeDns:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.node = rt.params["node"]
        self.domain = rt.params.get("dns_domain", "vnet")
        self.period_s = float(rt.params.get("dns_resync_s", "30"))
        ups = rt.params.get("dns_upstream")
        if ups is not None:
            self.upstreams = [u for u in ups.split(",") if u]
            self.search: list[str] = []
            self.options: list[str] = []
        else:
            self.upstreams, self.search, self.options = parse_resolv_conf(host_resolv_conf(rt.config.host_netns))
            # a loopback resolver of the host is not reachable from the host namespace's view
            # of a container's query path; it is still the host's own choice, so keep it
            self.upstreams = [u for u in self.upstreams if u]
        self.server = rt.adapters.node().dns_server(
            self._answer, upstreams=self.upstreams, host_netns=rt.config.host_netns,
            ttl=int(rt.params.get("dns_ttl_s", "5")), observe=self._observe, port=int(rt.params.get("dns_port", "53")),
            trace_ratio=float(rt.params.get("dns_trace_ratio", "0.01")))
        self.table: NameTable | None = None
        self.version = 0
        self.rebuilds = 0
        self.listen_errors: list[str] = []
        self._stale = asyncio.Event()
        self._fresh = asyncio.Event()
        self._full = True  # the next rebuild reads networks and rules too (else endpoints only)
        self._nets: list[VirtualNetwork] = []
        self._rules: list[AllowRule] = []
        self.in_play: set[str] = set()  # the networks whose endpoints the table holds
        self._subs: list[Any] = []
        self._worker: Any = None  # the node worker whose endpoint copies it hears

    def _observe(self, rcode: str, seconds: float, trace_id: str | None) -> None:
        # NXDOMAIN and REFUSED are answers isolation gives, not failures of the resolver
        failed = rcode.lower() if rcode in ("SERVFAIL", "FORMERR") else None
        self.rt.metrics.observe("dns.query", seconds, failed, trace_id)
        self.rt.metrics.count("vnet_dns_queries", node=self.node, rcode=rcode)

    # -- life ----------------------------------------------------------------------------
    async def start(self) -> None:
        for subj in (subjects.EVT_NETWORK, subjects.EVT_POLICY):
            self._subs.append(await self.rt.nc.subscribe(str(subj), cb=self._on_event))
        # endpoint events: only those addressed to this node, heard through the worker's own
        # subscription (one per connection: NodeWorker.copy_listeners says why)
        worker = self.rt.state.get("worker")
        if worker is not None:
            worker.copy_listeners.append(self._on_endpoint_event)
            self._worker = worker
        else:  # a resolver without a worker in this process
            own = subjects.EVT_TO_NODE.format(node=self.node).removesuffix(".>")
            self._subs.append(await self.rt.nc.subscribe(f"{own}.endpoint.>", cb=self._on_endpoint_event))
        self._stale.set()
        self.rt.spawn(self._loop(), "dns-rebuild")
        self.rt.spawn(self._settle(), "dns-settle")

    async def stop(self) -> None:
        if self._worker is not None and self._on_endpoint_event in self._worker.copy_listeners:
            self._worker.copy_listeners.remove(self._on_endpoint_event)
        for s in self._subs:
            try:
                await s.unsubscribe()
            except Exception:  # the connection may be gone already
                pass
        await self.server.close()

    async def _on_event(self, msg: Msg) -> None:
        """A network or policy event: modes, relations, rules; everything is read again."""
        self._full = True
        self._mark_stale()

    async def _on_endpoint_event(self, msg: Msg) -> None:
        """An endpoint event addressed to this node: the endpoints in play are read again."""
        if ".status." in msg.subject:  # a status change renames nothing (none is addressed today)
            return
        self._mark_stale()

    def _mark_stale(self) -> None:
        self._fresh.clear()
        self._stale.set()
        self.server.clear_cache()

    async def _settle(self) -> None:
        await asyncio.sleep(SETTLE_S)
        self._full = True
        self._stale.set()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stale.wait(), self.period_s)
            except TimeoutError:
                pass
            await asyncio.sleep(0.002)  # let a burst of events land in this one rebuild
            # periodic (nothing marked stale) or a network/policy event: everything is read
            full, self._full = self._full or not self._stale.is_set(), False
            self._stale.clear()
            try:
                await self.rebuild(full=full)
            except E.VNetError as err:
                log.info("node %s: dns: could not read the control plane (%s); keeping the last table",
                         self.node, err.message)
                await asyncio.sleep(0.5)
                self._full = self._full or full
                self._stale.set()
            except Exception:
                log.exception("node %s: dns: rebuild failed", self.node)
                await asyncio.sleep(0.5)
                self._full = self._full or full
                self._stale.set()
            else:
                if not self._stale.is_set():
                    self._fresh.set()

    # -- the table -----------------------------------------------------------------------
    async def _pages(self, subject: Any, req: Any, reply_type: Any, attr: str) -> list[Any]:
        out: list[Any] = []
        cursor: str | None = None
        while True:
            req.cursor = cursor
            page, _ = await self.rt.adapters.request(subject, req, reply_type,
                                                     timeout=self.rt.config.request_timeout_s)
            out += getattr(page, attr)
            cursor = page.next_cursor
            if cursor is None:
                return out

    async def rebuild(self, *, full: bool = True) -> None:
        """Read what the table needs and swap it in; ``full=False``: the networks and rules of
        the last full read, the endpoints read again (an endpoint event changes nothing else)."""
        t0 = time.perf_counter()
        if full or not self._nets:
            self._nets = await self._pages(subjects.NETWORK_LIST, NetworkList(limit=PAGE), NetworkPage, "networks")
            self._rules = await self._pages(subjects.POLICY_RULE_LIST, RuleList(), RulePage, "rules")
        nets, rules = self._nets, self._rules
        mine: list[EndpointInfo] = await self._pages(subjects.ENDPOINT_LIST, EndpointList(node=self.node, limit=PAGE),
                                                      EndpointPage, "endpoints")
        local_nets = {e.network_id for e in mine}
        # the networks in play here: ours and those related to them (a name elsewhere has no path)
        relations = Policy([policy_network(n) for n in nets], [], [])
        in_play = set(local_nets)
        for nid in local_nets:
            in_play |= {n.id for n in nets if relations.relations(nid, n.id)}
        eps: list[EndpointInfo] = []
        for nid in sorted(in_play):
            eps += await self._pages(subjects.ENDPOINT_LIST, EndpointList(network=nid, limit=PAGE), EndpointPage,
                                     "endpoints")
        self.in_play = in_play
        pol = Policy([policy_network(n) for n in nets], [policy_endpoint(e) for e in eps], rules)
        names = {n.id: n.name for n in nets}
        dns = [DnsEndpoint(id=e.id, name=e.container_id, network=e.network_id,
                           ips=tuple(a for a in (e.ip_address, e.ipv6_address) if a), aliases=tuple(e.aliases),
                           ports=tuple((p.protocol, p.container_port) for p in e.ports))
               for e in eps]
        self.table = NameTable(pol, dns, names, domain=self.domain)
        self.server.clear_cache()
        want = {g.split("/")[0] for n in nets if n.id in local_nets and n.driver_type in _SERVED_DRIVERS
                for g in (n.gateway, n.gateway_v6) if g}
        gone = [a for a in self.server.listening() if a not in want]
        errors = await self.server.listen(sorted(want))
        await self.server.unlisten(gone)
        if errors != self.listen_errors:
            for e in errors:
                log.warning("node %s: dns: cannot serve %s", self.node, e)
        self.listen_errors = errors
        self.version += 1
        self.rebuilds += 1
        log.debug("node %s: dns table %d: %d names, %d addresses served, %.1f ms", self.node, self.version,
                  len(dns), len(want), (time.perf_counter() - t0) * 1e3)

    async def _answer(self, src: str, qname: str, qtype: str) -> Answer:
        upstream = self.upstreams[0] if self.upstreams else None
        if self.table is None or not self._fresh.is_set():
            # a rebuild is pending: a name created a moment ago must not be denied for it
            try:
                await asyncio.wait_for(self._fresh.wait(), STALE_WAIT_S)
            except TimeoutError:
                pass
        if self.table is None:
            return Answer("REFUSED", why="the resolver has no table yet", cacheable=False)
        # the server passes one of QType's names (unknown types become ANY), typed as a plain str there
        ans = self.table.lookup(src, qname, qtype, upstream=upstream)  # type: ignore[arg-type]
        if not self._fresh.is_set():  # answered from the last table while a newer one is coming
            ans = dataclasses.replace(ans, cacheable=False)
        return ans


def enabled(rt: Runtime) -> bool:
    return rt.params.get("dns", os.environ.get("VNET_NODE_DNS", "off")).lower() in ("on", "1", "true", "yes")
