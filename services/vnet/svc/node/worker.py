"""The node worker's control loop: desired state from the services -> the kernel, level-triggered.

::

    start:   probe the kernel (which drivers really work) -> register (vnet.node.<node>.register,
             repeated as a heartbeat) -> fetch the desired state (vnet.endpoint.desired.get)
             -> full reconcile
    events:  vnet.evt.endpoint.{created,deleted}.<id> of this node, vnet.evt.network.deleted.<id>
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
    policy:  the PolicyAgent (vnet.adapters.nftables) keeps this node's ruleset in the kernel
             by element deltas (docs/dataplane.md). Before the first reconcile our tables are
             made to exist (empty: our traffic dropped). An attach or detach of this node is
             computed HERE (Ruleset.with_endpoint, no round trip) and written as ONE element
             transaction in the same thread step as its netlink work, before it (the binding is
             in before the link is up; "ready" means "enforced"); endpoints of other nodes
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
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import logging
import os
import resource
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext

from vnet.adapters import nats as nats_adapter
from vnet.adapters.nats import DurableConsumer
from vnet.adapters.nftables import PolicyAgent
from vnet.contracts import codec, subjects
from vnet.contracts.endpoint import (
    DesiredReply,
    DesiredRequest,
    EndpointEvent,
    EndpointStatusEvent,
    EndpointUpdatedEvent,
    NodeDeregister,
    NodeRegister,
    NodeRegistered,
    NodeStats,
    PolicyStats,
    TeardownReply,
    merge_desired,
    remote_of,
    to_desired,
)
from vnet.core import drivers as core_drivers
from vnet.core import errors as E
from vnet.core import mvpolicy, naming
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
from vnet.runtime.service import Runtime
from vnet.svc.node import lifecycle
from vnet.svc.node.dns import enabled as dns_enabled
from vnet.svc.node.drift import DriftMonitor, NodeMetrics
from vnet.telemetry import tracing

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RESYNC_S = 10.0
DEFAULT_HEARTBEAT_S = 10.0
RETRY_S = 1.0  # until the desired state has been fetched once
MAX_BATCH = 512
CONSUMER_INACTIVE_S = 3600.0  # the server drops a node's consumers after this long without it
DRIVERS = tuple(core_drivers.names())  # every registered driver (the simulated fleet reports them)


def _spans_hosts(driver: str) -> bool:
    """An overlay-like network: remote endpoints, peers, routed relations (the registry says)."""
    return core_drivers.get(driver).spans_hosts


def _without_kernel(why: Support) -> dict[str, Support]:
    """Every driver unavailable for ``why``, except those that need nothing from the kernel."""
    ok = Support(available=True, reason="needs nothing from the kernel")
    return {d.name: why if d.kernel_kinds else ok for d in core_drivers.all_drivers()}


# endpoint: one of this node's endpoints; remote: another node's endpoint in one of this node's
# overlay networks (its remotes change); network: a network was deleted; relations: a relation
# changed (connect, disconnect, mesh membership, parent/child, mode): the related overlays this
# host routes to may change; resync: a full resync.
# drift: the kernel reported a change to something of ours (svc/node/drift.py).
Kind = Literal["endpoint", "remote", "network", "relations", "resync", "drift"]
# Network events that change relations (the related overlays a host routes to, its parents).
RELATION_EVENTS = frozenset({"updated", "connected", "disconnected", "mesh_created", "mesh_deleted",
                             "mesh_member_added", "mesh_member_removed"})


@dataclass
class WorkItem:
    kind: Kind
    event: str = ""
    ident: str = ""
    endpoint: Any = None  # EndpointInfo for endpoint events
    fetch: bool = True  # resync: fetch the desired state first
    ctx: otel_context.Context | None = None
    span: SpanContext | None = None
    done: asyncio.Future[NodeStats] | None = None
    drift: Any = None  # drift: the suspects (svc/node/drift.py)


@dataclass
class Counters:
    reconciles: int = 0
    full_resyncs: int = 0
    events: int = 0
    batches: int = 0
    last_full_writes: int = 0
    last_full_duration_s: float = 0.0
    last_full_errors: int = 0
    last_full_at: float = 0.0
    last_errors: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


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


class NodeWorker:
    """One host's control loop (see the module docstring)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.node = rt.params["node"]
        self.host_netns = rt.config.host_netns
        params = rt.params
        self.resync_s = _float_param(params, "resync_s", rt.config.node_resync_interval_s)
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
        # The local copy of the desired state, and what the endpoint service has recorded.
        self.nets: dict[str, NetDesired] = {}
        self.eps: dict[str, EpDesired] = {}
        self.recorded: dict[str, tuple[str, str]] = {}
        self.peers: list[PeerHost] = []  # hosts of the remote endpoints of this node's overlay networks
        self.routed: set[str] = set()  # overlays here only because a local one is related to them
        self.fetched = False
        self.registered = False
        self.counters = Counters()
        self.queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        self._consumers: list[DurableConsumer] = []
        self._all: DurableConsumer | None = None  # every node's endpoint events, while rules need them
        self._scope_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._version = 0
        self._started = asyncio.Event()
        # Isolation (nftables): the agent, whether stateful filtering is available and why not.
        self.policy: PolicyAgent | None = None
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
        js = self.rt.js
        safe = self.node.replace(".", "_")
        own = subjects.EVT_TO_NODE.format(node=self.node).removesuffix(".>")
        self._consumers = [
            # Only the endpoint events addressed to this node (its endpoints, and those of the
            # overlays it holds or routes to): the endpoint service publishes a copy per node
            # that must act, so this grows with what changes here, not with the cluster
            # (docs/scale.md). Rule-set members of other nodes: the -all consumer, when needed.
            DurableConsumer(js, f"vnet-node-{safe}-ep", f"{own}.endpoint.>", deliver_all=False,
                            inactive_threshold_s=CONSUMER_INACTIVE_S, filter_subjects=[f"{own}.endpoint.>"]),
            DurableConsumer(js, f"vnet-node-{safe}-net", subjects.EVT_NETWORK.template, deliver_all=False,
                            inactive_threshold_s=CONSUMER_INACTIVE_S),
            DurableConsumer(js, f"vnet-node-{safe}-node", subjects.EVT_NODE.template, deliver_all=False,
                            inactive_threshold_s=CONSUMER_INACTIVE_S),
        ]
        await self._consumers[0].start(self._on_endpoint_event)
        await self._consumers[1].start(self._on_network_event)
        await self._consumers[2].start(self._on_node_event)
        if self.policy is not None:
            pol = DurableConsumer(js, f"vnet-node-{safe}-pol", subjects.EVT_POLICY.template, deliver_all=False,
                                  inactive_threshold_s=CONSUMER_INACTIVE_S)
            self._consumers.append(pol)
            await pol.start(self._on_policy_event)
            await self._event_scope()
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
        if self.rec is not None:
            self.rec.close()
            self.rec = None

    async def _halt(self) -> None:
        """Stop following events, kernel notifications (drift repairs would rebuild what a
        teardown removes) and every loop (a reconcile running in the thread finishes)."""
        if self.drift is not None:
            await self.drift.stop()
        consumers, self._consumers, self._all = self._consumers, [], None
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

    async def _deregister(self) -> None:
        """Graceful stop: tell the endpoint service now, so the other hosts drop this one's
        overlay entries at once instead of after the heartbeat timeout (the kernel here keeps
        everything: fail static). Fire and forget."""
        if not self.registered:
            return
        try:
            await self.rt.nc.publish(subjects.NODE_DEREGISTER.format(node=self.node),
                                     codec.encode(NodeDeregister(node=self.node, instance=self.rt.instance)))
            await self.rt.nc.flush(timeout=2)
        except Exception as exc:  # the heartbeat timeout covers it
            log.info("node %s: could not deregister: %s", self.node, exc)
        self.registered = False

    # -- isolation (nftables) -----------------------------------------------------------------
    async def _start_policy(self) -> None:
        """Check stateful filtering, and make our tables exist before anything is created:
        with no table of ours a new endpoint would be open until the first ruleset."""
        if not self.dataplane:  # same latch as the reconciler: never the kernel without a data plane
            self.isolation = Support(available=False, reason=f"data plane off: {self.dataplane_reason}")
            return
        agent = PolicyAgent(self.rt.nc, node=self.node, host_netns=self.host_netns,
                            timeout=self.rt.config.request_timeout_s, state_dir=self.state_dir)
        # macvlan endpoints are enforced inside their containers: the agent asks which they are
        agent.locals_source = lambda: mvpolicy.locals_from_desired(self.eps.values(), self.nets)
        self.isolation = await asyncio.to_thread(agent.start)
        if not self.isolation.available:
            log.warning("node %s: isolation is not stateful here: %s", self.node, self.isolation.reason)
        try:
            if await agent.ensure_tables():
                log.info("node %s: no nftables table of ours yet: installed the empty ruleset (our traffic "
                         "dropped until the first ruleset)", self.node)
        except Exception as exc:
            log.error("node %s: cannot install our nftables tables: %s", self.node, exc)
            self.isolation = Support(available=False, reason=f"nftables: {exc}")
        self.policy = agent

    async def _policy_sync(self, why: str, *, check: bool = True) -> None:
        """Fetch and apply this node's ruleset now (serialised); errors are logged and kept in
        the stats (the last ruleset, or the empty one, keeps enforcing)."""
        agent = self.policy
        if agent is None:
            return
        async with self._policy_lock:
            try:
                res = await agent.sync(check=check)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("node %s: policy sync (%s) failed; the last ruleset stays: %s", self.node, why, exc)
                return
        self.metrics.ruleset(res)
        if res.wrote:
            log.info("node %s: nftables ruleset %s applied (%s, %s) in %.0f ms", self.node, res.version, why,
                     res.reason, res.duration * 1000)
        await self._event_scope()

    def _wants_every_endpoint(self) -> bool:
        """Whether other nodes' endpoints outside what is addressed to us matter here: rules
        whose selectors take endpoints (labels, networks) put them in our sets, and macvlan
        tables list every endpoint of the networks they relate to. Unknown yet: yes."""
        agent = self.policy
        if agent is None:
            return False
        rs, mv = agent.target, agent.mv_target
        if rs is None:
            return True
        return any(s.selectors for s in rs.sets) or bool(mv is not None and mv.nets)

    async def _event_scope(self) -> None:
        """Start or stop the -all consumer (every node's endpoint events) as this node's rules
        need it. Only nodes whose rules select endpoints by label pay the cluster-wide fan-out;
        per-node ruleset deltas from the policy service would end that too (docs/scale.md)."""
        if not self._consumers:
            return  # not started (the first sync runs before the consumers), or stopping
        async with self._scope_lock:
            want = self._wants_every_endpoint()
            if want == (self._all is not None) or not self._consumers:
                return
            if want:
                name = f"vnet-node-{self.node.replace('.', '_')}-all"
                with contextlib.suppress(Exception):  # one left from an earlier period would replay its backlog
                    await self.rt.js.delete_consumer(subjects.EVENTS_STREAM, name)
                c = DurableConsumer(self.rt.js, name, subjects.EVT_ENDPOINT.template, deliver_all=False,
                                    inactive_threshold_s=CONSUMER_INACTIVE_S,
                                    filter_subjects=["vnet.evt.endpoint.created.>", "vnet.evt.endpoint.deleted.>",
                                                     "vnet.evt.endpoint.updated.>"])
                await c.start(self._on_any_endpoint_event)
                self._all = c
                self._consumers.append(c)
                # what was published before it existed is in the whole ruleset, fetched now
                self._policy_changed()
                log.info("node %s: rules here select endpoints: following every node's endpoint events", self.node)
            else:
                old, self._all = self._all, None
                assert old is not None
                if old in self._consumers:
                    self._consumers.remove(old)
                await old.stop(delete=True)
                log.info("node %s: no rule here selects endpoints: only the events addressed to it", self.node)

    def _policy_changed(self) -> None:
        """Something only the policy service sees whole changed (rules, modes, relations)."""
        if self.policy is not None:
            self._policy_fetch = True
            self._policy_dirty.set()

    def _policy_note(self, event: str, info: Any, *, local: bool) -> bool:
        """An endpoint added or removed: change the target ruleset here; False when that
        needs the whole ruleset (then fetched)."""
        agent = self.policy
        if agent is None:
            return True
        from vnet.contracts.policy import policy_endpoint

        pe = policy_endpoint(info)
        if event == "created":
            net = self.nets.get(info.network_id)
            bridge = net.bridge_name() if net is not None else naming.bridge_name(info.network_id)
            return agent.note_added(pe, local=local, bridge=bridge)
        return agent.note_removed(pe, local=local)

    def _push_policy(self) -> None:
        """In the kernel thread: the target ruleset's delta, one transaction (before the netlink work)."""
        agent = self.policy
        if agent is None:
            return
        try:
            res = agent.push()
        except Exception as exc:  # the next resync rewrites; the old bindings keep failing closed
            agent.last_error = str(exc)[:500]
            log.info("node %s: policy delta failed; the next sync repairs: %s", self.node, exc)
            self._policy_fetch = True
            return
        self.metrics.ruleset(res)  # from the kernel thread: handed to the loop
        if res is not None and res.whole:
            log.info("node %s: nftables ruleset written whole (%s) in %.1f ms", self.node, res.reason,
                     res.duration * 1000)

    async def _policy_loop(self) -> None:
        """Event-driven syncs, coalesced: events arriving during a sync cause one more."""
        while True:
            await self._policy_dirty.wait()
            self._policy_dirty.clear()
            if self._policy_fetch:
                self._policy_fetch = False
                await self._policy_sync("event", check=False)
            elif self.policy is not None:
                await asyncio.to_thread(self._push_policy)

    async def _on_policy_event(self, msg: Msg) -> None:
        self._policy_changed()

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
        desired = NodeDesired(networks=nets, endpoints=eps, underlay=underlay, peers=list(self.peers))
        self.counters.reconciles += 1
        if self.rec is None:
            return self._without_dataplane(desired, scope)
        if policy_first:  # one step in the kernel thread: the policy delta, then the netlink work
            def step() -> ReconcileResult:
                self._push_policy()
                return self.rec.reconcile(desired, scope)  # type: ignore[no-any-return]
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

    # -- registration ----------------------------------------------------------------------
    async def _probe(self) -> None:
        if not self.dataplane:
            why = Support(available=False, reason=f"data plane off: {self.dataplane_reason}")
            self.probe_result = ProbeResult(kinds={}, drivers=_without_kernel(why))
            return
        from vnet.adapters.netlink.probe import probe

        try:
            self.probe_result = await asyncio.to_thread(probe)
        except Exception as exc:
            log.warning("node %s: the kernel probe failed: %s", self.node, exc)
            why = Support(available=False, reason=f"the kernel probe failed: {exc}")
            self.probe_result = ProbeResult(kinds={}, drivers=_without_kernel(why))
            return
        missing = {d: s.reason for d, s in self.probe_result.drivers.items() if not s.available}
        for d, reason in sorted(missing.items()):
            log.info("node %s: driver %s unavailable: %s", self.node, d, reason)
        if self.underlay is None or self.underlay_ifname is None:
            try:
                found = await self._in_thread(self._find_underlay, self.underlay)
            except Exception as exc:
                log.info("node %s: could not read the host's addresses for the underlay: %s", self.node, exc)
            else:
                if found is not None:
                    self.underlay, self.underlay_ifname = found

    def _find_underlay(self, address: str | None) -> tuple[str, str] | None:
        """The interface holding ``address``, else the first IPv4 address (not loopback or
        link-local) of an interface that is not ours: where overlay peers reach this host."""
        host = self.rec.observer.host_full()
        for name in sorted(host.links):
            link = host.links[name]
            if name == "lo" or naming.is_ours(name) or naming.is_our_wg(name):
                continue
            for cidr in link.addrs:
                ip = ipaddress.ip_interface(cidr).ip
                if address is not None:
                    if str(ip) == address:
                        return address, name
                elif ip.version == 4 and not ip.is_loopback and not ip.is_link_local and not ip.is_multicast:
                    return str(ip), name
        return None

    async def _look_for_underlay(self) -> None:
        """No underlay yet (none when the worker started): look again; tell the registry when found."""
        try:
            found = await self._in_thread(self._find_underlay, self.underlay)
        except Exception as exc:
            log.debug("node %s: looking for the underlay: %s", self.node, exc)
            return
        if found is None:
            return
        self.underlay, self.underlay_ifname = found
        log.info("node %s: underlay %s on %s", self.node, *found)
        try:
            await self.register()
        except Exception as exc:  # the next heartbeat carries it
            log.info("node %s: could not re-register with the underlay: %s", self.node, exc)

    def _dns_registration(self) -> dict[str, Any]:
        """What the endpoints of this node learn about its resolver (vnet-node --dns)."""
        resolver = self.rt.state.get("dns")
        if not dns_enabled(self.rt):
            return {}
        out: dict[str, Any] = {"dns_domain": self.rt.params.get("dns_domain", "vnet")}
        if resolver is not None:  # started after the worker: the host's list from the next heartbeat on
            out.update(dns_search=resolver.search[:6], dns_options=resolver.options[:16])
        return out

    async def register(self) -> NodeRegistered:
        pr = self.probe_result
        req = NodeRegister(node=self.node, instance=self.rt.instance, underlay=self.underlay,
                           underlay_ifname=self.underlay_ifname, host_netns=self.host_netns,
                           privileged=os.geteuid() == 0, dataplane=self.dataplane,
                           drivers=dict(pr.drivers) if pr else {}, kinds=dict(pr.kinds) if pr else {},
                           heartbeat_s=self.heartbeat_s, version=self.rt.defn.version, isolation=self.isolation,
                           capabilities={"encrypted_overlay": self.encryption} if self.encryption else {},
                           wg_public_key=self.wg_public_key, wg_port=self.wg_port,
                           **self._dns_registration())
        reply, _ = await nats_adapter.request(self.rt.nc, subjects.NODE_REGISTER, req, NodeRegistered,
                                              timeout=self.rt.config.request_timeout_s, params={"node": self.node})
        if reply.wg_address is not None:
            self.wg_address = reply.wg_address
        return reply

    async def _wg_key(self) -> None:
        """Whether this node can run encrypted overlays (registered as the capability
        ``encrypted_overlay``) and its WireGuard public key (the key pair is generated on
        first use, the private key stays in the node's state directory)."""
        if self.rec is None:
            self.encryption = Support(available=False, reason=f"data plane off: {self.dataplane_reason}")
            return
        kinds = self.probe_result.kinds if self.probe_result is not None else {}
        kmod = kinds.get("wireguard", Support(available=False)).available
        try:
            sup: Support = await self._in_thread(self.rec.wireguard.capability, self.wg_ifname, kmod)
            if sup.available:
                self.wg_public_key = await self._in_thread(self.rec.wg_public_key, self.wg_ifname)
        except Exception as exc:
            sup = Support(available=False, reason=f"no WireGuard key pair: {exc}")
        self.encryption = sup
        if not sup.available:
            log.warning("node %s: encrypted overlays unavailable here (their endpoints fail with %s): %s",
                        self.node, E.ENCRYPTION_UNAVAILABLE.code, sup.reason)

    async def _heartbeat(self) -> None:
        await self._probe()
        await self._wg_key()
        failures = 0
        while True:
            try:
                rep = await self.register()
            except Exception as exc:
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "node %s: could not register with the endpoint service (retrying): %s", self.node, exc)
                await asyncio.sleep(min(RETRY_S * failures, self.heartbeat_s))
                continue
            if not self.registered or failures:
                log.info("node %s registered: %d endpoint(s) recorded here", self.node, rep.endpoints)
                if not self.fetched:
                    self.queue.put_nowait(WorkItem(kind="resync"))
            self.registered = True
            failures = 0
            await asyncio.sleep(self.heartbeat_s)

    # -- events ------------------------------------------------------------------------------
    def _item(self, **kw: Any) -> WorkItem:
        span = trace.get_current_span().get_span_context()
        return WorkItem(ctx=otel_context.get_current(), span=span if span.is_valid else None, **kw)

    async def _on_endpoint_event(self, msg: Msg) -> None:
        """An endpoint event addressed to this node (``vnet.evt.to.<node>.endpoint.<event>.<id>``)."""
        await self._endpoint_event(msg, addressed=True)

    async def _on_any_endpoint_event(self, msg: Msg) -> None:
        """Any node's endpoint event (``vnet.evt.endpoint.<event>.<id>``, the -all consumer):
        rule-set members only; what this node realises comes addressed to it."""
        await self._endpoint_event(msg, addressed=False)

    async def _endpoint_event(self, msg: Msg, *, addressed: bool) -> None:
        parts = msg.subject.split(".")
        if parts[2] == "to":  # vnet.evt.to.<node>.endpoint.<event>.<id>
            parts = parts[:2] + parts[4:]
        # Rule-set deltas come from ONE consumer at a time (the -all one while it runs): two
        # would not keep a created and a deleted of the same endpoint in order.
        sets_here = addressed == (self._all is None)
        if len(parts) >= 5 and parts[3] == "updated":
            if sets_here:
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
        if ev.endpoint.node == self.node and not addressed:
            return  # ours: it came addressed too, and the attach computes its rules
        if ev.endpoint.node != self.node:
            # rules may select it (labels, network, address): set members change here, coalesced
            if self.policy is not None and sets_here:
                if not self._policy_note(parts[3], ev.endpoint, local=False):
                    self._policy_fetch = True
                self._policy_dirty.set()
            if not addressed:
                return
            net = self.nets.get(ev.endpoint.network_id)
            if net is not None and _spans_hosts(net.driver):  # a remote of one of our overlays
                self.queue.put_nowait(self._item(kind="remote", event=parts[3], ident=ev.endpoint.network_id,
                                                 endpoint=ev.endpoint))
            return
        self.queue.put_nowait(self._item(kind="endpoint", event=parts[3], ident=ev.endpoint.id, endpoint=ev.endpoint))

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
        parts = msg.subject.split(".")
        if len(parts) < 5 or parts[3] not in ("left", "joined") or parts[4] == self.node:
            return
        for nid in sorted(n.id for n in self.nets.values() if _spans_hosts(n.driver)):
            self.queue.put_nowait(self._item(kind="remote", event=parts[3], ident=nid))

    async def request_resync(self, fetch: bool = True) -> NodeStats:
        """A full resync now (queued behind what is already waiting); its stats."""
        if self.torn_down:
            raise E.make(E.UNAVAILABLE, f"node {self.node} was torn down; restart its worker to rebuild it")
        fut: asyncio.Future[NodeStats] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(self._item(kind="resync", fetch=fetch, done=fut))
        return await fut

    # -- the loop ------------------------------------------------------------------------------
    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        while True:
            wait = next_full - loop.time()
            try:
                first = self.queue.get_nowait() if wait <= 0 else await asyncio.wait_for(self.queue.get(), wait)
            except (TimeoutError, asyncio.QueueEmpty):
                await self._safe_full(fetch=True, parent=None)
                next_full = loop.time() + (self.resync_s if self.fetched else min(RETRY_S, self.resync_s))
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
                next_full = loop.time() + (self.resync_s if self.fetched else min(RETRY_S, self.resync_s))
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
                page, _ = await nats_adapter.request(self.rt.nc, subjects.ENDPOINT_DESIRED,
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
        self.eps = {e.id: e for e in rep.desired.endpoints}
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

    async def _handle_events(self, items: list[WorkItem]) -> None:
        first = items[0]
        links = [Link(i.span) for i in items[1:] if i.span is not None]
        tracer = tracing.tracer()
        with tracer.start_as_current_span("node.events", context=first.ctx, links=links,
                                          attributes={"vnet.node": self.node, "vnet.events": len(items)}):
            scope_eps: set[str] = set()
            scope_nets: set[str] = set()
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
                    # as a delta when its host is a known peer, else the whole state (a new peer)
                    refetch = refetch or not self._remote_delta(it)
                    scope_nets.add(it.ident)
                elif it.kind == "relations":
                    refetch = True
            if refetch:
                before = dict(self.nets)
                # the state after every event of this batch (they were committed first)
                if await self._fetch():
                    # every network the fetch added, removed or changed (related overlays with
                    # their bridge, VXLAN device, FDB and neighbour entries) is reconciled now
                    scope_nets |= {n for n in before.keys() | self.nets.keys() if before.get(n) != self.nets.get(n)}
            # A network none of this node's endpoints uses any more: its bridge goes.
            used = {e.network_id for e in self.eps.values()}
            for nid in [n for n in self.nets if n not in used and n not in self.routed]:
                self.nets.pop(nid)
                scope_nets.add(nid)
            # A network new here may be the child of one already here: the parent's bridge
            # needs proxy ARP for it now (the planner finds children from the desired networks).
            scope_nets |= self._parents_of(set(self.nets) - had)
            self.counters.batches += 1
            # Endpoints created or removed: their policy delta computed here, then written in
            # the same kernel step as the netlink work and before it (bindings before the
            # link is up, "ready" means "enforced"): one transaction for the whole batch.
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
            result = await self._reconcile(Scope(endpoints=frozenset(scope_eps), networks=frozenset(scope_nets)),
                                           policy_first=policy)
            await self._report(result, gone)

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

    def _remote_delta(self, it: WorkItem) -> bool:
        """Apply a remote endpoint's event to the local desired state; False: refetch instead."""
        info = it.endpoint
        net = self.nets.get(it.ident)
        if info is None or net is None or info.node not in {p.name for p in self.peers}:
            return False
        rem = remote_of(info)
        others = tuple(r for r in net.remotes if r.mac != rem.mac)
        remotes = tuple(sorted((*others, rem), key=lambda r: r.mac)) if it.event == "created" else others
        self.nets[net.id] = msgspec.structs.replace(net, remotes=remotes)
        return True

    # -- status reports -------------------------------------------------------------------------
    def _next_version(self) -> int:
        self._version = max(self._version + 1, time.time_ns() // 1000)
        return self._version

    async def _report(self, result: ReconcileResult, gone: Collection[str] = ()) -> None:
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
            ev = EndpointStatusEvent(endpoint_id=eid, node=self.node, status=state,  # type: ignore[arg-type]
                                     reason=reason, code=code, version=v)
            try:
                # On this node's own subject: the bus lets this node publish nowhere else.
                await nats_adapter.publish_event(
                    self.rt.js, subjects.EVT_ENDPOINT_STATUS.format(node=self.node, id=eid), ev,
                    msg_id=f"endpoint.status.{eid}.{v}", template=subjects.EVT_ENDPOINT_STATUS.template)
            except Exception as exc:  # not recorded as reported: the next reconcile tries again
                log.info("node %s: could not report the status of %s: %s", self.node, eid, exc)
                return
            if state != "deleted" and eid in self.eps:
                self.recorded[eid] = (state, reason)

        await asyncio.gather(*(one(*t) for t in todo))

    # -- introspection ----------------------------------------------------------------------------
    def stats(self) -> NodeStats:
        c = self.counters
        return NodeStats(node=self.node, dataplane=self.dataplane, endpoints=len(self.eps), networks=len(self.nets),
                         writes=self.writes, reconciles=c.reconciles, full_resyncs=c.full_resyncs, events=c.events,
                         batches=c.batches, last_full_writes=c.last_full_writes,
                         last_full_duration_s=c.last_full_duration_s, last_full_errors=c.last_full_errors,
                         last_errors=list(c.last_errors),
                         last_full_at=c.last_full_at, desired_fetched=self.fetched,
                         failed={k: c.failed[k] for k in sorted(c.failed)[:100]}, resync_s=self.resync_s,
                         isolation=self.isolation, policy=self._policy_stats())

    def _policy_stats(self) -> PolicyStats | None:
        a = self.policy
        if a is None:
            return None
        return PolicyStats(syncs=a.syncs, applies=a.wrote, version=a.version,
                           last_reason=a.last.reason if a.last else "", last_error=a.last_error)
