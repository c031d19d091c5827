"""The node worker's event part: endpoint, network and node events -> work items, and the
scoped reconcile of a batch of them (the worker's module docstring, "events").
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
from typing import Any

import msgspec
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link

from vnet.contracts.endpoint import (
    EndpointEvent,
    EndpointUpdatedEvent,
    remote_of,
    to_desired,
)
from vnet.core import drivers as core_drivers
from vnet.core.dataplane_model import (
    EpDesired,
    NetDesired,
    ReconcileResult,
    Scope,
)
from vnet.core.plan import PlanOp, net_owner
from vnet.svc.node.workstate import RELATION_EVENTS, WorkerParts, WorkItem, _spans_hosts
from vnet.telemetry import tracing

log = logging.getLogger(__name__)

GAP_SPREAD_MAX_S = 5.0  # the resync after a possible loss of events starts within this, at random


def _domain_parts(subject: str) -> list[str]:
    """A copy's subject as its domain event's: ``vnet.node.<node>.evt.endpoint.created.<id>``
    -> ``[vnet, evt, endpoint, created, <id>]``; a domain subject as it is."""
    parts = subject.split(".")
    if len(parts) > 3 and parts[1] == "node" and parts[3] == "evt":
        return parts[:1] + parts[3:]
    return parts


def _involved(data: bytes) -> set[str] | None:
    """The networks a relation event (network.updated, connected, disconnected, mesh_*)
    concerns; empty for a labels-only update; None when the payload cannot be read."""
    try:
        body = msgspec.json.decode(data, type=dict[str, Any])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    out: set[Any] = set()
    net = body.get("network")
    if isinstance(net, dict):  # NetworkEvent (updated): the network, its parent and children
        changes = body.get("changes")
        if isinstance(changes, list) and changes and set(changes) <= {"labels"}:
            return set()  # labels change rules (the policy sync), never the networks here
        out |= {net.get("id"), net.get("parent"), *(net.get("children") or [])}
    elif isinstance(net, str):  # MeshEvent: the member added or removed
        out.add(net)
    out |= {body.get("network_a"), body.get("network_b"), *(body.get("members") or [])}  # connection, mesh
    ids = {i for i in out if isinstance(i, str)}
    return ids or None


class EventIntake(WorkerParts):
    """NodeWorker's intake methods (see the module docstring)."""

    # -- events ------------------------------------------------------------------------------
    def _item(self, **kw: Any) -> WorkItem:
        span = trace.get_current_span().get_span_context()
        return WorkItem(ctx=otel_context.get_current(), span=span if span.is_valid else None, **kw)

    def _on_gap(self, why: str) -> None:
        """Copies addressed to this node may have been lost (``why``: the client reconnected, a
        handler failed): a full resync soon, not at the periodic one. Spread over a tenth of the
        resync period (at most 5 s), so a fleet that reconnects together after a server died
        does not fetch its desired states in the same instant."""
        self.rt.metrics.count("vnet_node_event_gaps", node=self.node)
        delay = random.uniform(0.0, min(GAP_SPREAD_MAX_S, max(self.resync_s, self.fleet_resync_s) / 10))
        log.info("node %s: %s: full resync in %.2f s (events addressed here may have been missed)", self.node, why,
                 delay)
        asyncio.get_running_loop().call_later(delay, lambda: self.queue.put_nowait(self._item(kind="resync")))

    async def _on_endpoint_event(self, msg: Msg) -> None:
        """An endpoint event addressed to this node (``vnet.node.<node>.evt.endpoint.<event>.<id>``).

        The endpoint service addresses one to every node that must act on it (its
        ``event_nodes``): the endpoint's own node; nodes holding its overlay or a network
        related to it; nodes in play for its network when a rule selects it (set members here)
        or a macvlan network relates to it; resolvers. One consumer, so a created and a
        deleted of one endpoint arrive in order, and nothing of unrelated networks arrives.

        ``copy_listeners`` (the node's resolver) hear each copy from here. The node's connection
        must hold one subscription for these copies: the endpoint service forwards a waiting
        creator's reply subject with its copy, and the bus lets this node answer it once
        (``allow_responses``); a copy delivered twice (two overlapping subscriptions) took that
        answer away (the server refused it as a publish to another user's inbox)."""
        await self._endpoint_event(msg)
        for listener in self.copy_listeners:
            try:
                await listener(msg)
            except Exception:  # one listener's failure is not the worker's
                log.exception("node %s: a listener of endpoint copies failed on %s", self.node, msg.subject)

    async def _endpoint_event(self, msg: Msg) -> None:
        parts = _domain_parts(msg.subject)
        if len(parts) >= 5 and parts[3] == "updated":
            self._on_endpoint_updated(msg)
            return
        if len(parts) < 5 or parts[3] not in ("created", "deleted"):
            return  # status reports (ours and other nodes') and anything newer
        try:
            ev = msgspec.json.decode(msg.data, type=EndpointEvent)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("node %s: ignoring a malformed event on %s: %s", self.node, msg.subject, exc)
            self._policy_changed()
            return
        if ev.endpoint.node != self.node:
            # rules may select it (labels, network, address): set members change here, coalesced
            if self.policy is not None:
                if not self._policy_note(parts[3], ev.endpoint, local=False):
                    self._policy_fetch = True
                self._policy_dirty.set()
            net = self.nets.get(ev.endpoint.network_id)
            if net is not None and _spans_hosts(net.driver):  # a remote of one of our overlays
                self.queue.put_nowait(self._item(kind="remote", event=parts[3], ident=ev.endpoint.network_id,
                                                 endpoint=ev.endpoint))
            return
        self.queue.put_nowait(self._item(kind="endpoint", event=parts[3], ident=ev.endpoint.id, endpoint=ev.endpoint,
                                         reply=msg.reply or ""))

    def _on_endpoint_updated(self, msg: Msg) -> None:
        """Labels or published ports of an endpoint (of any node) changed. Labels only move its
        addresses between the rules' address sets: computed here (out of every set, back into
        those whose selectors take the new labels) and written by the policy task as one
        element delta, no round trip; established connections keep flowing (conntrack accepts
        them before any set is looked at). Published ports change the DNAT map of the
        endpoint's node and which endpoint holds a host port: the whole ruleset is fetched
        (still written as a delta)."""
        if self.policy is None:
            return
        try:
            ev = msgspec.json.decode(msg.data, type=EndpointUpdatedEvent)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("node %s: ignoring a malformed event on %s: %s", self.node, msg.subject, exc)
            self._policy_changed()
            return
        if set(ev.changes) <= {"labels"}:
            from vnet.contracts.policy import policy_endpoint

            old, new = policy_endpoint(ev.previous), policy_endpoint(ev.endpoint)
            if not (self.policy.note_removed(old, local=False) and self.policy.note_added(new, local=False)):
                self._policy_fetch = True
            self._policy_dirty.set()
            return
        self._policy_changed()

    async def _on_network_event(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        self._policy_changed()  # isolation mode, relations
        if len(parts) < 5:
            return
        if parts[3] in RELATION_EVENTS:
            # Which overlays this host routes to (related ones without a local endpoint
            # included) is the endpoint service's answer: refetch it now, not at the resync.
            # Only hosts with an overlay can route to another network.
            if not any(_spans_hosts(n.driver) for n in self.nets.values()):
                return
            involved = _involved(msg.data)
            # A relation X-Y changes what a host routes to only where X or Y is here (relations
            # are not transitive); an event we cannot read refetches anyway.
            if involved is None or involved & self.nets.keys():
                self.queue.put_nowait(self._item(kind="relations", event=parts[3], ident=parts[4]))
            return
        if parts[3] != "deleted":
            return
        nid = parts[4]
        if nid in self.nets or any(e.network_id == nid for e in self.eps.values()):
            self.queue.put_nowait(self._item(kind="network", event="deleted", ident=nid))

    async def _on_node_event(self, msg: Msg) -> None:
        """Another node left or (re)joined: re-fetch the remotes and peers of our overlays now."""
        parts = _domain_parts(msg.subject)
        if len(parts) < 5 or parts[3] not in ("left", "joined") or parts[4] == self.node:
            return
        for nid in sorted(n.id for n in self.nets.values() if _spans_hosts(n.driver)):
            self.queue.put_nowait(self._item(kind="remote", event=parts[3], ident=nid))

    async def _handle_events(self, items: list[WorkItem]) -> None:
        # the kernel's notifications of this batch's own writes are read after it, not in
        # the middle of its reconcile (DriftMonitor.held)
        with self.drift.held() if self.drift is not None else contextlib.nullcontext():
            await self._handle_batch(items)

    async def _handle_batch(self, items: list[WorkItem]) -> None:
        first = items[0]
        links = [Link(i.span) for i in items[1:] if i.span is not None]
        tracer = tracing.tracer()
        with tracer.start_as_current_span("node.events", context=first.ctx, links=links,
                                          attributes={"vnet.node": self.node, "vnet.events": len(items)}):
            scope_eps: set[str] = set()
            scope_nets: set[str] = set()
            delta: dict[str, list[PlanOp]] = {}  # network -> its remote endpoints' entries
            gone: set[str] = set()
            refetch = False  # overlay remotes changed: only the endpoint service knows them all
            had = set(self.nets)
            for it in items:
                self.counters.events += 1
                if it.kind == "endpoint" and it.event == "created":
                    net, epd = to_desired(it.endpoint)
                    if net.id not in self.nets:  # a network already here keeps its remotes
                        self.nets[net.id] = net
                        refetch = refetch or _spans_hosts(net.driver)
                    self.eps[epd.id] = epd
                    self.recorded.setdefault(epd.id, (it.endpoint.status, it.endpoint.reason))
                    scope_eps.add(epd.id)
                    gone.discard(epd.id)
                elif it.kind == "endpoint" and it.event == "deleted":
                    self.eps.pop(it.ident, None)
                    self.recorded.pop(it.ident, None)
                    scope_eps.add(it.ident)
                    scope_nets.add(it.endpoint.network_id)
                    gone.add(it.ident)
                    # the last local endpoint of an overlay: the overlays routed for it may go
                    nid = it.endpoint.network_id
                    if (self.routed and _spans_hosts(it.endpoint.driver)
                            and not any(e.network_id == nid for e in self.eps.values())):
                        refetch = True
                elif it.kind == "network" and it.event == "deleted":
                    for eid in [e.id for e in self.eps.values() if e.network_id == it.ident]:
                        self.eps.pop(eid)
                        self.recorded.pop(eid, None)
                        scope_eps.add(eid)
                        gone.add(eid)
                    self.routed.discard(it.ident)  # a routed network goes too (not kept as routed)
                    scope_nets.add(it.ident)
                elif it.kind == "remote":
                    # an endpoint of another host in one of our overlays: its FDB/neighbour entries
                    # written as a delta when its host is a known peer (else the network is
                    # reconciled), the whole state fetched for a new peer
                    known, ops = self._remote_delta(it)
                    refetch = refetch or not known
                    if ops is None:
                        scope_nets.add(it.ident)
                    else:
                        delta.setdefault(it.ident, []).extend(ops)
                elif it.kind == "relations":
                    refetch = True
            if refetch:
                before = dict(self.nets)
                # the state after every event of this batch (they were committed first)
                if await self._fetch():
                    # every network the fetch added, removed or changed (related overlays with
                    # their bridge, VXLAN device, FDB and neighbour entries) is reconciled now
                    scope_nets |= {n for n in before.keys() | self.nets.keys() if before.get(n) != self.nets.get(n)}
            # A network none of this node's endpoints uses any more: its bridge goes. Only a
            # batch that removed endpoints or replaced the state can leave one (a pass over every
            # endpoint: 0.2 ms of the 1,000th attach in cProfile, for a batch of creates).
            if gone or refetch or any(it.kind == "network" for it in items):
                used = {e.network_id for e in self.eps.values()}
                for nid in [n for n in self.nets if n not in used and n not in self.routed]:
                    self.nets.pop(nid)
                    scope_nets.add(nid)
            # A network new here may be the child of one already here: the parent's bridge
            # needs proxy ARP for it now (the planner finds children from the desired networks).
            scope_nets |= self._parents_of(set(self.nets) - had)
            # A network reconciled anyway needs no delta; one whose delta failed (its VXLAN
            # device not there yet, say) is reconciled.
            delta = {n: ops for n, ops in delta.items() if n not in scope_nets and n in self.nets}
            if delta and self.rec is not None:
                failed = await self._in_thread(self.rec.apply_delta, [op for ops in delta.values() for op in ops])
                self.counters.deltas += 1
                for owner, err in failed.items():
                    log.info("node %s: remote entries of %s not written as a delta (%s); reconciling it", self.node,
                             owner, err.message)
                scope_nets |= {n for n in delta if net_owner(n) in failed}
            elif delta:  # no data plane: what a reconcile reports
                scope_nets |= delta.keys()
            self.counters.batches += 1
            # Endpoints created or removed: their policy delta computed here, then written in
            # the same kernel step as the netlink work, beside it, before any link goes up
            # (bindings before the link is up, "ready" means "enforced"): one transaction
            # for the whole batch.
            policy = False
            if self.policy is not None:
                fetch = False
                for it in items:
                    if it.kind == "endpoint" and it.endpoint is not None:
                        fetch = not self._policy_note(it.event, it.endpoint, local=True) or fetch
                    elif it.kind == "network":
                        fetch = True
                if fetch:  # the whole ruleset (the service has these endpoints: events follow commits)
                    await self._policy_sync("endpoints", check=False)
                policy = True
            if scope_eps or scope_nets or not delta:
                result = await self._reconcile(Scope(endpoints=frozenset(scope_eps),
                                                     networks=frozenset(scope_nets)), policy_first=policy)
            else:  # remote entries only, written above; set members are the policy task's
                result = ReconcileResult(ops_planned=0, ops_applied=0, writes=0, errors=[], networks={}, endpoints={},
                                         duration=0.0)
            await self._report(result, gone, {it.ident: (it.reply, it.endpoint) for it in items
                                              if it.kind == "endpoint" and it.event == "created" and it.reply})
            await self._announce([it.ident for it in items if it.kind == "endpoint" and it.event == "created"
                                  and not it.endpoint.ip_first_use], result)

    async def _announce(self, created: list[str], result: ReconcileResult) -> None:
        """Gratuitous ARP for the container interfaces just reported ready, on the kernel
        thread once the report is out: off the attach's path (the kernel's own, at link up,
        floods every port of the bridge before the endpoint can be reported), still before
        the next batch's kernel work. Not for an address no one held before (IPAM's
        ``first_use``): no peer can cache a MAC for it, and the broadcast costs every port of
        the bridge (~1-2 ms of CPU at 900 ports, the growth row of docs/dataplane.md)."""
        eps: list[EpDesired] = []
        for eid in created:
            st, e = result.endpoints.get(eid), self.eps.get(eid)
            if st is None or st.state != "ready" or e is None or e.ipv4 is None:
                continue
            net = self.nets.get(e.network_id)
            if net is not None and core_drivers.get(net.driver).container_iface:
                eps.append(e)
        if not eps or self.rec is None:
            return
        try:
            for err in await self._in_thread(self.rec.announce, eps):
                log.info("node %s: %s", self.node, err)
        except Exception as exc:  # a lost announcement costs a peer's stale ARP entry, nothing more
            log.warning("node %s: gratuitous ARP failed: %s", self.node, exc)

    def _parents_of(self, nids: set[str]) -> set[str]:
        """The networks here whose IPv4 subnet strictly contains one of ``nids``' subnets."""
        def subnet(n: NetDesired) -> ipaddress.IPv4Network | None:
            if n.gateway4 is None:
                return None
            try:
                net = ipaddress.ip_interface(n.gateway4).network
            except ValueError:
                return None
            return net if isinstance(net, ipaddress.IPv4Network) else None

        subs = [s for s in (subnet(self.nets[i]) for i in nids if i in self.nets) if s is not None]
        if not subs:
            return set()
        out: set[str] = set()
        for n in self.nets.values():
            p = subnet(n)
            if p is not None and any(s != p and s.subnet_of(p) for s in subs):
                out.add(n.id)
        return out

    def _remote_delta(self, it: WorkItem) -> tuple[bool, list[PlanOp] | None]:
        """Apply a remote endpoint's event to the local desired state, and the kernel ops for
        that endpoint alone (``Driver.remote_delta``; None: reconcile the network). (False,
        None): its host is not a known peer, refetch instead."""
        info = it.endpoint
        net = self.nets.get(it.ident)
        if info is None or net is None or info.node not in {p.name for p in self.peers}:
            return False, None
        rem = remote_of(info)
        sup = self.encryption
        # an encrypted network this node cannot build has no VXLAN device to write to: its
        # reconcile refuses it as before
        ops = (None if net.encrypted and sup is not None and not sup.available else
               core_drivers.get(net.driver).remote_delta(net, self.peers, rem, it.event == "created"))
        others = tuple(r for r in net.remotes if r.mac != rem.mac)
        remotes = tuple(sorted((*others, rem), key=lambda r: r.mac)) if it.event == "created" else others
        self.nets[net.id] = msgspec.structs.replace(net, remotes=remotes)
        return True, ops
