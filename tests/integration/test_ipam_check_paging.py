"""``ipam check`` pages with a cursor, so a pool with thousands of leaks gets an answer.

Before: the check of a pool with 8,000 allocations built one reply over the bus's 1 MB
limit; the service logged a warning and the client waited out its timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import fresh_db_config
from vnet import VNetManager
from vnet.adapters import ipam_store
from vnet.contracts import subjects
from vnet.contracts.ipam import CheckReply, CheckRequest
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig
from vnet.svc.ipam.service import inspect

LEAKS = 8000


@pytest.fixture
async def cfg(config: VNetConfig) -> AsyncIterator[VNetConfig]:
    c = msgspec.structs.replace(fresh_db_config(config), request_timeout_s=120.0)
    r = aioredis.Redis.from_url(c.redis_url)
    await r.flushdb()
    yield c
    await r.flushdb()
    await r.aclose()


async def _leaky_pool(m: VNetManager, cfg: VNetConfig, nid: str, cidr: str, n: int) -> None:
    """A pool with ``n`` allocations whose owners are not in the endpoint index (leaks)."""
    await m.create_pool(nid, cidr)
    sem = asyncio.Semaphore(200)

    async def one(i: int) -> None:
        async with sem:
            await m.request_address(nid, owner=f"ghost-{i:05d}")

    await asyncio.gather(*(one(i) for i in range(n)))
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.sadd(ipam_store.ENDPOINTS_INDEX, "someone-alive")  # the index exists: leaks are looked for
    await r.aclose()


async def test_check_of_8000_leaks_pages_and_answers(cfg: VNetConfig,
                                                     start_service: Callable[..., Awaitable[Any]]) -> None:
    rt = await start_service("ipam", cfg=cfg)
    async with VNetManager(cfg) as m:
        await _leaky_pool(m, cfg, "big", "10.90.0.0/18", LEAKS)
        t0 = time.perf_counter()
        first = await m.ipam_check_page(network_id="big", grace_s=3600)
        took_page = time.perf_counter() - t0
        assert len(first.leaks) == 1000 and first.next_cursor and not first.clean
        size = len(msgspec.json.encode(first))
        t0 = time.perf_counter()
        whole = await m.ipam_check(network_id="big", grace_s=3600)
        took_all = time.perf_counter() - t0
        print(f"\nipam check of {LEAKS} leaks: first page {size} bytes in {took_page:.2f}s; "
              f"all pages in {took_all:.2f}s; one unpaged reply would be "
              f"{len(msgspec.json.encode(await inspect(rt.state['ipam_store'], 3600, 'big')))} bytes")
        assert len(whole.leaks) == LEAKS and whole.next_cursor is None and not whole.clean
        assert len({lk.owner for lk in whole.leaks}) == LEAKS  # no duplicates across pages
        assert whole.pools_checked == 1 and whole.allocations == LEAKS
        # The largest page the contract allows still fits in one message.
        biggest = await m.ipam_check_page(network_id="big", grace_s=3600, limit=2000)
        assert len(biggest.leaks) == 2000 and len(msgspec.json.encode(biggest)) < rt.nc.max_payload


def _ident(finding: Any) -> bytes:
    """A finding without its age (which grows between two checks, in age_s or the message)."""
    d = msgspec.to_builtins(finding)
    d.pop("age_s", None)
    d.pop("message", None)
    return msgspec.json.encode(d)


async def test_pages_concatenate_to_the_unpaged_check(cfg: VNetConfig,
                                                      start_service: Callable[..., Awaitable[Any]]) -> None:
    """Small pages, cursors inside pools and between them, pools with and without findings."""
    rt = await start_service("ipam", cfg=cfg)
    async with VNetManager(cfg) as m:
        await _leaky_pool(m, cfg, "p-a", "10.91.0.0/24", 23)
        await m.create_pool("p-b", "10.91.1.0/24")  # clean
        await _leaky_pool(m, cfg, "p-c", "10.91.2.0/24", 17)
        r = aioredis.Redis.from_url(cfg.redis_url)
        # An index entry with no pool behind it: an inconsistency between the pools.
        await r.zadd(ipam_store.POOLS_INDEX, {ipam_store.index_member("p-bb", 4): 1.0})
        await r.aclose()
        want = await inspect(rt.state["ipam_store"], 3600)
        assert len(want.leaks) == 40 and len(want.inconsistencies) == 1
        for limit in (1, 5, 7, 40, 41, 1000):
            got: list[Any] = []
            cursor = None
            pages = 0
            while True:
                page = await m.ipam_check_page(grace_s=3600, limit=limit, cursor=cursor)
                pages += 1
                n = len(page.leaks) + len(page.inconsistencies) + len(page.orphan_pools)
                assert n <= limit
                got += page.inconsistencies + page.leaks
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert sorted(map(_ident, got)) == sorted(map(_ident, want.inconsistencies + want.leaks)), limit
            assert pages == max(1, -(-41 // limit)) or limit >= 41
        merged = await m.ipam_check(page_size=3)
        assert merged.pools_checked == want.pools_checked == 3 and merged.allocations == 40


async def test_bad_cursor_is_a_clear_400(cfg: VNetConfig, start_service: Callable[..., Awaitable[Any]]) -> None:
    await start_service("ipam", cfg=cfg)
    async with VNetManager(cfg) as m:
        with pytest.raises(E.VNetError) as ei:
            await m.call(subjects.IPAM_CHECK, CheckRequest(cursor="nonsense"), CheckReply)
    assert ei.value.code == E.INVALID_REQUEST.code and "next_cursor" in ei.value.message


async def test_pool_list_pages(cfg: VNetConfig, start_service: Callable[..., Awaitable[Any]]) -> None:
    from vnet.contracts.ipam import PoolList, PoolsReply

    await start_service("ipam", cfg=cfg)
    async with VNetManager(cfg) as m:
        sem = asyncio.Semaphore(100)

        async def one(i: int) -> None:
            async with sem:
                await m.create_pool(f"pl-{i:03d}", f"10.{120 + i // 256}.{i % 256}.0/24")

        await asyncio.gather(*(one(i) for i in range(450)))
        first = await m.call(subjects.IPAM_POOL_LIST, PoolList(), PoolsReply)
        assert len(first.pools) == 200 and first.next_cursor is not None
        every = await m.pools(page_size=75)
        assert [p.network_id for p in every] == [f"pl-{i:03d}" for i in range(450)]
        last = await m.call(subjects.IPAM_POOL_LIST, PoolList(limit=1000), PoolsReply)
        assert len(last.pools) == 450 and last.next_cursor is None


async def test_check_finds_a_network_without_its_pool(cfg: VNetConfig,
                                                      start_service: Callable[..., Awaitable[Any]]) -> None:
    """What an interrupted create can leave (see test_chaos.py): a registered network with no pool.
    GC cannot repair it, so the check must say so."""
    await start_service("ipam", cfg=cfg)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.sadd(ipam_store.NETWORKS_INDEX, "has-pool", "no-pool")
    await r.aclose()
    async with VNetManager(cfg) as m:
        await m.create_pool("has-pool", "10.92.0.0/24")
        for rep in (await m.ipam_check(), await m.ipam_check(network_id="no-pool")):
            assert [(i.network_id, i.kind) for i in rep.inconsistencies] == [("no-pool", "network_without_pool")]
            assert not rep.clean and "no IPAM pool" in rep.inconsistencies[0].message
        assert (await m.ipam_check(network_id="has-pool")).clean
        assert not (await m.ipam_gc(grace_s=0)).pools_deleted  # nothing for GC to do about it
        await m.create_pool("no-pool", "10.92.1.0/24")
        assert (await m.ipam_check()).clean
