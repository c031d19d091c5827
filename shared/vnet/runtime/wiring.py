"""The adapters a service is handed: built by the runtime at start, typed by the ports.

The runtime is the one place that knows which concrete adapter implements which port
(:mod:`vnet.runtime.ports`): a service asks ``rt.adapters`` for its store or an event
consumer and gets an object typed by the Protocol, so the service file reads as decisions
plus calls on interfaces, and a test can hand it a fake instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext

from vnet.adapters import ipam_store, redis
from vnet.adapters import nats as nats_adapter
from vnet.adapters.endpoint_store import EndpointStore
from vnet.adapters.idempotency import ReplyStore
from vnet.adapters.ipam_rates import IpamRates
from vnet.adapters.nats import DurableConsumer, Feed
from vnet.adapters.network_store import NetworkStore
from vnet.adapters.policy_store import PolicyStore
from vnet.contracts import subjects
from vnet.contracts.subjects import Subject
from vnet.runtime.config import VNetConfig
from vnet.runtime.ports import (
    EndpointStorePort,
    EventConsumer,
    FeedPort,
    IpamRatesPort,
    IpamStorePort,
    NetworkStorePort,
    PolicyStorePort,
    ReplyStorePort,
)

if TYPE_CHECKING:
    from vnet.runtime.node_wiring import NodeAdapters

T = TypeVar("T")


async def connect_bus(config: VNetConfig, name: str) -> Client:
    """A NATS connection of its own (the node simulator's extra clients), as the runtime makes one."""
    return await nats_adapter.connect(config, name)


class ServiceAdapters:
    """What one service instance runs on: its Redis (when the service uses one), NATS and JetStream."""

    def __init__(self, config: VNetConfig, js: JetStreamContext, redis_client: Any = None, *,
                 nc: Client | None = None) -> None:
        self._config = config
        self._js = js
        self._redis = redis_client
        self._nc = nc

    def _r(self) -> Any:
        if self._redis is None:
            raise RuntimeError("this service was started without Redis (ServiceDef.uses_redis is off)")
        return self._redis

    def endpoint_store(self) -> EndpointStorePort:
        return EndpointStore(self._r())

    def ipam_store(self, *, wait_replicas: int = 0, wait_timeout_ms: int = 500) -> IpamStorePort:
        """``wait_replicas``: answer allocations and releases once that many replicas hold them."""
        return ipam_store.IpamStore(self._r(), wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)

    def ipam_rates(self) -> IpamRatesPort:
        return IpamRates(self._r())

    def network_store(self) -> NetworkStorePort:
        return NetworkStore(self._r())

    def policy_store(self) -> PolicyStorePort:
        return PolicyStore(self._r())

    def reply_store(self, domain: str) -> ReplyStorePort:
        """Claims and replies of ``domain``'s idempotent mutations (``network``, ``policy``, ``endpoint``)."""
        return ReplyStore(self._r(), domain)

    async def load_ipam_scripts(self) -> None:
        """Load the IPAM Lua scripts once at start (calls go by SHA afterwards)."""
        await redis.load_scripts(self._r(), *ipam_store.SCRIPTS)

    async def mark_index_maintained(self, index: str) -> None:
        """Tell IPAM GC that the global index ``index`` ("endpoints", "networks") is kept
        even when it is empty (Redis drops empty sets)."""
        await self._r().set(ipam_store.registry_marker(redis.global_key(index)), b"1")

    def event_consumer(self, durable: str, filter_subject: str = subjects.EVENTS_WILDCARD, *,
                       deliver_all: bool = True, inactive_threshold_s: float | None = None,
                       pull_expiry_s: float | None = None, filter_subjects: list[str] | None = None) -> EventConsumer:
        """A durable consumer of domain events; ``inactive_threshold_s``: the server drops it
        when nobody pulls that long (one per instance, e.g. the metrics service's);
        ``pull_expiry_s`` and ``filter_subjects`` as :class:`~vnet.adapters.nats.DurableConsumer`
        takes them (None: its defaults)."""
        extra: dict[str, Any] = {}
        if pull_expiry_s is not None:
            extra["pull_expiry_s"] = pull_expiry_s
        return DurableConsumer(self._js, durable, filter_subject, deliver_all=deliver_all,
                               inactive_threshold_s=inactive_threshold_s, filter_subjects=filter_subjects, **extra)

    def feed(self, on_gap: Callable[[str], None]) -> FeedPort:
        """Core subscriptions whose losses ``on_gap`` repairs (:class:`~vnet.adapters.nats.Feed`):
        a node worker's node-addressed copies (docs/scale.md)."""
        return Feed(self._bus(), on_gap)

    def node(self) -> NodeAdapters:
        """The node worker's own adapters (policy agent, DNS server, kernel probe)."""
        # imported here: nftables, netlink and dnslib code is the node's alone
        from vnet.runtime.node_wiring import NodeAdapters

        return NodeAdapters(self._bus())

    def _bus(self) -> Client:
        if self._nc is None:
            raise RuntimeError("these adapters were built without a NATS connection")
        return self._nc

    async def request(self, subject: Subject, payload: Any, reply_type: type[T], *, timeout: float = 5.0,
                      params: dict[str, str] | None = None, deadline: float | None = None) -> tuple[T, str | None]:
        """A request outside a handler's trace (:func:`vnet.adapters.nats.request`): the reply and its trace id."""
        return await nats_adapter.request(self._bus(), subject, payload, reply_type, timeout=timeout, params=params,
                                          deadline=deadline)

    async def publish_event(self, subject: str, event: Any, *, msg_id: str, template: str = subjects.EVT.template,
                            retry_for_s: float = nats_adapter.PUBLISH_RETRY_S) -> int:
        """Publish to the events stream with retries (:func:`vnet.adapters.nats.publish_event`)."""
        return await nats_adapter.publish_event(self._js, subject, event, msg_id=msg_id, template=template,
                                                retry_for_s=retry_for_s)
