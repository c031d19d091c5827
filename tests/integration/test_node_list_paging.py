"""``endpoint.node.list`` is paged (docs/scale.md, cause 5): ``limit`` nodes per reply in id
order, ``next_cursor`` until the last page; ``VNetManager.nodes()`` follows every page. Seven
simulated nodes on a real control plane, pages of three."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from tests.conftest import fresh_db_config
from vnet.client import VNetManager
from vnet.contracts import subjects
from vnet.contracts.endpoint import NodeList, NodeListRequest
from vnet.runtime.config import VNetConfig
from vnet.svc.node.simulate import SimulatedFleet, node_names


async def test_node_list_pages_in_id_order(config: VNetConfig, run_prefix: str,
                                           start_service: Callable[..., Awaitable[Any]]) -> None:
    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for name in ("ipam", "network", "endpoint"):
        await start_service(name, cfg=cfg)
    names = node_names(f"{run_prefix}-page", 7)
    fleet = SimulatedFleet(cfg, names)
    await fleet.start()
    m = VNetManager(cfg)
    await m.__aenter__()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while set(names) - {n.node for n in await m.nodes()}:
            assert loop.time() < deadline, "simulated nodes not registered"
            await asyncio.sleep(0.1)
        pages: list[list[str]] = []
        cursor: str | None = None
        while True:
            rep = await m.call(subjects.ENDPOINT_NODE_LIST, NodeListRequest(limit=3, cursor=cursor), NodeList)
            pages.append([n.node for n in rep.nodes])
            assert len(rep.nodes) <= 3
            if rep.next_cursor is None:
                break
            assert rep.next_cursor == rep.nodes[-1].node
            cursor = rep.next_cursor
        flat = [n for p in pages for n in p]
        assert flat == sorted(flat) and len(flat) == len(set(flat))  # id order, nothing twice
        assert set(names) <= set(flat) and [len(p) for p in pages][:2] == [3, 3]
        assert [n.node for n in await m.nodes()] == flat  # the client follows every page
    finally:
        await m.close()
        await fleet.stop()
        await r.flushdb()
        await r.aclose()
