"""The network service's test environment, for the ``test_network_*.py`` modules: the
``env_factory`` and ``env`` fixtures (the IPAM and network services on their own Redis
database, 1..15, flushed before and after, so the global network registry of one test never
leaks into another or into db 0 that other suites use), and a recorder of network events.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client
from nats.aio.msg import Msg

from vnet import VNetManager
from vnet.adapters import nats as nats_adapter
from vnet.adapters.redis import global_key
from vnet.contracts import subjects
from vnet.contracts.ipam import PoolsReply
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

_dbs = itertools.cycle(range(1, 16))


@dataclass
class Env:
    cfg: VNetConfig
    m: VNetManager
    r: aioredis.Redis
    nc: Client
    start: Callable[..., Awaitable[Runtime]]

    async def err(self, coro: Awaitable[Any]) -> E.VNetError:
        with pytest.raises(E.VNetError) as ei:
            await coro
        return ei.value

    async def ids_in_index(self) -> set[str]:
        return {m.decode() for m in await self.r.smembers(global_key("networks"))}

    async def pools(self, network_id: str) -> PoolsReply:
        return await self.m.call(subjects.IPAM_POOL_LIST, {"network_id": network_id}, PoolsReply)


@pytest.fixture
async def env_factory(config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]]
                      ) -> AsyncIterator[Callable[..., Awaitable[Env]]]:
    made: list[tuple[VNetManager, aioredis.Redis, Client]] = []

    async def make(*, replicas: int = 1, **overrides: Any) -> Env:
        db = next(_dbs)
        base = config.redis_url.rsplit("/", 1)[0]
        cfg = msgspec.structs.replace(config, redis_url=f"{base}/{db}", **overrides)
        r = aioredis.Redis.from_url(cfg.redis_url)
        await r.flushdb()
        await start_service("ipam", cfg=cfg)
        for _ in range(replicas):
            await start_service("network", cfg=cfg)
        m = VNetManager(cfg)
        await m.__aenter__()
        nc = await nats_adapter.connect(cfg, "test-network")
        made.append((m, r, nc))
        return Env(cfg, m, r, nc, start_service)

    yield make
    for m, r, nc in made:
        await m.close()
        await nc.drain()
        await r.flushdb()
        await r.aclose()


@pytest.fixture
async def env(env_factory: Callable[..., Awaitable[Env]]) -> Env:
    return await env_factory()


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def on_msg(self, msg: Msg) -> None:
        self.seen.append((msg.subject, json.loads(msg.data)))

    def names(self) -> list[str]:
        return [s.split(".")[3] for s, _ in self.seen]

    async def wait_for(self, event: str, n: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        for _ in range(int(timeout / 0.02)):
            got = [p for s, p in self.seen if s.split(".")[3] == event]
            if len(got) >= n:
                return got
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {event} event (saw {self.names()})")


async def events(env: Env) -> Events:
    ev = Events()
    await env.nc.subscribe(subjects.EVT_NETWORK.template, cb=ev.on_msg)
    await env.nc.flush()
    return ev
