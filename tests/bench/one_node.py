"""One node's whole stack for a benchmark: its own valkey and nats-server in a temp
directory, the four control-plane services and one node worker in a host namespace of
the benchmark's, each started in this process as the stack starts them. Everything
goes at the end, on error too.

    async with one_node(PREFIX, NS, lambda work: {"dns": "on"}) as st:
        net = await st.m.create_network(...)
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec

from tests.bench.scratch_ns import Scratch
from vnet import VNetManager
from vnet.runtime import launcher, servers, service
from vnet.runtime.config import VNetConfig


@dataclass
class OneNode:
    work: Path  # the temp directory: the servers' data, and room for the benchmark's files
    cfg: VNetConfig
    m: VNetManager
    node: str  # the node's name
    host: str  # the node's host namespace
    rts: list[service.Runtime]  # the services, the node worker last


@asynccontextmanager
async def one_node(prefix: str, ns: Scratch, node_params: Callable[[Path], dict[str, str]],
                   host: str = "h") -> AsyncIterator[OneNode]:
    """``node_params(work)``: the node worker's parameters on top of its name and a 600 s
    resync (so a benchmark measures the event path, never a resync)."""
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    valkey = servers.start_valkey(work / "valkey")
    nats = servers.start_nats(work / "nats")
    rts: list[service.Runtime] = []
    try:
        cfg = VNetConfig.load(env={}, nats_url=nats.url, redis_url=valkey.url, metrics_http_port=0,
                              log_level="WARNING")
        for name in ("ipam", "network", "endpoint", "policy"):
            rts.append(await service.start(launcher.load_service(name), cfg))
        hostns = ns.make(host)
        node = f"{prefix}-n"
        rts.append(await service.start(launcher.load_service("node"), msgspec.structs.replace(cfg, host_netns=hostns),
                                       params={"node": node, "resync_s": "600", **node_params(work)}))
        async with VNetManager(cfg) as m:
            for _ in range(200):  # registered: the control plane places endpoints on it
                if any(x.node == node for x in await m.nodes()):
                    break
                await asyncio.sleep(0.05)
            yield OneNode(work, cfg, m, node, hostns, rts)
    finally:
        for rt in reversed(rts):
            await rt.stop(drain_timeout=2.0)
        ns.cleanup()
        nats.stop()
        valkey.stop()
        shutil.rmtree(work, ignore_errors=True)
