"""``ipam gc``, the allow-rule list, the mesh list, the host-route reports and the exposure
audit page with a cursor (bounded replies everywhere).

Before: ``vnet.ipam.gc`` answered every released allocation in one reply (a pool with
thousands of leaks collected fine but the reply went over the bus limit and was lost,
so the caller saw a timeout), and ``vnet.policy.rule.list`` answered every rule at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import fresh_db_config, services
from vnet import VNetManager
from vnet.adapters import ipam_store
from vnet.contracts import subjects
from vnet.contracts.endpoint import PortMapping
from vnet.contracts.network import (
    HostRoutesInfo,
    HostRoutesReply,
    HostRoutesReport,
    HostRoutesRequest,
    MeshList,
    MeshListRequest,
    NodeRoutes,
)
from vnet.contracts.policy import Exposure, ExposureReply, ExposureRequest, RuleList, RulePage
from vnet.core import errors as E
from vnet.core.policy import AllowRule, Selector
from vnet.runtime.config import VNetConfig
from vnet.svc.network import hostroutes
from vnet.svc.policy import service as policy_service

LEAKS = 2500
NODE = "pg1"


@pytest.fixture
async def cfg(config: VNetConfig) -> AsyncIterator[VNetConfig]:
    c = msgspec.structs.replace(fresh_db_config(config), request_timeout_s=120.0)
    r = aioredis.Redis.from_url(c.redis_url)
    await r.flushdb()
    yield c
    await r.flushdb()
    await r.aclose()


async def test_gc_pages_its_answer(cfg: VNetConfig, start_service: Callable[..., Awaitable[Any]]) -> None:
    await start_service("ipam", cfg=cfg)
    async with VNetManager(cfg) as m:
        for nid, cidr in (("gca", "10.91.0.0/20"), ("gcb", "10.92.0.0/20")):
            await m.create_pool(nid, cidr)
        sem = asyncio.Semaphore(200)

        async def one(i: int) -> None:
            async with sem:
                await m.request_address("gca" if i % 2 else "gcb", owner=f"ghost-{i:05d}")

        await asyncio.gather(*(one(i) for i in range(LEAKS)))
        r = aioredis.Redis.from_url(cfg.redis_url)
        await r.sadd(ipam_store.ENDPOINTS_INDEX, "someone-alive")  # the index exists: orphans are collected
        await r.aclose()
        first = await m.ipam_gc_page(grace_s=0, limit=1000)
        assert len(first.released) == 1000 and first.next_cursor is not None
        second = await m.ipam_gc_page(grace_s=0, limit=1000, cursor=first.next_cursor)
        assert len(second.released) == 1000 and second.next_cursor is not None
        rest = await m.ipam_gc(grace_s=0, page_size=300)  # the client follows every page
        assert rest.next_cursor is None and len(rest.released) == LEAKS - 2000
        owners = [a.owner for a in first.released + second.released + rest.released]
        assert len(set(owners)) == LEAKS == len(owners)  # each collected once
        again = await m.ipam_gc(grace_s=0)
        assert again.released == [] and again.next_cursor is None
        assert (await m.ipam_check(grace_s=0)).clean


async def test_rule_list_pages(cfg: VNetConfig, start_service: Callable[..., Awaitable[Any]]) -> None:
    for name in ("network", "endpoint", "policy"):
        await start_service(name, cfg=cfg)
    async with VNetManager(cfg) as m:
        ids = [f"r{i:03d}" for i in range(23)]
        for rid in ids:
            await m.put_rule(AllowRule(id=rid, from_=[Selector(cidr="192.0.2.0/24")],
                                       to=[Selector(labels={"app": rid})]))
        got: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = await m.call(subjects.POLICY_RULE_LIST, RuleList(limit=5, cursor=cursor), RulePage)
            assert len(page.rules) <= 5
            got += [r.id for r in page.rules]
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        assert got == ids and pages == 5
        assert [r.id for r in await m.list_rules()] == ids


# --- mesh.list, hostroutes.list, policy.exposure (issue 11: "bounded replies everywhere") ----------
# Before: each answered in one message, so a large answer became a 413 reply_too_large.

@pytest.fixture
async def m(config: VNetConfig, start_service: Callable[..., Awaitable[Any]]) -> AsyncIterator[VNetManager]:
    async with services(config, start_service, node=NODE) as mgr:
        yield mgr


async def test_mesh_list_pages(m: VNetManager) -> None:
    names = [f"pm{i:02d}" for i in range(23)]
    nets = [await m.create_network(f"pmn{i}", f"10.93.{i}.0/24") for i in range(3)]
    for i, name in enumerate(names):
        await m.create_mesh(name, [nets[i % 3].id] if i % 2 else [])
    got: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await m.call(subjects.NETWORK_MESH_LIST, MeshListRequest(limit=5, cursor=cursor), MeshList)
        assert 0 < len(page.meshes) <= 5
        got += [g.name for g in page.meshes]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert got == names and pages == 5  # each mesh exactly once, in name order
    assert [g.name for g in await m.list_meshes(page_size=4)] == names  # the client follows the cursor
    assert [g.name for g in await m.list_meshes()] == names
    assert {g.name: g.members for g in await m.list_meshes(page_size=7)}["pm01"] == [nets[1].id]


async def test_hostroutes_list_pages(m: VNetManager, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pages also end at a prefix budget (a node may report 16,384 prefixes): small here, so
    # that limit and budget both cut pages.
    monkeypatch.setattr(hostroutes, "HOSTROUTES_PAGE_PREFIXES", 10)
    nodes = [f"prn{i:02d}" for i in range(19)]
    for i, node in enumerate(nodes):
        prefixes = [f"198.18.{i}.{4 * k}/30" for k in range(1 + i % 6)]
        await m.call(subjects.NETWORK_HOSTROUTES_REPORT, HostRoutesReport(node=node, prefixes=prefixes),
                     HostRoutesReply, params={"node": node})
    got: list[NodeRoutes] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await m.call(subjects.NETWORK_HOSTROUTES_LIST, HostRoutesRequest(limit=4, cursor=cursor),
                            HostRoutesInfo)
        assert 0 < len(page.nodes) <= 4
        assert len(page.nodes) == 1 or sum(len(n.prefixes) for n in page.nodes) <= 10
        got += page.nodes
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [n.node for n in got] == nodes and pages > 19 // 4 + 1  # every node once; the budget cut some pages
    assert {n.node: len(n.prefixes) for n in got} == {node: 1 + i % 6 for i, node in enumerate(nodes)}
    assert [n.node for n in (await m.host_routes(page_size=3)).nodes] == nodes


async def test_exposure_pages_and_splits_large_entries(m: VNetManager, monkeypatch: pytest.MonkeyPatch) -> None:
    none = await m.create_network("pxn", "10.94.0.0/24", isolation="none")
    full = await m.create_network("pxf", "10.94.1.0/24", isolation="full")
    for i in range(12):
        await m.create_endpoint(f"pxo{i}", none.id, node=NODE)
    for i in range(3):
        await m.create_endpoint(f"pxw{i}", full.id, labels={"app": f"a{i}"}, node=NODE,
                                ports=[PortMapping(protocol="tcp", host_port=18100 + i, container_port=80)])
    for i in range(14):
        await m.put_rule(AllowRule(id=f"px-rule-{i:02d}", from_=[Selector(cidr=f"203.0.113.{8 * i}/29")],
                                   to=[Selector(labels={"app": f"a{i % 4}"})]))
    whole = await m.call(subjects.POLICY_EXPOSURE, ExposureRequest(limit=1000), ExposureReply)
    assert whole.next_cursor is None and len(whole.exposures) == 1 + 3 + 14
    # Entries of more than 5 endpoints come in pieces; a page holds at most 7 endpoint ids.
    monkeypatch.setattr(policy_service, "EXPOSURE_CHUNK", 5)
    monkeypatch.setattr(policy_service, "EXPOSURE_PAGE_ENDPOINTS", 7)
    pieces: list[Exposure] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await m.call(subjects.POLICY_EXPOSURE, ExposureRequest(limit=4, cursor=cursor), ExposureReply)
        assert 0 < len(page.exposures) <= 4 and page.endpoints == whole.endpoints
        assert len(page.exposures) == 1 or sum(len(x.endpoints) for x in page.exposures) <= 7
        pieces += page.exposures
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages >= 5
    net_pieces = [x for x in pieces if x.kind == "network"]
    assert [len(x.endpoints) for x in net_pieces] == [5, 5, 2]
    # every entry exactly once, every endpoint of the split one exactly once, in the unpaged order
    joined: list[Exposure] = []
    for x in pieces:
        if joined and (joined[-1].kind, joined[-1].ident, joined[-1].ports) == (x.kind, x.ident, x.ports):
            joined[-1] = msgspec.structs.replace(joined[-1], endpoints=[*joined[-1].endpoints, *x.endpoints])
        else:
            joined.append(x)
    assert joined == whole.exposures
    assert await m.exposure(page_size=3) == whole  # the client follows the cursor and joins the pieces
    with pytest.raises(E.VNetError) as ei:
        await m.call(subjects.POLICY_EXPOSURE, ExposureRequest(cursor="not-a-cursor"), ExposureReply)
    assert ei.value.code == E.INVALID_REQUEST.code
