"""NATS connection, traced request/reply, and JetStream events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from nats import errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from vnet.adapters import natsauth
from vnet.adapters.settings import NatsSettings
from vnet.contracts import codec, subjects
from vnet.contracts import headers as H
from vnet.contracts.subjects import Subject
from vnet.core import errors as E
from vnet.telemetry import tracing

log = logging.getLogger(__name__)
T = TypeVar("T")

EVENTS_DUPLICATE_WINDOW_S = 120.0


def server_urls(nats_url: str) -> list[str]:
    """``nats_url`` may name every server of a cluster, comma-separated: the client starts
    with one of them (in random order, nats-py's default, so clients spread) and, when its
    server dies, reconnects to a survivor (it also learns the cluster's other servers from
    the one it is connected to)."""
    urls = [u.strip() for u in nats_url.split(",") if u.strip()]
    return urls or [nats_url]


async def connect(config: NatsSettings, name: str, *, connect_timeout: float = 2.0,
                  allow_reconnect: bool = True, give_up_after: float | None = None) -> Client:
    """Connect, giving up after ``give_up_after`` seconds (default ``config.connect_timeout_s``).

    The first connection is bounded: nats-py alone retries a server that is not there
    forever (logging each try), so a client pointed at no stack hung. Once connected,
    reconnects are endless and subscriptions are restored by the client.
    """

    client: list[Client] = []
    connected = False
    last_error: list[BaseException] = []

    async def _err(e: Exception) -> None:
        if not connected:  # the first connection: the final error says it all, once
            last_error[:] = [e]
            return
        log.warning("nats error: %s", e)

    async def _disc() -> None:
        if not connected:  # a failed first attempt: reported once, by the error raised below
            return
        if client and client[0].is_closed:  # a deliberate close, not an outage
            return
        log.warning("disconnected from NATS; reconnecting")

    async def _rec() -> None:
        log.info("reconnected to NATS")

    opts: dict[str, Any] = dict(
        servers=server_urls(config.nats_url),
        name=name,
        connect_timeout=connect_timeout,
        allow_reconnect=allow_reconnect,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=_err,
        disconnected_cb=_disc,
        reconnected_cb=_rec,
    )
    if config.nats_user:
        opts["user"] = config.nats_user
        opts["password"] = config.nats_password
    if config.nats_token:
        opts["token"] = config.nats_token
    if config.nats_creds:
        opts["user_credentials"] = config.nats_creds
    opts.update(natsauth.security_options(config))  # private inbox prefix, TLS
    limit = config.connect_timeout_s if give_up_after is None else give_up_after
    nc = Client()
    try:
        await asyncio.wait_for(nc.connect(**opts), limit)
    except Exception as exc:  # the client raises several unrelated types here
        with contextlib.suppress(Exception):
            await nc.close()
        cause = last_error[0] if isinstance(exc, TimeoutError) and last_error else exc
        why = f"{cause or type(cause).__name__}"
        if isinstance(exc, TimeoutError):
            why = f"no connection within {limit:g}s (last error: {why})"
        raise E.make(E.UNAVAILABLE, f"cannot connect to NATS at {config.nats_url}: {why}; is the stack up? "
                     "Start one with `vnetctl up` (it is then found by itself), or point at a running one "
                     "with VNET_NATS_URL, `vnetctl --nats URL` or VNetConfig(nats_url=...)",
                     url=config.nats_url, dependency="nats") from None
    connected = True
    client.append(nc)
    return nc


# nats-py errors that mean the bus (or JetStream) cannot serve now, not that we misused it.
_NATS_DOWN: tuple[type[BaseException], ...] = (
    NatsTimeout, NoRespondersError, ConnectionClosedError, nats_errors.ConnectionReconnectingError,
    nats_errors.ConnectionDrainingError, nats_errors.OutboundBufferLimitError, nats_errors.StaleConnectionError,
    nats_errors.NoServersError, nats_errors.SlowConsumerError, js_errors.NoStreamResponseError,
    js_errors.ServiceUnavailableError, js_errors.ServerError,
)


def _bus_error(nc: Client, exc: BaseException) -> E.VNetError:
    srv = nc._current_server  # the server it is connected or reconnecting to
    url = srv.uri.geturl() if srv is not None else "the NATS server"
    err = dependency_error(exc, url)
    assert err is not None
    return err


def dependency_error(exc: BaseException, url: str) -> E.VNetError | None:
    """The ``unavailable`` error for a NATS / JetStream failure; None for anything else."""
    if not isinstance(exc, _NATS_DOWN):
        return None
    what = "JetStream" if isinstance(exc, js_errors.Error) else "NATS"
    text = str(exc) or type(exc).__name__
    return E.make(E.UNAVAILABLE, f"{what} at {url} failed: {text}; retry later (the same request_id is safe "
                  "to retry)", dependency="nats", url=url)


async def flush(nc: Client, timeout: float = 10.0) -> None:
    """Return once the server has processed every command sent so far (SUB included).

    ``Client.flush()`` alone does not promise that in nats-py 2.16: it writes its PING
    straight to the socket while earlier commands (a SUB just made) still wait in the
    buffer for the flusher task, so the PONG can come back before the server saw them
    and a request sent right after "has no responders". The first flush makes the
    flusher write them (it runs before the PONG can be read); the second PING then
    follows them on the wire.
    """
    # nats-py annotates ``timeout: int`` but hands it to asyncio.wait_for, which takes any number
    await nc.flush(timeout=timeout)  # type: ignore[arg-type]
    await nc.flush(timeout=timeout)  # type: ignore[arg-type]


async def request(
    nc: Client,
    subject: Subject,
    payload: Any,
    reply_type: type[T],
    *,
    timeout: float = 5.0,
    params: dict[str, str] | None = None,
    deadline: float | None = None,
) -> tuple[T, str | None]:
    """Traced request/reply; raises the VNetError the service returned.

    The request carries its deadline (``Vnet-Deadline``): ``deadline`` (Unix seconds, a
    service passing on its caller's) or now + ``timeout``; we wait no longer than either.
    Returns the decoded reply and the trace id the service reported.
    """
    concrete = subject.format(**(params or {}))
    data = payload if isinstance(payload, bytes) else codec.encode(payload)
    now = time.time()
    if deadline is None:
        deadline = now + timeout
    elif deadline - now < timeout:
        timeout = deadline - now
        if timeout <= 0:
            raise E.make(E.DEADLINE_EXCEEDED, f"the caller's deadline passed before {concrete} was asked; "
                         "nothing was sent", subject=concrete)
    with tracing.publish_span(subject.template, concrete) as hdrs:
        hdrs[H.DEADLINE] = str(int(deadline * 1000))
        try:
            msg = await nc.request(concrete, data, timeout=timeout, headers=hdrs)
        except NoRespondersError:
            raise E.make(E.UNAVAILABLE, f"no service answers {concrete}; is the stack up? "
                         "(`vnetctl status` lists what runs)", subject=concrete,
                         no_responders=True) from None
        except NatsTimeout:
            raise E.make(E.TIMEOUT, f"no reply on {concrete} within {timeout}s", subject=concrete) from None
        except _NATS_DOWN as exc:  # closed, reconnecting, buffer full: the bus, not the service
            raise _bus_error(nc, exc) from None
    h = msg.headers or {}
    trace_id = h.get(H.TRACE_ID)
    if H.ERROR_CODE in h:
        err = codec.decode_error(msg.data, h[H.ERROR_CODE], h.get(H.ERROR, ""))
        err.trace_id = err.trace_id or trace_id
        raise err
    try:
        return msgspec.json.decode(msg.data, type=reply_type), trace_id
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise E.make(E.INTERNAL, f"reply on {concrete} does not match {reply_type.__name__}: {exc}") from None


# --- JetStream events -------------------------------------------------------------------

# Every node worker holds up to four durable consumers on VNET_EVENTS (endpoint, network, node,
# policy events) and every service a few. nats-server 2.15 caps a stream that sets no limit at
# 1,000 consumers: about 250 nodes (tests/bench/bench_scale.py hit it at 333 simulated nodes).
# An explicit limit lifts the cap: 16,384 nodes' worth.
EVENTS_MAX_CONSUMERS = 65536
_cap_warned = False


async def discover(nc: Client, *, wait: float = 0.5) -> list[dict[str, Any]]:
    """The ``$SRV.STATS`` replies of every ``nats.micro`` service instance that answer within
    ``wait`` seconds (scatter-gather: there is no way to know how many will answer)."""
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish("$SRV.STATS", b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=left)
            except (TimeoutError, NatsTimeout):
                break
            try:
                got = json.loads(msg.data)
            except ValueError:
                continue
            if isinstance(got, dict):
                replies.append(got)
    finally:
        await sub.unsubscribe()
    return replies


def _warn_consumer_cap() -> None:
    global _cap_warned
    if not _cap_warned:
        _cap_warned = True
        log.warning("%s was made without a consumer limit, so nats-server applies its default (1,000 consumers in "
                    "2.15: about 250 node workers); raise it with `nats stream edit %s --max-consumers %d` "
                    "(docs/scale.md)", subjects.EVENTS_STREAM, subjects.EVENTS_STREAM, EVENTS_MAX_CONSUMERS)


async def ensure_events_stream(js: JetStreamContext, replicas: int = 1, *, timeout: float = 60.0) -> int:
    """Create ``VNET_EVENTS`` if missing, with ``replicas`` replicas (an existing stream with
    fewer is raised to it); its replica count. Concurrent callers are fine.

    With ``replicas`` > 1 it is retried for up to ``timeout``: a cluster that is still
    forming has no JetStream meta leader, and answers "insufficient resources" until
    enough peers joined (services of a compose cluster start alongside its servers).
    """
    cfg = StreamConfig(
        name=subjects.EVENTS_STREAM,
        subjects=[subjects.EVENTS_WILDCARD],
        storage=StorageType.FILE,
        duplicate_window=EVENTS_DUPLICATE_WINDOW_S,
        max_age=7 * 24 * 3600.0,
        max_consumers=EVENTS_MAX_CONSUMERS,
        num_replicas=replicas,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            try:
                info = await js.stream_info(subjects.EVENTS_STREAM)
            except NotFoundError:
                try:
                    info = await js.add_stream(cfg)
                except Exception:  # lost a creation race: fine if it exists now
                    info = await js.stream_info(subjects.EVENTS_STREAM)
            if (info.config.max_consumers or 0) <= 0:
                _warn_consumer_cap()
            if (info.config.num_replicas or 1) < replicas:
                now = info.config
                now.num_replicas = replicas
                info = await js.update_stream(now)
            return int(info.config.num_replicas or 1)
        except Exception:
            if replicas <= 1 or loop.time() >= deadline:
                raise
            await asyncio.sleep(0.5)


# How long a publish of an event is retried while the bus cannot take it (a server of the
# cluster died: the client reconnects to another and the stream elects a new leader, which
# takes a second or two). Callers publish after committing, so giving up loses the event.
PUBLISH_RETRY_S = 10.0
# How often a long pull looks whether the client reconnected (a local counter, no traffic).
_RECONNECT_WATCH_S = 1.0
PULL_JITTER = 0.7  # an idle consumer's long pull lasts 70-100 % of its pull_expiry_s
# One attempt waits this long for the stream's ack: a publish written to a connection that
# was dying is lost with it and only a timeout says so; a second copy is harmless (dedup).
PUBLISH_ATTEMPT_S = 2.0
_PUBLISH_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.5)


async def publish_event(js: JetStreamContext, subject: str, event: Any, *, msg_id: str,
                        template: str = subjects.EVT.template, retry_for_s: float = PUBLISH_RETRY_S) -> int:
    """Publish a domain event with ``Nats-Msg-Id`` (dedup) and trace context; returns its seq.

    A publish that fails because the bus is down or moving (no ack, reconnecting, no
    responders while the stream elects a leader) is sent again, with the same message id,
    for up to ``retry_for_s``: the stream's duplicate window drops the second copy when the
    first did land (its ack carries the first one's sequence), so an event is stored once and
    an event whose ack was lost with a killed server is not missing."""
    data = codec.encode(event)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for_s
    attempt = 0
    with tracing.publish_span(template, subject) as hdrs:
        hdrs[H.MSG_ID] = msg_id
        while True:
            try:
                left = max(0.1, deadline - loop.time())
                ack = await js.publish(subject, data, headers=hdrs, stream=subjects.EVENTS_STREAM,
                                       timeout=min(PUBLISH_ATTEMPT_S, left) if retry_for_s > 0 else None)
                return int(ack.seq)
            except ConnectionClosedError:  # closed for good (stopping): nothing to wait for
                raise
            except _NATS_DOWN as exc:
                if loop.time() >= deadline:
                    raise
                log.debug("publish of %s failed (%s); again with the same message id", subject, exc)
                await asyncio.sleep(_PUBLISH_BACKOFF_S[min(attempt, len(_PUBLISH_BACKOFF_S) - 1)])
                attempt += 1


async def publish_copy(nc: Client, subject: str, event: Any, *, template: str, reply: str = "") -> None:
    """Publish a node-addressed copy of an event (core NATS, outside the stream) with trace
    context. Fire and forget: while the client reconnects it is buffered, and a copy that is
    lost anyway is repaired by the full resync its node runs when it reconnects (:class:`Feed`)."""
    data = codec.encode(event)
    with tracing.publish_span(template, subject) as hdrs:
        await nc.publish(subject, data, reply=reply, headers=hdrs)


async def handle_traced(template: str, m: Msg, handler: Callable[[Msg], Awaitable[None]], failed: str) -> bool:
    """``handler(m)`` in a ``process`` span parented on the publisher's trace; a handler that
    raises is logged with ``failed`` (what happens next) and marked on the span: False."""
    with tracing.process_span(template, m.subject, m.headers) as span:
        try:
            await handler(m)
        except Exception as exc:
            log.exception("handler failed on %s; %s", m.subject, failed)
            tracing.mark_error(span, "handler_failed", type(exc).__name__)
            return False
    return True


class _ReconnectWatch:
    """One look a ``watch_s`` at a client's reconnect counter for every :class:`Feed` on that
    client (a fleet of simulated nodes shares one connection: one wakeup a second, not one per
    node), stopped when the last feed closes."""

    _of: weakref.WeakKeyDictionary[Client, dict[float, _ReconnectWatch]] = weakref.WeakKeyDictionary()

    def __init__(self, nc: Client, watch_s: float) -> None:
        self.nc = nc
        self.watch_s = watch_s
        self.feeds: set[Feed] = set()
        self.task: asyncio.Task[None] | None = None
        self.seen = nc.stats["reconnects"]  # now: a reconnect before the task first runs counts

    @classmethod
    def join(cls, feed: Feed) -> None:
        by_period = cls._of.setdefault(feed.nc, {})
        w = by_period.get(feed.watch_s)
        if w is None or w.task is None or w.task.done():
            w = by_period[feed.watch_s] = cls(feed.nc, feed.watch_s)
        w.feeds.add(feed)
        if w.task is None:
            w.task = asyncio.create_task(w._run(), name="feed-reconnect-watch")

    @classmethod
    async def leave(cls, feed: Feed) -> None:
        w = cls._of.get(feed.nc, {}).get(feed.watch_s)
        if w is None or feed not in w.feeds:
            return
        w.feeds.discard(feed)
        if w.feeds:
            return
        task, w.task = w.task, None
        cls._of.get(feed.nc, {}).pop(feed.watch_s, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.watch_s)
            now = self.nc.stats["reconnects"]
            if now != self.seen:
                self.seen = now
                for f in list(self.feeds):
                    f._gap("the NATS client reconnected")


class Feed:
    """Core subscriptions for a level-triggered follower (a node worker's copies, docs/scale.md),
    and the signal that it may have missed some: ``on_gap`` is called once the client has
    reconnected (it re-subscribed before; what was published meanwhile is lost).

    Each message is handled in a ``process`` span parented on the publisher's trace, one at a
    time and in order per subscription; a handler that raises is logged (and counted as a gap:
    the follower's resync repairs what it missed). The client never drops a message for being
    slow here (no pending limits: the handlers only queue work); the server closes a connection
    it cannot write to, which is a reconnect, hence a gap."""

    def __init__(self, nc: Client, on_gap: Callable[[str], None], *, watch_s: float = _RECONNECT_WATCH_S) -> None:
        self.nc = nc
        self.on_gap = on_gap
        self.watch_s = watch_s
        self.received = 0
        self.gaps = 0
        self.subjects: list[str] = []
        self._subs: list[Any] = []
        self._watched = False

    async def subscribe(self, subject: str, template: str, handler: Callable[[Msg], Awaitable[None]]) -> None:
        async def cb(m: Msg) -> None:
            self.received += 1
            if not await handle_traced(template, m, handler, "the next resync repairs what it missed"):
                self._gap(f"a handler failed on {m.subject}")

        self._subs.append(await self.nc.subscribe(subject, cb=cb, pending_msgs_limit=0, pending_bytes_limit=0))
        self.subjects.append(subject)
        if not self._watched:
            self._watched = True
            _ReconnectWatch.join(self)

    def _gap(self, why: str) -> None:
        self.gaps += 1
        self.on_gap(why)

    async def close(self) -> None:
        if self._watched:
            self._watched = False
            await _ReconnectWatch.leave(self)
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await sub.unsubscribe()


class DurableConsumer:
    """A pull consumer with explicit ack: a handler that raises is nak'ed and redelivered.

    Messages are handled one at a time, in order, each in a ``process vnet.evt.{domain}.{event}.{id}``
    span parented on the publisher's trace. A handler that raises gets the message back after
    ``nak_delay_s`` (at most ``max_deliver`` deliveries); one that hangs past ``ack_wait_s`` gets it
    back too. ``inactive_threshold_s`` lets the server delete the consumer once nobody pulled for
    that long (for per-instance consumers that would otherwise outlive their process).

    ``pull_expiry_s``: how long one pull request waits on the server for a message. A message
    ends the wait at once, so this only sets what an idle consumer costs: a request and an
    expiry on the bus per period (1 s: two messages a second per consumer, the idle traffic
    of a large fleet, docs/scale.md). A long pull dies with the server it was sent to, so
    past 1 s the consumer watches the client's reconnect count (local, no traffic) and pulls
    again at once after a reconnect.
    """

    def __init__(self, js: JetStreamContext, durable: str, filter_subject: str = subjects.EVENTS_WILDCARD,
                 *, deliver_all: bool = True, ack_wait_s: float = 30.0, max_deliver: int = 10,
                 nak_delay_s: float = 1.0, inactive_threshold_s: float | None = None,
                 filter_subjects: list[str] | None = None, pull_expiry_s: float = 1.0) -> None:
        self.js = js
        self.durable = durable
        self.filter_subject = filter_subject
        # Several filters on one consumer (JetStream >= 2.10): e.g. a node's endpoint consumer
        # takes created and deleted events, not every node's status reports (docs/scale.md).
        self.filter_subjects = list(filter_subjects) if filter_subjects else None
        self.deliver_all = deliver_all
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.nak_delay_s = nak_delay_s
        self.inactive_threshold_s = inactive_threshold_s
        self.pull_expiry_s = pull_expiry_s
        self.pulls = 0  # pull requests sent (what an idle consumer costs: tests, the scale bench)
        self._busy = False  # the last pull brought messages: pull batches with a short expiry
        self.waiting_long = False  # a long pull is out (idle)
        self.long_expiry_s = 0.0  # the expiry of the last long pull (jittered)
        self._task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._stop = asyncio.Event()

    async def start(self, handler: Callable[[Msg], Awaitable[None]], *, batch: int = 64) -> None:
        if self.filter_subjects:
            await self._drop_if_filters_changed()
        sub = await self.js.pull_subscribe(
            self.filter_subject,
            durable=self.durable,
            stream=subjects.EVENTS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL if self.deliver_all else DeliverPolicy.NEW,
                ack_wait=self.ack_wait_s,
                max_deliver=self.max_deliver,
                inactive_threshold=self.inactive_threshold_s,
                filter_subjects=self.filter_subjects,
            ),
        )
        self._sub = sub
        tmpl = subjects.EVT.template

        async def settle(m: Msg, ok: bool) -> None:
            try:
                if ok:
                    await m.ack()
                else:
                    await m.nak(delay=self.nak_delay_s)
            except Exception as exc:  # disconnected: the server redelivers after ack_wait
                log.debug("could not %s %s: %s", "ack" if ok else "nak", m.subject, exc)

        async def loop() -> None:
            while not self._stop.is_set():
                try:
                    msgs = await self._pull(sub, batch)
                except NatsTimeout:
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        # nats-py turns a cancelled fetch on a closed connection into
                        # ConnectionClosedError; swallowing it would never let us end.
                        raise asyncio.CancelledError from None
                    if isinstance(exc, ConnectionClosedError):  # closed for good: nothing more comes
                        log.debug("consumer %s: connection closed", self.durable)
                        return
                    log.debug("fetch failed: %s", exc)  # disconnected: the client reconnects; keep pulling
                    await asyncio.sleep(0.5)
                    continue
                for m in msgs:
                    await settle(m, await handle_traced(tmpl, m, handler, "nak for redelivery"))

        self._task = asyncio.create_task(loop(), name=f"consumer-{self.durable}")

    async def _pull(self, sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
        """One pull request. Busy (the last pull brought messages): batches with a 1 s expiry, as
        before. Idle: ONE message with the long expiry (nats-py returns a batch only once it is
        full or its request expired, so a long batch would hold the first message back), then
        busy again. A long pull is abandoned (and the loop pulls again) when the client
        reconnected meanwhile: the server it was sent to may be gone, and with it the request."""
        self.pulls += 1
        nc = getattr(self.js, "_nc", None)
        if self.pull_expiry_s <= _RECONNECT_WATCH_S or nc is None or self._busy:
            try:
                msgs = await sub.fetch(batch, timeout=min(self.pull_expiry_s, _RECONNECT_WATCH_S))
            except NatsTimeout:
                self._busy = False  # nothing came for a second: wait with one long pull
                raise
            return msgs
        seen = nc.stats["reconnects"]
        # Jittered: consumers that went idle together (a fleet's network consumers after one
        # network event) would otherwise all pull again in the same instant, every period; at
        # 1,000 nodes those bursts held JetStream for 1-4 s every 30 s (docs/scale.md).
        expiry = self.long_expiry_s = self.pull_expiry_s * random.uniform(PULL_JITTER, 1.0)
        task = asyncio.ensure_future(sub.fetch(1, timeout=expiry))
        self.waiting_long = True
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_RECONNECT_WATCH_S)
                if done:
                    msgs = task.result()
                    self._busy = True
                    return msgs
                if nc.stats["reconnects"] != seen:
                    log.debug("consumer %s: the client reconnected: pulling again", self.durable)
                    raise NatsTimeout
        finally:
            self.waiting_long = False
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _drop_if_filters_changed(self) -> None:
        """A durable made by an older version with other filters would be bound as it is (the
        client does not update an existing consumer): delete it so it is made with ours (a node
        worker's endpoint consumer gained ``updated``). Only NEW messages are lost, which the
        worker's full resync covers."""
        try:
            info = await self.js.consumer_info(subjects.EVENTS_STREAM, self.durable)
        except Exception:  # not there (or not readable): pull_subscribe makes it
            return
        have = sorted(info.config.filter_subjects or ([info.config.filter_subject]
                                                      if info.config.filter_subject else []))
        if have != sorted(self.filter_subjects or []):
            try:
                await self.js.delete_consumer(subjects.EVENTS_STREAM, self.durable)
                log.info("durable %s had filters %s: recreated with %s", self.durable, have, self.filter_subjects)
            except Exception as exc:
                log.warning("durable %s has filters %s, not %s, and could not be deleted: %s", self.durable, have,
                            self.filter_subjects, exc)

    async def stop(self, *, delete: bool = False) -> None:
        """Stop pulling; ``delete`` also removes the consumer from the server."""
        self._stop.set()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._sub is not None:
            # Drop what the server already pushed for a fetch nobody waits for any more;
            # left alone, it would hold up nc.drain() (it waits for every pending message).
            try:
                await self._sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe %s: %s", self.durable, exc)
            self._sub = None
        if delete:
            try:
                await self.js.delete_consumer(subjects.EVENTS_STREAM, self.durable)
            except Exception as exc:
                log.debug("delete consumer %s: %s", self.durable, exc)
