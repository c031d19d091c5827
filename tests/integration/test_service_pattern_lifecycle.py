"""The one service pattern (``vnet.runtime.service``) against a real nats-server: a
service's life: graceful drain on stop (and what is answered past the drain timeout, what a
stop leaves open, a stop bounded when a hook or task will not end), a failed start leaves
nothing registered, subscriptions are live when ``start()`` returns, reconnect after a NATS
restart.
"""

# ruff: noqa: F811 (a test's argument nc is service_pattern_env's fixture, imported for pytest)

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from tests.integration.service_pattern_env import (
    Echo,
    EchoReply,
    StartService,
    _echo_service,
    _unique,
    _until,
    nc,  # noqa: F401  (the fixture)
)
from vnet.adapters import nats as nats_adapter
from vnet.contracts.messages import MetricsReport
from vnet.core import errors as E
from vnet.runtime import servers
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime, ServiceDef

# -- 7. graceful drain ----------------------------------------------------------------------------

async def test_stop_drains_in_flight_requests(start_service: StartService, nc: Client) -> None:
    defn, subj, state = _echo_service(_unique("pdrain"))
    rt = await start_service(defn)
    data = Echo(text="d", hold=True)
    calls = [asyncio.create_task(nats_adapter.request(nc, subj["slow"], data, EchoReply, timeout=120.0))
             for _ in range(10)]
    assert await _until(lambda: rt.inflight == 10, timeout=60.0), \
        (rt.inflight, [c.exception() for c in calls if c.done()])
    stopping = asyncio.create_task(rt.stop(drain_timeout=90.0))
    await asyncio.sleep(0.3)
    assert not stopping.done(), "stop() returned with requests still in flight"
    assert state["done"] == 0
    state.gate.set()  # the held requests finish now, during the drain
    await stopping
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(not isinstance(r, BaseException) and r[0].text == "d" for r in results), results
    assert state["done"] == 10
    # afterwards: nobody answers here
    with pytest.raises(E.Unavailable) as ei:
        await nats_adapter.request(nc, subj["echo"], Echo(text="late"), EchoReply, timeout=2.0)
    assert ei.value.code == "unavailable"


async def test_stop_past_drain_timeout_answers_unavailable(start_service: StartService, nc: Client) -> None:
    defn, subj, _ = _echo_service(_unique("pcut"))
    rt = await start_service(defn)
    call = asyncio.create_task(nats_adapter.request(nc, subj["slow"], Echo(hold=True), EchoReply, timeout=120.0))
    assert await _until(lambda: rt.inflight == 1, timeout=60.0), call.exception() if call.done() else "no reply"
    # The gate never opens: stop() gives up after the drain timeout instead of waiting for it
    # (the generous bound only tells "gave up" from "waited for ever").
    await asyncio.wait_for(rt.stop(drain_timeout=0.3), 60.0)
    with pytest.raises(E.Unavailable, match="stopped before finishing slow"):
        await call


async def test_stop_leaves_a_given_connection_open(config: VNetConfig, nc: Client) -> None:
    from vnet.runtime import service

    defn, subj, _ = _echo_service(_unique("pown"))
    own = await nats.connect(config.nats_url)
    try:
        rt = await service.start(defn, config, nc=own)
        reply, _ = await nats_adapter.request(nc, subj["echo"], Echo(text="a"), EchoReply)
        assert reply.text == "a"
        await rt.stop(drain_timeout=2.0)
        assert own.is_connected, "stop() closed a connection it did not open"
        with pytest.raises(E.Unavailable):
            await nats_adapter.request(nc, subj["echo"], Echo(text="b"), EchoReply, timeout=2.0)
    finally:
        await own.close()


async def test_stop_is_bounded_when_a_hook_or_a_task_will_not_end(config: VNetConfig, nc: Client,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A stop hook that never returns and a background task that swallows its cancellation
    cost at most one step bound each, and the log says where they were stuck."""
    from vnet.runtime import service

    monkeypatch.setattr(service, "STOP_STEP_S", 0.5)
    defn, _, _ = _echo_service(_unique("pstuck"))
    forever = asyncio.Event()

    @defn.stopping
    async def hangs(rt: Runtime) -> None:
        await forever.wait()

    async def stubborn() -> None:
        while not forever.is_set():
            try:
                await forever.wait()
            except asyncio.CancelledError:
                continue  # the bug this bound survives: a loop that eats its cancellation

    rt = await service.start(defn, config)
    rt.spawn(stubborn(), "stubborn")
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await asyncio.wait_for(rt.stop(drain_timeout=0.5), 30.0)
    took = time.monotonic() - t0
    assert took < 10.0, took  # three bounded steps of 0.5 s, not the 30 s guard
    text = caplog.text
    assert "stop hook hangs: still running" in text and "forever.wait()" in text
    assert "background task still running" in text and "stubborn" in text
    forever.set()  # let the abandoned task end, so the test leaves nothing running
    await asyncio.sleep(0.05)


async def test_failed_start_leaves_nothing_registered(config: VNetConfig, nc: Client) -> None:
    from vnet.runtime import service

    name = _unique("pfailstart")
    defn = ServiceDef(name, "on_start fails", uses_redis=False)

    @defn.starting
    async def broken(rt: Runtime) -> None:
        raise RuntimeError("cannot start")

    with pytest.raises(RuntimeError, match="cannot start"):
        await service.start(defn, config)
    replies = []
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.PING.vnet-{name}", b"", reply=inbox)
    try:
        replies.append(await sub.next_msg(timeout=0.5))
    except nats.errors.TimeoutError:
        pass
    await sub.unsubscribe()
    # the server's own "no responders" status is all that comes back
    assert [m.data for m in replies if (m.headers or {}).get("Status") != "503"] == []


# -- subscriptions are live when start() returns ---------------------------------------------------

async def test_flush_waits_for_queued_subscriptions(config: VNetConfig, nc: Client) -> None:
    """nats-py's flush() can return before a SUB still queued behind other data reached the
    server (its PING skips the queue); ``nats_adapter.flush`` cannot, and ``start()`` uses it.
    With a plain ``nc.flush()`` here, a third to a half of the requests find no responder."""
    sub_nc = await nats.connect(config.nats_url)

    async def answer(msg: Msg) -> None:
        await msg.respond(b"ok")

    try:
        blob = b"x" * (60 * 1024)
        missed = 0
        for i in range(30):
            for _ in range(24):  # ~1.4 MB queued ahead of the SUB
                await sub_nc.publish(f"vnet.test.sink.{i}", blob)
            subject = _unique("vnet.test.flush.")
            sub = await sub_nc.subscribe(subject, queue="q", cb=answer)
            await nats_adapter.flush(sub_nc)
            try:
                await nc.request(subject, b"", timeout=5.0)
            except nats.errors.NoRespondersError:
                missed += 1
            await sub.unsubscribe()
        assert missed == 0, f"{missed} of 30 fresh subscriptions were not live after flush"
    finally:
        await sub_nc.close()


# -- 8. reconnect after a NATS restart -------------------------------------------------------------

async def test_service_survives_nats_restart(config: VNetConfig, start_service: StartService,
                                             tmp_path: Path) -> None:
    port = servers.free_port()
    data_dir = tmp_path / "nats-restart"
    srv = servers.start_nats(data_dir, port=port)
    cfg = msgspec.structs.replace(config, nats_url=srv.url)
    defn, subj, _ = _echo_service(_unique("precon"))
    client: Client | None = None
    rt: Runtime | None = None
    try:
        rt = await start_service(defn, cfg=cfg)
        client = await nats_adapter.connect(cfg, "test-reconnect")
        reply, _ = await nats_adapter.request(client, subj["echo"], Echo(text="before"), EchoReply)
        assert reply.text == "before"

        srv.stop()
        await asyncio.sleep(0.5)
        srv = servers.start_nats(data_dir, port=port)

        deadline = time.monotonic() + 60.0
        last: Exception | None = None
        answered = False
        while time.monotonic() < deadline:
            try:
                reply, _ = await nats_adapter.request(client, subj["echo"], Echo(text="after"), EchoReply,
                                                      timeout=0.5)
                answered = reply.text == "after"
                break
            except E.VNetError as exc:
                last = exc
                await asyncio.sleep(0.2)
        assert answered, f"the service did not answer within 60 s of NATS coming back: {last}"
        assert rt.nc.is_connected
        health = await rt.health()
        assert health.checks["nats"] == "ok"
    finally:
        if rt is not None:
            await rt.stop(drain_timeout=2.0)
        if client is not None:
            await client.close()
        srv.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# -- metrics reports ------------------------------------------------------------------------------

async def test_metrics_report_goes_when_its_counters_move(start_service: StartService, nc: Client) -> None:
    """An idle instance sends no report each interval (the metrics service keeps the last
    one; 1,000 idle nodes sent 500 a second); one request later, the next interval reports it."""
    defn, subj, _ = _echo_service(_unique("preport"))
    rt = await start_service(defn)
    interval = rt.config.metrics_report_interval_s
    got: list[MetricsReport] = []

    async def on_report(msg: Msg) -> None:
        got.append(msgspec.json.decode(msg.data, type=MetricsReport))

    await rt.nc.flush()  # the report made at start is through the server before we listen
    sub = await nc.subscribe(f"vnet.metrics.report.{defn.name}.{rt.instance}", cb=on_report)
    try:
        await nc.flush()
        await asyncio.sleep(interval * 3)  # the report made at start may still be on its way
        got.clear()
        await asyncio.sleep(interval * 6)
        assert got == [], f"{len(got)} unchanged report(s) in {interval * 6:.1f} s"
        await nats_adapter.request(nc, subj["echo"], Echo(text="x"), EchoReply)
        assert await _until(lambda: bool(got), timeout=interval * 25), "no report after a request"
        assert {o.op: o.count for o in got[-1].ops}.get("echo") == 1, got[-1]
    finally:
        await sub.unsubscribe()
