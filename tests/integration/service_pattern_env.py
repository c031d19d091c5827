"""What the ``test_service_pattern_*.py`` modules share: the ``nc`` fixture (a raw NATS
connection), a check that a reply leaks no traceback or repr, ``$SRV.INFO`` and ``$SRV.STATS``
readers, a poll, and a small service of their own
(:func:`_echo_service`: ops that echo, fail, raise, and wait at a gate).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from vnet.contracts.subjects import Subject
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Ctx, Runtime, ServiceDef

StartService = Callable[..., Awaitable[Runtime]]

# What must never reach a caller: tracebacks and Python reprs of objects or exceptions.
_LEAK = re.compile(r"Traceback|File \"[^\"]+\", line \d+|<[\w.]+ object at 0x[0-9a-f]+>|\b\w*(Error|Exception)\(")


def _no_leak(msg: Msg) -> None:
    text = msg.data.decode(errors="replace") + " " + json.dumps(msg.headers or {})
    assert not _LEAK.search(text), f"reply leaks a traceback or repr: {text}"


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def nc(config: VNetConfig) -> AsyncIterator[Client]:
    client = await nats.connect(config.nats_url, name="test-service-pattern")
    yield client
    await client.close()


async def _info(nc: Client, rt: Runtime) -> dict[str, Any]:
    msg = await nc.request(f"$SRV.INFO.vnet-{rt.defn.name}.{rt.instance}", b"", timeout=5.0)
    info: dict[str, Any] = json.loads(msg.data)
    return info


async def _stats(nc: Client, rt: Runtime) -> dict[str, dict[str, Any]]:
    msg = await nc.request(f"$SRV.STATS.vnet-{rt.defn.name}.{rt.instance}", b"", timeout=5.0)
    return {e["name"]: e for e in json.loads(msg.data)["endpoints"]}


async def _until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


# -- small services for the rest ---------------------------------------------------------------

class Echo(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    text: str = ""
    sleep_s: float = 0.0
    hold: bool = False  # ``slow`` waits for the test to open the service's gate


class EchoReply(msgspec.Struct, kw_only=True):
    text: str
    trace_id: str | None = None


class Boom(Exception):
    def __repr__(self) -> str:
        return "Boom(<secret object at 0xdeadbeef>)"


class EchoState:
    """What ``slow`` saw: requests in it now, the most at once, finished ones; and the gate
    that held requests wait for (so a test decides when they finish, not a wall clock)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {"now": 0, "peak": 0, "done": 0}
        self.gate = asyncio.Event()

    def __getitem__(self, k: str) -> int:
        return self.counts[k]

    def __repr__(self) -> str:
        return f"EchoState({self.counts}, gate open: {self.gate.is_set()})"


def _echo_service(name: str) -> tuple[ServiceDef, dict[str, Subject], EchoState]:
    """Ops ``echo``, ``fail`` (409), ``boom`` (unexpected exception), ``slow`` (sleeps or waits
    for the gate, counts concurrency)."""
    defn = ServiceDef(name, f"test service {name}", uses_redis=False)
    subj = {k: Subject(f"vnet.{name}.{k}") for k in ("echo", "fail", "boom", "slow")}
    state = EchoState()
    c = state.counts

    @defn.op("echo", subj["echo"], Echo)
    async def echo(ctx: Ctx, req: Echo) -> EchoReply:
        return EchoReply(text=req.text, trace_id=ctx.trace_id)

    @defn.op("fail", subj["fail"], Echo)
    async def fail(ctx: Ctx, req: Echo) -> EchoReply:
        raise E.make(E.CONFLICT, f"refused {req.text}", what=req.text)

    @defn.op("boom", subj["boom"], Echo)
    async def boom(ctx: Ctx, req: Echo) -> EchoReply:
        raise Boom("the secret internals")

    @defn.op("slow", subj["slow"], Echo)
    async def slow(ctx: Ctx, req: Echo) -> EchoReply:
        c["now"] += 1
        c["peak"] = max(c["peak"], c["now"])
        try:
            if req.hold:
                await state.gate.wait()
            await asyncio.sleep(req.sleep_s)
        finally:
            c["now"] -= 1
        c["done"] += 1
        return EchoReply(text=req.text)

    return defn, subj, state
