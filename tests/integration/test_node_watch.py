"""The endpoint service announces a node silent past its timeout, on time (docs/scale.md).

The watch reads every node's registration expiry every ``NODE_WATCH_FULL_S`` (5 s) and, in
between, only the nodes due to expire by now. A node that registers after a full read and
falls silent before the next one must still be announced when its registration runs out,
not at the next full read: its heartbeat told the instance when to look. Real endpoint
service, real nats-server and Valkey; the node is a stand-in that registers and stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis

from tests.conftest import fresh_db_config
from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.endpoint import NodeMembership, NodeRegister, NodeRegistered
from vnet.runtime.config import VNetConfig
from vnet.svc.endpoint import common as ep_common

HEARTBEAT_S = 0.4  # its registration lasts HEARTBEAT_MISSES (3) heartbeats: 1.2 s


async def test_a_node_registered_between_full_reads_is_announced_when_it_expires(
        config: VNetConfig, run_prefix: str, start_service: Callable[..., Awaitable[Any]]) -> None:
    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    await start_service("endpoint", cfg=cfg)
    nc = await nats_adapter.connect(cfg, "test-node-watch")
    left: list[tuple[float, NodeMembership]] = []

    async def on_left(msg: Any) -> None:
        left.append((time.time(), msgspec.json.decode(msg.data, type=NodeMembership)))

    sub = await nc.subscribe(subjects.EVT_NODE_LEFT.wildcard(), cb=on_left)
    try:
        await asyncio.sleep(1.0)  # the watch's first full read is done; the next is 4 s away
        node = f"{run_prefix}-w1"
        rep, _ = await nats_adapter.request(nc, subjects.NODE_REGISTER,
                                            NodeRegister(node=node, instance="i1", heartbeat_s=HEARTBEAT_S),
                                            NodeRegistered, params={"node": node}, timeout=10)
        expires = time.time() + rep.ttl_s
        assert rep.ttl_s < ep_common.NODE_WATCH_FULL_S - 2  # it expires well before the next full read
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not any(m.node == node for _, m in left):
            assert loop.time() < deadline, "the silent node was never announced"
            await asyncio.sleep(0.02)
        at, ev = next((t, m) for t, m in left if m.node == node)
        assert ev.reason == "timeout", ev
        assert at >= expires - 0.05, f"announced {expires - at:.2f} s before its registration ran out"
        assert at <= expires + 1.0, f"announced {at - expires:.2f} s after its registration ran out"
    finally:
        await sub.unsubscribe()
        await nc.drain()
        await r.flushdb()
        await r.aclose()
