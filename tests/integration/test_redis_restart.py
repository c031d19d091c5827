"""After a Redis restart the first requests succeed: no 503 from a dead pooled connection.

Before: every connection in a service's pool was dead after a restart, and the first command
on each failed with "Connection closed by server" (a burst of 40 reads right after a restart:
39 answered 503). The pool now checks a connection before handing it out, and a read whose
connection broke is sent once more on a new one (``vnet.adapters.redis``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest

from tests.integration.test_dependency_faults import OwnValkey, valkey  # noqa: F401  (the fixture)
from vnet import VNetManager
from vnet.runtime.config import VNetConfig

StartService = Callable[..., Awaitable[Any]]
BURST = 40


@pytest.fixture
async def cfg(config: VNetConfig, valkey: OwnValkey) -> AsyncIterator[VNetConfig]:  # noqa: F811
    yield msgspec.structs.replace(config, redis_url=valkey.url, redis_timeout_s=5.0, request_timeout_s=30.0)


async def test_first_requests_after_a_redis_restart_succeed(cfg: VNetConfig, valkey: OwnValkey,  # noqa: F811
                                                          start_service: StartService) -> None:
    await start_service("ipam", cfg=cfg)
    await start_service("network", cfg=cfg)
    async with VNetManager(cfg) as m:
        nets = [await m.create_network(f"restart-{i}", f"10.83.{i}.0/24") for i in range(4)]
        # Fill the pool: every one of these connections is dead once the server restarts.
        await asyncio.gather(*(m.get_network(nets[i % 4].id) for i in range(BURST)))
        valkey.kill()
        valkey.restart()
        await asyncio.sleep(0.2)  # the event loop sees the old connections' EOF, as a running service would
        first = await m.get_network(nets[0].id)  # raised 503 unavailable before
        assert first.id == nets[0].id
        got = await asyncio.gather(*(m.get_network(nets[i % 4].id) for i in range(BURST)), return_exceptions=True)
        errors = [g for g in got if isinstance(g, BaseException)]
        assert errors == [], f"{len(errors)} of {BURST} reads failed right after the restart: {errors[:3]}"
        listed = await m.all_networks()
        assert sorted(n.name for n in listed) == [f"restart-{i}" for i in range(4)]


async def test_first_write_after_a_redis_restart_succeeds(cfg: VNetConfig, valkey: OwnValkey,  # noqa: F811
                                                         start_service: StartService) -> None:
    await start_service("ipam", cfg=cfg)
    await start_service("network", cfg=cfg)
    async with VNetManager(cfg) as m:
        net = await m.create_network("restart-w", "10.84.0.0/24")
        await asyncio.gather(*(m.get_network(net.id) for _ in range(BURST)))
        valkey.kill()
        valkey.restart()
        await asyncio.sleep(0.2)
        # A write is never re-sent (it may have run), so it must not be written to a dead connection.
        upd = await m.update_network(net.id, set_labels={"after": "restart"})
        assert upd.labels == {"after": "restart"}


def test_only_reads_are_sent_twice() -> None:
    """What the client may resend after a broken connection: reads and read-only scripts,
    never a write or a script that writes (it may have run before the connection broke)."""
    from vnet.adapters import network_lua
    from vnet.adapters.redis import _retry_safe

    for args in (("GET", "k"), ("MGET", "a", "b"), (b"HGETALL", "h"), ("zrangebyscore", "z", 0, 1),
                 ("EVALSHA", network_lua.GET.sha, 1, "k"), ("EVALSHA", network_lua.LIST.sha.encode(), 1, "k")):
        assert _retry_safe(args), args
    for args in (("SET", "k", "v"), ("DEL", "k"), ("HSET", "h", "f", "v"), ("EVALSHA", network_lua.CREATE.sha, 1, "k"),
                 ("EVALSHA", network_lua.DELETE.sha, 1, "k"), ("EVAL", "return 1", 0), ()):
        assert not _retry_safe(args), args
