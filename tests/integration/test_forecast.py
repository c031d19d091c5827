"""Address forecasts against the real IPAM and metrics services: rates and time to
exhaustion in ``pool.get``, the 80 % / 95 % fullness events (once per crossing), and the
``vnet_ipam_pool_*`` gauges on ``/metrics``."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.integration.test_metrics import scrape_until, value
from vnet import VNetManager
from vnet.adapters import nats as nats_adapter
from vnet.adapters.ipam_rates import rates_key
from vnet.adapters.redis import global_key
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

_dbs = itertools.cycle(range(13, 0, -1))


@pytest.fixture
async def env(config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]]
              ) -> AsyncIterator[tuple[VNetManager, Runtime]]:
    base = config.redis_url.rsplit("/", 1)[0]
    cfg = msgspec.structs.replace(config, redis_url=f"{base}/{next(_dbs)}", metrics_http_port=0)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    await start_service("ipam", cfg=cfg)
    metrics = await start_service("metrics", cfg=cfg)
    mgr = VNetManager(cfg)
    await mgr.__aenter__()
    try:
        yield mgr, metrics
    finally:
        await mgr.close()
        await r.flushdb()
        await r.aclose()


async def test_rates_exhaustion_fullness_events_and_gauges(env: tuple[VNetManager, Runtime]) -> None:
    m, metrics = env
    nc = await nats_adapter.connect(m.config, "test-forecast-events")
    got: list[dict[str, Any]] = []

    async def on(msg: Any) -> None:
        got.append(msgspec.json.decode(msg.data))

    await nc.subscribe("vnet.evt.ipam.pool_fullness.>", cb=on)
    try:
        await m.create_pool("fc1", "10.205.0.0/28", "10.205.0.1")  # 13 assignable addresses
        before = (await m.pool("fc1", 4))[0]
        assert before.forecast is not None and before.forecast.exhaustion_s is None  # nothing allocated
        for k in range(10):
            await m.request_address("fc1", f"o{k}")
        # an allocation is counted right after its reply (not on the attach's path)
        p = await _pool_when(m, "fc1", lambda f: f.alloc_per_h == pytest.approx(10 * 3600 / f.window_s, abs=0.01))
        f = p.forecast
        assert f is not None and p.used == 10
        # the rate is over the time the window covers (the pool's age, one bucket at least; the
        # reply says which), so the arithmetic is checked without depending on the clock
        assert 60.0 <= f.window_s <= 900.0 and f.release_per_h == 0.0
        assert f.alloc_per_h == pytest.approx(10 * 3600 / f.window_s, abs=0.01)
        assert f.exhaustion_s == pytest.approx(3 / f.alloc_per_h * 3600, abs=0.5)  # 3 free at that rate
        assert got == []  # 10 of 13 is below 80 % (ceil(10.4) = 11)
        await m.request_address("fc1", "o10")  # 11: 80 %
        # (counts are written together every COUNT_FLUSH_S: a level is announced with the
        # pool's use when the count that crossed it is written, so the crossing is awaited)
        await _until(lambda: len(got) >= 1)
        await m.request_address("fc1", "o10")  # a repeat allocates nothing and counts nothing
        await m.request_address("fc1", "o11")  # 12
        await m.request_address("fc1", "o12")  # 13: 95 % (ceil(12.35) = 13) and full
        await _until(lambda: len(got) >= 2)
        assert [(e["level"], e["used"], e["capacity"]) for e in got] == [(0.8, 11, 13), (0.95, 13, 13)]
        assert got[1]["forecast"]["exhaustion_s"] == 0.0
        p = await _pool_when(m, "fc1", lambda f: f.alloc_per_h >= 13 * 3600 / f.window_s - 0.01)
        await asyncio.sleep(0.3)  # a 14th count (the repeat's) would have landed by now
        p = (await m.pool("fc1", 4))[0]
        f = p.forecast
        assert f is not None  # 13 allocations, not 14: the repeat did not count
        assert f.alloc_per_h == pytest.approx(13 * 3600 / f.window_s, abs=0.01)
        # falling below 95 % re-arms it; rising again announces it again (80 % stays announced)
        await m.release_address("fc1", "o12")
        await m.request_address("fc1", "o13")
        await _until(lambda: len(got) >= 3)
        await asyncio.sleep(0.5)
        assert [e["level"] for e in got] == [0.8, 0.95, 0.95]
        p = (await m.pool("fc1", 4))[0]
        f = p.forecast
        assert f is not None and f.release_per_h == pytest.approx(3600 / f.window_s, abs=0.01)
        # what the garbage collector reclaims counts as releases too (no owner is a known endpoint)
        r = aioredis.Redis.from_url(m.config.redis_url)
        try:
            await r.sadd(global_key("endpoints"), "somebody-else")
        finally:
            await r.aclose()
        gc = await m.ipam_gc(grace_s=0, network_id="fc1")
        assert len(gc.released) == 13
        p = (await m.pool("fc1", 4))[0]
        f = p.forecast
        assert f is not None and p.used == 0 and f.release_per_h == pytest.approx(14 * 3600 / f.window_s, abs=0.01)
    finally:
        await nc.drain()
    port = metrics.state["metrics"].http_port
    lbl = {"network_id": "fc1", "family": "4"}
    s = await scrape_until(port, lambda s: value(s, "vnet_ipam_pool_release_per_hour", **lbl) > 0
                           and value(s, "vnet_ipam_pool_used", **lbl) == 0
                           and value(s, "vnet_ipam_pool_capacity", **lbl) == 13)
    assert value(s, "vnet_ipam_pool_fullness_ratio", **lbl) == 0
    # 14 allocations, 14 releases (one by hand, 13 by the collector): not filling, no time to exhaustion
    assert value(s, "vnet_ipam_pool_release_per_hour", **lbl) == value(s, "vnet_ipam_pool_alloc_per_hour", **lbl) > 0
    assert ("vnet_ipam_pool_exhaustion_seconds", frozenset(lbl.items())) not in s


async def _pool_when(m: VNetManager, network: str, pred: Callable[[Any], bool], deadline_s: float = 10.0) -> Any:
    """The pool once its forecast satisfies ``pred`` (counts land just after the replies)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        p = (await m.pool(network, 4))[0]
        if p.forecast is not None and pred(p.forecast):
            return p
        assert loop.time() < end, f"forecast not as expected within the deadline: {p.forecast}"
        await asyncio.sleep(0.05)


async def _until(pred: Callable[[], bool], deadline_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not pred():
        assert loop.time() < end, "not within the deadline"
        await asyncio.sleep(0.05)


async def test_allocation_counts_are_written_together(env: tuple[VNetManager, Runtime]) -> None:
    """Allocations close together are counted in one write per pool (COUNT_FLUSH_S), not one
    each, and every one of them is counted."""
    m, _ = env
    r = aioredis.Redis.from_url(m.config.redis_url)
    try:
        await m.create_pool("fc3", "10.205.3.0/24", "10.205.3.1")

        # Every write of counts renews the hash's TTL; nothing else in this stack (IPAM,
        # metrics) sends EXPIRE, so Valkey's EXPIRE calls count the writes.
        async def count_writes() -> int:
            return int((await r.info("commandstats")).get("cmdstat_expire", {}).get("calls", 0))

        before = await count_writes()
        await asyncio.gather(*(m.request_address("fc3", f"c{k}") for k in range(30)))
        got: dict[bytes, bytes] = {}

        def counted() -> int:
            return sum(int(v) for f, v in got.items() if f.startswith(b"a:"))

        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while counted() < 30:
            assert loop.time() < end, f"not every allocation counted: {got}"
            await asyncio.sleep(0.05)
            got = await r.hgetall(rates_key("fc3", 4))
        await asyncio.sleep(0.3)  # nothing more comes
        assert counted() == 30, got
        writes = await count_writes() - before
        assert 1 <= writes <= 10, f"{writes} count writes for 30 allocations"
    finally:
        await r.aclose()
