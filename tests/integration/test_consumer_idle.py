"""A durable consumer with a long pull expiry (docs/scale.md, idle traffic): an idle consumer
sends one pull request per expiry instead of one a second, a message still ends the wait at
once, and a pull that died with its server is sent again as soon as the client reconnects
(not when the expiry runs out). Its own nats-server (restarted on the same port and store)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

from vnet.adapters.nats import DurableConsumer
from vnet.contracts import subjects
from vnet.runtime import servers

EXPIRY_S = 600.0  # far beyond every deadline below: a pull that waited it out would fail the test
DEADLINE_S = 60.0


async def _until(pred: object, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not pred():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_long_pull_is_cheap_when_idle_and_follows_a_server_restart(tmp_path: Path) -> None:
    srv = servers.start_nats(tmp_path / "nats")
    nc = await nats.connect(srv.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, name="test-consumer-idle")
    got: list[str] = []

    async def handler(msg: Msg) -> None:
        got.append(msg.subject)

    c = DurableConsumer(nc.jetstream(), "idle-test", "vnet.evt.x.>", deliver_all=False, pull_expiry_s=EXPIRY_S)
    try:
        js = nc.jetstream()
        await js.add_stream(name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_WILDCARD])
        await c.start(handler)
        await js.publish("vnet.evt.x.a.1", b"{}")
        await _until(lambda: got == ["vnet.evt.x.a.1"], "the first message")
        # idle (after a short batch pull that found nothing more): one long pull waits; no new
        # pull meanwhile (with the 1 s expiry there would be one a second)
        await _until(lambda: c.waiting_long, "the long pull")
        before = c.pulls
        await asyncio.sleep(3.0)
        assert c.pulls == before and c.waiting_long, (before, c.pulls)
        # the server goes away and comes back (same port, same store): the waiting pull is gone
        reconnects = nc.stats["reconnects"]
        srv.stop()
        srv = servers.start_nats(tmp_path / "nats", port=srv.port)
        await _until(lambda: nc.stats["reconnects"] > reconnects and nc.is_connected, "the reconnect")
        t0 = time.monotonic()
        await js.publish("vnet.evt.x.a.2", b"{}")
        await _until(lambda: "vnet.evt.x.a.2" in got, "the message after the restart")
        assert time.monotonic() - t0 < EXPIRY_S / 2  # pulled again on the reconnect, not at expiry
        assert c.pulls > before
    finally:
        await c.stop(delete=True)
        await nc.close()
        srv.stop()


async def test_consumers_idle_together_pull_again_at_different_times(tmp_path: Path) -> None:
    """A fleet's network consumers all go idle after the same network event; their long pulls
    must not all expire (and be sent again) in the same instant every period: at 1,000 nodes
    those bursts held JetStream for 1-4 s every 30 s (docs/scale.md)."""
    from vnet.adapters.nats import PULL_JITTER

    expiry = 3.0
    srv = servers.start_nats(tmp_path / "nats")
    nc = await nats.connect(srv.url, name="test-consumer-jitter")
    js = nc.jetstream()
    await js.add_stream(name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_WILDCARD])
    got: list[str] = []

    async def handler(msg: Msg) -> None:
        got.append(msg.subject)

    cs = [DurableConsumer(js, f"jitter-{i}", "vnet.evt.net.>", deliver_all=False, pull_expiry_s=expiry)
          for i in range(12)]
    try:
        for c in cs:
            await c.start(handler)
        await js.publish("vnet.evt.net.created.1", b"{}")
        await _until(lambda: len(got) == len(cs) and all(c.waiting_long for c in cs), "every consumer idle")
        loop = asyncio.get_running_loop()
        t0, base = loop.time(), [c.pulls for c in cs]
        again: dict[int, float] = {}
        while len(again) < len(cs) and loop.time() - t0 < 2 * expiry:
            for i, c in enumerate(cs):
                if i not in again and c.pulls > base[i]:
                    again[i] = loop.time() - t0
            await asyncio.sleep(0.02)
        assert len(again) == len(cs), again
        lengths = [c.long_expiry_s for c in cs]
        assert all(PULL_JITTER * expiry <= x <= expiry for x in lengths), lengths
        assert len(set(lengths)) == len(cs)
        # the pulls went out again spread over the jitter window, not in one instant
        assert max(again.values()) - min(again.values()) >= 0.1 * expiry, sorted(again.values())
    finally:
        for c in cs:
            await c.stop(delete=True)
        await nc.close()
        srv.stop()
