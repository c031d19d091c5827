"""The connection every API mixin shares: :class:`ClientBase` (connect on first use, the typed
``call``, health and discovery) and :class:`ServiceStatus`.

The mixins (``vnet.api.network`` ...) build on this module and :mod:`vnet.client` composes
them into ``VNetManager``; nothing here imports either, so the client and its API modules
form no import cycle.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec
from nats.aio.client import Client

from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.messages import Empty, HealthReply, MetricsSummary
from vnet.contracts.subjects import Subject
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig

T = TypeVar("T")


def _unanswered(err: E.VNetError) -> bool:
    """This attempt did nothing: the client's own timeout, no responders (marked by the
    adapter: nobody serves the subject; a 503 for a dependency carries no such mark), a
    service's 504 ``deadline_exceeded`` (it took the attempt off its queue after the
    attempt's deadline and did not run it; on a busy machine that answer can arrive before
    the client's own timer fires), or a 503 ``pending`` (an earlier attempt with the same
    request_id still runs; this one waited for its reply and did nothing itself)."""
    if err.code in (E.TIMEOUT.code, E.DEADLINE_EXCEEDED.code):
        return True
    return err.code == E.UNAVAILABLE.code and bool(err.details.get("no_responders") or err.details.get("pending"))


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
        # attempts sent again with the same request_id after no answer / no responders
        self.retries = 0

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
        """One request; ``timeout`` is each attempt's (default ``request_timeout_s``).

        A mutation that carries a ``request_id`` is sent again, with the same id, when an
        attempt gets no answer (the instance holding it may have been SIGKILLed: nobody will
        ever answer it), finds no responders (the service is restarting) or was skipped for
        its deadline (504 ``deadline_exceeded``: nothing was done), until
        ``mutation_retry_s`` after the first attempt: the services make a repeat return the
        first result (docs/reliability.md lists the guarantee per mutation). Anything a
        service answered, 503 included, is raised at once: the caller decides.
        """
        nc = await self._client()
        attempt_s = timeout or self.config.request_timeout_s
        retry = bool(getattr(payload, "request_id", None))
        give_up = time.monotonic() + max(attempt_s, self.config.mutation_retry_s)
        pause = 0.05
        while True:
            try:
                reply, self.last_trace_id = await nats_adapter.request(
                    nc, subject, payload, reply_type, params=params, timeout=attempt_s)
                break
            except E.VNetError as err:
                left = give_up - time.monotonic()
                if not (retry and _unanswered(err)) or left <= pause:
                    raise
            self.retries += 1
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)  # a restarting service needs a second or so
            # the last attempt waits only for what is left of the caller's time
            attempt_s = min(timeout or self.config.request_timeout_s, max(give_up - time.monotonic(), 0.1))
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
