"""Deadlines travel with requests; replies that cannot fit get a clear error, not silence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from vnet import VNetManager
from vnet.contracts import headers as H
from vnet.contracts import subjects
from vnet.contracts.messages import Empty
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Ctx, ServiceDef

StartService = Callable[..., Awaitable[Any]]


class Count(msgspec.Struct):
    n: int = 0


async def test_mutation_whose_deadline_passed_in_the_queue_is_not_started(
        config: VNetConfig, start_service: StartService) -> None:
    """One worker, held by a slow request; a mutation queued behind it times out at its caller.
    When the worker frees up, the mutation's deadline has passed: it must not run."""
    svc = ServiceDef("deadq", "a slow op and a mutation", uses_redis=False)
    s_slow = subjects.Subject("vnet.test.deadq.slow")
    s_mut = subjects.Subject("vnet.test.deadq.mutate")
    started = asyncio.Event()
    release = asyncio.Event()
    done = Count()

    @svc.op("slow", s_slow, Empty)
    async def slow(ctx: Ctx, req: Empty) -> None:
        started.set()
        await release.wait()

    @svc.op("mutate", s_mut, Empty)
    async def mutate(ctx: Ctx, req: Empty) -> Count:
        done.n += 1
        return done

    await start_service(svc, cfg=msgspec.structs.replace(config, max_inflight=1))
    async with VNetManager(config) as m:
        slow_call = asyncio.create_task(m.call(s_slow, Empty(), dict, timeout=60.0))
        await asyncio.wait_for(started.wait(), 30.0)
        with pytest.raises(E.VNetError) as ei:
            await m.call(s_mut, Empty(), Count, timeout=0.2)
        assert ei.value.code == E.TIMEOUT.code
        release.set()  # the worker takes the queued mutation only now, past its deadline
        await slow_call
        # A mutation with time left still runs (the queue is empty now).
        assert (await m.call(s_mut, Empty(), Count, timeout=30.0)).n == 1
    assert done.n == 1  # the timed-out one never ran


async def test_expired_deadline_header_is_refused_and_nothing_is_created(
        config: VNetConfig, start_service: StartService) -> None:
    from tests.conftest import fresh_db_config

    cfg = fresh_db_config(config)
    await start_service("ipam", cfg=cfg)
    await start_service("network", cfg=cfg)
    async with VNetManager(cfg) as m:
        nc = await m._client()
        past = str(int((time.time() - 5) * 1000))
        msg = await nc.request(subjects.NETWORK_CREATE.template, b'{"name":"late","cidr":"10.83.0.0/24"}',
                               timeout=30.0, headers={H.DEADLINE: past})
        assert msg.headers is not None and msg.headers[H.ERROR_CODE] == "504"
        assert b"deadline_exceeded" in msg.data
        assert [n.name for n in await m.all_networks()] == []
        # A deadline in the future is no obstacle, and the client always sends one.
        net = await m.create_network("in-time", "10.83.1.0/24")
        assert net.name == "in-time"


async def test_a_started_handler_finishes_its_calls_after_the_callers_deadline(
        config: VNetConfig, start_service: StartService) -> None:
    """The caller's deadline stops work from starting, never a handler halfway: the calls a
    started handler makes carry their own deadline, so they run even once its caller is gone."""
    svc = ServiceDef("deadhop", "a slow handler that calls a mutation", uses_redis=False)
    s_mut = subjects.Subject("vnet.test.deadhop.mutate")
    s_hop = subjects.Subject("vnet.test.deadhop.hop")
    done = Count()
    seen: dict[str, float | None] = {}

    @svc.op("mutate", s_mut, Empty)
    async def mutate(ctx: Ctx, req: Empty) -> Count:
        seen["inner"] = ctx.deadline
        done.n += 1
        return done

    @svc.op("hop", s_hop, Empty)
    async def hop(ctx: Ctx, req: Empty) -> Count:
        assert ctx.deadline is not None
        seen["outer"] = ctx.deadline
        await asyncio.sleep(max(0.0, ctx.deadline - time.time()) + 0.2)  # the caller is gone now
        return await ctx.request(s_mut, Empty(), Count, timeout=30.0)

    await start_service(svc, cfg=config)
    async with VNetManager(config) as m:
        with pytest.raises(E.VNetError) as ei:
            await m.call(s_hop, Empty(), Count, timeout=0.3)
        assert ei.value.code == E.TIMEOUT.code
        for _ in range(600):
            if done.n:
                break
            await asyncio.sleep(0.05)
    assert done.n == 1  # the second half of the started work was done
    outer, inner = seen["outer"], seen["inner"]
    assert outer is not None and inner is not None and inner > outer + 20  # the hop's own 30 s


async def test_reply_over_the_bus_limit_is_a_clear_error(config: VNetConfig, start_service: StartService) -> None:
    svc = ServiceDef("bigreply", "answers more than fits", uses_redis=False)
    s_big = subjects.Subject("vnet.test.bigreply.get")

    @svc.op("get", s_big, Empty, page_hint="page with `cursor` and `limit`")
    async def get(ctx: Ctx, req: Empty) -> dict[str, str]:
        return {"blob": "x" * (2 << 20)}

    rt = await start_service(svc, cfg=config)
    async with VNetManager(config) as m:
        with pytest.raises(E.VNetError) as ei:
            await m.call(s_big, Empty(), dict, timeout=30.0)
    err = ei.value
    assert err.code == E.REPLY_TOO_LARGE.code and err.status == 413
    assert "page with `cursor` and `limit`" in err.message
    assert err.details["limit"] < rt.nc.max_payload < err.details["size"]
