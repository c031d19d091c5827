"""Dependency failures answer 503 ``unavailable`` naming what is down, fast, and recover.

Each test starts a valkey of its own (never the session one: the other tests share that)
on a fixed port, so it can be killed or frozen and brought back at the same address.
Before: a killed Redis gave 500 ``internal`` for every mutation, and a frozen one
(SIGSTOP) held every request for the whole freeze.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats import errors as nats_errors

from vnet import VNetManager
from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.messages import Empty
from vnet.core import errors as E
from vnet.runtime import servers
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Ctx, ServiceDef

StartService = Callable[..., Awaitable[Any]]


class OwnValkey:
    """A valkey-server this test may kill, freeze and restart on the same port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc = servers.start_valkey(data_dir)
        self.port = self.proc.port
        self.url = self.proc.url

    def kill(self) -> None:
        self.proc.proc.kill()
        self.proc.proc.wait()

    def restart(self) -> None:
        self.proc = servers.start_valkey(self.data_dir, port=self.port)

    def freeze(self) -> None:
        os.kill(self.proc.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc.proc.poll() is None:
            os.kill(self.proc.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()
        self.proc.stop()


@pytest.fixture
def valkey(tmp_root: Path, request: pytest.FixtureRequest) -> Iterator[OwnValkey]:
    v = OwnValkey(tmp_root / f"valkey-{request.node.name}")
    try:
        yield v
    finally:
        v.stop()


@pytest.fixture
async def cfg(config: VNetConfig, valkey: OwnValkey) -> AsyncIterator[VNetConfig]:
    # Redis calls fail after 1 s; the caller waits far longer, so a hang would show as
    # a client timeout instead of the 503 the test expects.
    yield msgspec.structs.replace(config, redis_url=valkey.url, redis_timeout_s=1.0, request_timeout_s=30.0)


async def _unavailable(coro: Awaitable[Any]) -> tuple[E.VNetError, float]:
    t0 = time.monotonic()
    with pytest.raises(E.VNetError) as ei:
        await coro
    return ei.value, time.monotonic() - t0


async def _until_ok(call: Callable[[], Awaitable[Any]], timeout: float = 60.0) -> tuple[Any, float]:
    t0 = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - t0 < timeout:
        try:
            return await call(), time.monotonic() - t0
        except E.VNetError as err:
            assert err.code == E.UNAVAILABLE.code, err  # only 503 while it recovers
            last = err
        await asyncio.sleep(0.1)
    raise AssertionError(f"not recovered within {timeout}s: {last}")


async def test_redis_killed_answers_unavailable_then_recovers(cfg: VNetConfig, valkey: OwnValkey,
                                                             start_service: StartService) -> None:
    await start_service("ipam", cfg=cfg)
    await start_service("network", cfg=cfg)
    async with VNetManager(cfg) as m:
        net = await m.create_network("before-kill", "10.81.0.0/24")
        valkey.kill()
        for call in (lambda: m.get_network(net.id),
                     lambda: m.create_network("during-kill", "10.81.1.0/24", request_id="rq-during-kill"),
                     lambda: m.request_address(net.id, owner="ep-1")):
            err, took = await _unavailable(call())
            print(f"\nRedis killed: {err.status} {err.code} after {took:.3f}s: {err.message}")
            assert err.code == E.UNAVAILABLE.code and err.status == 503, err
            assert f"Redis at redis://127.0.0.1:{valkey.port}" in err.message
        health = await m.health("network")
        assert health.status == "degraded" and health.checks["redis"].startswith("unreachable")
        valkey.restart()
        got, took = await _until_ok(lambda: m.get_network(net.id))
        print(f"Redis restarted: reads answer again after {took:.3f}s")
        assert got.id == net.id
        created, _ = await _until_ok(lambda: m.create_network("during-kill", "10.81.1.0/24",
                                                              request_id="rq-during-kill"))
        again = await m.create_network("during-kill", "10.81.1.0/24", request_id="rq-during-kill")
        assert again.id == created.id
        assert (await m.ipam_check()).clean


async def test_redis_frozen_fails_fast_and_retry_is_safe(cfg: VNetConfig, valkey: OwnValkey,
                                                         start_service: StartService) -> None:
    await start_service("ipam", cfg=cfg)
    await start_service("network", cfg=cfg)
    async with VNetManager(cfg) as m:
        net = await m.create_network("before-freeze", "10.82.0.0/24")
        valkey.freeze()
        try:
            err, took = await _unavailable(m.get_network(net.id))
            print(f"\nRedis frozen: get answered {err.status} {err.code} after {took:.3f}s: {err.message}")
            assert err.code == E.UNAVAILABLE.code and "did not answer in time" in err.message, err
            # The store stays frozen until we thaw it: an answer at all proves the service does not
            # wait for it (the caller would wait 30 s).
            err, took = await _unavailable(m.create_network("frozen", "10.82.1.0/24", request_id="rq-frozen"))
            print(f"Redis frozen: create answered {err.status} {err.code} after {took:.3f}s")
            assert err.code == E.UNAVAILABLE.code, err
        finally:
            valkey.thaw()
        # What was sent before the freeze may still be applied after it: the documented answer to
        # a 503 or a timeout is to retry with the same request_id, which yields one network.
        created, took = await _until_ok(lambda: m.create_network("frozen", "10.82.1.0/24", request_id="rq-frozen"))
        print(f"Redis thawed: the retried create succeeded after {took:.3f}s")
        names = [n.name for n in await m.all_networks()]
        assert names.count("frozen") == 1 and created.name == "frozen"
        assert (await m.ipam_check()).clean


async def test_redis_loading_is_unavailable(cfg: VNetConfig, start_service: StartService) -> None:
    """LOADING (a restarted server reading its data set) is the store's state, not our bug."""
    from redis.exceptions import BusyLoadingError

    svc = ServiceDef("faultload", "raises what a loading Redis raises", uses_redis=True)
    subject = subjects.Subject("vnet.test.faultload.get")

    @svc.op("get", subject, Empty)
    async def get(ctx: Ctx, req: Empty) -> dict[str, str]:
        raise BusyLoadingError("Redis is loading the dataset in memory")

    await start_service(svc, cfg=cfg)
    async with VNetManager(cfg) as m:
        err, _ = await _unavailable(m.call(subject, Empty(), dict))
    assert err.code == E.UNAVAILABLE.code and "is loading its data set" in err.message, err


async def test_nats_failures_are_unavailable_and_bugs_internal(config: VNetConfig,
                                                               start_service: StartService) -> None:
    svc = ServiceDef("faultnats", "raises NATS failures and a bug", uses_redis=False)
    s_closed = subjects.Subject("vnet.test.faultnats.closed")
    s_js = subjects.Subject("vnet.test.faultnats.js")
    s_hop = subjects.Subject("vnet.test.faultnats.hop")
    s_slow = subjects.Subject("vnet.test.faultnats.slow")
    s_bug = subjects.Subject("vnet.test.faultnats.bug")
    release = asyncio.Event()

    @svc.op("closed", s_closed, Empty)
    async def closed(ctx: Ctx, req: Empty) -> None:
        raise nats_errors.ConnectionClosedError()

    @svc.op("js", s_js, Empty)
    async def js(ctx: Ctx, req: Empty) -> None:
        raise nats_errors.TimeoutError()  # what a JetStream publish without an ack raises

    @svc.op("slow", s_slow, Empty)
    async def slow(ctx: Ctx, req: Empty) -> None:
        await release.wait()

    @svc.op("hop", s_hop, Empty)
    async def hop(ctx: Ctx, req: Empty) -> None:
        await ctx.request(s_slow, Empty(), dict, timeout=0.3)  # a dependency that does not answer

    @svc.op("bug", s_bug, Empty)
    async def bug(ctx: Ctx, req: Empty) -> None:
        raise KeyError("our own bug")

    await start_service(svc, cfg=config)
    try:
        async with VNetManager(config) as m:
            for s in (s_closed, s_js, s_hop):
                err, _ = await _unavailable(m.call(s, Empty(), dict, timeout=30.0))
                assert err.code == E.UNAVAILABLE.code and err.status == 503, (s.template, err)
            err, _ = await _unavailable(m.call(s_closed, Empty(), dict))
            assert f"NATS at {config.nats_url}" in err.message
            err, _ = await _unavailable(m.call(s_hop, Empty(), dict))
            assert "vnet.test.faultnats.slow" in err.message
            err, _ = await _unavailable(m.call(s_bug, Empty(), dict))
            assert err.code == E.INTERNAL.code and "KeyError" not in err.message
    finally:
        release.set()


def test_dependency_error_leaves_bugs_alone() -> None:
    from redis.exceptions import ConnectionError as RCE
    from redis.exceptions import ResponseError
    from redis.exceptions import TimeoutError as RTE

    from vnet.adapters import redis as redis_adapter

    url = "redis://:secret@127.0.0.1:6390/0"
    for exc in (RCE("Connection refused"), RTE("Timeout reading"), ResponseError("READONLY You can't write"),
                ResponseError("OOM command not allowed"), ConnectionRefusedError(111, "refused")):
        err = redis_adapter.dependency_error(exc, url)
        assert err is not None and err.code == E.UNAVAILABLE.code, exc
        assert "secret" not in err.message and "127.0.0.1:6390" in err.message
    for exc in (ResponseError("WRONGTYPE Operation against a key"), ValueError("x"), KeyError("k")):
        assert redis_adapter.dependency_error(exc, url) is None, exc
    assert nats_adapter.dependency_error(ValueError("x"), "nats://x") is None
    assert nats_adapter.dependency_error(TimeoutError(), "nats://x") is None  # ours, not the bus's
