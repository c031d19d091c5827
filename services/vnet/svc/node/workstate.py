"""What the parts of the node worker share: its work items, counters and state.

:class:`~vnet.svc.node.worker.NodeWorker` is one object and one control loop, written in
parts by concern that it inherits: :mod:`~vnet.svc.node.registration` (kernel probe,
underlay, register and heartbeat), :mod:`~vnet.svc.node.intake` (events -> work items,
and the scoped reconcile of a batch of them) and :mod:`~vnet.svc.node.policysync` (this
node's nftables ruleset). :class:`WorkerParts` tells the type checker which of the
worker's attributes the parts read (``NodeWorker.__init__`` sets them all) and which of
its methods they call across parts; it adds nothing at run time (the method stubs exist
only under ``TYPE_CHECKING``, so none can shadow a real one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanContext

from vnet.contracts.endpoint import (
    EndpointInfo,
    NodeStats,
)
from vnet.core import drivers as core_drivers
from vnet.core.dataplane_model import (
    EpDesired,
    NetDesired,
    PeerHost,
    ProbeResult,
    ReconcileResult,
    Scope,
    Support,
)
from vnet.runtime.node_wiring import PolicyAgentPort
from vnet.runtime.ports import EventConsumer
from vnet.runtime.service import Runtime
from vnet.svc.node.drift import DriftMonitor, NodeMetrics

T = TypeVar("T")

RETRY_S = 1.0  # until the desired state has been fetched once
CONSUMER_INACTIVE_S = 3600.0  # the server drops a node's consumers after this long without it
# An idle node's consumers pull once per this long, not once a second (a message ends the wait
# at once; a reconnect re-pulls at once): idle bus traffic per node /30 (docs/scale.md).
CONSUMER_PULL_EXPIRY_S = 30.0


# endpoint: one of this node's endpoints; remote: another node's endpoint in one of this node's
# overlay networks (its remotes change); network: a network was deleted; relations: a relation
# changed (connect, disconnect, mesh membership, parent/child, mode): the related overlays this
# host routes to may change; resync: a full resync.
# drift: the kernel reported a change to something of ours (svc/node/drift.py).
Kind = Literal["endpoint", "remote", "network", "relations", "resync", "drift"]

# Network events that change relations (the related overlays a host routes to, its parents).
RELATION_EVENTS = frozenset({"updated", "connected", "disconnected", "mesh_created", "mesh_deleted",
                             "mesh_member_added", "mesh_member_removed"})


_MISSING: Any = object()


class EndpointTable(dict[str, EpDesired]):
    """This node's desired endpoints by id, counting the endpoints of each container namespace
    as they come and go, so an attach learns that its namespace holds no other endpoint of
    ours without a pass over all of them (``shared``)."""

    def __init__(self, eps: Iterable[EpDesired] = ()) -> None:
        super().__init__()
        self._netns: dict[str, int] = {}
        for e in eps:
            self[e.id] = e

    def __setitem__(self, key: str, e: EpDesired) -> None:
        old = super().get(key)
        if old is not None:
            self._drop(old.netns)
        super().__setitem__(key, e)
        self._netns[e.netns] = self._netns.get(e.netns, 0) + 1

    def __delitem__(self, key: str) -> None:
        old = self[key]
        super().__delitem__(key)
        self._drop(old.netns)

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self:
            if default is _MISSING:
                raise KeyError(key)
            return default
        e = self[key]
        del self[key]
        return e

    def _drop(self, netns: str) -> None:
        n = self._netns.get(netns, 0) - 1
        if n > 0:
            self._netns[netns] = n
        else:
            self._netns.pop(netns, None)

    def shared(self, netns: str) -> int:
        """How many of these endpoints live in container namespace ``netns``."""
        return self._netns.get(netns, 0)

    # the other ways of changing a dict would miss the count
    def update(self, *a: Any, **k: Any) -> None:
        raise TypeError("EndpointTable: set or pop endpoints one by one")

    setdefault = popitem = clear = __ior__ = update  # type: ignore[assignment]


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
    reply: str = ""  # endpoint created: where its creator waits (this node answers it once ready)


@dataclass
class Counters:
    reconciles: int = 0
    full_resyncs: int = 0
    events: int = 0
    batches: int = 0
    deltas: int = 0  # batches whose remote endpoints' entries were written as a delta (no reconcile)
    last_full_writes: int = 0
    last_full_duration_s: float = 0.0
    last_full_errors: int = 0
    last_full_at: float = 0.0
    last_errors: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _spans_hosts(driver: str) -> bool:
    """An overlay-like network: remote endpoints, peers, routed relations (the registry says)."""
    return core_drivers.get(driver).spans_hosts


def _without_kernel(why: Support) -> dict[str, Support]:
    """Every driver unavailable for ``why``, except those that need nothing from the kernel."""
    ok = Support(available=True, reason="needs nothing from the kernel")
    return {d.name: why if d.kernel_kinds else ok for d in core_drivers.all_drivers()}


class WorkerParts:
    """The worker's state and cross-part methods, declared for the parts (see the module docstring)."""

    rt: Runtime
    node: str
    host_netns: str | None
    state_dir: str
    heartbeat_s: float
    underlay: str | None
    underlay_ifname: str | None
    wg_ifname: str
    wg_port: int
    wg_public_key: str | None
    wg_address: str | None
    fleet_resync_s: float
    resync_s: float
    encryption: Support | None
    dataplane: bool
    dataplane_reason: str
    probe_result: ProbeResult | None
    rec: Any
    nets: dict[str, NetDesired]
    eps: EndpointTable
    recorded: dict[str, tuple[str, str]]
    peers: list[PeerHost]
    routed: set[str]
    fetched: bool
    registered: bool
    counters: Counters
    copy_listeners: list[Callable[[Msg], Awaitable[None]]]
    queue: asyncio.Queue[WorkItem]
    _consumers: list[EventConsumer]
    policy: PolicyAgentPort | None
    isolation: Support
    _policy_dirty: asyncio.Event
    _policy_fetch: bool
    _policy_lock: asyncio.Lock
    metrics: NodeMetrics
    drift: DriftMonitor | None

    if TYPE_CHECKING:
        async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T: ...
        async def _fetch(self) -> bool: ...
        async def _reconcile(self, scope: Scope | None, *, policy_first: bool = False) -> ReconcileResult: ...
        async def _report(self, result: ReconcileResult, gone: Collection[str] = (),
                          answers: dict[str, tuple[str, EndpointInfo]] | None = None) -> None: ...
        def _policy_changed(self) -> None: ...
        def _policy_note(self, event: str, info: Any, *, local: bool) -> bool: ...
        async def _policy_sync(self, why: str, *, check: bool = True) -> None: ...
        async def _on_any_endpoint_event(self, msg: Msg) -> None: ...
