"""The connection every API mixin shares: :class:`ClientBase` (connect on first use, the typed
``call``, health and discovery) and :class:`ServiceStatus`.

The mixins (``vnet.api.network`` ...) build on this module and :mod:`vnet.client` composes
them into ``VNetManager``; nothing here imports either, so the client and its API modules
form no import cycle.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec
from nats.aio.client import Client

from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.messages import Empty, HealthReply, MetricsSummary
from vnet.contracts.subjects import Subject
from vnet.runtime.config import VNetConfig

T = TypeVar("T")


class ServiceStatus(msgspec.Struct, kw_only=True):
    """One running instance, as ``$SRV.PING`` and ``$SRV.STATS`` report it."""

    name: str
    id: str
    version: str
    started: str
    requests: int
    errors: int
    metadata: dict[str, str] = {}


class ClientBase:
    """Connection handling and the typed ``call`` every API mixin uses."""

    def __init__(self, config: VNetConfig | None = None, *, nc: Client | None = None) -> None:
        self.config = config or VNetConfig.load()
        self._nc = nc
        self._own_nc = nc is None
        self._lock = asyncio.Lock()
        self.last_trace_id: str | None = None
        # (subject template, trace id) of every call, in order (vnetctl prints a mutation's)
        self.trace_ids: list[tuple[str, str | None]] = []

    async def __aenter__(self) -> Self:
        await self._client()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _client(self) -> Client:
        if self._nc is None:
            async with self._lock:
                if self._nc is None:
                    self._nc = await nats_adapter.connect(self.config, "vnet-client")
        return self._nc

    async def close(self) -> None:
        if self._nc is not None and self._own_nc:
            await self._nc.drain()
        self._nc = None

    async def call(self, subject: Subject, payload: Any, reply_type: type[T], *,
                   params: dict[str, str] | None = None, timeout: float | None = None) -> T:
        nc = await self._client()
        reply, self.last_trace_id = await nats_adapter.request(
            nc, subject, payload, reply_type, params=params, timeout=timeout or self.config.request_timeout_s)
        if len(self.trace_ids) < 1000:  # a long-lived client keeps the first ones only
            self.trace_ids.append((subject.template, self.last_trace_id))
        return reply

    # -- discovery and health ----------------------------------------------------------------
    async def health(self, service: str, *, node: str | None = None) -> HealthReply:
        if service == subjects.NODE_SERVICE:
            if not node:
                raise ValueError("health of a node worker needs its node id")
            return await self.call(subjects.NODE_HEALTH, Empty(), HealthReply, params={"node": node})
        return await self.call(subjects.health(service), Empty(), HealthReply)

    async def metrics_summary(self) -> MetricsSummary:
        return await self.call(subjects.METRICS_SUMMARY, Empty(), MetricsSummary)

    async def services(self, *, wait: float = 0.5) -> list[ServiceStatus]:
        """Every running instance of every VNet service, from ``$SRV.STATS`` (scatter-gather)."""
        replies = await nats_adapter.discover(await self._client(), wait=wait)
        out = []
        for r in replies:
            name = str(r.get("name", ""))
            if not name.startswith("vnet-"):
                continue
            eps = r.get("endpoints") or []
            out.append(ServiceStatus(
                name=name.removeprefix("vnet-"),
                id=str(r.get("id", "")),
                version=str(r.get("version", "")),
                started=str(r.get("started", "")),
                requests=sum(int(e.get("num_requests", 0)) for e in eps),
                errors=sum(int(e.get("num_errors", 0)) for e in eps),
                metadata={str(k): str(v) for k, v in (r.get("metadata") or {}).items()},
            ))
        out.sort(key=lambda s: (s.name, s.metadata.get("vnet.node", ""), s.id))
        return out
