"""The one service pattern: every VNet service and the node worker run on this.

A service is a :class:`ServiceDef` — a name, a version and typed operations::

    SERVICE = ServiceDef("ipam", "IP address management")

    @SERVICE.op("addr.request", subjects.IPAM_ADDR_REQUEST, AddrRequest)
    async def request_addr(ctx: Ctx, req: AddrRequest) -> AddrReply: ...

:func:`start` turns it into a ``nats.micro`` service (``$SRV.PING|INFO|STATS``,
queue group per endpoint) and adds what plain ``nats.micro`` lacks:

* strict decoding (unknown fields, wrong types, oversized bodies -> 400 naming the problem);
* errors as ``Nats-Service-Error``/``-Code`` headers plus a JSON body with a stable
  code; an unexpected exception is logged with its traceback and reaches the caller
  only as ``internal`` with the trace id, never as a Python repr;
* bounded concurrency: ``nats.micro`` awaits one handler at a time per endpoint,
  which caps throughput at 1/latency, so each request runs in its own task under a
  semaphore (the subscription stops reading while the bound is reached);
* a ``process <subject template>`` span per request, parented on the caller's
  ``traceparent``; the trace id returned in ``Vnet-Trace-Id``;
* ``vnet_operations_total`` / ``_errors_total`` / ``_duration_seconds`` per op,
  reported to the metrics service;
* a ``health`` operation; graceful drain on stop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Endpoint as MicroEndpoint
from nats.micro.service import EndpointConfig, Service

from vnet.adapters import nats as nats_adapter
from vnet.contracts import codec, subjects
from vnet.contracts import headers as H
from vnet.contracts.messages import Empty, HealthReply
from vnet.contracts.subjects import Subject
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig
from vnet.telemetry import tracing
from vnet.telemetry.metrics import OpMetrics

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Rep = TypeVar("Rep")
VERSION = "0.1.0"


@dataclass
class Ctx:
    """What a handler gets besides its typed request."""

    rt: Runtime
    subject: str
    template: str
    headers: dict[str, str]
    params: dict[str, str]
    trace_id: str | None

    async def publish_event(self, domain: str, event: str, ident: str, payload: Any, *,
                            msg_id: str | None = None) -> int:
        return await self.rt.publish_event(domain, event, ident, payload, msg_id=msg_id)

    async def request(self, subject: Subject, payload: Any, reply_type: type[Rep], *,
                      params: dict[str, str] | None = None, timeout: float | None = None) -> Rep:
        """Call another service; the trace continues across the hop."""
        reply, _ = await nats_adapter.request(
            self.rt.nc, subject, payload, reply_type, params=params,
            timeout=timeout or self.rt.config.request_timeout_s)
        return reply


Handler = Callable[[Ctx, Any], Awaitable[Any]]


@dataclass
class Op(Generic[Req]):
    name: str
    subject: Subject
    req_type: type[Req]
    handler: Handler
    max_bytes: int = codec.MAX_REQUEST_BYTES


@dataclass
class ServiceDef:
    """A service's name, description and operations (no I/O until :func:`start`)."""

    name: str
    description: str
    version: str = VERSION
    ops: list[Op[Any]] = field(default_factory=list)
    on_start: list[Callable[[Runtime], Awaitable[None]]] = field(default_factory=list)
    on_stop: list[Callable[[Runtime], Awaitable[None]]] = field(default_factory=list)
    health_checks: list[Callable[[Runtime], Awaitable[tuple[str, str]]]] = field(default_factory=list)
    uses_redis: bool = True
    # Subject used for this service's health op; the node worker's carries its id.
    health_subject: Subject | None = None

    def op(self, name: str, subject: Subject, req_type: type[Req], *,
           max_bytes: int = codec.MAX_REQUEST_BYTES) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            if any(o.name == name for o in self.ops):
                raise ValueError(f"duplicate op {name!r} in service {self.name}")
            self.ops.append(Op(name, subject, req_type, fn, max_bytes))
            return fn

        return deco

    def starting(self, fn: Callable[[Runtime], Awaitable[None]]) -> Callable[[Runtime], Awaitable[None]]:
        self.on_start.append(fn)
        return fn

    def stopping(self, fn: Callable[[Runtime], Awaitable[None]]) -> Callable[[Runtime], Awaitable[None]]:
        self.on_stop.append(fn)
        return fn


class Runtime:
    """One running instance of a service: connections, metrics, in-flight tasks."""

    def __init__(self, defn: ServiceDef, config: VNetConfig, nc: Client, *, params: dict[str, str],
                 redis: Any = None) -> None:
        self.defn = defn
        self.config = config
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.redis = redis
        self.params = params
        self.instance = ""
        self.metrics = OpMetrics(defn.name, "")
        self.started = time.time()
        self.state: dict[str, Any] = {}  # per-service state set by on_start hooks
        self._micro: Service | None = None
        self._sem = asyncio.Semaphore(config.max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._bg: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stopped = asyncio.Event()

    # -- events --------------------------------------------------------------------------
    async def publish_event(self, domain: str, event: str, ident: str, payload: Any, *,
                            msg_id: str | None = None) -> int:
        subject = subjects.event(domain, event, ident)
        return await nats_adapter.publish_event(
            self.js, subject, payload, msg_id=msg_id or f"{domain}.{event}.{ident}.{time.time_ns()}")

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        """A background task that is cancelled when the service stops."""
        self._bg.append(asyncio.ensure_future(coro))

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    # -- request handling ----------------------------------------------------------------
    def _endpoint_for(self, name: str) -> MicroEndpoint | None:
        if self._micro is None:
            return None
        for ep in self._micro._endpoints:
            if ep._name == name:
                found: MicroEndpoint = ep
                return found
        return None

    def _make_handler(self, op: Op[Any]) -> Callable[[Request], Awaitable[None]]:
        async def on_request(request: Request) -> None:
            await self._sem.acquire()
            task = asyncio.create_task(self._run(op, request))
            self._tasks.add(task)
            task.add_done_callback(self._done)

        return on_request

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._sem.release()

    async def _run(self, op: Op[Any], request: Request) -> None:
        t0 = time.perf_counter()
        msg = request._msg
        hdrs = dict(msg.headers or {})
        code: str | None = None
        failure: E.VNetError | None = None
        with tracing.process_span(op.subject.template, msg.subject, hdrs,
                                  **{"vnet.service": self.defn.name, "vnet.op": op.name}) as span:
            trace_id = tracing.trace_id_hex(span)
            reply_headers = tracing.inject_headers({H.INSTANCE: self.instance})
            if trace_id:
                reply_headers[H.TRACE_ID] = trace_id
            try:
                if self._stopping:
                    raise E.make(E.UNAVAILABLE, f"{self.defn.name} instance {self.instance} is shutting "
                                 "down; retry (another replica answers)")
                req = codec.decode(msg.data, op.req_type, max_bytes=op.max_bytes)
                ctx = Ctx(self, msg.subject, op.subject.template, hdrs,
                          _params(op.subject.template, msg.subject), trace_id)
                result = await op.handler(ctx, req)
                body = codec.encode(result) if result is not None else b"{}"
            except E.VNetError as err:
                failure = err
            except Exception as exc:
                log.error("unexpected error in %s %s: %s", self.defn.name, op.name,
                          "".join(traceback.format_exception(exc)))
                tracing.mark_error(span, E.INTERNAL.code, type(exc).__name__)
                span.record_exception(exc)
                failure = E.make(E.INTERNAL, f"internal error in {self.defn.name} while handling {op.name}; "
                                 f"the logs and trace {trace_id} have the details")
            if failure is not None:
                code = failure.code
                failure.trace_id = trace_id
                if code != E.INTERNAL.code:
                    tracing.mark_error(span, code, failure.message)
                body = codec.error_body(failure)
                reply_headers[H.ERROR] = _header_safe(failure.message)
                reply_headers[H.ERROR_CODE] = str(failure.status)
            if msg.reply:
                try:
                    await self.nc.publish(msg.reply, body, headers=reply_headers)
                except Exception as exc:
                    log.warning("could not reply on %s: %s", msg.subject, exc)
        elapsed = time.perf_counter() - t0
        self.metrics.observe(op.name, elapsed, code)
        ep = self._endpoint_for(op.name)
        if ep is not None:  # keep $SRV.STATS truthful: micro only saw the hand-off
            ep._processing_time += int(elapsed * 1e9)
            ep._average_processing_time = int(ep._processing_time / max(ep._num_requests, 1))
            if code is not None:
                ep._num_errors += 1
                ep._last_error = code  # type: ignore[assignment]

    # -- lifecycle -----------------------------------------------------------------------
    async def health(self) -> HealthReply:
        checks = {"nats": "ok" if self.nc.is_connected else "disconnected"}
        for check in self.defn.health_checks:
            try:
                name, status = await check(self)
            except Exception as exc:
                name, status = "check", f"failed: {exc}"
            checks[name] = status
        if self.redis is not None:
            try:
                await asyncio.wait_for(self.redis.ping(), 2.0)
                checks["redis"] = "ok"
            except Exception as exc:
                checks["redis"] = f"unreachable: {exc}"
        ok = all(v == "ok" for v in checks.values())
        return HealthReply(service=self.defn.name, instance=self.instance, version=self.defn.version,
                           status="ok" if ok else "degraded", uptime_s=round(time.time() - self.started, 3),
                           checks=checks, inflight=self.inflight)

    async def _report_metrics(self) -> None:
        subject = subjects.METRICS_REPORT.format(service=self.defn.name, instance=self.instance)
        await self.nc.publish(subject, codec.encode(self.metrics.snapshot()))

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.metrics_report_interval_s)
            try:
                await self._report_metrics()
            except Exception as exc:
                log.debug("metrics report failed: %s", exc)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop taking requests, finish those in flight, report, close."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self._micro is not None:
            try:
                await self._micro.stop()
            except Exception as exc:
                log.debug("micro stop: %s", exc)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=drain_timeout)
        for hook in self.defn.on_stop:
            try:
                await hook(self)
            except Exception:
                log.exception("stop hook failed")
        for t in self._bg:
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        try:
            await self._report_metrics()
            await self.nc.drain()
        except Exception:
            pass
        if self.redis is not None:
            try:
                await self.redis.aclose()
            except Exception:
                pass
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _header_safe(s: str) -> str:
    return s.replace("\r", " ").replace("\n", " ")[:512]


def _params(template: str, subject: str) -> dict[str, str]:
    if "{" not in template:
        return {}
    out = {}
    for t, s in zip(template.split("."), subject.split("."), strict=False):
        if t.startswith("{") and t.endswith("}"):
            out[t[1:-1]] = s
    return out


async def start(defn: ServiceDef, config: VNetConfig, *, nc: Client | None = None,
                params: dict[str, str] | None = None, redis: Any = None) -> Runtime:
    """Connect (unless given a client), register every op, start background work."""
    params = params or {}
    own_nc = nc is None
    if nc is None:
        nc = await nats_adapter.connect(config, f"vnet-{defn.name}@{socket.gethostname()}")
    if defn.uses_redis and redis is None:
        from vnet.adapters import redis as redis_adapter

        redis = redis_adapter.connect(config)
        await redis_adapter.ping(redis, config.redis_url)
    rt = Runtime(defn, config, nc, params=params, redis=redis)
    try:
        await nats_adapter.ensure_events_stream(rt.js)
        meta = {"vnet.service": defn.name, **{f"vnet.{k}": v for k, v in params.items()}}
        micro = await add_service(nc, name=f"vnet-{defn.name}", version=defn.version,
                                  description=defn.description, metadata=meta)
        rt._micro = micro
        rt.instance = micro.id
        rt.metrics = OpMetrics(defn.name, micro.id)
        health_subject = defn.health_subject or subjects.health(defn.name)

        async def _health(ctx: Ctx, req: Empty) -> HealthReply:
            return await ctx.rt.health()

        ops = [Op("health", health_subject, Empty, _health), *defn.ops]
        for hook in defn.on_start:
            await hook(rt)
        for op in ops:
            concrete = op.subject.format(**{k: v for k, v in params.items() if "{" + k + "}" in op.subject.template})
            await micro.add_endpoint(EndpointConfig(name=op.name, subject=concrete, handler=rt._make_handler(op),
                                                    queue_group=f"vnet-{defn.name}"))
        await nc.flush()
        rt.spawn(rt._report_loop(), "metrics-report")
        await rt._report_metrics()
    except BaseException:
        if own_nc:
            await nc.close()
        raise
    return rt


def decode_reply(data: bytes, tp: type[Rep]) -> Rep:
    return msgspec.json.decode(data, type=tp)
