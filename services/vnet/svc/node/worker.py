"""The node worker's control loop: desired state from the services -> the kernel, level-triggered.

::

    start:   probe the kernel (which drivers really work) -> register (vnet.node.<node>.register,
             repeated as a heartbeat) -> fetch the desired state (vnet.endpoint.desired.get)
             -> full reconcile
    events:  vnet.node.<node>.evt.endpoint.{created,deleted}.<id> (core NATS copies addressed to
             this node; a full resync as soon as the client has reconnected, since some may have
             been missed), vnet.evt.network.deleted.<id>
             -> the local copy of the desired state changes -> scoped reconcile of those ids
             (events that arrive while a reconcile runs are handled together in the next one);
             an endpoint of another host in one of our overlays changes that network's remotes
             here (its FDB/neighbour entries, a delta) when its host is a known peer, and
             refetches the desired state only for a host not known yet; a relation change
             (vnet.evt.network.{connected,disconnected,updated,mesh_*}) on a host with an
             overlay refetches it (the related overlays this host routes to, with no local
             endpoint, are part of it) and reconciles every network that changed; a network
             new here also reconciles its parent (proxy ARP on the parent's bridge)
    timer:   every ``resync_s`` (default 10 s) fetch the desired state again and reconcile the
             whole host: drift (an interface or address removed by hand) is repaired, a
             missed event is caught up, and a converged host costs zero kernel writes
    report:  vnet.evt.endpoint.status.<node>.<id> {node, status ready|failed|deleted, reason}, only
             when an endpoint's status differs from what the endpoint service has recorded
    policy:  the PolicyAgent (vnet.adapters.policy_agent) keeps this node's ruleset in the kernel
             by element deltas (docs/dataplane.md). Before the first reconcile our tables are
             made to exist (empty: our traffic dropped). An attach or detach of this node is
             computed HERE (Ruleset.with_endpoint, no round trip) and written as ONE element
             transaction in the same step as its netlink work, in a thread beside it while the
             interfaces are made, and always before a link goes up (the reconcile's gate: the
             binding is in before the link is up; "ready" means "enforced"); endpoints of other nodes
             change set members the same way (coalesced in one task). The whole ruleset is
             fetched (vnet.policy.ruleset.get) on rule and network events, when a delta cannot
             be computed here (a network new to this host, a host port already taken), and at
             every full resync, which also reads the kernel back (a deleted or altered table
             is restored; a converged host costs zero writes). Stopping the worker leaves the
             rules (fail static).

It holds no Redis credentials: everything comes over NATS. One task owns the local
desired state and runs every reconcile, so reconciles never overlap; the kernel work
itself runs in one dedicated thread (the reconciler's netlink sockets belong to it).

**Fail static.** Until the desired state has been fetched once, only scoped reconciles
run (a full one against an empty state would tear everything down). When the endpoint
service cannot be reached later, the periodic resync goes on against the last state
it received; nothing is flushed when the worker stops.

**Tracing.** An event's handling is one ``node.events`` span whose parent is the
``process vnet.evt...`` span of the event (so the trace of the client's request goes
on down to the reconcile and every kernel operation); when several events are
handled together, the first is the parent and the others are span links. Status
events published from there carry that trace on to the endpoint service.

**Data plane off.** Without root, or under the test suite (``VNET_RUN_PREFIX`` set)
without an explicit ``host_netns``, the worker never touches the kernel: it
registers with every driver unavailable (the host driver excepted) and says why.

**Where the code is.** This module holds the worker's state, its lifecycle, the loop and
the reconcile; the worker inherits its other parts, one module each:
:mod:`~vnet.svc.node.registration` (probe, underlay, register, heartbeat),
:mod:`~vnet.svc.node.intake` (events -> work items, a batch's scoped reconcile) and
:mod:`~vnet.svc.node.policysync` (nftables); :mod:`~vnet.svc.node.workstate` declares what
they share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import random
import resource
import time
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
from nats.aio.msg import Msg
from opentelemetry import trace

from vnet.contracts import codec, subjects
from vnet.contracts import headers as H
from vnet.contracts.endpoint import (
    DesiredReply,
    DesiredRequest,
    EndpointInfo,
    EndpointStatusEvent,
    NodeStats,
    TeardownReply,
    merge_desired,
    status_time,
)
from vnet.core import drivers as core_drivers
from vnet.core import errors as E
from vnet.core.dataplane_model import (
    EpDesired,
    NetDesired,
    NodeDesired,
    ObjectStatus,
    PeerHost,
    ProbeResult,
    ReconcileResult,
    Scope,
    Support,
    Underlay,
)
from vnet.core.plan import ep_owner
from vnet.runtime.node_wiring import PolicyAgentPort
from vnet.runtime.ports import EventConsumer, FeedPort
from vnet.runtime.service import Runtime
from vnet.svc.node import lifecycle
from vnet.svc.node.drift import DriftMonitor, NodeMetrics
from vnet.svc.node.intake import EventIntake
from vnet.svc.node.policysync import PolicySync
from vnet.svc.node.registration import Registration
from vnet.svc.node.workstate import (
    CONSUMER_INACTIVE_S,
    CONSUMER_PULL_EXPIRY_S,
    RETRY_S,
    Counters,
    EndpointTable,
    WorkItem,
    _spans_hosts,
)
from vnet.telemetry import tracing

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RESYNC_S = 10.0
DEFAULT_HEARTBEAT_S = 10.0
RESYNC_JITTER = 0.2
MAX_BATCH = 512
DRIVERS = tuple(core_drivers.names())  # every registered driver (the simulated fleet reports them)


def dataplane_mode(host_netns: str | None) -> tuple[bool, str]:
    """Whether this worker may change the kernel, and why not."""
    if os.geteuid() != 0:
        return False, "the node worker is not running as root, so it cannot change the kernel"
    if host_netns is None and os.environ.get("VNET_RUN_PREFIX"):
        return False, ("test-safety latch: VNET_RUN_PREFIX is set (a test run) and no host_netns was given, so this "
                       "worker will not touch the namespace it runs in")
    return True, ""


def _socket_cache_size() -> int:
    """Namespaces whose netlink socket the reconciler keeps open (2 descriptors each). A full
    resync visits every container in turn, so a cache smaller than the number of containers
    misses on every one of them (LRU under a cyclic scan): as large as a quarter of the
    descriptor limit allows, at least 1,024."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 16384
    return max(1024, min(16384, soft // 4))


def _scoped_endpoints(eps: list[EpDesired], scope: Scope, table: EndpointTable | None = None) -> list[EpDesired]:
    """The endpoints a scoped reconcile looks at: those in scope and those sharing a container
    namespace with one of them (they decide its default routes together), in their order.
    The planner, the observation and the reconciler select exactly these from a scoped desired
    state; handing them every endpoint of the node made each attach walk all of them several
    times (plan, observation targets, ledger, departed: ~1 ms at 1,000 endpoints).

    ``table``: ``eps`` is every endpoint of that table. One endpoint alone in its namespace
    (an attach) is then found without the two passes over ``eps`` (0.3 ms of the 1,000th
    attach in cProfile)."""
    ids = scope.endpoints
    if not ids:
        return []
    if table is not None and len(ids) == 1:
        (i,) = ids
        e = table.get(i)
        if e is None:
            return []
        if table.shared(e.netns) == 1:
            return [e]
    shared = {e.netns for e in eps if e.id in ids}
    return [e for e in eps if e.id in ids or e.netns in shared]


def _float_param(params: dict[str, str], name: str, default: float) -> float:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise E.make(E.INVALID_CONFIG, f"node worker parameter {name}={raw!r} is not a number") from None
    if v <= 0:
        raise E.make(E.INVALID_CONFIG, f"node worker parameter {name} must be positive, not {raw}")
    return v


class NodeWorker(Registration, EventIntake, PolicySync):
    """One host's control loop (see the module docstring)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.node = rt.params["node"]
        self.host_netns = rt.config.host_netns
        params = rt.params
        self.resync_s = _float_param(params, "resync_s", rt.config.node_resync_interval_s)
        # the period the control plane asks of every node, spaced by the cluster's size (the
        # heartbeat's reply, NodeRegistered.resync_s); the longer of the two is used
        self.fleet_resync_s = 0.0
        self.heartbeat_s = _float_param(params, "heartbeat_s", DEFAULT_HEARTBEAT_S)
        # This host's underlay address (overlay VTEP); found from the routes if not given.
        self.underlay = params.get("underlay") or rt.config.node_underlay
        self.underlay_ifname = params.get("underlay_ifname") or rt.config.node_underlay_ifname
        # WireGuard mesh (encrypted overlays): the key pair is made here, only the public key is
        # published; the registry gives the mesh address. Hosts sharing a machine need distinct
        # names: the default is one per node (lifecycle.wg_ifname), as is the state directory.
        self.wg_ifname = lifecycle.wg_ifname(params, self.node)
        self.state_dir = lifecycle.state_dir(rt.config, self.node)
        self.encryption: Support | None = None  # encrypted overlays possible here (None: not checked yet)
        self.torn_down = False  # `vnetctl node teardown`: nothing is reconciled any more
        self.wg_port = int(_float_param(params, "wg_port", 51820))
        self.wg_public_key: str | None = None
        self.wg_address: str | None = None
        self.dataplane, self.dataplane_reason = dataplane_mode(self.host_netns)
        self.probe_result: ProbeResult | None = None
        self.rec: Any = None  # Reconciler, made at start when the data plane is on
        self._pool: ThreadPoolExecutor | None = None
        self._push_pool: ThreadPoolExecutor | None = None  # an attach's policy delta, beside its netlink work
        # The local copy of the desired state, and what the endpoint service has recorded.
        self.nets: dict[str, NetDesired] = {}
        self.eps = EndpointTable()
        self.recorded: dict[str, tuple[str, str]] = {}
        self.peers: list[PeerHost] = []  # hosts of the remote endpoints of this node's overlay networks
        self.routed: set[str] = set()  # overlays here only because a local one is related to them
        self.fetched = False
        self.registered = False
        self.counters = Counters()
        self.queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        self._consumers: list[EventConsumer] = []
        self.feed: FeedPort | None = None  # the copies addressed to this node (core NATS)
        # Others in this process that hear the endpoint copies (the node's resolver) hear them
        # from this subscription, not one of their own: a copy delivered twice on the node's
        # connection would cost it the one answer its create may get (EventIntake._on_endpoint_event).
        self.copy_listeners: list[Callable[[Msg], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._version = 0
        self._started = asyncio.Event()
        # Isolation (nftables): the agent, whether stateful filtering is available and why not.
        self.policy: PolicyAgentPort | None = None
        self.isolation: Support = Support(available=False, reason="not checked yet")
        self._policy_dirty = asyncio.Event()
        self._policy_fetch = False  # the next policy task run fetches the whole ruleset (else: push)
        self._policy_lock = asyncio.Lock()
        # Drift by event: kernel notifications of the host namespace -> repairs (drift.py).
        self.metrics = NodeMetrics(rt, self.node)
        self.drift: DriftMonitor | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self.dataplane:
            from vnet.svc.node.reconcile import Reconciler

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vnet-node-{self.node}")
            self._push_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vnet-policy-{self.node}")
            self.rec = Reconciler(self.host_netns, node_name=self.node, state_dir=self.state_dir,
                                  max_namespaces=_socket_cache_size())
            log.info("node %s: managing %s (full resync every %.1fs)", self.node,
                     f"namespace {self.host_netns}" if self.host_netns else "the namespace it runs in", self.resync_s)
        else:
            log.warning("node %s: data plane off: %s", self.node, self.dataplane_reason)
        self.metrics.bind(asyncio.get_running_loop())
        await self._start_policy()
        self.drift = DriftMonitor(self, self.metrics)
        await self.drift.start()  # before the first reconcile: nothing it does goes unheard
        adapters = self.rt.adapters
        safe = self.node.replace(".", "_")
        own = subjects.EVT_TO_NODE.format(node=self.node).removesuffix(".>")
        # Only the events addressed to this node (its endpoints, those of the overlays it holds
        # or routes to, those rules here select, the joins and departures of the nodes sharing
        # an overlay with it): the endpoint service sends a copy to each node that must act, so
        # this grows with what changes here, not with the cluster (docs/scale.md). Core NATS:
        # a copy missed while disconnected is repaired by the full resync of _on_gap.
        self.feed = adapters.feed(self._on_gap)
        await self.feed.subscribe(f"{own}.endpoint.>", subjects.EVT_ENDPOINT_TO_NODE.template,
                                  self._on_endpoint_event)
        await self.feed.subscribe(f"{own}.node.>", subjects.EVT_NODE_TO_NODE.template, self._on_node_event)
        self._consumers = [
            adapters.event_consumer(f"vnet-node-{safe}-net", subjects.EVT_NETWORK.template, deliver_all=False,
                                    inactive_threshold_s=CONSUMER_INACTIVE_S, pull_expiry_s=CONSUMER_PULL_EXPIRY_S),
        ]
        await self._consumers[0].start(self._on_network_event)
        if self.policy is not None:
            pol = adapters.event_consumer(f"vnet-node-{safe}-pol", subjects.EVT_POLICY.template,
                                          deliver_all=False, inactive_threshold_s=CONSUMER_INACTIVE_S,
                                          pull_expiry_s=CONSUMER_PULL_EXPIRY_S)
            self._consumers.append(pol)
            await pol.start(self._on_policy_event)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._main(), name=f"node-{self.node}-loop"),
                       loop.create_task(self._heartbeat(), name=f"node-{self.node}-heartbeat")]
        if self.policy is not None:
            self._tasks.append(loop.create_task(self._policy_loop(), name=f"node-{self.node}-policy"))

    async def stop(self) -> None:
        """Stop following events and reconciling; the kernel keeps what it has (fail static)."""
        await self._halt()
        if self.rt.config.node_deregister_on_stop:
            await self._deregister()
        pool, self._pool = self._pool, None
        if pool is not None:  # a reconcile still running in its thread finishes first
            await asyncio.to_thread(pool.shutdown, True)
        push_pool, self._push_pool = self._push_pool, None
        if push_pool is not None:
            await asyncio.to_thread(push_pool.shutdown, True)
        if self.rec is not None:
            self.rec.close()
            self.rec = None

    async def _halt(self) -> None:
        """Stop following events, kernel notifications (drift repairs would rebuild what a
        teardown removes) and every loop (a reconcile running in the thread finishes)."""
        if self.drift is not None:
            await self.drift.stop()
        feed, self.feed = self.feed, None
        if feed is not None:
            await feed.close()
        consumers, self._consumers = self._consumers, []
        for c in consumers:
            await c.stop(delete=True)
        for t in self._tasks:
            t.cancel()
        pending = set(self._tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=1.0)
            for t in pending:  # a cancellation lost inside a library's wait_for/timeout handling: again
                t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def teardown(self, *, deregister: bool = True) -> TeardownReply:
        """Remove everything this node made (vnet.svc.node.lifecycle): stop reconciling first
        (nothing is rebuilt), leave the registry, tear down in the kernel thread. The worker
        stays up, answering health and stats as torn down, until its process is stopped."""
        self.torn_down = True
        await self._halt()
        if deregister:
            await self._deregister()
        if self.rec is None:
            return TeardownReply(node=self.node, ok=True,
                                 errors=[] if not self.dataplane else ["the reconciler is already closed"])
        agent = self.policy
        reply: TeardownReply = await self._in_thread(
            lambda: lifecycle.teardown_host(self.host_netns, self.node, self.state_dir, self.wg_ifname, rec=self.rec,
                                            enforcer=agent.enforcer if agent is not None else None))
        self.policy = None
        log.warning("node %s torn down in %.2f s: %d removed, %d error(s)%s", self.node, reply.duration_s,
                    len(reply.removed), len(reply.errors), "".join(f"\n  {e}" for e in reply.errors))
        return reply

    # -- kernel work, in the worker's own thread ------------------------------------------
    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._pool is not None
        ctx = contextvars.copy_context()  # the trace context follows into the thread
        return await asyncio.get_running_loop().run_in_executor(self._pool, ctx.run, fn, *args)

    async def _reconcile(self, scope: Scope | None, *, policy_first: bool = False) -> ReconcileResult:
        underlay = (Underlay(address=self.underlay, ifname=self.underlay_ifname, wg_address=self.wg_address,
                             wg_ifname=self.wg_ifname, wg_port=self.wg_port)
                    if self.underlay and self.underlay_ifname else None)
        nets, eps, refused = self._without_encryption(scope)
        if scope is not None:
            whole = not refused and len(eps) == len(self.eps)  # every endpoint of the table
            eps = _scoped_endpoints(eps, scope, self.eps if whole else None)
        desired = NodeDesired(networks=nets, endpoints=eps, underlay=underlay, peers=list(self.peers))
        self.counters.reconciles += 1
        if self.rec is None:
            return self._without_dataplane(desired, scope)
        if policy_first:
            # The policy delta is written in its own thread while the netlink work creates the
            # interfaces, which stay down until the delta is in (the reconcile's gate: the
            # binding is in before the link is up). Written first, the delta held the netlink
            # work up ~1.5-2 ms per attach (docs/dataplane.md, "Policy deltas").
            # It starts once the plan is made: started with the observation, its Python work
            # and the observation's took turns at the GIL (the observation 0.3-0.4 ms alone,
            # 0.7-0.9 ms beside it); the kernel's veth creation, which holds no GIL, is what
            # it runs beside now.
            def step() -> ReconcileResult:
                pool = self._push_pool
                assert pool is not None
                pushing: list[concurrent.futures.Future[None]] = []

                def start() -> None:
                    if not pushing:
                        pushing.append(pool.submit(contextvars.copy_context().run, self._push_policy))

                def gate() -> None:
                    start()
                    pushing[0].result()
                # reached through the data-plane port, which mypy sees returning Any; it is a ReconcileResult
                return self.rec.reconcile(desired, scope, gate=gate, planned=start)  # type: ignore[no-any-return]
            result: ReconcileResult = await self._in_thread(step)
        else:
            result = await self._in_thread(self.rec.reconcile, desired, scope)
        result.endpoints.update(refused)
        self.metrics.reconcile(scope, result)
        return result

    def _without_encryption(self, scope: Scope | None) -> tuple[list[NetDesired], list[EpDesired],
                                                                   dict[str, ObjectStatus]]:
        """The desired networks and endpoints to realise, and the endpoints refused here: on a
        node that cannot run encrypted overlays (no WireGuard), an encrypted network is not
        built at all (never in clear) and its endpoints fail with ``encryption_unavailable``."""
        nets, eps = list(self.nets.values()), list(self.eps.values())
        sup = self.encryption
        if sup is None or sup.available or self.rec is None:
            return nets, eps, {}
        enc = {n.id for n in nets if _spans_hosts(n.driver) and n.encrypted}
        if not enc:
            return nets, eps, {}
        st = ObjectStatus(state="failed", code=E.ENCRYPTION_UNAVAILABLE.code,
                          reason=f"node {self.node} cannot run encrypted overlays: {sup.reason}")
        refused = {e.id: st for e in eps if e.network_id in enc and (scope is None or e.id in scope.endpoints)}
        return [n for n in nets if n.id not in enc], [e for e in eps if e.network_id not in enc], refused

    def _without_dataplane(self, desired: NodeDesired, scope: Scope | None) -> ReconcileResult:
        """Host-driver endpoints need nothing; every other one cannot be realised here."""
        driver = {n.id: n.driver for n in desired.networks}
        eps: dict[str, ObjectStatus] = {}
        for e in desired.endpoints:
            if scope is not None and e.id not in scope.endpoints:
                continue
            d = driver.get(e.network_id)
            eps[e.id] = (ObjectStatus(state="ready") if d is not None and not core_drivers.get(d).realised else
                         ObjectStatus(state="failed", code=E.DRIVER_UNAVAILABLE.code,
                                      reason=f"node {self.node} has no data plane: {self.dataplane_reason}"))
        return ReconcileResult(ops_planned=0, ops_applied=0, writes=0, errors=[], endpoints=eps, networks={},
                               duration=0.0)

    @property
    def writes(self) -> int:
        return int(self.rec.writes) if self.rec is not None else 0

    async def request_resync(self, fetch: bool = True) -> NodeStats:
        """A full resync now (queued behind what is already waiting); its stats."""
        if self.torn_down:
            raise E.make(E.UNAVAILABLE, f"node {self.node} was torn down; restart its worker to rebuild it")
        fut: asyncio.Future[NodeStats] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(self._item(kind="resync", fetch=fetch, done=fut))
        return await fut

    # -- the loop ------------------------------------------------------------------------------
    def _next_period(self) -> float:
        """Seconds to the next full resync: soon while nothing was fetched yet; else the longer of
        ``resync_s`` and the cluster's period, cut by up to 20 % at random so that nodes started
        together (a restart of the fleet) do not fetch together ever after."""
        if not self.fetched:
            return min(RETRY_S, self.resync_s)
        return max(self.resync_s, self.fleet_resync_s) * random.uniform(1.0 - RESYNC_JITTER, 1.0)

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        while True:
            wait = next_full - loop.time()
            try:
                first = self.queue.get_nowait() if wait <= 0 else await asyncio.wait_for(self.queue.get(), wait)
            except (TimeoutError, asyncio.QueueEmpty):
                await self._safe_full(fetch=True, parent=None)
                next_full = loop.time() + self._next_period()
                continue
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self.queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            events = [i for i in batch if i.kind not in ("resync", "drift")]
            resyncs = [i for i in batch if i.kind == "resync"]
            drifts = [i for i in batch if i.kind == "drift"]
            if events:
                try:
                    await self._handle_events(events)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("node %s: handling %d event(s) failed; the next full resync repairs", self.node,
                                  len(events))
            if drifts and self.drift is not None:  # its own reconcile: its writes are the repair's
                try:
                    await self.drift.repair(drifts)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("node %s: repairing drift failed; the next full resync repairs", self.node)
            if resyncs:
                await self._safe_full(fetch=any(r.fetch for r in resyncs), parent=resyncs[0])
                next_full = loop.time() + self._next_period()
                stats = self.stats()
                for r in resyncs:
                    if r.done is not None and not r.done.done():
                        r.done.set_result(stats)

    async def _safe_full(self, *, fetch: bool, parent: WorkItem | None) -> None:
        try:
            await self._full(fetch=fetch, parent=parent)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("node %s: full resync failed; retrying at the next one", self.node)

    async def _fetch(self) -> bool:
        try:
            # Every page (a node may hold more endpoints than one bus message carries);
            # a failed page keeps the last whole state rather than half of a new one.
            pages: list[DesiredReply] = []
            cursor: str | None = None
            while True:
                page, _ = await self.rt.adapters.request(subjects.ENDPOINT_DESIRED,
                                                         DesiredRequest(node=self.node, cursor=cursor),
                                                         DesiredReply, timeout=self.rt.config.request_timeout_s)
                pages.append(page)
                cursor = page.next_cursor
                if cursor is None:
                    break
            rep = merge_desired(pages)
        except E.VNetError as err:
            (log.info if self.fetched else log.debug)(
                "node %s: could not fetch the desired state (%s); %s", self.node, err.message,
                "keeping the last one" if self.fetched else "retrying")
            return False
        self.nets = {n.id: n for n in rep.desired.networks}
        self.eps = EndpointTable(rep.desired.endpoints)
        self.recorded = {i: (s, rep.reasons.get(i, "")) for i, s in rep.statuses.items()}
        self.peers = list(rep.desired.peers)
        self.routed = set(self.nets) - {e.network_id for e in self.eps.values()}
        self.fetched = True
        return True

    async def _full(self, *, fetch: bool, parent: WorkItem | None) -> None:
        tracer = tracing.tracer()
        ctx = parent.ctx if parent is not None else None
        with tracer.start_as_current_span("node.resync", context=ctx,
                                          attributes={"vnet.node": self.node, "vnet.fetch": fetch}) as span:
            if self.dataplane and not self.registered:
                # The registration answers this node's WireGuard mesh address: a whole-host
                # reconcile before it would take a restarted worker's encrypted overlays
                # down (fail static). The heartbeat queues a resync once registered.
                span.set_attribute("vnet.skipped", "not registered yet")
                return
            if fetch:
                await self._fetch()
            if not self.fetched:  # never reconcile the whole host against a state we do not have
                span.set_attribute("vnet.skipped", "desired state not fetched yet")
                return
            if self.rec is not None and self.underlay_ifname is None and self.probe_result is not None:
                await self._look_for_underlay()
            t0 = time.perf_counter()
            result = await self._reconcile(None)
            c = self.counters
            c.full_resyncs += 1
            c.last_full_writes = result.writes
            c.last_full_duration_s = round(time.perf_counter() - t0, 6)
            c.last_full_errors = len(result.errors)
            c.last_errors = [f"{e.owner}: {e.message}" for e in result.errors[:20]]
            c.last_full_at = time.time()
            span.set_attribute("vnet.writes", result.writes)
            for eid in [i for i in c.failed if i not in self.eps]:  # gone while we were not told
                c.failed.pop(eid)
            if result.writes:
                log.info("node %s: full resync made %d kernel write(s) (drift or missed events repaired)", self.node,
                         result.writes)
            node_err = next((e for e in result.errors if e.owner == "node"), None)
            if node_err is not None:
                log.warning("node %s: %s", self.node, node_err.message)
            await self._policy_sync("resync")  # also restores a deleted or altered table of ours
            if self.drift is not None:  # what the resync repaired, in the drift list too
                self.drift.note_resync(result, self.policy.last if self.policy is not None else None)
            await self._report(result)

    # -- status reports -------------------------------------------------------------------------
    def _next_version(self) -> int:
        self._version = max(self._version + 1, time.time_ns() // 1000)
        return self._version

    async def _report(self, result: ReconcileResult, gone: Collection[str] = (),
                      answers: dict[str, tuple[str, EndpointInfo]] | None = None) -> None:
        todo: list[tuple[str, str, str, str]] = []
        for eid, st in result.endpoints.items():
            if st.state == "failed":
                self.counters.failed[eid] = st.reason
            else:
                self.counters.failed.pop(eid, None)
            if self.recorded.get(eid) != (st.state, st.reason):
                todo.append((eid, st.state, st.reason, st.code))
        for eid in gone:
            self.counters.failed.pop(eid, None)
            err = next((e for e in result.errors if e.owner == ep_owner(eid)), None)
            if err is None:
                todo.append((eid, "deleted", "", ""))
            else:
                todo.append((eid, "failed", f"teardown failed: {err.message}", err.code))
        if not todo:
            return

        async def one(eid: str, state: str, reason: str, code: str) -> None:
            v = self._next_version()
            # ``state`` is one of the worker's own states (ready, failed, deleted), a plain str here
            ev = EndpointStatusEvent(endpoint_id=eid, node=self.node, status=state,  # type: ignore[arg-type]
                                     reason=reason, code=code, version=v)
            try:
                # On this node's own subject: the bus lets this node publish nowhere else.
                reporting = asyncio.ensure_future(self.rt.adapters.publish_event(
                    subjects.EVT_ENDPOINT_STATUS.format(node=self.node, id=eid), ev,
                    msg_id=f"endpoint.status.{eid}.{v}", template=subjects.EVT_ENDPOINT_STATUS.template))
                answer = answers.get(eid) if answers and state == "ready" else None
                if answer is not None:
                    # The report first: its publish is written out before it awaits the stream's
                    # ack, so every endpoint replica hears it before the caller has the answer
                    # (a read right after finds the record ready: StatusBoard).
                    await asyncio.sleep(0)
                    await self._answer(answer[0], answer[1], v)
                await reporting
            except Exception as exc:  # not recorded as reported: the next reconcile tries again
                log.info("node %s: could not report the status of %s: %s", self.node, eid, exc)
                return
            if state != "deleted" and eid in self.eps:
                self.recorded[eid] = (state, reason)

        await asyncio.gather(*(one(*t) for t in todo))

    async def _answer(self, reply: str, info: EndpointInfo, version: int) -> None:
        """Answer the create waiting for ``info`` on ``reply`` (the endpoint service forwarded
        its caller's reply subject with the event): the endpoint as the service would answer
        it once the report is folded in, one hop sooner (docs/endpoints.md, "Who answers a
        create"). The service answers too, after its fold; the caller takes the first answer."""
        ready = msgspec.structs.replace(info, status="ready", reason="", status_code="",
                                        status_at=status_time(version))
        headers = {H.NODE: self.node}
        sc = trace.get_current_span().get_span_context()
        if sc.is_valid:
            headers[H.TRACE_ID] = f"{sc.trace_id:032x}"
        try:
            await self.rt.nc.publish(reply, codec.encode(ready), headers=headers)
        except Exception as exc:  # the service's own answer follows
            log.info("node %s: could not answer the create of %s: %s", self.node, info.id, exc)

    # -- introspection ----------------------------------------------------------------------------
    def stats(self) -> NodeStats:
        c = self.counters
        return NodeStats(node=self.node, dataplane=self.dataplane, endpoints=len(self.eps), networks=len(self.nets),
                         writes=self.writes, reconciles=c.reconciles, full_resyncs=c.full_resyncs, events=c.events,
                         batches=c.batches, remote_deltas=c.deltas, last_full_writes=c.last_full_writes,
                         last_full_duration_s=c.last_full_duration_s, last_full_errors=c.last_full_errors,
                         last_errors=list(c.last_errors),
                         last_full_at=c.last_full_at, desired_fetched=self.fetched,
                         failed={k: c.failed[k] for k in sorted(c.failed)[:100]},
                         resync_s=max(self.resync_s, self.fleet_resync_s),
                         isolation=self.isolation, policy=self._policy_stats())
