"""Drift by event: the node worker hears the kernel change under it and repairs at once.

::

    kernel notification (vnet.adapters.netlink.watch, on the event loop)
      nftables commit touching ``table inet vnet`` / ``table bridge vnet`` by another process
          -> our ruleset checked against the kernel and rewritten (policy lock; no fetch)
      a link of ours deleted / set down / taken off its bridge, a bridge's address removed
          -> coalesced (COALESCE_S) -> a ``drift`` work item with the network or endpoint it
             belongs to -> a scoped reconcile in the worker's loop (serialised with the others)
      notifications lost (receive buffer overflow) -> a full reconcile (no fetch) and a
          ruleset check, as the periodic resync would do

**No repair loops.** Our own nftables transactions are recognised by the committing
thread the kernel names (``NFTA_GEN_PROC_PID`` is a thread of this process) and ignored.
Link and address notifications are compared with the desired state, not trusted: only
a change to something the worker wants (a desired bridge, veth or VXLAN device) is a
suspect, only its LAST state counts (our own create-then-set-up sequence ends "up"), and
the repair is a level-triggered reconcile, so a suspect that is fine by then costs no
write. Only a repair that wrote something is recorded.

**Attribution.** The kernel names the committing process of every nftables
transaction; for address changes it gives the sender's netlink port id, which is mapped
to the process holding that socket while it still exists; link changes come without a
sender (recorded as ``unknown``). Records go to a bounded ring (``CAPACITY``) served on
``vnet.node.<node>.drift.list``, to the log, and to ``vnet_node_drift_repairs_total{kind}``.

The periodic resync stays the safety net (a notification the kernel never sends, a
change inside a container namespace).

:class:`NodeMetrics` also lives here: the node-side figures the metrics service exports
(reconcile duration and kernel writes per reconcile, ruleset apply duration).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vnet.adapters.netlink.watch import (
    NETLINK_ROUTE,
    AddrChange,
    Change,
    LinkChange,
    NetlinkWatch,
    NftCommit,
    Overflow,
    describe,
    is_own_thread,
)
from vnet.contracts.node import DriftKind, DriftRecord, DriftReply, DriftSender
from vnet.core import drivers, naming
from vnet.core.dataplane_model import ReconcileResult, Scope
from vnet.core.nft import FAMILIES, TABLE

if TYPE_CHECKING:
    from vnet.runtime.node_wiring import SyncResult
    from vnet.runtime.service import Runtime
    from vnet.svc.node.worker import NodeWorker

log = logging.getLogger(__name__)

CAPACITY = 256  # repairs kept per node (the ring)
COALESCE_S = 0.02  # a burst of notifications (one `ip` command, one transaction) is one repair
OUR_TABLES = frozenset((fam, TABLE) for fam in FAMILIES)


@dataclass
class Suspect:
    """A change the kernel reported that may be drift."""

    kind: DriftKind
    target: str  # interface name, or "<family> vnet"
    owner: str  # network or endpoint id ("" for our nftables tables)
    scope: str  # "network" | "endpoint" | "nft"
    at: float  # wall clock of the notification
    t0: float  # perf_counter of the notification
    detail: str
    sender: DriftSender = field(default_factory=lambda: DriftSender(source="unknown"))


class NodeMetrics:
    """Node-side figures in the worker's metrics report (thread-safe: the kernel thread
    records ruleset deltas too; counts are handed to the event loop).

    * ``vnet_operation_duration_seconds{service="node",op="reconcile.full|reconcile.scoped"}``
    * ``vnet_node_reconciles_total{node,scope}`` and ``vnet_node_kernel_writes_total{node,scope}``
      (kernel writes per reconcile = the ratio of their rates)
    * ``vnet_operation_duration_seconds{service="node",op="nft.delta|nft.whole"}``
    * ``vnet_node_drift_repairs_total{node,kind}``
    """

    def __init__(self, rt: Runtime, node: str) -> None:
        self.rt = rt
        self.node = node
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        # called after every reconcile, on the event loop (the drift monitor's bookkeeping)
        self.listeners: list[Callable[[Scope | None, ReconcileResult], None]] = []

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._loop_thread = loop, threading.get_ident()

    def _call(self, fn: Any, *args: Any, **kw: Any) -> None:
        if self._loop is None or threading.get_ident() == self._loop_thread:
            fn(*args, **kw)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: fn(*args, **kw))

    def reconcile(self, scope: Scope | None, result: ReconcileResult) -> None:
        which = "full" if scope is None else "scoped"
        m = self.rt.metrics
        self._call(m.observe, f"reconcile.{which}", result.duration)
        self._call(m.count, "vnet_node_reconciles", 1, node=self.node, scope=which)
        if result.writes:
            self._call(m.count, "vnet_node_kernel_writes", result.writes, node=self.node, scope=which)
        for fn in self.listeners:
            fn(scope, result)

    def ruleset(self, res: SyncResult | None) -> None:
        if res is None or not res.wrote:
            return
        self._call(self.rt.metrics.observe, "nft.whole" if res.whole else "nft.delta", res.duration)

    def drift(self, kind: str, repaired_s: float) -> None:
        self._call(self.rt.metrics.count, "vnet_node_drift_repairs", 1, node=self.node, kind=kind)
        self._call(self.rt.metrics.observe, "drift.repair", repaired_s)


class DriftMonitor:
    """One host namespace's kernel notifications -> repairs (see the module docstring)."""

    def __init__(self, worker: NodeWorker, metrics: NodeMetrics) -> None:
        self.w = worker
        self.metrics = metrics
        self.ring: deque[DriftRecord] = deque(maxlen=CAPACITY)
        self.total = 0
        self.watch: NetlinkWatch | None = None
        self.reason = "not started"
        self._pending: dict[str, Suspect] = {}  # interface name -> suspect, until the flush
        self._last: dict[str, LinkChange] = {}  # interface name -> its last notification
        self._index: dict[int, str] = {}  # ifindex -> name (IPv6 address changes carry no label)
        self._timer: asyncio.TimerHandle | None = None
        self._nft: list[Suspect] = []
        self._nft_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.notifications = 0  # link/address/nftables changes read
        self.handling_s = 0.0  # event-loop time spent deciding about them (the watch's cost)
        self.checks = 0  # drift work items the worker's loop took
        self.reconciles = 0  # of which needed a reconcile (a suspect still drifted)
        self._resync_policy: SyncResult | None = None
        # the desired state each of the last two reconciles ran with, and whether it succeeded:
        # a resync's writes are drift only when nothing changed in between (else: catching up)
        self._cur: tuple[dict[str, Any], dict[str, Any], list[Any], bool] | None = None
        self._prev: tuple[dict[str, Any], dict[str, Any], list[Any], bool] | None = None
        metrics.listeners.append(self._after_reconcile)
        self._veth_owner: dict[str, str] = {}  # host veth name -> endpoint id (names are hashes of ids)
        self._veth_seen: set[str] = set()  # endpoint ids whose veth name is in _veth_owner

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self.w.rec is None:
            self.reason = f"data plane off: {self.w.dataplane_reason}"
            return
        watch = NetlinkWatch(self.w.host_netns, self._on_changes)
        try:
            await asyncio.to_thread(watch.open)
        except Exception as exc:  # the periodic resync still repairs, later
            self.reason = f"cannot follow kernel notifications: {exc}"
            log.warning("node %s: %s; drift is repaired by the periodic resync only", self.w.node, self.reason)
            return
        watch.attach(asyncio.get_running_loop())
        self.watch, self.reason = watch, ""
        log.info("node %s: following link, address and nftables notifications of %s", self.w.node,
                 self.w.host_netns or "its namespace")

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = [t for t in (self._nft_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        watch, self.watch = self.watch, None
        if watch is not None:
            await asyncio.to_thread(watch.close)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The notifications wait unread while the worker handles a batch of events, and are
        read, in order, once it is done (its report and answers sent). They are mostly the
        batch's own writes (a veth's creation and setup, the policy delta's commit), and read
        as they came they woke the event loop in the middle of the reconcile, whose thread
        then waited for the GIL: the attach took 0.2-0.55 ms longer (docs/dataplane.md, "The
        last runs on main (5 Dec 02:50-03:17 UTC)"). A change made by someone else meanwhile
        is decided at the batch's end plus ``COALESCE_S``."""
        watch = self.watch
        if watch is None:
            yield
            return
        watch.hold()
        try:
            yield
        finally:
            if self.watch is watch:  # not stopped meanwhile
                watch.release()

    def reply(self, limit: int) -> DriftReply:
        recs = list(self.ring)[-limit:][::-1]
        return DriftReply(node=self.w.node, watching=self.watch is not None, reason=self.reason, total=self.total,
                          capacity=CAPACITY, records=recs)

    # -- notifications (event loop) ------------------------------------------------------------
    def _note_veth(self, eid: str) -> None:
        self._veth_seen.add(eid)
        self._veth_owner[naming.veth_name(eid)] = eid

    def _wanted(self, name: str) -> tuple[str, str] | None:
        """Whether the desired state holds host interface ``name``: ("network"|"endpoint", id).

        Per name, and O(1) per attach in the number of endpoints: an endpoint's veth name is a
        hash of its id, so the names are remembered per id and only endpoints not seen before
        are hashed. Rebuilding the whole name map after every reconcile hashed every endpoint
        on every attach (~1-2 ms at 1,000 endpoints); even the set difference of the ids with
        those seen was 0.5 ms of the 1,000th attach, so a name not known yet first looks at the
        newest endpoints only (``eps`` is a dict: insertion order, a new one last)."""
        eps = self.w.eps
        if naming.is_our_veth(name):
            eid = self._veth_owner.get(name)
            if eid is None:
                for i in reversed(eps.keys()):
                    if i in self._veth_seen:
                        break
                    self._note_veth(i)
                eid = self._veth_owner.get(name)
                if eid is None:  # the dict was rebuilt (a resync), or a veth of ours no endpoint wants
                    for i in eps.keys() - self._veth_seen:
                        self._note_veth(i)
                    eid = self._veth_owner.get(name)
                if len(self._veth_seen) > 2 * len(eps) + 64:  # forget the departed now and then
                    self._veth_seen = set(eps)
                    self._veth_owner = {naming.veth_name(i): i for i in eps}
            e = eps.get(eid) if eid is not None else None
            n = self.w.nets.get(e.network_id) if e is not None else None
            if e is None or n is None or not drivers.get(n.driver).bridged:
                return None
            return ("endpoint", e.id)
        for n in self.w.nets.values():  # a few networks: their bridge (and an overlay's VXLAN device)
            driver = drivers.get(n.driver)
            if driver.bridged and name in driver.wanted_links(n):
                return ("network", n.id)
        return None

    def _on_changes(self, changes: list[Change]) -> None:
        self.notifications += len(changes)
        now, t0 = time.time(), time.perf_counter()
        try:
            self._decide(changes, now, t0)
        finally:
            self.handling_s += time.perf_counter() - t0

    def _decide(self, changes: list[Change], now: float, t0: float) -> None:
        for c in changes:
            if isinstance(c, NftCommit):
                self._on_nft(c, now, t0)
                continue
            if isinstance(c, Overflow):
                self._on_overflow(c)
                continue
            if isinstance(c, LinkChange):
                if c.deleted:
                    self._index.pop(c.index, None)
                else:
                    self._index[c.index] = c.name
                if not naming.is_ours(c.name):
                    continue
                self._last[c.name] = c
                got = None
                if c.deleted or not c.up or c.master == 0:
                    got = self._wanted(c.name)
                kind: DriftKind = "link_deleted" if c.deleted else ("link_down" if not c.up else "link_master")
                # only a veth has a master (its network's bridge): a bridge or VXLAN device up is fine
                if got is not None and (kind != "link_master" or got[0] == "endpoint"):
                    detail = {"link_deleted": "deleted", "link_down": "set down",
                              "link_master": "taken off its bridge"}[kind]
                    self._suspect(Suspect(kind=kind, target=c.name, owner=got[1], scope=got[0], at=now, t0=t0,
                                          detail=f"{c.name} {detail}"))
                else:
                    self._pending.pop(c.name, None)  # fine again (our own create-then-up)
            elif isinstance(c, AddrChange) and c.deleted:
                name = c.label or self._index.get(c.index, "")
                if not naming.is_ours(name):
                    continue
                got = self._wanted(name)
                if got is None or got[0] != "network" or not self._gateway(got[1], c.address):
                    continue  # not an address we put there (a link-local one goes with the link's state)
                s = Suspect(kind="address_removed", target=name, owner=got[1], scope="network", at=now, t0=t0,
                            detail=f"address {c.address} removed from {name}",
                            sender=DriftSender(source="netlink port", port=c.port) if c.port else
                            DriftSender(source="unknown"))
                if c.port:
                    self._attribute_port(s, c.port)
                self._suspect(s, key=f"{name} addr")

    def _gateway(self, nid: str, address: str) -> bool:
        """Whether ``address`` (CIDR) is the gateway address network ``nid`` puts on its bridge."""
        n = self.w.nets.get(nid)
        if n is None or not address:
            return False
        try:
            got = ipaddress.ip_interface(address)
            return any(g is not None and ipaddress.ip_interface(g) == got for g in (n.gateway4, n.gateway6))
        except ValueError:
            return False

    def _suspect(self, s: Suspect, key: str | None = None) -> None:
        k = key or s.target
        prev = self._pending.get(k)
        if prev is not None:  # keep the first notification's time (the repair time counts from it)
            s.at, s.t0 = prev.at, prev.t0
        self._pending[k] = s
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(COALESCE_S, self._flush)

    def _flush(self) -> None:
        self._timer = None
        suspects, self._pending = list(self._pending.values()), {}
        if suspects:
            # Into the worker's queue: serialised with event work and resyncs, never a second reconciler.
            self.w.queue.put_nowait(self.w._item(kind="drift", drift=suspects))

    def _attribute_port(self, s: Suspect, port: int) -> None:
        """Map the sender's port id to its process now (it may exit any moment)."""
        watch = self.watch
        if watch is None:
            return

        async def look() -> None:
            pid = await asyncio.to_thread(watch.port_owner, NETLINK_ROUTE, port)
            if pid:
                p = await asyncio.to_thread(describe, pid)
                s.sender = DriftSender(source="netlink port", pid=p.pid, port=port, comm=p.comm, cmdline=p.cmdline)

        self._spawn(look())

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _on_nft(self, c: NftCommit, now: float, t0: float) -> None:
        ours = c.tables & OUR_TABLES
        if not ours or is_own_thread(c.pid) or self.w.policy is None:
            return  # somebody else's table, or our own transaction
        p = describe(c.pid, c.comm) if c.pid else None  # now: the process may exit any moment
        sender = (DriftSender(source="nftables", pid=p.pid, port=c.port, comm=p.comm, cmdline=p.cmdline)
                  if p is not None else DriftSender(source="unknown", port=c.port, comm=c.comm))
        deleted = any(k.startswith("delete table ") for k in c.changes)
        detail = ", ".join(f"{k}" + (f" x{n}" if n > 1 else "") for k, n in sorted(c.changes.items())[:8])
        self._nft.append(Suspect(kind="nft_table" if deleted else "nft_rules",
                                 target=", ".join(f"{f} {t}" for f, t in sorted(ours)), owner="", scope="nft",
                                 at=now, t0=t0, detail=detail, sender=sender))
        if self._nft_task is None or self._nft_task.done():
            self._nft_task = asyncio.get_running_loop().create_task(self._repair_nft())

    def _on_overflow(self, c: Overflow) -> None:
        log.warning("node %s: %s notifications were lost (receive buffer full): checking everything",
                    self.w.node, c.source)
        if c.source == "nftables" and self.w.policy is not None:
            self._nft.append(Suspect(kind="lost_notifications", target="nftables", owner="", scope="nft",
                                     at=time.time(), t0=time.perf_counter(), detail="nftables notifications lost"))
            if self._nft_task is None or self._nft_task.done():
                self._nft_task = asyncio.get_running_loop().create_task(self._repair_nft())
        else:
            self.w.queue.put_nowait(self.w._item(kind="resync", fetch=False))

    # -- repairs -------------------------------------------------------------------------------
    async def _repair_nft(self) -> None:
        """Check our tables against the ruleset in force and write the difference; commits
        that arrive meanwhile are handled by one more round."""
        while self._nft:
            batch, self._nft = self._nft, []
            agent = self.w.policy
            if agent is None:
                return
            err = ""
            res: SyncResult | None = None
            try:
                if agent.target is None:  # no ruleset yet: fetch it (the sync checks the kernel)
                    await self.w._policy_sync("drift")
                    res = agent.last
                else:
                    async with self.w._policy_lock:
                        res = await asyncio.to_thread(self._check_nft, agent)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = str(exc)[:500]
            wrote = res is not None and res.wrote
            if not wrote and not err:
                # A table of ours deleted is drift even when a ruleset write (an event's) put it
                # back before this check: recorded, with no write of its own. Anything else that
                # left our tables as wanted (added and removed again) is not.
                gone = [b for b in batch if b.kind == "nft_table"]
                if gone:
                    self._record(gone, writes=0, error="", extra="; already restored by a ruleset write")
                else:
                    log.debug("node %s: nftables commit by %s left our tables as wanted", self.w.node,
                              batch[0].sender.pid)
                continue
            self._record(batch, writes=1 if wrote else 0, error=err,
                         extra=f"; restored ({res.reason})" if res is not None and wrote else "")

    @staticmethod
    def _check_nft(agent: Any) -> SyncResult:
        # Under the enforcer's lock, as PolicyAgent.push does: the latest target is read and
        # written in one step, so a delta written meanwhile is never overwritten by an older state.
        with agent.enforcer._lock:
            rs = agent.target
            res: SyncResult = agent.enforcer.sync_ruleset(rs, check=True)
        agent.syncs += 1
        agent.wrote += int(res.wrote)
        agent.last = res
        return res

    def _still_drifted(self, s: Suspect) -> bool:
        if s.kind not in ("link_deleted", "link_down", "link_master"):
            return True
        last = self._last.get(s.target)
        return last is None or last.deleted or not last.up or (s.scope == "endpoint" and last.master == 0)

    async def repair(self, items: Iterable[Any]) -> None:
        """In the worker's loop: one scoped reconcile for every suspect still drifted."""
        self.checks += 1
        suspects = [s for it in items for s in (it.drift or ())]
        live = [s for s in suspects if self._still_drifted(s)]
        if not live:
            return
        self.reconciles += 1
        scope = Scope(endpoints=frozenset(s.owner for s in live if s.scope == "endpoint"),
                      networks=frozenset(s.owner for s in live if s.scope == "network"))
        result = await self.w._reconcile(scope)
        await self.w._report(result)
        if not result.writes and not result.errors:
            return  # it was fine by the time we looked (our own change, or undone)
        owners = {e.owner: e.message for e in result.errors}
        for s in live:
            err = next((m for o, m in owners.items() if o.endswith(s.owner) or o == "node"), "")
            self._record([s], writes=result.writes, error=err)

    def _after_reconcile(self, scope: Scope | None, result: ReconcileResult) -> None:
        self._prev = self._cur
        self._cur = (dict(self.w.nets), dict(self.w.eps), list(self.w.peers), not result.errors)

    def _unchanged_since_last(self) -> bool:
        """The full resync that just ran had the desired state the reconcile before it had, and
        that one succeeded: the kernel had converged to it, so what the resync wrote is drift."""
        p = self._prev
        return p is not None and p[3] and p[0] == self.w.nets and p[1] == self.w.eps and p[2] == list(self.w.peers)

    def note_resync(self, result: ReconcileResult, policy: SyncResult | None) -> None:
        """After a periodic full resync: what it wrote is drift no notification told of (or a
        missed event); recorded too, with no sender (nobody told)."""
        now, t = time.time(), time.perf_counter()
        if self.w.counters.full_resyncs <= 1:
            return  # the start-up resync builds (or adopts) the host: nothing drifted yet
        if result.writes and self._unchanged_since_last():
            self._record([Suspect(kind="resync", target="host", owner="", scope="full", at=now,
                                  t0=t - result.duration,
                                  detail=f"the periodic resync wrote {result.writes} kernel change(s) "
                                         "to a host that had converged to the same desired state")],
                         writes=result.writes, error="")
        if policy is not None and policy is not self._resync_policy and policy.wrote and \
                policy.reason.startswith("table"):
            self._resync_policy = policy  # the agent keeps its last result: record each once
            self._record([Suspect(kind="nft_table" if "missing" in policy.reason else "nft_rules",
                                  target=", ".join(f"{f} {tb}" for f, tb in sorted(OUR_TABLES)), owner="",
                                  scope="nft", at=now, t0=t - policy.duration,
                                  detail=f"{policy.reason}, found by the periodic resync")],
                         writes=1, error="")

    def _record(self, batch: list[Suspect], *, writes: int, error: str, extra: str = "") -> None:
        done = time.perf_counter()
        for s in batch:
            rec = DriftRecord(at=s.at, kind=s.kind, target=s.target, owner=s.owner, detail=s.detail + extra,
                              writes=writes, repaired_s=round(done - s.t0, 6), repaired=not error, error=error,
                              sender=s.sender)
            self.ring.append(rec)
            self.total += 1
            self.metrics.drift(s.kind, rec.repaired_s)
            if s.sender.pid:
                cmd = f": {s.sender.cmdline}" if s.sender.cmdline else ""
                who = f"pid {s.sender.pid} ({s.sender.comm or '?'}{cmd})"
            elif s.sender.port:
                who = f"netlink port {s.sender.port} (the process had exited; usually its pid)"
            elif "periodic resync" in s.detail:
                who = "an unknown process (no notification: found by the periodic resync)"
            else:
                who = "an unknown process (the kernel does not say who changes links)"
            if error:
                log.warning("node %s: drift by %s: %s; repair failed: %s", self.w.node, who, rec.detail, error)
            else:
                log.warning("node %s: drift by %s: %s; repaired in %.0f ms (%d write(s))", self.w.node, who,
                            rec.detail, rec.repaired_s * 1000, writes)
