"""``ipam gc`` and the allow-rule list page with a cursor (bounded replies everywhere).

Before: ``vnet.ipam.gc`` answered every released allocation in one reply (a pool with
thousands of leaks collected fine but the reply went over the bus limit and was lost,
so the caller saw a timeout), and ``vnet.policy.rule.list`` answered every rule at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import fresh_db_config
from vnet import VNetManager
from vnet.adapters import ipam_store
from vnet.contracts import subjects
from vnet.contracts.policy import RuleList, RulePage
from vnet.core.policy import AllowRule, Selector
from vnet.runtime.config import VNetConfig

LEAKS = 2500


@pytest.fixture
async def cfg(config: VNetConfig) -> AsyncIterator[VNetConfig]:
    c = msgspec.structs.replace(fresh_db_config(config), request_timeout_s=120.0)
    r = aioredis.Redis.from_url(c.redis_url)
    await r.flushdb()
    yield c
    await r.flushdb()
    await r.aclose()


async def test_gc_pages_its_answer(cfg: VNetConfig, start_service: Callable[..., Awaitable[Any]]) -> None:
    await start_service("ipam", cfg=cfg)
    async with VNetManager(cfg) as m:
        for nid, cidr in (("gca", "10.91.0.0/20"), ("gcb", "10.92.0.0/20")):
            await m.create_pool(nid, cidr)
        sem = asyncio.Semaphore(200)

        async def one(i: int) -> None:
            async with sem:
                await m.request_address("gca" if i % 2 else "gcb", owner=f"ghost-{i:05d}")

        await asyncio.gather(*(one(i) for i in range(LEAKS)))
        r = aioredis.Redis.from_url(cfg.redis_url)
        await r.sadd(ipam_store.ENDPOINTS_INDEX, "someone-alive")  # the index exists: orphans are collected
        await r.aclose()
        first = await m.ipam_gc_page(grace_s=0, limit=1000)
        assert len(first.released) == 1000 and first.next_cursor is not None
        second = await m.ipam_gc_page(grace_s=0, limit=1000, cursor=first.next_cursor)
        assert len(second.released) == 1000 and second.next_cursor is not None
        rest = await m.ipam_gc(grace_s=0, page_size=300)  # the client follows every page
        assert rest.next_cursor is None and len(rest.released) == LEAKS - 2000
        owners = [a.owner for a in first.released + second.released + rest.released]
        assert len(set(owners)) == LEAKS == len(owners)  # each collected once
        again = await m.ipam_gc(grace_s=0)
        assert again.released == [] and again.next_cursor is None
        assert (await m.ipam_check(grace_s=0)).clean


async def test_rule_list_pages(cfg: VNetConfig, start_service: Callable[..., Awaitable[Any]]) -> None:
    for name in ("network", "endpoint", "policy"):
        await start_service(name, cfg=cfg)
    async with VNetManager(cfg) as m:
        ids = [f"r{i:03d}" for i in range(23)]
        for rid in ids:
            await m.put_rule(AllowRule(id=rid, from_=[Selector(cidr="192.0.2.0/24")],
                                       to=[Selector(labels={"app": rid})]))
        got: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = await m.call(subjects.POLICY_RULE_LIST, RuleList(limit=5, cursor=cursor), RulePage)
            assert len(page.rules) <= 5
            got += [r.id for r in page.rules]
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        assert got == ids and pages == 5
        assert [r.id for r in await m.list_rules()] == ids
