"""A node's desired state pages with a cursor, so a node with 10,000 endpoints gets all of it.

Before: ``vnet.endpoint.desired.get`` answered one message with every endpoint of the node;
past about 4,000 endpoints it exceeded the bus's 1 MB limit, the reply was dropped and the
worker kept retrying. Now each reply holds ``limit`` endpoints (and their networks) and
``next_cursor``; the node worker fetches every page and merges them (``merge_desired``).

The 10,000 endpoint records are written straight into the endpoint service's Redis keys
(the same hash and per-node set its commit script writes): creating them through the API
would take minutes on this machine and is not what is under test here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import fresh_db_config
from vnet.adapters import endpoint_store as es
from vnet.client import VNetManager
from vnet.contracts.endpoint import DesiredReply, EndpointInfo, merge_desired
from vnet.core.model import DriverType
from vnet.runtime.config import VNetConfig
from vnet.svc.node.simulate import SimulatedFleet

N = 10_000
NETS = 4  # the endpoints spread over a few bridge networks


@pytest.fixture
async def cfg(config: VNetConfig) -> AsyncIterator[VNetConfig]:
    c = msgspec.structs.replace(fresh_db_config(config), request_timeout_s=60.0)
    r = aioredis.Redis.from_url(c.redis_url)
    await r.flushdb()
    yield c
    await r.flushdb()
    await r.aclose()


async def _many_endpoints(cfg: VNetConfig, node: str, n: int) -> set[str]:
    r = aioredis.Redis.from_url(cfg.redis_url)
    ids: set[str] = set()
    try:
        async with r.pipeline(transaction=False) as p:
            for i in range(n):
                net = i % NETS
                host = i // NETS + 2
                ident = f"ep{i:05d}"
                info = EndpointInfo(id=ident, container_id=f"c{i:05d}", network_id=f"net{net}",
                                    ip_address=f"10.{60 + net}.{host >> 8}.{host & 255}",
                                    mac_address=f"02:00:00:{net:02x}:{host >> 8:02x}:{host & 255:02x}",
                                    interface_name="eth0", node=node, netns=f"c{i:05d}", prefix_len=16,
                                    gateway=f"10.{60 + net}.0.1", driver=DriverType.BRIDGE, status="ready")
                p.hset(es.rec_key(ident), mapping={"doc": msgspec.json.encode(info), "status": "ready"})
                p.sadd(es.node_set(node), ident)
                ids.add(ident)
            await p.execute()
    finally:
        await r.aclose()
    return ids


async def test_node_with_10000_endpoints_gets_its_whole_desired_state(
        cfg: VNetConfig, run_prefix: str, start_service: Callable[..., Awaitable[Any]]) -> None:
    node = f"{run_prefix}-big"
    rt = await start_service("endpoint", cfg=cfg)
    ids = await _many_endpoints(cfg, node, N)
    async with VNetManager(cfg) as m:
        # The pages: bounded, in order, no endpoint twice, each far below the bus limit.
        pages: list[DesiredReply] = []
        cursor: str | None = None
        while True:
            page = await m.node_desired_page(node, cursor=cursor)
            pages.append(page)
            size = len(msgspec.json.encode(page))
            assert size < rt.nc.max_payload // 2, size
            assert len(page.desired.endpoints) <= 1000
            cursor = page.next_cursor
            if cursor is None:
                break
        assert len(pages) == N // 1000
        seen = [e.id for p in pages for e in p.desired.endpoints]
        assert seen == sorted(ids)  # every endpoint once, in id order across pages
        whole = merge_desired(pages)
        assert {n.id for n in whole.desired.networks} == {f"net{i}" for i in range(NETS)}
        assert len(whole.statuses) == N and set(whole.statuses.values()) == {"ready"}
        unpaged = len(msgspec.json.encode(whole))
        print(f"\ndesired state of {N} endpoints: {len(pages)} pages of <= "
              f"{max(len(msgspec.json.encode(p)) for p in pages)} bytes; one reply would be {unpaged} bytes "
              f"(bus limit {rt.nc.max_payload})")
        assert unpaged > rt.nc.max_payload  # one message could not have carried it
        assert (await m.node_desired(node)).desired.endpoints == whole.desired.endpoints
        # The largest page the contract allows still fits in one message.
        biggest = await m.node_desired_page(node, limit=2000)
        assert len(biggest.desired.endpoints) == 2000 and len(msgspec.json.encode(biggest)) < rt.nc.max_payload

    # The real node worker control loop (recording data plane) fetches every page at start.
    fleet = SimulatedFleet(cfg, [node])
    await fleet.start()
    try:
        assert not fleet.failed
        w = fleet.workers()[0]
        for _ in range(1200):  # 60 s: a loaded machine is slow, never wrong to wait
            if w.fetched and len(w.applier.endpoints) == N:
                break
            await asyncio.sleep(0.05)
        assert set(w.eps) == ids
        assert w.applier.endpoints == ids
        assert w.applier.networks == {f"net{i}" for i in range(NETS)}
        assert w.stats().endpoints == N
    finally:
        await fleet.stop()


async def test_ruleset_of_10000_endpoints_comes_in_parts(
        cfg: VNetConfig, run_prefix: str, start_service: Callable[..., Awaitable[Any]]) -> None:
    """The node's compiled ruleset (what its policy agent applies) is the other half of its
    desired state: for 10,000 endpoints its JSON is ~1.5 MB, so it comes in parts."""
    from vnet.contracts import subjects
    from vnet.contracts.policy import RulesetReply, RulesetRequest, join_ruleset
    from vnet.svc.policy.service import RULESET_PART

    node = f"{run_prefix}-bigrs"
    for svc in ("ipam", "network", "endpoint", "policy"):
        rt = await start_service(svc, cfg=cfg)
    async with VNetManager(cfg) as m:
        nets = [await m.create_network(f"rs{i}", f"10.{60 + i}.0.0/16", isolation="peer_only") for i in range(NETS)]
        r = aioredis.Redis.from_url(cfg.redis_url)
        try:
            async with r.pipeline(transaction=False) as p:
                for i in range(N):
                    net, host = nets[i % NETS], i // NETS + 2
                    ident = f"ep{i:05d}"
                    info = EndpointInfo(id=ident, container_id=f"c{i:05d}", network_id=net.id,
                                        ip_address=f"{net.cidr.split('.')[0]}.{net.cidr.split('.')[1]}."
                                                   f"{host >> 8}.{host & 255}",
                                        mac_address=f"02:00:00:{i % NETS:02x}:{host >> 8:02x}:{host & 255:02x}",
                                        interface_name="eth0", node=node, netns=f"c{i:05d}", prefix_len=16,
                                        gateway=net.gateway, driver=DriverType.BRIDGE, status="ready")
                    p.hset(es.rec_key(ident), mapping={"doc": msgspec.json.encode(info), "status": "ready"})
                    p.sadd(es.node_set(node), ident)
                    p.sadd(es.ENDPOINTS, ident)
                    p.sadd(es.net_set(net.id), ident)
                await p.execute()
        finally:
            await r.aclose()
        first = await m.call(subjects.POLICY_RULESET, RulesetRequest(node=node, structured=True), RulesetReply)
        assert first.parts > 1 and first.ruleset is None and first.chunk
        parts = [first] + [await m.call(subjects.POLICY_RULESET, RulesetRequest(node=node, structured=True, part=i),
                                        RulesetReply) for i in range(1, first.parts)]
        for p in parts:
            assert len(msgspec.json.encode(p)) < rt.nc.max_payload  # each part fits one message
        whole = join_ruleset(parts)
        assert whole.ruleset is not None and len(whole.ruleset.ports) == N and whole.endpoints == N
        size = len(msgspec.json.encode(whole))
        print(f"\nruleset of {N} endpoints: {size} bytes in {first.parts} parts of <= {RULESET_PART} bytes (+base64)")
        assert size > rt.nc.max_payload  # one message could not have carried it
        again = await m.node_ruleset(node, structured=True)  # the client joins the parts itself
        assert again.version == whole.version and again.ruleset == whole.ruleset
        script = await m.node_ruleset(node)  # the rendered script comes in parts too
        assert script.version and len(script.script) > 100_000
