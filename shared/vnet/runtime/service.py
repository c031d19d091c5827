"""The one service pattern: every VNet service and the node worker run on this.

A service is a :class:`ServiceDef` — a name, a version and typed operations::

    SERVICE = ServiceDef("ipam", "IP address management")

    @SERVICE.op("addr.request", subjects.IPAM_ADDR_REQUEST, AddrRequest)
    async def request_addr(ctx: Ctx, req: AddrRequest) -> AddrReply: ...

:func:`start` turns it into a service as ``nats.micro`` would (``$SRV.PING|INFO|STATS``,
queue group per endpoint) and adds what plain ``nats.micro`` lacks:

* strict decoding (unknown fields, wrong types, oversized bodies -> 400 naming the problem);
* errors as ``Nats-Service-Error``/``-Code`` headers plus a JSON body with a stable
  code; an unexpected exception is logged with its traceback and reaches the caller
  only as ``internal`` with the trace id, never as a Python repr;
* bounded concurrency: ``nats.micro`` awaits one handler at a time per endpoint,
  which caps throughput at 1/latency, so each request runs in its own task under a
  semaphore shared by the instance's endpoints (``config.max_inflight``); while the
  bound is reached the subscriptions stop reading and NATS buffers for us;
* a ``process <subject template>`` span per request, parented on the caller's
  ``traceparent``; the trace id returned in ``Vnet-Trace-Id``, the instance in
  ``Vnet-Instance``;
* ``vnet_operations_total`` / ``_errors_total`` / ``_duration_seconds`` per op,
  reported to the metrics service, and ``$SRV.STATS`` counters that match them;
* a ``health`` operation; graceful drain on stop (no request that reached this
  instance is dropped: unsubscribe, answer what was received, then close).

The request path is written for throughput (see ``docs/service-pattern.md`` for the
figures): the endpoint subscriptions are ours rather than ``nats.micro``'s (which would
wrap every message in a ``Request`` and time the hand-off), everything that depends
only on the op is computed once at start, and a request without headers skips the
trace-context extraction. Since the subscriptions are ours, so is discovery: this module
uses no ``nats.micro`` service object (and none of its private fields);
:mod:`vnet.runtime.discovery` answers ``$SRV.*`` with upstream's public reply types and
the counters this request path keeps.

One module over 600 lines on purpose: the request path (decode, bound, span, handler,
error mapping, reply size, stats) is one hot loop whose parts share per-op state computed
at start (``_Bound``); split, each request would cross module boundaries for no reader's
benefit. The service definition (``ServiceDef``/``Op``/``Ctx``) and the runtime around it
stay together with it for the same reason.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from vnet.adapters import nats as nats_adapter
from vnet.contracts import codec, subjects
from vnet.contracts import headers as H
from vnet.contracts.messages import Empty, HealthReply
from vnet.contracts.subjects import Subject
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig
from vnet.runtime.discovery import Discovery, EndpointRecord
from vnet.runtime.wiring import ServiceAdapters
from vnet.telemetry import tracing
from vnet.telemetry.metrics import OpMetrics

log = logging.getLogger(__name__)

# Messages of one plain subscription handled at once (Runtime.concurrently): well under the
# Redis pool (max_inflight connections), which the request handlers share.
CONCURRENT_HANDLERS = 32
# An unchanged metrics report is sent again after this long (a restarted metrics service
# learns every instance within it); a changed one goes every metrics_report_interval_s.
REPORT_REFRESH_S = 30.0

Req = TypeVar("Req")
Rep = TypeVar("Rep")
VERSION = "0.1.0"

# nats.micro endpoint names allow only these characters; op names may also use dots.
_ENDPOINT_NAME_BAD = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class Ctx:
    """What a handler gets besides its typed request."""

    rt: Runtime
    subject: str
    template: str
    headers: dict[str, str]
    params: dict[str, str]
    trace_id: str | None
    # The caller's deadline (Unix seconds) from ``Vnet-Deadline``; None when it sent none.
    deadline: float | None = None
    # Where the caller waits for the answer (the request's reply subject; "" for an event).
    reply: str = ""

    async def publish_event(self, domain: str, event: str, ident: str, payload: Any, *,
                            msg_id: str | None = None, to: Subject | None = None, node: str = "",
                            reply: str = "") -> int:
        """Publish a domain event to ``VNET_EVENTS``; it carries this request's trace context."""
        return await self.rt.publish_event(domain, event, ident, payload, msg_id=msg_id, to=to, node=node,
                                           reply=reply)

    async def request(self, subject: Subject, payload: Any, reply_type: type[Rep], *,
                      params: dict[str, str] | None = None, timeout: float | None = None) -> Rep:
        """Call another service; the trace continues across the hop.

        The call carries a deadline of its own (now + the time we wait for it), not our
        caller's: a handler that started finishes even when its caller has given up (half
        a mutation, a pool made and its network not, is worse than a late one), so what it
        asks of others must be done too. ``self.deadline`` is there for a handler that wants
        to skip optional work for a caller that is gone.

        A dependency that does not answer in time is ``unavailable`` for our caller (503,
        retry), not a timeout of ours: the caller's request did reach us and got an answer.
        """
        try:
            reply, _ = await nats_adapter.request(
                self.rt.nc, subject, payload, reply_type, params=params,
                timeout=timeout or self.rt.config.request_timeout_s)
        except E.VNetError as err:
            if err.code != E.TIMEOUT.code:
                raise
            raise E.make(E.UNAVAILABLE, f"{err.message}: the service behind it is slow or down; retry (the same "
                         "request_id is safe to retry)", dependency=subject.template) from None
        return reply


Handler = Callable[[Ctx, Any], Awaitable[Any]]


@dataclass
class Op(Generic[Req]):
    name: str
    subject: Subject
    req_type: type[Req]
    handler: Handler
    max_bytes: int = codec.MAX_REQUEST_BYTES
    # How a caller asks for less when the reply would not fit in one message (named in
    # the ``reply_too_large`` error).
    page_hint: str | None = None

    @property
    def endpoint_name(self) -> str:
        """The ``nats.micro`` endpoint name (``addr.request`` -> ``addr_request``)."""
        return _ENDPOINT_NAME_BAD.sub("_", self.name)


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
           max_bytes: int = codec.MAX_REQUEST_BYTES, page_hint: str | None = None) -> Callable[[Handler], Handler]:
        """Register ``fn`` as operation ``name`` on ``subject``, decoding requests as ``req_type``."""

        def deco(fn: Handler) -> Handler:
            new = Op(name, subject, req_type, fn, max_bytes, page_hint)
            if name == "health" or any(o.name == name for o in self.ops):
                raise ValueError(f"duplicate op {name!r} in service {self.name}")
            if any(o.endpoint_name == new.endpoint_name for o in self.ops):
                raise ValueError(f"op {name!r} in service {self.name} clashes with another op's endpoint name "
                                 f"{new.endpoint_name!r}")
            self.ops.append(new)
            return fn

        return deco

    def starting(self, fn: Callable[[Runtime], Awaitable[None]]) -> Callable[[Runtime], Awaitable[None]]:
        self.on_start.append(fn)
        return fn

    def stopping(self, fn: Callable[[Runtime], Awaitable[None]]) -> Callable[[Runtime], Awaitable[None]]:
        self.on_stop.append(fn)
        return fn


class _Bound:
    """One op as registered: everything the request path needs, computed once."""

    __slots__ = ("attrs", "decode", "dynamic", "op", "params", "span_name", "stats", "sub", "subscribe_subject",
                 "template")

    def __init__(self, service: str, op: Op[Any], params: dict[str, str]) -> None:
        self.op = op
        self.decode = codec.request_decoder(op.req_type, op.max_bytes)
        self.template = op.subject.template
        self.span_name = f"process {self.template}"
        tokens = self.template.split(".")
        concrete: list[str] = []
        self.params: dict[str, str] = {}
        # Template parameters the instance was not started with are wildcards, read per request.
        self.dynamic: list[tuple[int, str]] = []
        for i, tok in enumerate(tokens):
            if tok.startswith("{") and tok.endswith("}"):
                name = tok[1:-1]
                if name in params:
                    self.params[name] = params[name]
                    concrete.append(Subject(tok).format(**{name: params[name]}))
                else:
                    self.dynamic.append((i, name))
                    concrete.append("*")
            else:
                concrete.append(tok)
        self.subscribe_subject = ".".join(concrete)
        # Span attributes cost 1-2 us each in the SDK, on every request. The span name has
        # the subject template and the resource the service, so a span gets the concrete
        # subject only when the template has parameters (which node, which id).
        self.attrs: dict[str, str] | None = (
            {"messaging.destination.name": self.subscribe_subject} if "{" in self.template else None)
        self.stats: EndpointRecord | None = None  # what $SRV.STATS reports (vnet.runtime.discovery)
        self.sub: Subscription | None = None  # ours: see the module docstring

    def params_of(self, subject: str) -> dict[str, str]:
        out = dict(self.params)
        if self.dynamic:
            parts = subject.split(".")
            for i, name in self.dynamic:
                out[name] = parts[i] if i < len(parts) else ""
        return out


_Item = tuple[_Bound, Msg]


class _Workers:
    """A bounded pool of long-lived tasks that run requests.

    ``nats.micro`` would await one handler at a time per endpoint; a task per request
    fixes that but costs a task creation, a registration and a done callback per
    request. Here a request goes to an idle worker (one wake-up), or to a new worker
    while there are fewer than ``limit``, or to a short backlog that a worker takes
    up without sleeping; when that is full too, :meth:`put` waits, so the NATS
    subscription stops reading and the client library buffers. At most ``limit``
    handlers run at once.

    A worker runs many requests one after another in the same task, so a handler must
    not leave a ``ContextVar`` set when it returns (``with`` blocks, as OpenTelemetry
    uses, are fine).
    """

    def __init__(self, run: Callable[[_Bound, Msg], Awaitable[None]], limit: int) -> None:
        self._run = run
        self.limit = limit
        self.busy = 0  # workers holding a request
        self.workers: set[asyncio.Task[None]] = set()
        self._idle: deque[asyncio.Future[_Item]] = deque()
        self._backlog: deque[_Item] = deque()
        self._space: deque[asyncio.Future[None]] = deque()
        self._quiet = asyncio.Event()
        self._quiet.set()

    def offer(self, item: _Item) -> bool:
        """Hand ``item`` over without waiting; False when the bound and the backlog are full."""
        while self._idle:
            fut = self._idle.pop()  # the most recently parked worker: warm caches
            if fut.done():  # its worker was cancelled
                continue
            self.busy += 1
            self._quiet.clear()
            fut.set_result(item)
            return True
        if len(self.workers) < self.limit:
            self.busy += 1
            self._quiet.clear()
            task = asyncio.get_running_loop().create_task(self._work(item))
            self.workers.add(task)
            task.add_done_callback(self.workers.discard)
            return True
        if len(self._backlog) < self.limit:
            self._backlog.append(item)
            self._quiet.clear()
            return True
        return False

    async def put(self, item: _Item) -> None:
        while not self.offer(item):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._space.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()

    async def _work(self, item: _Item) -> None:
        loop = asyncio.get_running_loop()
        holding = True
        try:
            while True:
                try:
                    await self._run(*item)
                except Exception:  # _run answers every failure itself; this is a bug in it
                    log.exception("request handling failed")
                if self._backlog:
                    item = self._backlog.popleft()
                    while self._space:
                        waiter = self._space.popleft()
                        if not waiter.done():
                            waiter.set_result(None)
                            break
                    continue
                holding = False
                self.busy -= 1
                if self.busy == 0:
                    self._quiet.set()
                fut: asyncio.Future[_Item] = loop.create_future()
                self._idle.append(fut)
                try:
                    item = await fut
                finally:
                    if not fut.done():
                        fut.cancel()
                holding = True
        finally:
            if holding:
                self.busy -= 1
                if self.busy == 0 and not self._backlog:
                    self._quiet.set()

    async def join(self, timeout: float) -> bool:
        """Wait until no request is running or waiting; False on timeout."""
        try:
            await asyncio.wait_for(self._quiet.wait(), max(timeout, 0.01))
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Cancel every worker (a request still running is answered ``unavailable``)."""
        self._backlog.clear()
        for fut in self._space:
            fut.cancel()
        workers = list(self.workers)
        for t in workers:
            t.cancel()
        if workers:
            _, stuck = await asyncio.wait(workers, timeout=STOP_STEP_S)
            for t in stuck:
                log.warning("a request worker still running %.0f s after it was cancelled:\n%s", STOP_STEP_S,
                            _task_stack(t))


class Runtime:
    """One running instance of a service: connections, metrics, in-flight tasks."""

    def __init__(self, defn: ServiceDef, config: VNetConfig, nc: Client, *, params: dict[str, str],
                 redis: Any = None, own_nc: bool = True, own_redis: bool = True) -> None:
        self.defn = defn
        self.config = config
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.redis = redis
        # the adapters this service is handed (typed by vnet.runtime.ports); services build nothing concrete
        self.adapters = ServiceAdapters(config, self.js, redis, nc=nc)
        self.params = params
        self.instance = ""
        self.metrics = OpMetrics(defn.name, "")
        self.started = time.time()
        self.state: dict[str, Any] = {}  # per-service state set by on_start hooks
        self._discovery: Discovery | None = None
        self._endpoints: dict[str, _Bound] = {}
        self._workers = _Workers(self._run, config.max_inflight)
        self._bg: list[asyncio.Future[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()  # see concurrently()
        self._last_report: bytes | None = None  # the last metrics report sent (see _report_loop)
        self._stopping = False
        self._stopped = asyncio.Event()
        self._own_nc = own_nc
        self._own_redis = own_redis
        self._dep_logged: dict[str, float] = {}

    # -- calls ---------------------------------------------------------------------------
    async def request(self, subject: Subject, payload: Any, reply_type: type[Rep], *,
                      timeout: float | None = None) -> Rep:
        """Call another service from background work (outside a handler: no caller, no
        deadline to carry); errors are the adapter's (``vnet.core.errors``)."""
        reply, _ = await nats_adapter.request(self.nc, subject, payload, reply_type,
                                              timeout=timeout or self.config.request_timeout_s)
        return reply

    # -- events --------------------------------------------------------------------------
    async def publish_event(self, domain: str, event: str, ident: str, payload: Any, *,
                            msg_id: str | None = None, to: Subject | None = None, node: str = "",
                            reply: str = "") -> int:
        """Publish ``vnet.evt.<domain>.<event>.<ident>`` with ``Nats-Msg-Id`` (dedup) and trace context.

        Give ``msg_id`` to make a retried publish idempotent; the default is unique per call.
        ``to`` (with ``node``) publishes the copy addressed to one node instead, e.g.
        ``subjects.EVT_ENDPOINT_TO_NODE``: a core NATS message, not stored (docs/scale.md);
        ``reply`` forwards a caller's reply subject with it (that node may answer the caller).
        """
        if to is not None:  # a core NATS copy, outside the stream: returns 0
            await nats_adapter.publish_copy(self.nc, to.format(node=node, event=event, id=ident), payload,
                                            template=to.template, reply=reply)
            return 0
        return await nats_adapter.publish_event(
            self.js, subjects.event(domain, event, ident), payload,
            msg_id=msg_id or f"{domain}.{event}.{ident}.{time.time_ns()}", template=subjects.EVT.template)

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        """A background task that is cancelled when the service stops."""
        task = asyncio.ensure_future(coro)
        if isinstance(task, asyncio.Task):
            task.set_name(f"{self.defn.name}:{name}")
        self._bg.append(task)

    def after_reply(self, coro: Awaitable[None], name: str) -> None:
        """Work a handler starts that its caller does not wait for (a count, an announcement):
        it runs once the reply is out, and is cancelled when the service stops (best effort:
        nothing a caller relies on may go here). Unlike :meth:`spawn`, for one per request:
        the task is forgotten when it ends."""
        task = asyncio.ensure_future(coro)
        if isinstance(task, asyncio.Task):
            task.set_name(f"{self.defn.name}:{name}")
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    def concurrently(self, handler: Callable[[Msg], Awaitable[None]], name: str,
                     limit: int = CONCURRENT_HANDLERS) -> Callable[[Msg], Awaitable[None]]:
        """A plain subscription's callback that runs ``handler`` for each message in a task of
        its own, at most ``limit`` at once (then the callback waits, and the client buffers).

        nats-py awaits a subscription's callback before it hands over the next message, so a
        handler that waits on Redis serialises its subject: 1,000 simulated nodes' heartbeats
        (100 a second) queued behind one another past their 5 s timeout while creates held
        the Redis pool, and the nodes expired (bench_scale, 1,000 nodes x 50 endpoints).
        The tasks are cancelled with the background tasks when the service stops."""
        gate = asyncio.Semaphore(limit)

        async def run(msg: Msg) -> None:
            try:
                await handler(msg)
            except Exception:
                log.exception("%s: %s handler failed", self.defn.name, name)
            finally:
                gate.release()

        async def callback(msg: Msg) -> None:
            await gate.acquire()
            task = asyncio.get_running_loop().create_task(run(msg), name=f"{self.defn.name}:{name}")
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

        return callback

    @property
    def inflight(self) -> int:
        """Requests being handled right now."""
        return self._workers.busy

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- request handling ----------------------------------------------------------------
    def _make_handler(self, b: _Bound) -> Callable[[Msg], Awaitable[None]]:
        workers = self._workers

        async def on_msg(msg: Msg) -> None:
            ep = b.stats
            if ep is not None:
                ep.num_requests += 1
            item = (b, msg)
            if not workers.offer(item):
                await workers.put(item)

        return on_msg

    async def _run(self, b: _Bound, msg: Msg) -> None:
        t0 = time.perf_counter()
        op = b.op
        subject = msg.subject
        headers = msg.headers
        attrs = {"messaging.destination.name": subject} if b.dynamic else b.attrs
        span = tracing.start_process_span(b.span_name, headers, attrs)
        token = tracing.activate(span)
        sc = span.get_span_context()
        trace_id = f"{sc.trace_id:032x}" if sc.is_valid else None
        failure: E.VNetError | None = None
        cancelled = False
        try:
            try:
                deadline = _deadline_of(headers) if headers else None
                if deadline is not None and time.time() > deadline:
                    # The caller has given up: starting now could only change state nobody
                    # waits for (a mutation done after the caller's timeout).
                    raise E.make(E.DEADLINE_EXCEEDED, f"the caller's deadline passed before {op.name} started "
                                 f"(waited {time.time() - deadline:.3f}s too long); nothing was done")
                req = b.decode(msg.data)
                ctx = Ctx(self, subject, b.template, headers if headers is not None else {},
                          b.params_of(subject) if b.dynamic else dict(b.params), trace_id, deadline,
                          msg.reply or "")
                result = await op.handler(ctx, req)
                body = b"{}" if result is None else codec.encode(result)
                if len(body) > self._max_reply:
                    failure = self._too_large(op, len(body))
            except E.VNetError as err:
                failure = err
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or not task.cancelling():  # the handler awaited something cancelled
                    failure = self._internal(op, span, trace_id, exc)
                else:  # stop() gave up waiting: say so rather than leave the caller hanging
                    cancelled = True
                    failure = E.make(E.UNAVAILABLE, f"{self.defn.name} instance {self.instance} stopped "
                                     f"before finishing {op.name}; retry (another replica answers)")
            except Exception as exc:
                failure = self._dependency(op, exc) or self._internal(op, span, trace_id, exc)
            if failure is None:
                # Success replies carry the trace id only: every header costs on both ends.
                reply_headers = {}
            else:
                if trace_id:
                    failure.trace_id = trace_id
                tracing.mark_error(span, failure.code, failure.message)
                span.set_attribute("vnet.op", op.name)
                body = codec.error_body(failure)
                reply_headers = {H.ERROR: _header_safe(failure.message), H.ERROR_CODE: str(failure.status),
                                 H.INSTANCE: self.instance}
            if trace_id:
                reply_headers[H.TRACE_ID] = trace_id
            if msg.reply:
                try:
                    await self.nc.publish(msg.reply, body, headers=reply_headers or None)
                except Exception as exc:
                    log.warning("could not reply on %s: %s", subject, exc)
        finally:
            span.end()
            tracing.deactivate(token)
        elapsed = time.perf_counter() - t0
        code = failure.code if failure is not None else None
        # a recorded (sampled) request becomes its latency bucket's exemplar
        self.metrics.observe(op.name, elapsed, code, trace_id if trace_id and span.is_recording() else None)
        ep = b.stats
        if ep is not None:  # $SRV.STATS: the same truth as the metrics
            ep.processing_time_ns += int(elapsed * 1e9)  # the average is computed when STATS asks
            if failure is not None:
                ep.num_errors += 1
                ep.last_error = f"{failure.status} {failure.code}"
        if cancelled:
            raise asyncio.CancelledError

    @property
    def _max_reply(self) -> int:
        """The largest reply body that fits in one message: the server's max_payload less room
        for the reply's headers (which count against it too)."""
        limit = self.nc.max_payload or (1 << 20)
        return max(limit - _REPLY_HEADER_ROOM, 1024)

    def _too_large(self, op: Op[Any], size: int) -> E.VNetError:
        how = op.page_hint or "ask for less (a narrower request)"
        log.warning("%s %s: reply of %d bytes exceeds the bus limit (%d); answered reply_too_large",
                    self.defn.name, op.name, size, self._max_reply)
        return E.make(E.REPLY_TOO_LARGE, f"the reply to {op.name} would be {size} bytes, more than the "
                      f"{self._max_reply} bytes one NATS message may carry here; {how}",
                      size=size, limit=self._max_reply)

    def _dependency(self, op: Op[Any], exc: BaseException) -> E.VNetError | None:
        """``unavailable`` naming what is down when ``exc`` is a dependency's failure (Redis, NATS)."""
        err = None
        if self.redis is not None:
            from vnet.adapters import redis as redis_adapter

            err = redis_adapter.dependency_error(exc, self.config.redis_url)
        if err is None:
            err = nats_adapter.dependency_error(exc, self.config.nats_url)
        if err is not None:
            now = time.monotonic()
            dep = str(err.details.get("dependency", "?"))
            # One line per dependency and second: an outage fails every request, and a log
            # line per request would drown what matters.
            if now - self._dep_logged.get(dep, -1e9) >= 1.0:
                self._dep_logged[dep] = now
                log.warning("%s %s failed: %s", self.defn.name, op.name, err.message)
        return err

    def _internal(self, op: Op[Any], span: Any, trace_id: str | None, exc: BaseException) -> E.VNetError:
        """Log an unexpected exception with its traceback; the caller gets ``internal`` and a reference."""
        ref = trace_id or uuid.uuid4().hex
        log.error("unexpected error in %s %s (trace %s)", self.defn.name, op.name, ref, exc_info=exc)
        span.record_exception(exc)
        err = E.make(E.INTERNAL, f"internal error in {self.defn.name} while handling {op.name}; "
                     f"the logs and trace {ref} have the details")
        err.trace_id = ref
        return err

    # -- lifecycle -----------------------------------------------------------------------
    async def health(self) -> HealthReply:
        checks = {"nats": "ok" if self.nc.is_connected else "disconnected"}
        if self._stopping:
            checks["serving"] = "draining"
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

    async def _report_metrics(self, *, force: bool = True) -> bool:
        """Publish the counters; without ``force`` only when they moved since the last
        report. Returns whether it published."""
        body = codec.encode(self.metrics.snapshot())
        if not force and body == self._last_report:
            return False
        subject = subjects.METRICS_REPORT.format(service=self.defn.name, instance=self.instance)
        self._last_report = body  # before the await: the loop must not send it again meanwhile
        try:
            await self.nc.publish(subject, body)
        except BaseException:
            self._last_report = None
            raise
        return True

    async def _report_loop(self) -> None:
        # An idle instance's counters do not move, and the metrics service keeps the last
        # report of each instance: re-sending it every interval made 1,000 simulated nodes
        # the bus's largest idle traffic (500 reports/s of 909 messages/s, bench_scale). The
        # same report goes again after REPORT_REFRESH_S, for a metrics service that restarted.
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.config.metrics_report_interval_s)
            try:
                if await self._report_metrics(force=loop.time() - last >= REPORT_REFRESH_S):
                    last = loop.time()
            except Exception as exc:
                log.debug("metrics report failed: %s", exc)

    async def _drain_endpoints(self, timeout: float) -> None:
        """Unsubscribe every endpoint at the server and hand what already arrived to handlers."""

        async def drain_one(b: _Bound) -> None:
            sub, b.sub = b.sub, None
            if sub is None:
                return
            try:
                # Subscription.drain has no annotations in nats-py 2.x: strict mypy refuses the call
                await cast(Any, sub).drain()
            except Exception as exc:  # closed or reconnecting: nothing more will arrive anyway
                log.debug("drain %s: %s", b.subscribe_subject, exc)
                try:
                    await sub.unsubscribe()
                except Exception:
                    pass

        pending = [asyncio.create_task(drain_one(b)) for b in self._endpoints.values()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=max(timeout, 0.01))
            for t in late:
                t.cancel()
            if late:
                _, stuck = await asyncio.wait(late, timeout=STOP_STEP_S)
                for t in stuck:
                    log.warning("%s: unsubscribing still stuck after it was cancelled:\n%s", self.defn.name,
                                _task_stack(t))

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop taking requests, finish those in flight, report, close.

        Requests that reached this instance are answered (by their handler, or with
        ``unavailable`` if one is still running after ``drain_timeout``); afterwards
        the subjects have no responder here, so callers go to another replica.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        try:
            await self._drain_endpoints(drain_timeout)
            if not await self._workers.join(deadline - loop.time()):
                log.warning("%s: %d requests still running after %.1fs; cancelling them", self.defn.name,
                            self._workers.busy, drain_timeout)
            await self._workers.close()
            if self._discovery is not None:  # the endpoints are unsubscribed above
                try:
                    await asyncio.wait_for(self._discovery.stop(), max(deadline - loop.time(), 1.0))
                except Exception as exc:
                    log.debug("discovery stop: %s", exc)
            for hook in self.defn.on_stop:
                try:
                    await _bounded(hook(self), STOP_STEP_S, f"{self.defn.name}: stop hook {hook.__name__}")
                except Exception:
                    log.exception("stop hook failed")
            await self._cancel_background()
            if self.config.metrics_enabled:
                try:
                    await _bounded(self._report_metrics(), STOP_STEP_S, f"{self.defn.name}: last metrics report")
                except Exception:
                    pass
            await self._close_connections(max(deadline - loop.time(), 1.0))
        finally:
            self._stopped.set()

    async def _cancel_background(self) -> None:
        self._bg.extend(self._handlers)
        self._handlers.clear()
        for t in self._bg:
            t.cancel()
        if self._bg:
            _, late = await asyncio.wait(self._bg, timeout=STOP_STEP_S)
            for t in late:  # a task that swallows its cancellation: name it, never hang the stop
                log.warning("%s: a background task still running %.0f s after it was cancelled; left behind:\n%s",
                            self.defn.name, STOP_STEP_S, _task_stack(t))
        self._bg.clear()

    async def _close_connections(self, timeout: float) -> None:
        if self._own_nc:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout)
            except Exception:
                try:
                    await self.nc.close()
                except Exception:
                    pass
        if self.redis is not None and self._own_redis:
            try:
                await _bounded(self.redis.aclose(), STOP_STEP_S, f"{self.defn.name}: closing Redis")
            except Exception:
                pass

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


# Room kept for a reply's headers (trace id, error headers of up to 512 bytes, instance).
_REPLY_HEADER_ROOM = 2048


def _deadline_of(headers: dict[str, str]) -> float | None:
    raw = headers.get(H.DEADLINE)
    if not raw:
        return None
    try:
        return int(raw) / 1000.0
    except ValueError:
        return None  # a malformed deadline is no deadline, not a failed request


def _header_safe(s: str) -> str:
    return s.replace("\r", " ").replace("\n", " ")[:512]


async def start(defn: ServiceDef, config: VNetConfig, *, nc: Client | None = None,
                params: dict[str, str] | None = None, redis: Any = None) -> Runtime:
    """Connect (unless given a client), register every op, start background work.

    A client or Redis connection passed in stays open when the service stops.
    """
    params = params or {}
    own_nc = nc is None
    if nc is None:
        nc = await nats_adapter.connect(config, f"vnet-{defn.name}@{socket.gethostname()}")
    own_redis = redis is None
    try:
        if defn.uses_redis and redis is None:
            from vnet.adapters import redis as redis_adapter

            redis = redis_adapter.connect(config)
            await redis_adapter.ping(redis, config.redis_url)
    except BaseException:
        if own_nc:
            await nc.close()
        if redis is not None and own_redis:
            await redis.aclose()
        raise
    rt = Runtime(defn, config, nc, params=params, redis=redis, own_nc=own_nc, own_redis=own_redis)
    try:
        await nats_adapter.ensure_events_stream(rt.js, config.events_replicas)
        meta = {"vnet.service": defn.name, **{f"vnet.{k}": v for k, v in params.items()}}
        disc = Discovery(nc, name=f"vnet-{defn.name}", version=defn.version, description=defn.description,
                         metadata=meta)
        rt._discovery = disc
        await disc.start()
        rt.instance = disc.id
        rt.metrics = OpMetrics(defn.name, disc.id)
        health_subject = defn.health_subject or subjects.health(defn.name)

        async def _health(ctx: Ctx, req: Empty) -> HealthReply:
            return await ctx.rt.health()

        ops = [Op("health", health_subject, Empty, _health), *defn.ops]
        for hook in defn.on_start:
            await hook(rt)
        queue = f"vnet-{defn.name}"
        for op in ops:
            b = _Bound(defn.name, op, params)
            b.stats = disc.add_endpoint(
                op.endpoint_name, b.subscribe_subject, queue,
                metadata={"vnet.op": op.name, "vnet.subject": op.subject.template,
                          "vnet.request": getattr(op.req_type, "__name__", str(op.req_type)),
                          "vnet.max_bytes": str(op.max_bytes)})
            b.sub = await nc.subscribe(b.subscribe_subject, queue=queue, cb=rt._make_handler(b))
            rt._endpoints[op.name] = b
        await nats_adapter.flush(nc)  # answering from here on: not just nc.flush(), see there
        if config.metrics_enabled:
            rt.spawn(rt._report_loop(), "metrics-report")
            await rt._report_metrics()
    except BaseException:
        await _abort(rt)
        raise
    return rt


async def _abort(rt: Runtime) -> None:
    """Undo a half-done start: nothing registered stays behind."""
    rt._stopping = True
    await rt._cancel_background()
    await rt._workers.close()
    for b in rt._endpoints.values():
        sub, b.sub = b.sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
    if rt._discovery is not None:
        await rt._discovery.stop()
    await rt._close_connections(2.0)
    rt._stopped.set()


def decode_reply(data: bytes, tp: type[Rep]) -> Rep:
    return msgspec.json.decode(data, type=tp)


# The longest any one step of stop() may take. A stop that hangs holds up a whole test run
# (CI: a fixture's teardown waited out pytest's 300 s once, and the stack did not say on what).
STOP_STEP_S = 10.0


def _task_stack(t: asyncio.Future[Any]) -> str:
    if not isinstance(t, asyncio.Task):
        return f"  {t!r}"
    buf = io.StringIO()
    t.print_stack(file=buf)
    return f"  task {t.get_name()}\n{buf.getvalue()}"


async def _bounded(aw: Awaitable[Any], timeout: float, what: str) -> None:
    """Await ``aw`` for at most ``timeout``; past it, log where it was stuck and go on."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if done:
        task.result()
        return
    log.warning("%s: still running after %.0f s; cancelled. It was at:\n%s", what, timeout, _task_stack(task))
    task.cancel()
