"""Node heartbeats are handled side by side, not one after another.

nats-py awaits a plain subscription's callback before it hands over the next message; the
endpoint service's ``vnet.node.*.register`` handler waits on Redis, so under load (the
Redis pool held by creates) 1,000 simulated nodes' heartbeats queued past their 5 s timeout
and the nodes expired mid-benchmark (bench_scale, 1,000 nodes x 50 endpoints, docs/scale.md).
Here a real endpoint service whose node lookup is made slow (0.3 s, a loaded Redis) gets 20
registrations at once: handled one after another they need 6 s, side by side well under 2 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from tests.conftest import fresh_db_config
from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.endpoint import NodeRegister, NodeRegistered
from vnet.runtime.config import VNetConfig

SLOW_S = 0.3
NODES = 20


async def test_registrations_are_handled_side_by_side(config: VNetConfig, run_prefix: str,
                                                      start_service: Callable[..., Awaitable[Any]]) -> None:
    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    rt = await start_service("endpoint", cfg=cfg)
    store = rt.state["store"]
    real = store.node

    async def slow_node(node: str, *, include_gone: bool = False) -> Any:
        await asyncio.sleep(SLOW_S)
        return await real(node, include_gone=include_gone)

    store.node = slow_node
    nc = await nats_adapter.connect(cfg, "test-heartbeats")
    try:
        names = [f"{run_prefix}-hb{i:02d}" for i in range(NODES)]

        async def register(node: str) -> NodeRegistered:
            req = NodeRegister(node=node, instance="i1", heartbeat_s=600)
            rep, _ = await nats_adapter.request(nc, subjects.NODE_REGISTER, req, NodeRegistered,
                                                params={"node": node}, timeout=10)
            return rep

        t0 = time.perf_counter()
        got = await asyncio.gather(*(register(n) for n in names))
        took = time.perf_counter() - t0
        assert [g.node for g in got] == names
        # one after another: NODES x SLOW_S = 6 s; side by side: one slow lookup and change
        assert took < NODES * SLOW_S / 3, f"{NODES} registrations took {took:.2f} s: handled one at a time?"
        assert {n.node for n in await rt.state["store"].nodes(counts=False)} >= set(names)
    finally:
        store.node = real
        await nc.drain()
        await r.flushdb()
        await r.aclose()
