"""Two IPAM replicas under concurrent load from four clients (real valkey and NATS): no address
handed out twice, both replicas serve, exhaustion is exact."""

# ruff: noqa: F811 (a test's argument rds is ipam_env's fixture, imported for pytest)

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import msgspec
import redis.asyncio as aioredis

from tests.integration.ipam_env import (
    _register_network,
    rds,  # noqa: F401  (the fixture)
)
from vnet.client import VNetManager
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig

# --- 2. replicas under concurrent load ---------------------------------------------------------

async def test_two_replicas_four_clients_no_duplicates(config: VNetConfig, start_service: Any, run_prefix: str,
                                                       rds: aioredis.Redis) -> None:
    # 10,000 requests 64 at a time on two replicas and one valkey: on a busy machine a command
    # or a request can wait in line past the defaults (2 s, 5 s); that is slowness, not an error
    config = msgspec.structs.replace(config, redis_timeout_s=60.0, request_timeout_s=120.0)
    await start_service("ipam", cfg=config)
    await start_service("ipam", cfg=config)
    clients = [VNetManager(config) for _ in range(4)]
    for c in clients:
        await c.__aenter__()
    try:
        big, small = f"{run_prefix}-big", f"{run_prefix}-small"
        await _register_network(rds, big, small)
        info = await clients[0].create_pool(big, "10.64.0.0/18", "10.64.0.1")
        assert info.capacity == 16384 - 3

        total, inflight = 10_000, 64
        sem = asyncio.Semaphore(inflight)

        async def one(i: int) -> str:
            async with sem:
                rep = await clients[i % 4].request_address(big, f"o{i}")
                return rep.address

        addrs = await asyncio.gather(*(one(i) for i in range(total)))
        assert len(set(addrs)) == total, "duplicate addresses handed out"
        net = ipaddress.ip_network("10.64.0.0/18")
        assert all(ipaddress.ip_address(a) in net for a in addrs)
        assert not {"10.64.0.0", "10.64.0.1", "10.64.63.255"} & set(addrs)
        (pool,) = await clients[1].pool(big)
        assert pool.used == total and pool.free == pool.capacity - total

        # both replicas did part of the work
        stats = [s for s in await clients[0].services() if s.name == "ipam"]
        assert len(stats) >= 2 and sum(1 for s in stats if s.requests > 100) >= 2, stats

        # over-asking a /26: exactly its capacity succeeds, the rest get a clear 503
        small_info = await clients[0].create_pool(small, "10.65.0.0/26", "10.65.0.1")
        assert small_info.capacity == 61

        async def try_one(i: int) -> str | E.VNetError:
            async with sem:
                try:
                    return (await clients[i % 4].request_address(small, f"s{i}")).address
                except E.VNetError as err:
                    return err

        results = await asyncio.gather(*(try_one(i) for i in range(100)))
        ok = [r for r in results if isinstance(r, str)]
        errs = [r for r in results if isinstance(r, E.VNetError)]
        assert len(ok) == 61 and len(set(ok)) == 61 and len(errs) == 39
        for err in errs:
            assert isinstance(err, E.Unavailable) and err.code == "pool_exhausted" and err.status == 503
            assert small in err.message and "10.65.0.0/26" in err.message and "61" in err.message
            assert err.details["capacity"] == 61

        # releasing everything returns both pools to empty, and check finds nothing wrong
        async def rel(nid: str, owner: str, i: int) -> list[str]:
            async with sem:
                return await clients[i % 4].release_address(nid, owner)

        released = await asyncio.gather(*(rel(big, f"o{i}", i) for i in range(total)),
                                        *(rel(small, f"s{i}", i) for i in range(100)))
        assert sum(len(r) for r in released) == total + 61
        for nid in (big, small):
            (p,) = await clients[0].pool(nid)
            assert p.used == 0 and p.free == p.capacity
            rep = await clients[0].ipam_check(network_id=nid)
            assert rep.clean and rep.pools_checked == 1 and rep.allocations == 0, rep
        # a released address is not handed out again while others are free: the cursor went on
        nxt = await clients[0].request_address(small, "after")
        assert nxt.address == "10.65.0.2"  # the cursor was at .62; .63 is the broadcast: wrapped to .2
        await clients[0].delete_pool(small, force=True)
        await clients[0].delete_pool(big)
    finally:
        for c in clients:
            await c.close()
