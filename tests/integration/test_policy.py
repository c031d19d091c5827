"""The policy service against real valkey and NATS, with the real IPAM, network and endpoint services."""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import fake_node, fresh_db_config, requires_root, services
from vnet import VNetManager
from vnet.adapters import nats as nats_adapter
from vnet.adapters.policy_agent import PolicyAgent
from vnet.core import errors as E
from vnet.core import naming
from vnet.core.policy import AllowRule, PortSpec, Selector
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime


@pytest.fixture
async def m(config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]]) -> AsyncIterator[VNetManager]:
    async with services(config, start_service) as mgr:
        yield mgr


async def err(coro: Awaitable[Any]) -> E.VNetError:
    with pytest.raises(E.VNetError) as ei:
        await coro
    return ei.value


async def test_rules_crud_explain_and_ruleset(m: VNetManager) -> None:
    a = await m.create_network("pa", "10.201.1.0/24", isolation="none")
    b = await m.create_network("pb", "10.201.2.0/24", isolation="full")
    rule = AllowRule(id="to-dns", from_=[Selector(network=b.id)], to=[Selector(cidr="192.0.2.53/32")],
                     ports=[PortSpec(protocol="udp", port=53)])
    assert (await m.put_rule(rule, request_id="req-1")).as_rule() == rule
    assert (await m.put_rule(rule, request_id="req-1")).as_rule() == rule  # idempotent
    assert await m.get_rule("to-dns") == rule
    # an update replaces the whole rule
    rule2 = AllowRule(id="to-dns", from_=[Selector(network=b.id)], to=[Selector(cidr="192.0.2.53/32")])
    await m.put_rule(rule2)
    assert [r.id for r in await m.list_rules()] == ["to-dns"] and (await m.get_rule("to-dns")).ports is None
    e = await err(m.put_rule(AllowRule(id="bad", from_=[Selector()], to=[Selector(endpoint="x")])))
    assert (e.code, e.status) == ("invalid_request", 400)

    # explain over addresses: the gateway of a None network reaches out; an address nobody owns cannot send
    v = await m.explain("203.0.113.1", "10.201.1.9", protocol="icmp")
    assert not v.allowed
    v = await m.explain("10.201.2.9", "192.0.2.53", protocol="udp", port=53)
    assert not v.allowed and "anti-spoofing" in v.reasons[0]

    # the mode passes through the network service
    await m.update_network(b.id, isolation="peer_only")

    got = await m.node_ruleset("n1")
    assert got.node == "n1" and "table inet vnet {" in got.script and got.endpoints == 0
    assert got.version == (await m.node_ruleset("n1")).version
    assert naming.bridge_name(a.id) not in got.script  # no endpoint of this node: no network in play

    assert (await m.delete_rule("to-dns")).deleted is True
    assert (await m.delete_rule("to-dns")).deleted is False
    e = await err(m.get_rule("to-dns"))
    assert (e.code, e.status) == ("rule_not_found", 404)


async def test_explain_and_ruleset_over_recorded_endpoints(m: VNetManager) -> None:
    async with fake_node(m, "pn1"):  # a node that only answers netns checks
        await _recorded(m)


async def _recorded(m: VNetManager) -> None:
    f = await m.create_network("pf", "10.202.1.0/24", isolation="full")
    ea = await m.create_endpoint("ca", f.id, labels={"role": "web"})
    eb = await m.create_endpoint("cb", f.id, labels={"role": "db"})
    v = await m.explain(ea.id, eb.id, protocol="tcp", port=5432)
    assert not v.allowed and v.path == ["same"] and v.src.mode == "full"
    await m.put_rule(AllowRule(id="web-db", from_=[Selector(labels={"role": "web"})],
                               to=[Selector(labels={"role": "db"})], ports=[PortSpec(protocol="tcp", port=5432)]))
    v = await m.explain(ea.id, eb.id, protocol="tcp", port=5432)
    assert (v.allowed, v.by, v.rules) == (True, "rule", ["web-db"])
    assert not (await m.explain(eb.id, ea.id, protocol="tcp", port=5432)).allowed  # directional
    rs = await m.node_ruleset("pn1")
    assert rs.endpoints == 2 and rs.rules == 1
    # the rule is one line over two named address sets: web's (ea) to db's (eb), tcp/5432
    sets = dict(re.findall(r"set (e4_\w+) \{\s*type ipv4_addr[^}]*?elements = \{\s*([^}]*?)\s*\}", rs.script))
    src = next(n for n, els in sets.items() if ea.ip_address in [x.strip() for x in els.split(",")])
    dst = next(n for n, els in sets.items() if eb.ip_address in [x.strip() for x in els.split(",")])
    assert f"ip saddr @{src} ip daddr @{dst} meta l4proto tcp th dport 5432 accept" in rs.script, rs.script
    assert f'"{naming.veth_name(ea.id)}" . {ea.mac_address} . {ea.ip_address}' in rs.script
    assert (await m.node_ruleset("other")).endpoints == 0


@requires_root
async def test_policy_agent_applies_keeps_and_repairs(config: VNetConfig,
                                                      start_service: Callable[..., Awaitable[Runtime]],
                                                      netns: Callable[[str], str]) -> None:
    """The node side: fetch + one-transaction apply in a host namespace; with the policy
    service gone the ruleset stays (fail static) and a table deleted by hand comes back."""
    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for svc in ("ipam", "network", "endpoint"):
        await start_service(svc, cfg=cfg)
    pol = await start_service("policy", cfg=cfg)
    host = netns("pa-h")
    nc = await nats_adapter.connect(cfg, "test-policy-agent")
    try:
        agent = PolicyAgent(nc, "pa1", host, timeout=10.0)  # a busy machine answers slowly, not wrongly
        assert agent.start().available
        res = await agent.sync()
        assert (res.wrote, res.reason) == (True, "first apply") and res.version
        assert (await agent.sync()).wrote is False

        def tables() -> str:
            return subprocess.run(["ip", "netns", "exec", host, "nft", "list", "tables"], check=True,
                                  capture_output=True, text=True).stdout

        await pol.stop(drain_timeout=1.0)  # the policy service goes away
        res = await agent.sync()
        assert not res.wrote and "kept the last ruleset" in res.reason
        assert "table inet vnet" in tables() and "table bridge vnet" in tables()
        def delete_ours() -> None:
            subprocess.run(["ip", "netns", "exec", host, "nft", "delete", "table", "inet", "vnet"], check=True)

        delete_ours()
        res = await agent.sync()
        assert res.wrote and res.reason.startswith("table missing")
        assert "table inet vnet" in tables()
    finally:
        await nc.drain()
        await r.flushdb()
        await r.aclose()
