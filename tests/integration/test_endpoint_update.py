"""``vnet.endpoint.update`` (labels and published ports of a live endpoint, issue 16) and the
atomic host-port claim (issue 18), against the real services, NATS and valkey.

The node is a stand-in that only answers namespace checks (the ``m`` fixture of
``test_reach``): these tests are about the control plane; the kernel side of a label change
is ``tests/netns/test_endpoint_update.py``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import services
from tests.integration.test_reach import EXTERNAL, NODE, Events, expected_groups, groups, matrix
from vnet import VNetManager
from vnet.adapters import endpoint_store as es
from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.endpoint import (
    EndpointInfo,
    EndpointUpdated,
    PortMapping,
)
from vnet.contracts.ipam import PoolsReply
from vnet.core.errors import VNetError
from vnet.core.policy import AllowRule, PortSpec, Selector
from vnet.core.reach import ReachDiff
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime


@pytest.fixture
async def m(config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]]) -> AsyncIterator[VNetManager]:
    """Services on a fresh database and node ``NODE``: a stand-in that registers and answers
    namespace checks (no kernel: the netns test covers that side)."""
    async with services(config, start_service, node=NODE) as mgr:
        yield mgr


async def err(coro: Any) -> VNetError:
    with pytest.raises(VNetError) as ei:
        await coro
    return ei.value


async def test_label_update_dry_run_equals_explain_difference_and_event_carries_it(m: VNetManager) -> None:
    nc = await nats_adapter.connect(m.config, "test-epupd-events")
    ev = Events()
    await nc.subscribe("vnet.evt.>", cb=ev.cb)
    try:
        net = await m.create_network("ua", "10.204.1.0/24", isolation="full")
        web = await m.create_endpoint("w1", net.id, node=NODE)
        db1 = await m.create_endpoint("d1", net.id, labels={"role": "db"}, node=NODE)
        db2 = await m.create_endpoint("d2", net.id, labels={"role": "db"}, node=NODE)
        await m.put_rule(AllowRule(id="web-db", from_=[Selector(labels={"role": "web"})],
                                   to=[Selector(labels={"role": "db"})], ports=[PortSpec(protocol="tcp", port=5432)]))
        parties = [web.id, db1.id, db2.id, EXTERNAL]
        net_of = {e.id: e.network_id for e in (web, db1, db2)}

        async def step(dry_kw: dict[str, Any], opens: int, closes: int) -> EndpointUpdated:
            before = await matrix(m, parties)
            dry = await m.update_endpoint(web.id, dry_run=True, **dry_kw)
            assert dry.dry_run and dry.reach is not None
            assert await matrix(m, parties) == before  # a dry run changes nothing
            real = await m.update_endpoint(web.id, **dry_kw)
            after = await matrix(m, parties)
            assert groups(dry.reach) == expected_groups(before, after, net_of)
            assert (dry.reach.opens, dry.reach.closes) == (opens, closes)
            assert real.reach == dry.reach and real.changes == dry.changes == ["labels"]
            assert real.endpoint.labels == dry.endpoint.labels
            body = await ev.wait(f"vnet.evt.endpoint.updated.{web.id}")
            assert body["reach"] == msgspec.to_builtins(dry.reach)  # the event carries the same diff
            assert body["changes"] == ["labels"] and body["endpoint"]["labels"] == real.endpoint.labels
            return real

        # w1 becomes a web: the rule opens w1 -> d1, d2 on tcp/5432; then it stops being one
        r1 = await step({"set_labels": {"role": "web"}}, 2, 0)
        assert r1.endpoint.revision == 1 and (await m.get_endpoint(web.id)).labels == {"role": "web"}
        r2 = await step({"remove_labels": ["role"]}, 0, 2)
        assert r2.endpoint.revision == 2 and (await m.get_endpoint(web.id)).labels == {}
        # labels= replaces the whole map
        r3 = await step({"labels": {"role": "web", "tier": "front"}}, 2, 0)
        assert r3.endpoint.labels == {"role": "web", "tier": "front"}

        # nothing to change: no event, no revision, an empty diff on a dry run
        same = await m.update_endpoint(web.id, set_labels={"tier": "front"})
        assert same.changes == [] and same.endpoint.revision == r3.endpoint.revision
        dry_same = await m.update_endpoint(web.id, set_labels={"tier": "front"}, dry_run=True)
        assert dry_same.reach == ReachDiff() and dry_same.changes == []
    finally:
        await nc.drain()


async def test_update_is_idempotent_and_optimistic(m: VNetManager) -> None:
    net = await m.create_network("ub", "10.204.2.0/24", isolation="full")
    ep = await m.create_endpoint("i1", net.id, node=NODE)
    first = await m.update_endpoint(ep.id, set_labels={"a": "1"}, request_id="upd-1")
    # a repeat with the same request id returns the first reply and changes nothing more
    again = await m.update_endpoint(ep.id, set_labels={"a": "1"}, request_id="upd-1")
    assert again == first and (await m.get_endpoint(ep.id)).revision == 1
    # expected_revision: refused once another change got in first
    e = await err(m.update_endpoint(ep.id, set_labels={"b": "2"}, expected_revision=0))
    assert (e.code, e.status) == ("stale_revision", 409) and e.details["revision"] == 1, e
    ok = await m.update_endpoint(ep.id, set_labels={"b": "2"}, expected_revision=1)
    assert ok.endpoint.revision == 2 and ok.endpoint.labels == {"a": "1", "b": "2"}
    # concurrent edits of different keys without expected_revision: none is lost
    reps = await asyncio.gather(*(m.update_endpoint(ep.id, set_labels={f"k{i}": str(i)}) for i in range(12)))
    got = await m.get_endpoint(ep.id)
    assert {f"k{i}": str(i) for i in range(12)}.items() <= got.labels.items(), got.labels
    assert got.revision == 2 + 12 and sorted(r.endpoint.revision for r in reps) == list(range(3, 15))


async def test_bad_update_requests_are_clear_4xx(m: VNetManager) -> None:
    net = await m.create_network("uc", "10.204.3.0/24", isolation="full")
    ep = await m.create_endpoint("b1", net.id, node=NODE, ports=[PortMapping(host_port=9000, container_port=80)])
    other = await m.create_endpoint("b2", net.id, node=NODE)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"endpoint_id": "nope"}, 404, "endpoint_not_found"),
        ({"endpoint_id": ep.id, "colour": "red"}, 400, "unknown_field"),
        ({"endpoint_id": ep.id, "set_labels": {"bad key!": "x"}}, 400, "invalid_request"),
        ({"endpoint_id": ep.id, "remove_labels": [""]}, 400, "invalid_request"),
        ({"endpoint_id": ep.id, "ports": [{"host_port": 0, "container_port": 80}]}, 400, "invalid_request"),
        ({"endpoint_id": ep.id, "ports": [{"host_port": 1, "container_port": 1, "protocol": "icmp"}]}, 400,
         "invalid_request"),
        ({"endpoint_id": ep.id, "ports": [{"host_port": 81, "container_port": 80},
                                          {"host_port": 81, "container_port": 82}]}, 400, "invalid_request"),
        ({"endpoint_id": ep.id, "expected_revision": -1}, 400, "invalid_request"),
        ({"endpoint_id": other.id, "ports": [{"host_port": 9000, "container_port": 80}]}, 409, "port_in_use"),
        ({"endpoint_id": other.id, "ports": [{"host_port": 9000, "container_port": 80}], "dry_run": True}, 409,
         "port_in_use"),
        ({"endpoint_id": ep.id, "expected_revision": 7, "set_labels": {"a": "b"}}, 409, "stale_revision"),
    ]
    for body, status, code in cases:
        e = await err(m.call(subjects.ENDPOINT_UPDATE, body, EndpointUpdated))
        assert (e.status, e.code) == (status, code), (body, e)
    e = await err(m.call(subjects.ENDPOINT_UPDATE, {"endpoint_id": other.id, "ports": [
        {"host_port": 9000, "container_port": 80}]}, EndpointUpdated))
    assert ep.id in e.message and e.details["holder"] == ep.id, e
    # nothing of the refused requests stuck
    assert (await m.get_endpoint(ep.id)).revision == 0 and (await m.get_endpoint(other.id)).ports == []


async def test_published_ports_move_with_updates_and_deletes(m: VNetManager) -> None:
    net = await m.create_network("ud", "10.204.4.0/24", isolation="full")
    a = await m.create_endpoint("p1", net.id, node=NODE, ports=[PortMapping(host_port=8080, container_port=80)])
    b = await m.create_endpoint("p2", net.id, node=NODE)
    st = es.EndpointStore(m_redis(m))
    try:
        assert await st.port_holders(NODE) == {"tcp/*/8080": a.id}
        # the dry run of an unpublish says what closes (external -> a on tcp/80) and changes nothing
        dry = await m.update_endpoint(a.id, published_ports=[], dry_run=True)
        assert dry.changes == ["ports"] and dry.reach is not None and dry.reach.closes == 1, dry.reach
        assert [g.dst for g in dry.reach.closed] == [net.id] and dry.reach.closed[0].ports == "tcp/80"
        assert await st.port_holders(NODE) == {"tcp/*/8080": a.id}
        # a moves to 8081: 8080 is free for b at once
        moved = await m.update_endpoint(a.id, published_ports=[PortMapping(host_port=8081, container_port=80)])
        assert moved.changes == ["ports"] and moved.endpoint.ports[0].host_port == 8081
        await m.update_endpoint(b.id, published_ports=[PortMapping(host_port=8080, container_port=80, protocol="tcp"),
                                                        PortMapping(host_port=8080, container_port=53,
                                                                    protocol="udp")])
        assert await st.port_holders(NODE) == {"tcp/*/8081": a.id, "tcp/*/8080": b.id, "udp/*/8080": b.id}
        # a delete releases its claims; a create may take them
        await m.delete_endpoint(b.id)
        assert await st.port_holders(NODE) == {"tcp/*/8081": a.id}
        c = await m.create_endpoint("p3", net.id, node=NODE, ports=[PortMapping(host_port=8080, container_port=80)])
        assert await st.port_holders(NODE) == {"tcp/*/8081": a.id, "tcp/*/8080": c.id}
        # GC: a claim left behind (a crash) goes, a record without its claim (an older version) gets it back
        r = m_redis(m)
        await r.hset(es.ports_key(NODE), "udp/*/9999", "gone-endpoint")
        await r.hdel(es.ports_key(NODE), "tcp/*/8081")
        assert await st.repair_port_claims(NODE) == (1, 1)
        assert await st.port_holders(NODE) == {"tcp/*/8081": a.id, "tcp/*/8080": c.id}
        assert await st.repair_port_claims(NODE) == (0, 0)
    finally:
        await st.r.aclose()


def m_redis(mgr: VNetManager) -> Any:
    return aioredis.Redis.from_url(mgr.config.redis_url)


async def test_fifty_racing_creates_for_one_host_port_exactly_one_wins(m: VNetManager) -> None:
    """Issue 18: the host-port claim is taken in the commit script, so racing creates that all
    pass the early check cannot both record the port."""
    net = await m.create_network("ue", "10.204.5.0/24", isolation="full")
    port = [PortMapping(host_port=7777, container_port=80)]
    got = await asyncio.gather(*(m.create_endpoint(f"race{i}", net.id, node=NODE, ports=port) for i in range(50)),
                               return_exceptions=True)
    wins = [g for g in got if isinstance(g, EndpointInfo)]
    losses = [g for g in got if isinstance(g, VNetError)]
    assert len(wins) == 1 and len(losses) == 49, [type(g).__name__ for g in got]
    assert Counter(e.code for e in losses) == Counter({"port_in_use": 49}), [str(e) for e in losses[:3]]
    assert all(e.status == 409 and e.details.get("holder") == wins[0].id for e in losses)
    # exactly one record publishes it, and the losers left nothing behind (no address, no record)
    eps = await m.list_endpoints(network=net.id)
    assert [e.id for e in eps if e.ports] == [wins[0].id] and len(eps) == 1
    pools = await m.call(subjects.IPAM_POOL_LIST, {"network_id": net.id}, PoolsReply)
    assert [p.used for p in pools.pools] == [1], pools

    # the same for updates: 20 endpoints asking for one free port at once
    others = await asyncio.gather(*(m.create_endpoint(f"u{i}", net.id, node=NODE) for i in range(20)))
    ups = await asyncio.gather(*(m.update_endpoint(o.id, published_ports=[PortMapping(host_port=7778,
                                                                                      container_port=80)])
                                 for o in others), return_exceptions=True)
    ok = [u for u in ups if isinstance(u, EndpointUpdated)]
    assert len(ok) == 1, [type(u).__name__ for u in ups]
    assert Counter(u.code for u in ups if isinstance(u, VNetError)) == Counter({"port_in_use": 19})
    assert [e.id for e in await m.list_endpoints(network=net.id) if any(p.host_port == 7778 for p in e.ports)] \
        == [ok[0].endpoint.id]


async def test_a_durable_made_with_other_filters_is_remade_with_ours(m: VNetManager) -> None:
    """A node worker's endpoint durable made by a version without ``updated`` in its filters
    would be bound as it was (the client does not update an existing consumer): it is made
    again with the new filters, so updated events reach the worker after an upgrade."""
    nc = await nats_adapter.connect(m.config, "test-epupd-durable")
    js = nc.jetstream()
    name = "vnet-node-epupd-test-ep"
    old = ["vnet.evt.endpoint.created.>", "vnet.evt.endpoint.deleted.>"]
    new = [*old, "vnet.evt.endpoint.updated.>"]
    got: list[str] = []

    async def handler(msg: Any) -> None:
        got.append(msg.subject)

    try:
        first = nats_adapter.DurableConsumer(js, name, subjects.EVT_ENDPOINT.template, deliver_all=False,
                                             filter_subjects=old)
        await first.start(handler)
        await first.stop()
        info = await js.consumer_info(subjects.EVENTS_STREAM, name)
        assert sorted(info.config.filter_subjects or []) == sorted(old)
        second = nats_adapter.DurableConsumer(js, name, subjects.EVT_ENDPOINT.template, deliver_all=False,
                                              filter_subjects=new)
        await second.start(handler)
        try:
            info = await js.consumer_info(subjects.EVENTS_STREAM, name)
            assert sorted(info.config.filter_subjects or []) == sorted(new)
            await js.publish("vnet.evt.endpoint.updated.x1", b"{}")
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.05)
            assert got == ["vnet.evt.endpoint.updated.x1"], got
        finally:
            await second.stop(delete=True)
    finally:
        await nc.drain()
