"""The full-resync period is spaced by the cluster's size (docs/scale.md).

Every node's periodic full resync fetches its whole desired state: 1,000 nodes at 10 s were
100 fetches a second, whatever changed, and that work grew with the endpoints. The
endpoint service answers every heartbeat with the period that keeps the cluster's resyncs at
``RESYNC_FETCHES_PER_S``; a node uses the longer of that and its own. Here the budget is one
fetch a second, so 6 live nodes are asked for 6 s, against a real endpoint service and a
real node worker (no data plane) whose own period is 1 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import fresh_db_config
from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.endpoint import NodeRegister, NodeRegistered
from vnet.runtime.config import VNetConfig
from vnet.svc.endpoint import nodes as ep_nodes
from vnet.svc.node import worker as node_worker


def test_the_period_grows_with_the_live_nodes_only_past_the_budget() -> None:
    assert ep_nodes.fleet_resync_s(10) == pytest.approx(0.5)  # each node's own 10 s is longer
    assert ep_nodes.fleet_resync_s(1000) == pytest.approx(50.0)
    assert ep_nodes.fleet_resync_s(1000, fetches_per_s=0) == 0.0


async def test_heartbeats_answer_the_cluster_period_and_the_node_follows_it(
        config: VNetConfig, run_prefix: str, start_service: Callable[..., Awaitable[Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ep_nodes, "RESYNC_FETCHES_PER_S", 1.0)
    monkeypatch.setattr(ep_nodes, "LIVE_NODES_CACHE_S", 0.0)
    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    await start_service("endpoint", cfg=cfg)
    nc = await nats_adapter.connect(cfg, "test-fleet-resync")
    try:
        async def register(node: str) -> NodeRegistered:
            rep, _ = await nats_adapter.request(nc, subjects.NODE_REGISTER,
                                                NodeRegister(node=node, instance="i1", heartbeat_s=600),
                                                NodeRegistered, params={"node": node}, timeout=10)
            return rep

        first = await register(f"{run_prefix}-fr0")
        assert first.resync_s == pytest.approx(1.0)  # one live node, one fetch a second
        for i in range(1, 5):
            await register(f"{run_prefix}-fr{i}")
        # a real node worker (its own period 1 s) joins: 6 nodes, asked for 6 s
        monkeypatch.setattr(node_worker, "RESYNC_JITTER", 0.0)
        node = await start_service("node", cfg=cfg, params={"node": f"{run_prefix}-fr5", "resync_s": "1"})
        worker = node.state["worker"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while worker.fleet_resync_s == 0.0 or not worker.fetched:
            assert loop.time() < deadline, "the node never registered"
            await asyncio.sleep(0.05)
        assert worker.fleet_resync_s == pytest.approx(6.0)
        assert worker._next_period() == pytest.approx(6.0)
        assert worker.stats().resync_s == pytest.approx(6.0)
        # with the budget back at its default, 6 nodes are far below it: the node's own 1 s
        monkeypatch.setattr(ep_nodes, "RESYNC_FETCHES_PER_S", 20.0)
        await worker.register()
        assert worker._next_period() == pytest.approx(1.0)
    finally:
        await nc.drain()
        await r.flushdb()
        await r.aclose()
