"""Domain events on JetStream: the ``VNET_EVENTS`` stream, dedup by ``Nats-Msg-Id``,
trace context on every event, and :class:`DurableConsumer` (ack, nak, redelivery)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StorageType
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from vnet.adapters import nats as nats_adapter
from vnet.contracts import headers as H
from vnet.contracts import subjects
from vnet.contracts.subjects import Subject
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Ctx, Runtime, ServiceDef

StartService = Callable[..., Awaitable[Runtime]]


class Happened(msgspec.Struct, kw_only=True):
    n: int


class Publish(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    n: int


class Published(msgspec.Struct, kw_only=True):
    seq: int


def _domain() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def nc(config: VNetConfig) -> AsyncIterator[Client]:
    client = await nats.connect(config.nats_url, name="test-events")
    yield client
    await client.close()


def _tiny_service(domain: str) -> tuple[ServiceDef, Subject]:
    defn = ServiceDef(f"evt-{domain}", "publishes an event per request", uses_redis=False)
    subj = Subject(f"vnet.{domain}.publish")

    @defn.op("publish", subj, Publish)
    async def publish(ctx: Ctx, req: Publish) -> Published:
        seq = await ctx.publish_event(domain, "happened", str(req.n), Happened(n=req.n))
        return Published(seq=seq)

    return defn, subj


async def _until(pred: Callable[[], bool], timeout: float = 30.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


async def test_stream_exists_after_a_service_starts(start_service: StartService, nc: Client) -> None:
    defn, _ = _tiny_service(_domain())
    await start_service(defn)
    info = await nc.jetstream().stream_info(subjects.EVENTS_STREAM)
    cfg = info.config
    assert cfg.subjects == [subjects.EVENTS_WILDCARD] == ["vnet.evt.>"]
    assert cfg.storage == StorageType.FILE
    assert cfg.duplicate_window is not None and cfg.duplicate_window > 0
    # a second start is fine with the stream already there
    defn2, _ = _tiny_service(_domain())
    await start_service(defn2)


async def test_publish_twice_with_same_msg_id_stores_once(start_service: StartService, nc: Client) -> None:
    domain = _domain()
    defn, _ = _tiny_service(domain)
    rt = await start_service(defn)
    msg_id = f"{domain}-once"
    seq1 = await rt.publish_event(domain, "created", "x1", Happened(n=1), msg_id=msg_id)
    seq2 = await rt.publish_event(domain, "created", "x1", Happened(n=1), msg_id=msg_id)
    assert seq1 == seq2
    seq3 = await rt.publish_event(domain, "created", "x1", Happened(n=1))  # no msg id: a new event
    assert seq3 > seq1
    js = nc.jetstream()
    sub = await js.pull_subscribe(f"vnet.evt.{domain}.>", stream=subjects.EVENTS_STREAM)
    msgs = await sub.fetch(10, timeout=2.0)
    assert [m.metadata.sequence.stream for m in msgs] == [seq1, seq3]
    assert msgs[0].headers is not None and msgs[0].headers[H.MSG_ID] == msg_id
    await sub.unsubscribe()


async def test_event_published_in_a_handler_carries_the_trace(start_service: StartService, nc: Client,
                                                              spans: InMemorySpanExporter) -> None:
    domain = _domain()
    defn, subj = _tiny_service(domain)
    await start_service(defn)
    reply, trace_id = await nats_adapter.request(nc, subj, Publish(n=7), Published)
    stored = await nc.jetstream().get_msg(subjects.EVENTS_STREAM, reply.seq)
    assert stored.subject == f"vnet.evt.{domain}.happened.7"
    assert stored.headers is not None and stored.headers[H.MSG_ID]
    assert stored.headers[H.TRACEPARENT].split("-")[1] == trace_id
    assert msgspec.json.decode(stored.data or b"", type=Happened).n == 7
    (pub,) = [s for s in spans.get_finished_spans() if s.name == f"publish {subjects.EVT.template}"]
    (proc,) = [s for s in spans.get_finished_spans() if s.name == f"process {subj.template}"]
    assert pub.parent is not None and proc.context is not None and pub.parent.span_id == proc.context.span_id


async def test_durable_consumer_gets_acks_and_continues_the_trace(start_service: StartService, nc: Client,
                                                                  spans: InMemorySpanExporter) -> None:
    domain = _domain()
    defn, subj = _tiny_service(domain)
    rt = await start_service(defn)
    got: list[Msg] = []

    async def handler(m: Msg) -> None:
        got.append(m)

    consumer = nats_adapter.DurableConsumer(nc.jetstream(), f"test-{domain}", f"vnet.evt.{domain}.>")
    await consumer.start(handler)
    try:
        for i in range(3):
            await rt.publish_event(domain, "made", f"e{i}", Happened(n=i))
        _, trace_id = await nats_adapter.request(nc, subj, Publish(n=99), Published)
        assert await _until(lambda: len(got) == 4), got
        assert [m.subject.split(".")[-1] for m in got] == ["e0", "e1", "e2", "99"]
        assert all(m.metadata.num_delivered == 1 for m in got)
        js = nc.jetstream()

        async def acked() -> bool:
            ci = await js.consumer_info(subjects.EVENTS_STREAM, f"test-{domain}")
            return ci.num_ack_pending == 0 and ci.num_pending == 0

        for _ in range(600):
            if await acked():
                break
            await asyncio.sleep(0.05)
        assert await acked()
        # the consumer's span continues the trace of the request that published the event
        in_trace = [s for s in spans.get_finished_spans()
                    if s.context is not None and format(s.context.trace_id, "032x") == trace_id]
        (pub,) = [s for s in in_trace if s.name == f"publish {subjects.EVT.template}"]
        (proc,) = [s for s in in_trace if s.name == f"process {subjects.EVT.template}"]
        assert proc.parent is not None and pub.context is not None and proc.parent.span_id == pub.context.span_id
    finally:
        await consumer.stop(delete=True)


async def test_failing_handler_gets_the_event_again(start_service: StartService, nc: Client) -> None:
    domain = _domain()
    defn, _ = _tiny_service(domain)
    rt = await start_service(defn)
    deliveries: list[tuple[str, int]] = []

    async def handler(m: Msg) -> None:
        deliveries.append((m.subject.split(".")[-1], m.metadata.num_delivered))
        if m.subject.endswith(".bad") and m.metadata.num_delivered < 3:
            raise RuntimeError("not yet")

    consumer = nats_adapter.DurableConsumer(nc.jetstream(), f"test-{domain}", f"vnet.evt.{domain}.>",
                                            nak_delay_s=0.05, ack_wait_s=5.0)
    await consumer.start(handler)
    try:
        await rt.publish_event(domain, "made", "bad", Happened(n=1))
        await rt.publish_event(domain, "made", "good", Happened(n=2))
        assert await _until(lambda: ("bad", 3) in deliveries and ("good", 1) in deliveries), deliveries
        await asyncio.sleep(0.3)  # nothing more arrives once it was handled
        assert sorted(d for d in deliveries if d[0] == "bad") == [("bad", 1), ("bad", 2), ("bad", 3)]
        assert [d for d in deliveries if d[0] == "good"] == [("good", 1)]
    finally:
        await consumer.stop(delete=True)
    with pytest.raises(nats.js.errors.NotFoundError):
        await nc.jetstream().consumer_info(subjects.EVENTS_STREAM, f"test-{domain}")


async def test_consumer_ends_when_its_connection_is_closed(config: VNetConfig, nc: Client) -> None:
    domain = _domain()
    own = await nats.connect(config.nats_url)
    consumer = nats_adapter.DurableConsumer(own.jetstream(), f"test-{domain}", f"vnet.evt.{domain}.>")

    async def handler(m: Msg) -> None:
        pass

    await consumer.start(handler)
    task = consumer._task
    assert task is not None
    await asyncio.sleep(0.2)  # pulling
    await own.close()
    try:
        # it notices and ends, rather than spinning on a connection that never comes back
        await asyncio.wait_for(asyncio.shield(task), 30.0)
    finally:
        await consumer.stop()
        await nc.jetstream().delete_consumer(subjects.EVENTS_STREAM, f"test-{domain}")
    assert task.done() and not task.cancelled()
