"""The endpoint service's caches of networks and nodes (svc/endpoint/lookups.py) never serve
a record an event has retired: real endpoint, network, IPAM and policy services, a real node
worker in a namespace, real nats-server and Valkey.

Each test changes something and uses it at once, well inside the caches' lifetimes (2 s for
networks, 1 s for nodes): only the invalidation can make it pass.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest

from tests.conftest import control_plane
from tests.integration.test_endpoint import Env
from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.endpoint import NodeRegister, NodeRegistered
from vnet.contracts.messages import MetricsReport
from vnet.core.dataplane_model import Support
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime
from vnet.svc.endpoint import lookups


@pytest.fixture
async def env(config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]], netns: Callable[[str], str],
              run_prefix: str) -> AsyncIterator[Env]:
    async with control_plane(config, start_service, netns, host="lkh", node=f"{run_prefix}-n1", resync_s=60,
                             services=("ipam", "network", "endpoint", "policy")) as cp:
        yield Env(cp.cfg, cp.m, cp.r, cp.node, cp.host, netns, start_service)


async def test_a_network_recreated_under_its_name_is_the_one_attached_to(env: Env) -> None:
    m = env.m
    old = await env.network("lk", cidr="10.211.0.0/24")
    a = await m.create_endpoint(env.netns("c1"), "lk", wait=True)  # by name: the service now holds "lk"
    assert a.network_id == old.id
    await m.delete_endpoint(a.id, wait=True)
    await m.delete_network(old.id)
    new = await env.network("lk", cidr="10.212.0.0/24")  # the same name, another network
    b = await m.create_endpoint(env.netns("c2"), "lk", wait=True)
    assert b.network_id == new.id, "the create used the deleted network's cached record"
    assert ipaddress.ip_address(b.ip_address) in ipaddress.ip_network("10.212.0.0/24"), b
    assert b.status == "ready", b


async def test_a_second_node_is_seen_by_the_next_attach(env: Env) -> None:
    """With one node, an attach that names none goes there; once a second registers, the
    next such attach must ask which one (not go to the first from a stale list)."""
    m = env.m
    net = await env.network("lkn", cidr="10.214.0.0/24")
    a = await m.create_endpoint(env.netns("c1"), net.id)  # the node list is now cached
    assert a.node == env.node
    node = f"{env.node}-second"
    nc = await nats_adapter.connect(env.cfg, "test-lookups")
    try:
        reg = NodeRegister(node=node, instance="s1", heartbeat_s=600, dataplane=True, host_netns=env.host,
                           drivers={"bridge": Support(available=True)})
        await nats_adapter.request(nc, subjects.NODE_REGISTER, reg, NodeRegistered, params={"node": node})
        e = await env.err(m.create_endpoint(env.netns("c2"), net.id))
        assert e.code == "invalid_request" and "2 nodes are registered" in e.message, e
    finally:
        await nc.drain()


async def test_lookups_count_hits_and_misses_into_the_metrics(env: Env) -> None:
    """Two attaches to one network in a row: the first reads the network, the second finds it
    (and the node) kept; the endpoint service's metrics report says so."""
    m = env.m
    net = await env.network("lkm", cidr="10.215.0.0/24")
    nc = await nats_adapter.connect(env.cfg, "test-lookups-metrics")
    reports: list[MetricsReport] = []

    async def on(msg: Any) -> None:
        reports.append(msgspec.json.decode(msg.data, type=MetricsReport))

    sub = await nc.subscribe(subjects.METRICS_REPORT.template.format(service="endpoint", instance="*"),
                             cb=on)
    try:
        await m.create_endpoint(env.netns("c1"), net.id, node=env.node)
        await m.create_endpoint(env.netns("c2"), net.id, node=env.node)

        def counts() -> dict[tuple[str, str], int]:
            last = reports[-1] if reports else None
            return {(c.labels["what"], c.labels["result"]): c.value for c in (last.counters if last else [])
                    if c.name == "vnet_endpoint_lookups"}

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not (counts().get(("network", "hit"), 0) >= 1 and counts().get(("node", "hit"), 0) >= 1):
            assert loop.time() < deadline, f"no hits reported: {counts()}"
            await asyncio.sleep(0.1)
        assert counts().get(("network", "miss"), 0) >= 1, counts()
    finally:
        await sub.unsubscribe()
        await nc.drain()


def test_a_read_started_before_a_clear_is_not_stored() -> None:
    now = [0.0]
    c: lookups.TtlCache[str] = lookups.TtlCache(2.0, clock=lambda: now[0])
    gen = c.gen
    c.clear()  # an event arrived while the read was on its way
    c.put(gen, "old", "k")
    assert c.get("k") is None
    c.put(c.gen, "new", "k", "k2")
    assert c.get("k") == "new" and c.get("k2") == "new"
    now[0] = 2.5
    assert c.get("k") is None, "an entry outlived its lifetime"
    assert (c.hits, c.misses) == (2, 2)
