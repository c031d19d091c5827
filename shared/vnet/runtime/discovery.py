"""Service discovery (``$SRV.PING|INFO|STATS``, NATS ADR-32), answered by us in full.

``nats.micro`` would answer these from its own endpoint records, which it updates only
around its own handler. Our request path subscribes by itself (one task per request under
a bound, see :mod:`vnet.runtime.service`), so the counters must be ours too: rather than
write into ``nats.micro``'s private fields, this module owns the whole protocol. It
subscribes to the nine control subjects of the instance and answers with upstream's
public reply types (``nats.micro.service.ServicePing``, ``ServiceInfo``, ``ServiceStats``,
``EndpointInfo``, ``EndpointStats``), so ``nats micro ls/info/stats`` and any ADR-32 client
read it exactly as they read a ``nats.micro`` service.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import (
    DEFAULT_PREFIX,
    EndpointInfo,
    EndpointStats,
    ServiceInfo,
    ServicePing,
    ServiceStats,
    ServiceVerb,
    control_subject,
)
from nats.nuid import NUID


@dataclass
class EndpointRecord:
    """One endpoint as discovery reports it; the request path updates the counters."""

    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str] = field(default_factory=dict)
    num_requests: int = 0
    num_errors: int = 0
    last_error: str = ""
    processing_time_ns: int = 0

    def stats(self) -> EndpointStats:
        return EndpointStats(name=self.name, subject=self.subject, queue_group=self.queue_group,
                             num_requests=self.num_requests, num_errors=self.num_errors, last_error=self.last_error,
                             processing_time=self.processing_time_ns,
                             # derived when asked, not per request (the request path stays lean)
                             average_processing_time=self.processing_time_ns // max(self.num_requests, 1))

    def info(self) -> EndpointInfo:
        return EndpointInfo(name=self.name, subject=self.subject, queue_group=self.queue_group,
                            metadata=dict(self.metadata))


class Discovery:
    """The ADR-32 identity of one service instance: its id, and its answers on ``$SRV.*``."""

    def __init__(self, nc: Client, *, name: str, version: str, description: str | None,
                 metadata: dict[str, str]) -> None:
        self.nc = nc
        self.id = NUID().next().decode()
        self.name = name
        self.version = version
        self.description = description
        self.metadata = dict(metadata)
        self.endpoints: list[EndpointRecord] = []
        self.started = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # naive UTC, as nats.micro reports it
        self._subs: list[Subscription] = []

    def add_endpoint(self, name: str, subject: str, queue_group: str,
                     metadata: dict[str, str] | None = None) -> EndpointRecord:
        rec = EndpointRecord(name=name, subject=subject, queue_group=queue_group, metadata=dict(metadata or {}))
        self.endpoints.append(rec)
        return rec

    async def start(self) -> None:
        """Answer ``$SRV.<VERB>``, ``$SRV.<VERB>.<name>`` and ``$SRV.<VERB>.<name>.<id>``."""
        handlers: dict[ServiceVerb, Callable[[Msg], Awaitable[None]]] = {
            ServiceVerb.PING: self._ping, ServiceVerb.INFO: self._info, ServiceVerb.STATS: self._stats}
        for verb, handler in handlers.items():
            for name, ident in ((None, None), (self.name, None), (self.name, self.id)):
                subject = control_subject(verb, name=name, id=ident, prefix=DEFAULT_PREFIX)
                self._subs.append(await self.nc.subscribe(subject, cb=handler))

    async def stop(self) -> None:
        """Stop answering (the instance leaves ``nats micro ls``); errors of a closed connection are moot."""
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    def stats(self) -> ServiceStats:
        return ServiceStats(name=self.name, id=self.id, version=self.version, metadata=dict(self.metadata),
                            started=self.started, endpoints=[e.stats() for e in self.endpoints])

    def info(self) -> ServiceInfo:
        return ServiceInfo(name=self.name, id=self.id, version=self.version, metadata=dict(self.metadata),
                           description=self.description, endpoints=[e.info() for e in self.endpoints])

    async def _ping(self, msg: Msg) -> None:
        ping = ServicePing(name=self.name, id=self.id, version=self.version, metadata=dict(self.metadata))
        await msg.respond(json.dumps(ping.to_dict()).encode())

    async def _info(self, msg: Msg) -> None:
        await msg.respond(json.dumps(self.info().to_dict()).encode())

    async def _stats(self, msg: Msg) -> None:
        await msg.respond(json.dumps(self.stats().to_dict()).encode())
