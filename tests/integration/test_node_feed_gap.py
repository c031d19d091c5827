"""A node worker that may have missed events addressed to it resyncs at once (docs/scale.md).

The copies of endpoint events addressed to a node (``vnet.node.<node>.evt.>``) are core NATS
messages, not stored: a copy published while the node's client is disconnected is lost. The
worker is level-triggered, so it repairs that with a full resync as soon as its client has
reconnected, instead of at its periodic resync (60 s here, so only the reconnect can meet the
bound).

The node's client reaches nats-server through a TCP relay in this test, which cuts the
node's connection (and refuses new ones) while the services stay connected: the endpoint is
created on the node during the cut, so its copy never reaches the node. Real nats-server and
Valkey, real services, a simulated node worker (the real NodeWorker with a recording data
plane).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec
import redis.asyncio as aioredis

from tests.conftest import fresh_db_config
from vnet.client import VNetManager
from vnet.runtime.config import VNetConfig
from vnet.svc.node.simulate import SimulatedFleet

SERVICES = ("ipam", "network", "endpoint", "policy")
RESYNC_S = 60.0
BOUND_S = 15.0  # reconnect (~1 s) + the client's watch (1 s) + the spread (at most 5 s) + the fetch


class Relay:
    """127.0.0.1:<port> -> nats-server, with every connection cut (and new ones refused) on demand."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.conns: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self.conns |= {writer, up_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self.conns -= {writer, up_w}

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.conns):
            w.close()
        await self.server.wait_closed()
        self.server = None

    async def close(self) -> None:
        if self.server is not None:
            await self.cut()


async def _until(pred: Callable[[], Awaitable[bool]], what: str, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await pred():
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)
    return loop.time() - start


async def test_a_node_that_reconnected_resyncs_at_once(
        config: VNetConfig, run_prefix: str, start_service: Callable[..., Awaitable[Any]]) -> None:
    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for name in SERVICES:
        await start_service(name, cfg=cfg)
    url = urlsplit(cfg.nats_url.split(",")[0])  # nats://user:password@127.0.0.1:port
    assert url.port is not None
    relay = Relay(url.port)
    await relay.open()
    node = f"{run_prefix}-gap"
    node_cfg = msgspec.structs.replace(cfg, nats_url=url._replace(netloc=url.netloc.replace(
        f":{url.port}", f":{relay.port}")).geturl(), node_resync_interval_s=RESYNC_S)
    fleet = SimulatedFleet(node_cfg, [node])
    m = VNetManager(cfg)
    await m.__aenter__()
    try:
        await fleet.start()
        (w,) = fleet.workers()
        assert w.feed is not None

        async def registered() -> bool:
            return w.registered and w.fetched

        await _until(registered, "the node to register", 30)
        net = await m.create_network(f"{run_prefix}-gapnet", "10.79.0.0/24", driver="bridge")
        before = await m.create_endpoint(f"{run_prefix}-c0", net.id, node=node, wait=True, wait_timeout=30.0)
        assert before.status == "ready", before  # the copy path works while connected
        gaps = w.feed.gaps

        await relay.cut()  # only the node's client is cut off
        ep = await m.create_endpoint(f"{run_prefix}-c1", net.id, node=node)  # its copy is lost
        await asyncio.sleep(1.0)
        assert ep.id not in w.eps, "the node heard of the endpoint while cut off"
        await relay.open()  # same port: the client reconnects

        async def ready() -> bool:
            got = await m.get_endpoint(ep.id)
            return got.status == "ready"

        took = await _until(ready, "the endpoint created during the cut to be ready", BOUND_S)
        assert w.feed.gaps > gaps, "the node resynced for another reason than the reconnect"
        assert took < BOUND_S < RESYNC_S * 0.8  # the periodic resync (48-60 s) cannot have done it
    finally:
        await m.close()
        await fleet.stop()
        await relay.close()
        await r.flushdb()
        await r.aclose()
