"""A repeat with the same request_id, per mutation: what the client's resend relies on (issue 11).

``VNetManager`` resends a mutation that carries a ``request_id`` after an attempt got no
answer; a repeat must then not do the work twice and should answer as the first did. Each
mutation of the network, IPAM and policy services is sent twice with one ``request_id``
(sequentially: the first landed and was recorded, the case a resend after a lost reply
meets) and the state and the answers are compared. docs/reliability.md ("A caller that saw
a timeout: per mutation") lists the same; endpoint create/delete/update repeats are in
tests/integration/test_endpoint.py (they need a node worker).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import fresh_db_config
from vnet import VNetManager
from vnet.core.policy_inputs import AllowRule, Selector
from vnet.runtime.config import VNetConfig

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]


@pytest.fixture
async def m(config: VNetConfig, start_service: Callable[..., Awaitable[Any]]) -> AsyncIterator[VNetManager]:
    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for name in ("ipam", "network", "endpoint", "policy"):
        await start_service(name, cfg=cfg)
    async with VNetManager(cfg) as mgr:
        yield mgr
    await r.flushdb()
    await r.aclose()


def _same(a: Any, b: Any) -> bool:
    return msgspec.json.encode(a) == msgspec.json.encode(b)


async def test_network_mutations_repeated_with_their_request_id(m: VNetManager) -> None:
    a1 = await m.create_network("rep-a", "10.171.0.0/24", request_id="rq-net-a")
    a2 = await m.create_network("rep-a", "10.171.0.0/24", request_id="rq-net-a")
    assert a1.id == a2.id
    b = await m.create_network("rep-b", "10.171.1.0/24", request_id="rq-net-b")
    c = await m.create_network("rep-c", "10.171.2.0/24", request_id="rq-net-c")
    assert sorted(n.name for n in await m.all_networks()) == ["rep-a", "rep-b", "rep-c"]

    u1 = await m.update_network(a1.id, set_labels={"k": "v"}, request_id="rq-upd")
    u2 = await m.update_network(a1.id, set_labels={"k": "v"}, request_id="rq-upd")
    assert _same(u1, u2)

    for op in ("connect", "disconnect"):
        fn = m.connect_networks if op == "connect" else m.disconnect_networks
        r1 = await fn(a1.id, b.id, request_id=f"rq-{op}")
        r2 = await fn(a1.id, b.id, request_id=f"rq-{op}")
        assert r1.changed and _same(r1, r2), op  # the first reply, "changed" included

    g1 = await m.create_mesh("rep-mesh", [a1.id, b.id], request_id="rq-mesh")
    g2 = await m.create_mesh("rep-mesh", [a1.id, b.id], request_id="rq-mesh")
    assert _same(g1, g2)
    add1 = await m.add_to_mesh("rep-mesh", c.id, request_id="rq-mesh-add")
    add2 = await m.add_to_mesh("rep-mesh", c.id, request_id="rq-mesh-add")
    assert add1.changed and _same(add1, add2)
    rm1 = await m.remove_from_mesh("rep-mesh", c.id, request_id="rq-mesh-rm")
    rm2 = await m.remove_from_mesh("rep-mesh", c.id, request_id="rq-mesh-rm")
    assert rm1.changed and _same(rm1, rm2)
    d1 = await m.delete_mesh("rep-mesh", request_id="rq-mesh-del")
    d2 = await m.delete_mesh("rep-mesh", request_id="rq-mesh-del")
    assert _same(d1, d2)

    x1 = await m.delete_network(c.id, request_id="rq-net-del")
    x2 = await m.delete_network(c.id, request_id="rq-net-del")  # not 404: the first reply
    assert _same(x1, x2)
    assert sorted(n.name for n in await m.all_networks()) == ["rep-a", "rep-b"]


async def test_ipam_mutations_repeated_with_their_request_id(m: VNetManager) -> None:
    net = await m.create_network("rep-ipam", "10.172.0.0/24", request_id="rq-ipam-net")
    a1 = await m.request_address(net.id, "owner-1", request_id="rq-addr")
    a2 = await m.request_address(net.id, "owner-1", request_id="rq-addr")
    assert a1.address == a2.address
    assert [p.used for p in await m.pools(network_id=net.id) if p.family == 4] == [1]
    r1 = await m.release_address(net.id, "owner-1", request_id="rq-rel")
    r2 = await m.release_address(net.id, "owner-1", request_id="rq-rel")
    assert r1 == [a1.address] and r2 == []  # by owner: nothing left to release (documented)

    p1 = await m.create_pool("standalone-pool", "10.173.0.0/24", request_id="rq-pool")
    p2 = await m.create_pool("standalone-pool", "10.173.0.0/24", request_id="rq-pool")
    assert p1.cidr == p2.cidr and p1.network_id == p2.network_id
    e1 = await m.exclude_from_pool("standalone-pool", add=["10.173.0.128/26"], request_id="rq-excl")
    e2 = await m.exclude_from_pool("standalone-pool", add=["10.173.0.128/26"], request_id="rq-excl")
    assert e1.excluded == e2.excluded == ["10.173.0.128/26"]
    k1 = await m.delete_pool("standalone-pool", request_id="rq-pool-del")
    k2 = await m.delete_pool("standalone-pool", request_id="rq-pool-del")
    assert len(k1.pools) == 1 and k2.pools == []  # nothing left to delete (documented)
    assert not [p for p in await m.pools() if p.network_id == "standalone-pool"]


async def test_policy_mutations_repeated_with_their_request_id(m: VNetManager) -> None:
    rule = AllowRule(id="rep-rule", from_=[Selector(labels={"app": "web"})], to=[Selector(labels={"app": "db"})])
    p1 = await m.put_rule(rule, request_id="rq-put")
    p2 = await m.put_rule(rule, request_id="rq-put")
    assert _same(p1, p2)
    d1 = await m.delete_rule("rep-rule", request_id="rq-del")
    d2 = await m.delete_rule("rep-rule", request_id="rq-del")
    assert d1.deleted and _same(d1, d2)  # the first reply, not "deleted: false"
    assert not [r for r in await m.list_rules() if r.id == "rep-rule"]
