"""The endpoint service with real NATS and valkey, the real IPAM and network services, and a
real node worker whose host is a namespace made by the ``netns`` fixture.

Each test gets its own Redis database (flushed before and after). Container namespaces
come from the ``netns`` fixture too (per-run prefix, deleted at teardown, pass or fail).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import control_plane
from vnet import VNetManager
from vnet.adapters import endpoint_store as es
from vnet.adapters import nats as nats_adapter
from vnet.adapters.redis import global_key, key
from vnet.contracts import headers as H
from vnet.contracts import subjects
from vnet.contracts.endpoint import EndpointInfo, NodeRegister, NodeRegistered
from vnet.contracts.ipam import PoolsReply
from vnet.core import errors as E
from vnet.core import naming
from vnet.core.dataplane_model import Support
from vnet.core.model import VirtualNetwork
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

CIDR = "10.201.0.0/24"
CIDR6 = "fd00:201::/64"


async def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, list(cmd), capture_output=True, text=True, check=True)


@dataclass
class Env:
    cfg: VNetConfig
    m: VNetManager
    r: aioredis.Redis
    node: str
    host: str
    netns: Callable[[str], str]
    start: Callable[..., Awaitable[Runtime]]

    async def err(self, coro: Awaitable[Any]) -> E.VNetError:
        with pytest.raises(E.VNetError) as ei:
            await coro
        return ei.value

    async def used(self, network_id: str) -> dict[int, int]:
        rep = await self.m.call(subjects.IPAM_POOL_LIST, {"network_id": network_id}, PoolsReply)
        return {p.family: p.used for p in rep.pools}

    async def members(self, k: str) -> set[str]:
        return {x.decode() for x in await self.r.smembers(k)}

    async def network(self, name: str = "web", **kw: Any) -> VirtualNetwork:
        kw.setdefault("cidr", CIDR)
        kw.setdefault("isolation", "none")
        return await self.m.create_network(name, **kw)


@pytest.fixture
async def env(config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]], netns: Callable[[str], str],
              run_prefix: str) -> AsyncIterator[Env]:
    async with control_plane(config, start_service, netns, host="eph", node=f"{run_prefix}-n1", resync_s=2,
                             services=("ipam", "network", "endpoint", "metrics", "policy")) as cp:
        yield Env(cp.cfg, cp.m, cp.r, cp.node, cp.host, netns, start_service)


async def test_create_get_list_delete(env: Env) -> None:
    m = env.m
    net = await env.network(cidr_v6=CIDR6)
    c1 = env.netns("c1")
    ep = await m.create_endpoint(c1, net.id, None, None, labels={"app": "web"})
    assert ep.container_id == c1 and ep.network_id == net.id and ep.node == env.node and ep.netns == c1
    assert ep.ip_address == "10.201.0.2" and ep.prefix_len == 24 and ep.gateway == "10.201.0.1"
    assert ep.ipv6_address == "fd00:201::2" and ep.gateway_v6 == "fd00:201::1"
    assert ep.interface_name == "eth0" and ep.status in ("pending", "ready")
    assert naming.normalize_mac(ep.mac_address) == ep.mac_address and int(ep.mac_address[:2], 16) & 0x03 == 0x02
    # The node reports; the record follows.
    for _ in range(600):
        got = await m.get_endpoint(ep.id)
        if got.status != "pending":
            break
        await asyncio.sleep(0.05)
    assert got.status == "ready", got
    # A second interface of the same container in another network: eth1.
    net2 = await env.network("db", cidr="10.202.0.0/24")
    ep2 = await m.create_endpoint(c1, "db", "10.202.0.50", None, wait=True)
    assert ep2.interface_name == "eth1" and ep2.ip_address == "10.202.0.50" and ep2.status == "ready"
    assert {e.id for e in await m.list_endpoints()} == {ep.id, ep2.id}
    assert [e.id for e in await m.list_endpoints(network=net.id)] == [ep.id]
    assert [e.id for e in await m.list_endpoints(network="db")] == [ep2.id]
    assert [e.id for e in await m.list_endpoints(labels={"app": "web"})] == [ep.id]
    assert {e.id for e in await m.list_endpoints(node=env.node, container=c1)} == {ep.id, ep2.id}
    assert await m.list_endpoints(node="elsewhere") == []
    assert len(await m.list_endpoints(status="ready")) == 2
    page = await m.list_endpoints_page(limit=1)
    assert len(page.endpoints) == 1 and page.next_cursor == page.endpoints[0].id
    # Indexes.
    assert await env.members(global_key("endpoints")) == {ep.id, ep2.id}
    assert await env.members(key("netep", net.id)) == {ep.id}
    assert await env.members(es.node_set(env.node)) == {ep.id, ep2.id}
    assert await env.used(net.id) == {4: 1, 6: 1}
    # Delete: the node tears down, the address goes back, the record and indexes go.
    d = await m.delete_endpoint(ep.id, wait=True)
    assert d.endpoint.id == ep.id and sorted(d.released) == ["10.201.0.2", "fd00:201::2"]
    assert d.node_confirmed and d.warnings == []
    assert await env.used(net.id) == {4: 0, 6: 0}
    assert await env.members(global_key("endpoints")) == {ep2.id}
    assert await env.members(key("netep", net.id)) == set()
    assert not await env.r.exists(es.rec_key(ep.id), es.ctr_key(c1, net.id), es.macs_key(net.id))
    assert await env.r.hgetall(es.ifnames_key(c1)) == {b"eth1": ep2.id.encode()}
    e = await env.err(m.get_endpoint(ep.id))
    assert e.code == "endpoint_not_found" and e.status == 404
    e = await env.err(m.delete_endpoint(ep.id))
    assert e.code == "endpoint_not_found"
    await m.delete_endpoint(ep2.id, wait=True)
    assert await env.used(net2.id) == {4: 0}
    assert not await env.r.exists(global_key("endpoints"), es.node_set(env.node), es.ifnames_key(c1))


async def test_idempotent_create(env: Env) -> None:
    m = env.m
    net = await env.network()
    c1, c2 = env.netns("c1"), env.netns("c2")
    a = await m.create_endpoint(c1, net.id)
    b = await m.create_endpoint(c1, "web")  # same (container, network): the first result
    assert b.id == a.id and b.ip_address == a.ip_address
    # ... but a repeat asking for something else is a conflict naming what differs
    e = await env.err(m.create_endpoint(c1, "web", "10.201.0.99", None))
    assert e.code == "conflict" and e.details["fields"] == ["ip"] and a.id in e.message
    # a repeat naming the address the first one got: IPAM refuses it (in use: by that endpoint),
    # and the answer is still the first endpoint, with nothing more allocated
    c = await m.create_endpoint(c1, "web", a.ip_address, a.mac_address)
    assert c.id == a.id and await env.used(net.id) == {4: 1}
    r1 = await m.create_endpoint(c2, net.id, request_id="req-1")
    r2 = await m.create_endpoint(c2, net.id, request_id="req-1")
    assert r1.id == r2.id
    # Concurrent repeats race to one endpoint and leave nothing extra allocated.
    c3 = env.netns("c3")
    got = await asyncio.gather(*(m.create_endpoint(c3, net.id) for _ in range(8)))
    assert len({g.id for g in got}) == 1
    assert await env.used(net.id) == {4: 3}
    assert len(await m.list_endpoints()) == 3
    await m.delete_endpoint(r1.id)
    e = await env.err(m.create_endpoint(c2, net.id, request_id="req-1"))
    assert e.code == "endpoint_gone" and r1.id in e.message


async def test_static_ip_conflict_names_the_holder(env: Env) -> None:
    m = env.m
    net = await env.network()
    c1, c2 = env.netns("c1"), env.netns("c2")
    first = await m.create_endpoint(c1, net.id, "10.201.0.10", None)
    e = await env.err(m.create_endpoint(c2, net.id, "10.201.0.10", None))
    assert e.code == "address_in_use" and e.status == 409
    assert first.id in e.message and c1 in e.message and e.details["holder"] == first.id
    e = await env.err(m.create_endpoint(c2, net.id, "10.99.0.10", None))
    assert e.code == "address_not_assignable"
    e = await env.err(m.create_endpoint(c2, net.id, "10.201.0.1", None))  # the gateway
    assert e.code == "address_not_assignable"
    assert await env.used(net.id) == {4: 1}
    assert await env.members(global_key("endpoints")) == {first.id}


async def test_unknown_network_and_bad_input_leave_nothing(env: Env) -> None:
    m = env.m
    net = await env.network()
    c1, c2 = env.netns("c1"), env.netns("c2")
    e = await env.err(m.create_endpoint(c1, "nope"))
    assert e.code == "network_not_found" and e.status == 404
    cases: list[tuple[dict[str, Any], str]] = [
        ({"mac": "01:00:5e:00:00:01"}, "invalid_mac"),  # multicast
        ({"mac": "02:42:ac:11:00"}, "invalid_mac"),  # five octets
        ({"ifname": "a-much-too-long-name"}, "invalid_ifname"),
        ({"ifname": "eth 0"}, "invalid_ifname"),
        ({"netns": f"{env.host}-nonexistent"}, "netns_not_found"),
        ({"netns": "../etc"}, "invalid_netns"),
        ({"ip": "not-an-ip"}, "invalid_request"),
        ({"ipv6": "fd00:201::5"}, "no_ipv6_pool"),
        ({"node": "ghost"}, "node_not_found"),
    ]
    for kw, code in cases:
        ip = kw.pop("ip", None)
        e = await env.err(m.create_endpoint(c1, net.id, ip, kw.pop("mac", None), **kw))
        assert e.code == code, (kw, e)
    e = await env.err(m.create_endpoint(c1, net.id, node="ghost"))
    assert "ghost" in e.message and "vnetctl endpoint nodes" in e.message
    a = await m.create_endpoint(c1, net.id, None, "02:42:0a:c9:00:10", ifname="lan0")
    e = await env.err(m.create_endpoint(c2, net.id, None, "02:42:0A:C9:00:10"))
    assert e.code == "mac_in_use" and a.id in e.message and c1 in e.message
    net2 = await env.network("other", cidr="10.202.0.0/24")
    e = await env.err(m.create_endpoint(c1, net2.id, ifname="lan0"))
    assert e.code == "ifname_in_use" and a.id in e.message
    assert await env.used(net.id) == {4: 1} and await env.used(net2.id) == {4: 0}
    assert await env.members(global_key("endpoints")) == {a.id}


async def test_waiting_create_with_a_missing_namespace_leaves_nothing(env: Env) -> None:
    """A create that waits asks the node nothing before its commit: the node's own attempt
    finds the namespace missing (before any kernel write) and the create removes what it
    committed — record, indexes, address, the node's copy, the request id — and answers
    ``netns_not_found`` naming the namespace and the node, as the check before the commit did.
    The same request id then attaches once the namespace is there."""
    m = env.m
    net = await env.network()
    missing = f"{env.host}-nonexistent"
    e = await env.err(m.create_endpoint("ctr-late", net.id, netns=missing, wait=True, request_id="rq-late"))
    assert e.code == "netns_not_found" and e.status == 404, e
    assert missing in e.message and env.node in e.message and "vnetctl container create" in e.message
    assert e.details["netns"] == missing and e.details["node"] == env.node
    assert await env.used(net.id) == {4: 0}
    assert await env.members(global_key("endpoints")) == set()
    assert await m.list_endpoints(network=net.id) == []
    for _ in range(100):  # the node heard the deleted event too: it holds nothing of it
        if (await m.node_stats(env.node)).endpoints == 0:
            break
        await asyncio.sleep(0.05)
    assert (await m.node_stats(env.node)).endpoints == 0
    ns = env.netns("late")
    ep = await m.create_endpoint("ctr-late", net.id, netns=ns, wait=True, request_id="rq-late")
    assert ep.status == "ready" and ep.netns == ns, ep
    assert await env.used(net.id) == {4: 1}
    assert await env.members(global_key("endpoints")) == {ep.id}


async def test_node_reports_this_kernels_drivers(env: Env) -> None:
    """What the node worker registered matches an independent probe of this kernel, whichever
    drivers it has."""
    from vnet.adapters.netlink.probe import probe

    info = {n.node: n for n in await env.m.nodes()}[env.node]
    assert info.alive and info.dataplane and info.host_netns == env.host
    assert info.drivers["bridge"].available and info.drivers["host"].available
    here = await asyncio.to_thread(probe)
    assert {d: s.available for d, s in info.drivers.items()} == {d: s.available for d, s in here.drivers.items()}
    ipvlan = info.drivers["ipvlan"]
    assert ipvlan.available or "ipvlan" in ipvlan.reason, ipvlan


@pytest.mark.parametrize("where", ["this-node", "stand-in"])
async def test_driver_unavailable_names_driver_and_node(env: Env, where: str) -> None:
    """A create on a node that lacks the network's driver is a 503 naming both, and leaves
    nothing. ``this-node``: the real worker, on a kernel without ipvlan (only there can it
    show this). ``stand-in``: a second node registered as lacking ipvlan, so the service's
    path is tested on every kernel."""
    if where == "this-node":
        ipvlan = {n.node: n for n in await env.m.nodes()}[env.node].drivers["ipvlan"]
        if ipvlan.available:
            pytest.skip("this kernel has ipvlan: the stand-in case covers the refusal")
        node, nc = env.node, None
    else:
        node = f"{env.node}-standin"
        nc = await nats_adapter.connect(env.cfg, "test-standin")
        reg = NodeRegister(node=node, instance="s1", heartbeat_s=600, dataplane=True, host_netns=env.host,
                           drivers={"bridge": Support(available=True), "host": Support(available=True),
                                    "ipvlan": Support(available=False, reason="ipvlan: refused (stand-in)")})
        await nats_adapter.request(nc, subjects.NODE_REGISTER, reg, NodeRegistered, params={"node": node})
    try:
        net = await env.network("iv", driver="ipvlan", options={"parent": "eth0"})
        c1 = env.netns("c1")
        e = await env.err(env.m.create_endpoint(c1, net.id, node=node))
        assert e.code == "driver_unavailable" and e.status == 503, e
        assert "ipvlan" in e.message and node in e.message and e.details["node"] == node
        assert e.details["driver"] == "ipvlan"
        assert await env.used(net.id) == {4: 0}
        assert await env.r.scard(global_key("endpoints")) == 0
        # control: the same node takes an endpoint of a driver it has
        ok = await env.m.create_endpoint(c1, (await env.network("br", cidr="10.202.0.0/24")).id, node=node)
        assert ok.node == node and ok.ip_address == "10.202.0.2"
    finally:
        if nc is not None:
            await nc.drain()


async def test_host_driver_records_the_host_namespace(env: Env) -> None:
    net = await env.network("hostnet", driver="host", cidr="10.203.0.0/24")
    ep = await env.m.create_endpoint("ctr-host", net.id, wait=True, wait_timeout=10)
    assert ep.status == "ready" and ep.netns == env.host and ep.ip_address == "" and ep.interface_name == ""
    assert await env.used(net.id) == {4: 0}
    d = await env.m.delete_endpoint(ep.id, wait=True)
    assert d.released == [] and d.node_confirmed


async def test_metrics_endpoint_count_follows(env: Env) -> None:
    m = env.m
    net = await env.network()
    cs = [env.netns(f"c{i}") for i in range(3)]

    async def count(n: int) -> None:
        for _ in range(300):
            if (await m.metrics_summary()).endpoints == n:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"metrics endpoints != {n}: {(await m.metrics_summary()).endpoints}")

    eps = [await m.create_endpoint(c, net.id) for c in cs]
    await count(3)
    await m.delete_endpoint(eps[0].id)
    await count(2)
    for e in eps[1:]:
        await m.delete_endpoint(e.id)
    await count(0)
    assert await env.used(net.id) == {4: 0}


async def test_forced_network_delete_removes_endpoints(env: Env) -> None:
    m = env.m
    net = await env.network()
    cs = [env.netns(f"c{i}") for i in range(3)]
    eps = [await m.create_endpoint(c, net.id, wait=True) for c in cs]
    e = await env.err(m.delete_network(net.id))
    assert e.code == "network_in_use"
    d = await m.delete_network(net.id, force=True)
    assert sorted(d.endpoints_deleted) == sorted(x.id for x in eps)
    assert await m.list_endpoints() == []
    assert await env.r.scard(global_key("endpoints")) == 0
    # The node tears the veths and the bridge down.
    bridge = naming.bridge_name(net.id)
    for _ in range(600):
        out = (await sh("ip", "-n", env.host, "-o", "link")).stdout
        if bridge not in out and naming.VETH_PREFIX not in out:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"left in the host namespace: {out}")


async def test_a_node_status_report_updates_the_record(env: Env) -> None:
    m = env.m
    net = await env.network()
    c1 = env.netns("c1")
    ep = await m.create_endpoint(c1, net.id, wait=True)
    assert ep.status == "ready"
    # The veth is deleted by hand and the container namespace with it: the next full resync
    # finds the namespace gone and reports the endpoint failed with the reason.
    await sh("ip", "netns", "del", c1)
    for _ in range(300):
        got = await m.get_endpoint(ep.id)
        if got.status == "failed":
            break
        await asyncio.sleep(0.1)
    assert got.status == "failed" and c1 in got.reason, got
    stats = await m.node_stats(env.node)
    assert stats.failed.get(ep.id) and stats.desired_fetched and stats.endpoints == 1


async def test_node_registry_contract(env: Env) -> None:
    """Registration is request/reply on vnet.node.<node>.register (clients may not publish there)."""
    nc = await nats_adapter.connect(env.cfg, "test-node")
    req = NodeRegister(node="fake-1", instance="i1", heartbeat_s=1.0)

    async def heartbeat() -> None:
        # A live node repeats its registration every heartbeat_s; this one repeats it ten times
        # as often, so it stays alive for as long as the test needs it unless the whole process
        # stalls for most of the 3 s ttl.
        while True:
            await asyncio.sleep(req.heartbeat_s / 10)
            await nats_adapter.request(nc, subjects.NODE_REGISTER, req, NodeRegistered, params={"node": req.node})

    beating: asyncio.Task[None] | None = None
    try:
        rep, _ = await nats_adapter.request(nc, subjects.NODE_REGISTER, req, NodeRegistered, params={"node": req.node})
        beating = asyncio.create_task(heartbeat())
        assert rep.node == "fake-1" and rep.ttl_s == pytest.approx(3.0) and rep.endpoints == 0
        assert "fake-1" in {n.node for n in await env.m.nodes()}
        with pytest.raises(E.VNetError) as ei:
            await nats_adapter.request(nc, subjects.NODE_REGISTER, b'{"node": "x", "bogus": 1}', NodeRegistered,
                                       params={"node": "x"})
        assert ei.value.code == "unknown_field"
        # Several nodes: a create must name one.
        net = await env.network()
        e = await env.err(env.m.create_endpoint(env.netns("c1"), net.id))
        assert e.code == "invalid_request" and "fake-1" in e.message
        assert not beating.done(), beating  # (a failed heartbeat would have ended it)
        # The heartbeats stop: three missed and it is gone (listed only with include_gone).
        beating.cancel()
        for _ in range(600):  # 30 s, for a ttl of 3 s
            if "fake-1" not in {n.node for n in await env.m.nodes()}:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("fake-1 stayed alive after its heartbeats stopped")
        assert "fake-1" in {n.node for n in await env.m.nodes(include_gone=True) if not n.alive}
    finally:
        if beating is not None:
            beating.cancel()
        await nc.drain()


async def test_desired_state_and_resync_counts_writes(env: Env) -> None:
    m = env.m
    net = await env.network(cidr_v6=CIDR6)
    cs = [env.netns(f"c{i}") for i in range(3)]
    eps = [await m.create_endpoint(c, net.id, wait=True) for c in cs]
    assert all(e.status == "ready" for e in eps)
    d = await m.node_desired(env.node)
    assert [n.id for n in d.desired.networks] == [net.id]
    assert d.desired.networks[0].gateway4 == "10.201.0.1/24" and d.desired.networks[0].gateway6 == "fd00:201::1/64"
    assert sorted(e.id for e in d.desired.endpoints) == sorted(e.id for e in eps)
    assert set(d.statuses.values()) == {"ready"}
    s = await m.node_resync(env.node)
    assert s.last_full_writes == 0 and s.endpoints == 3 and s.networks == 1
    before = s.writes
    s = await m.node_resync(env.node)
    assert s.writes == before


async def test_one_trace_from_the_request_to_the_kernel(env: Env, spans: InMemorySpanExporter) -> None:
    net = await env.network()
    c1 = env.netns("c1")
    spans.clear()
    ep = await env.m.create_endpoint(c1, net.id, wait=True)
    assert ep.status == "ready"
    trace_id = env.m.last_trace_id
    assert trace_id
    # "node.events" ends last: the gratuitous ARP goes out after the report, inside it
    expected = {"process vnet.endpoint.create", "ipam.allocate", "node.events", "node.reconcile",
                "node.apply"}
    for _ in range(600):
        mine = [s for s in spans.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
        names = {s.name for s in mine}
        if expected <= names and any(n.startswith("kernel create_veth") for n in names):
            break
        await asyncio.sleep(0.05)
    assert expected <= names, names
    assert any(n.startswith("kernel create_veth") for n in names), names
    assert "publish vnet.evt.{domain}.{event}.{id}" in names
    # the address is allocated in the endpoint service (vnet.runtime.addresses), not asked of
    # the IPAM service over the bus: a process fewer on the attach's path (issue 9)
    assert not {"publish vnet.ipam.addr.request", "process vnet.ipam.addr.request"} & names, names


async def test_the_node_answers_a_waiting_create_and_a_read_right_after_sees_ready(env: Env) -> None:
    """The endpoint's node answers a create that waits as soon as the endpoint is ready (the
    service forwards its caller's reply subject with the event), one hop before the service's
    own answer; a read that comes before the service has folded the report in still says
    ready (the report each replica heard, svc/endpoint/events.py StatusBoard)."""
    net = await env.network()
    nc = await env.m._client()
    cs = await asyncio.to_thread(lambda: [env.netns(f"a{i}") for i in range(20)])
    for c in cs:
        body = msgspec.json.encode({"container_id": c, "network_id": net.id, "wait": True})
        msg = await nc.request(subjects.ENDPOINT_CREATE.template, body, timeout=30)
        assert (msg.headers or {}).get(H.NODE) == env.node, msg.headers  # the node's answer came first
        assert (msg.headers or {}).get(H.TRACE_ID)  # with the create's trace, as the service's would be
        ep = msgspec.json.decode(msg.data, type=EndpointInfo)
        assert ep.status == "ready" and ep.status_at and ep.interface_name == "eth0" and ep.ip_address, ep
        # at once, before the fold may have landed
        got, ready = await asyncio.gather(env.m.get_endpoint(ep.id), env.m.list_endpoints(container=c,
                                                                                         status="ready"))
        assert got.status == "ready" and got.status_at == ep.status_at, got
        assert [e.id for e in ready] == [ep.id]
    # and the records themselves follow (the service's fold)
    ids = [e.id for e in await env.m.list_endpoints(network=net.id)]
    for _ in range(100):
        stored = {await env.r.hget(es.rec_key(i), "status") for i in ids}
        if stored == {b"ready"}:
            break
        await asyncio.sleep(0.05)
    assert len(ids) == 20 and stored == {b"ready"}
    # A create that does not wait is answered by the service alone (pending).
    body = msgspec.json.encode({"container_id": env.netns("nowait"), "network_id": net.id})
    msg = await nc.request(subjects.ENDPOINT_CREATE.template, body, timeout=30)
    assert H.NODE not in (msg.headers or {}), msg.headers


async def _vnetctl(cfg: VNetConfig, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from vnet.cli.main import main; main()", "--nats", cfg.nats_url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli(env: Env) -> None:
    cfg = env.cfg
    net = await env.network()
    cs = [env.netns(f"k{i}") for i in range(3)]
    rc, out, err = await _vnetctl(cfg, "endpoint", "create", cs[0], "--network", "web", "--json")
    assert rc == 0, err
    ep = msgspec.json.decode(out, type=dict[str, list[EndpointInfo]])["items"][0]  # vnetctl: {"items", "errors"}
    assert ep.status == "ready" and ep.container_id == cs[0]  # the CLI waits by default
    rc, out, err = await _vnetctl(cfg, "endpoint", "attach", cs[1], cs[2], "--network", net.id)
    assert rc == 0, err
    assert out.count("ready") >= 2, out
    rc, out, err = await _vnetctl(cfg, "endpoint", "ls")
    assert rc == 0 and all(c in out for c in cs), out
    rc, out, err = await _vnetctl(cfg, "endpoint", "inspect", ep.id)
    assert rc == 0 and ep.ip_address in out and "ready" in out, out
    rc, out, err = await _vnetctl(cfg, "endpoint", "nodes")
    assert rc == 0 and env.node in out and "ipvlan" in out, out
    rc, out, err = await _vnetctl(cfg, "endpoint", "create", cs[0], "--network", "nope")
    assert rc == 1 and "network_not_found" in err, err
    ids = [e.id for e in await env.m.list_endpoints()]
    rc, out, err = await _vnetctl(cfg, "endpoint", "rm", *ids)
    assert rc == 0, err
    assert await env.m.list_endpoints() == []
    assert await env.used(net.id) == {4: 0}
