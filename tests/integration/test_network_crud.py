"""The network service against real valkey and NATS, with the real IPAM service: create,
read, update and delete, their events, validation, limits, forced deletes with endpoints,
labels and pagination, the CLI. (``network_env`` gives each test its own Redis database.)
"""

# ruff: noqa: F811 (a test's argument env or env_factory is network_env's fixture, imported for pytest)

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from tests.integration.network_env import Env, env, env_factory, events  # noqa: F401  (the fixtures)
from vnet import DriverType, IsolationMode
from vnet.adapters.redis import key
from vnet.contracts import subjects
from vnet.contracts.ipam import PoolsReply
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Ctx, ServiceDef

# --- 1. the module description's example, reads, events ------------------------------------

async def test_module_description_example(env: Env) -> None:
    ev = await events(env)
    vnet_manager = env.m
    network = await vnet_manager.create_network(
        "example-network",
        "172.20.0.0/16",
        "172.20.0.1",
        DriverType.BRIDGE,
        IsolationMode.FULL,
        {},
        {},
    )
    print(f"Created network: {network.id}")
    assert isinstance(network, VirtualNetwork)
    assert (network.name, network.cidr, network.gateway) == ("example-network", "172.20.0.0/16", "172.20.0.1")
    assert network.driver_type is DriverType.BRIDGE and network.isolation_mode is IsolationMode.FULL
    assert network.created_at.endswith("Z") and network.parent is None and network.children == []
    assert await vnet_manager.get_network(network.id) == network
    assert await vnet_manager.get_network("example-network") == network
    # The IPAM pool exists with the gateway, and the metrics index counts the network.
    pools = (await env.pools(network.id)).pools
    assert [(p.family, p.cidr, p.gateway) for p in pools] == [(4, "172.20.0.0/16", "172.20.0.1")]
    assert await env.ids_in_index() == {network.id}
    created = await ev.wait_for("created")
    assert created[0]["network"]["id"] == network.id
    e = await env.err(vnet_manager.get_network("nope"))
    assert e.code == "network_not_found" and "'nope'" in e.message


async def test_defaults_come_from_the_service_config(env_factory: Callable[..., Awaitable[Env]]) -> None:
    env = await env_factory(default_driver=DriverType.OVERLAY, default_isolation=IsolationMode.PEER_ONLY)
    n = await env.m.create_network("defaults")
    assert n.driver_type is DriverType.OVERLAY and n.isolation_mode is IsolationMode.PEER_ONLY
    assert n.options == {"encrypted": "false", "vni": "1"}  # the driver's defaults, and an allocated VNI
    assert n.cidr == "172.20.0.0/24" and n.gateway == "172.20.0.1"
    m = await env.m.create_network("macv", None, None, "macvlan", "none", {"parent": "eth0", "mode": "vepa"})
    assert m.options == {"mode": "vepa", "parent": "eth0"} and m.isolation_mode is IsolationMode.NONE


# --- validation: each rule its code and a message naming the problem ---------------------------

async def test_validation_errors(env: Env) -> None:
    m = env.m
    web = await m.create_network("web", "10.10.0.0/16")
    cases: list[tuple[Awaitable[Any], str, list[str]]] = [
        (m.create_network("-bad name"), "invalid_request", ["name", "$.name"]),
        (m.create_network("x", "10.20.0.0/40"), "invalid_cidr", ["10.20.0.0/40", "172.20.1.0/24"]),
        (m.create_network("x", "ten.0.0.0/8"), "invalid_cidr", ["ten.0.0.0/8"]),
        (m.create_network("x", "10.20.1.7/24"), "cidr_host_bits", ["host bits", "10.20.1.0/24"]),
        (m.create_network("x", "10.20.0.0/24", "10.21.0.1"), "invalid_gateway", ["outside the subnet", "10.20.0.1"]),
        (m.create_network("x", "10.20.0.0/24", "10.20.0.0"), "invalid_gateway", ["network address"]),
        (m.create_network("x", "10.20.0.0/24", "10.20.0.255"), "invalid_gateway", ["broadcast address"]),
        (m.create_network("x", None, "10.20.0.1"), "invalid_request", ["gateway needs a cidr"]),
        (m.create_network("x", driver="token-ring"), "unknown_driver", ["token-ring", "bridge, overlay"]),
        (m.create_network("x", isolation="paranoid"), "unknown_isolation", ["paranoid", "peer_only"]),
        (m.create_network("x", driver="macvlan"), "invalid_option", ["needs option 'parent'"]),
        (m.create_network("x", driver="macvlan", options={"parent": "eth0", "mode": "l3"}), "invalid_option",
         ["bridge, private, vepa, passthru"]),
        (m.create_network("x", options={"vlan": "3"}), "invalid_option", ["unknown option 'vlan'", "bridge_name, mtu"]),
        (m.create_network("web"), "name_taken", ["'web'", web.id]),
        (m.create_network("x", "10.10.5.0/24"), "subnet_overlap", ["'web'", web.id, "10.10.0.0/16", "parent"]),
        (m.create_network("x", "10.0.0.0/8"), "subnet_overlap", ["'web'", web.id, "10.10.0.0/16"]),
        (m.create_network("x", parent="ghost"), "parent_not_found", ["'ghost'"]),
        (m.create_network("x", "10.11.0.0/24", parent="web"), "cidr_outside_parent", ["not inside", "10.10.0.0/16"]),
        (m.create_network("x", "10.10.0.0/24", parent="web"), "cidr_outside_parent", ["gateway 10.10.0.1"]),
        (m.create_network("x", prefix_len=12), "invalid_request", ["/12", "172.20.0.0/16"]),
        (m.create_network("x", ipv6=True), "no_ipv6_pool", ["default_subnet_v6", "cidr_v6"]),
        (m.create_network("x", cidr_v6="10.30.0.0/24"), "invalid_cidr", ["IPv4", "cidr_v6"]),
        (m.connect_networks("web", web.id), "self_connection", ["'web'", "itself"]),
        (m.connect_networks("web", "ghost"), "network_not_found", ["'ghost'"]),
        (m.create_mesh("m1", ["web", "ghost"]), "network_not_found", ["'ghost'"]),
        (m.add_to_mesh("nomesh", "web"), "mesh_not_found", ["'nomesh'"]),
        (m.update_network("web", isolation="sideways"), "unknown_isolation", ["sideways"]),
        (m.delete_network("ghost"), "network_not_found", ["'ghost'"]),
    ]
    for coro, code, words in cases:
        e = await env.err(coro)
        assert e.code == code, (code, e.code, e.message)
        for w in words:
            assert w in e.message, (code, w, e.message)
        assert "Traceback" not in e.message
    # Nothing of the refused requests was left behind: one network, one pool.
    assert await env.ids_in_index() == {web.id}
    all_pools = await env.m.call(subjects.IPAM_POOL_LIST, {}, PoolsReply)
    assert [p.network_id for p in all_pools.pools] == [web.id]
    # Deleting a network with endpoints is refused (the endpoint service keeps this set).
    await env.r.sadd(key("netep", web.id), "ep-1", "ep-2")
    e = await env.err(m.delete_network("web"))
    assert e.code == "network_in_use" and "2 endpoint(s)" in e.message and "force" in e.message
    assert (await m.get_network("web")).id == web.id


async def test_max_networks(env_factory: Callable[..., Awaitable[Env]]) -> None:
    env = await env_factory(max_networks=3)
    for i in range(3):
        await env.m.create_network(f"n{i}")
    e = await env.err(env.m.create_network("n3"))
    assert e.code == "limit_reached" and e.status == 503
    assert "max_networks (3)" in e.message and "3 networks exist" in e.message
    await env.m.delete_network("n0")
    await env.m.create_network("n3")
    # The concurrent form: 6 creates for 2 free places -> exactly 2 succeed.
    await env.m.delete_network("n1")
    await env.m.delete_network("n2")
    results = await asyncio.gather(*(env.m.create_network(f"c{i}") for i in range(6)), return_exceptions=True)
    ok = [r for r in results if isinstance(r, VirtualNetwork)]
    assert len(ok) == 2
    assert all(isinstance(r, E.VNetError) and r.code == "limit_reached" for r in results if r not in ok)
    assert len(await env.ids_in_index()) == 3
    assert len((await env.m.call(subjects.IPAM_POOL_LIST, {}, PoolsReply)).pools) == 3  # refused ones rolled back


# --- delete with endpoints -----------------------------------------------------------------

class EndpointDelete(msgspec.Struct, forbid_unknown_fields=True):
    endpoint_id: str
    force: bool = False


def fake_endpoint_service(calls: list[EndpointDelete]) -> ServiceDef:
    """Stands in for the endpoint service: deleting an endpoint removes it from its network's set."""
    svc = ServiceDef("endpoint", "fake endpoint service for the network tests")

    @svc.op("delete", subjects.ENDPOINT_DELETE, EndpointDelete)
    async def delete(ctx: Ctx, req: EndpointDelete) -> dict[str, Any]:
        calls.append(req)
        if req.endpoint_id == "ep-gone":
            raise E.make(E.ENDPOINT_NOT_FOUND, "no such endpoint")
        for k in await ctx.rt.redis.keys("vnet:{netep:*}"):
            await ctx.rt.redis.srem(k, req.endpoint_id)
        return {"endpoint_id": req.endpoint_id}

    return svc


async def test_forced_delete_removes_endpoints(env: Env) -> None:
    ev = await events(env)
    n = await env.m.create_network("eps")
    await env.r.sadd(key("netep", n.id), "ep-1", "ep-2", "ep-gone")
    # The endpoint service is down: a clear 503 and the network intact.
    e = await env.err(env.m.delete_network("eps", force=True))
    assert e.code == "unavailable" and e.status == 503
    assert "endpoint service did not answer" in e.message and "not deleted" in e.message
    assert (await env.m.get_network("eps")).id == n.id
    assert len((await env.pools(n.id)).pools) == 1
    calls: list[EndpointDelete] = []
    await env.start(fake_endpoint_service(calls), cfg=env.cfg)
    d = await env.m.delete_network("eps", force=True)
    assert sorted(c.endpoint_id for c in calls) == ["ep-1", "ep-2", "ep-gone"] and all(c.force for c in calls)
    assert sorted(d.endpoints_deleted) == ["ep-1", "ep-2", "ep-gone"] and d.warnings == []
    assert await env.ids_in_index() == set()
    assert (await env.pools(n.id)).pools == []
    assert await env.r.exists(key("netep", n.id)) == 0
    deleted = await ev.wait_for("deleted")
    assert deleted[0]["network"]["id"] == n.id


# --- labels, pagination, update ----------------------------------------------------------------

async def test_label_filter_and_pagination(env: Env) -> None:
    m = env.m
    names = [f"net-{i:02d}" for i in range(23)]
    for i, name in enumerate(names):
        await m.create_network(name, labels={"env": "prod" if i % 2 else "dev", "team": "a" if i % 3 else "b"})
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await m.list_networks(limit=5, cursor=cursor)
        pages += 1
        seen += [n.name for n in page.networks]
        assert len(page.networks) <= 5
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == names and pages == 5
    prod = await m.all_networks({"env": "prod"})
    assert [n.name for n in prod] == [n for i, n in enumerate(names) if i % 2]
    both = await m.all_networks(["env=prod", "team=b"])
    assert [n.name for n in both] == [n for i, n in enumerate(names) if i % 2 and not i % 3]
    page = await m.list_networks({"env": "prod", "team": "b"}, limit=2)
    assert [n.name for n in page.networks] == [n.name for n in both[:2]] and page.next_cursor is not None
    assert (await m.list_networks({"env": "nowhere"})).networks == []


def _stamp(text: str) -> dt.datetime:
    """A record's timestamp (ISO 8601, UTC, ``Z``) as an aware datetime."""
    t = dt.datetime.fromisoformat(text)
    assert t.tzinfo is not None and t.utcoffset() == dt.timedelta(0), text
    return t


async def test_update_labels_and_isolation(env: Env) -> None:
    ev = await events(env)
    m = env.m
    made = await m.create_network("u", labels={"a": "1", "b": "2"})
    created = _stamp(made.created_at)
    assert _stamp(made.updated_at) == created
    await asyncio.sleep(0.01)  # the updates are stamped at least a millisecond after the create
    before = dt.datetime.now(dt.UTC) - dt.timedelta(milliseconds=1)  # stamps are truncated to ms
    n = await m.update_network("u", set_labels={"c": "3"}, remove_labels=["a"])
    assert n.labels == {"b": "2", "c": "3"}
    n = await m.update_network("u", labels={"only": "this"}, isolation="PeerOnly")
    after = dt.datetime.now(dt.UTC)
    assert n.labels == {"only": "this"} and n.isolation_mode is IsolationMode.PEER_ONLY
    # Compared as times, not strings: an update moves updated_at and leaves created_at alone.
    assert _stamp(n.created_at) == created
    assert created < before <= _stamp(n.updated_at) <= after, (made, n)
    got = await ev.wait_for("updated", 2)
    assert got[-1]["changes"] == ["labels", "isolation"]


# --- CLI ---------------------------------------------------------------------------------------

async def _vnetctl(cfg: VNetConfig, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from vnet.cli.main import main; main()", "--nats", cfg.nats_url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"})
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli(env: Env) -> None:
    cfg = env.cfg
    rc, out, err = await _vnetctl(cfg, "network", "create", "cli-web", "--cidr", "10.90.0.0/16", "-l", "env=prod")
    assert rc == 0, err
    assert "created network cli-web" in out and "10.90.0.0/16" in out
    rc, out, _ = await _vnetctl(cfg, "network", "create", "cli-kid", "--parent", "cli-web", "--json")
    kid = json.loads(out)
    assert rc == 0 and kid["parent"] and kid["cidr"] == "10.90.1.0/24"
    assert (await _vnetctl(cfg, "network", "create", "cli-db", "--driver", "macvlan", "-o", "parent=eth0"))[0] == 0
    assert (await _vnetctl(cfg, "network", "connect", "cli-web", "cli-db"))[0] == 0
    assert (await _vnetctl(cfg, "network", "mesh", "create", "cli-mesh", "cli-db", "cli-kid"))[0] == 0
    rc, out, _ = await _vnetctl(cfg, "network", "ls", "--json", "-l", "env=prod")
    assert rc == 0 and [n["name"] for n in json.loads(out)["items"]] == ["cli-web"]
    rc, out, _ = await _vnetctl(cfg, "network", "ls")
    assert rc == 0 and "cli-db" in out and "cli-kid" in out
    rc, out, _ = await _vnetctl(cfg, "network", "topology")
    assert rc == 0
    lines = out.splitlines()
    web = next(i for i, ln in enumerate(lines) if "cli-web" in ln and "10.90.0.0/16" in ln)
    kid_line = next(i for i, ln in enumerate(lines) if "cli-kid" in ln and "10.90.1.0/24" in ln)
    assert kid_line > web and lines[kid_line].index("cli-kid") > lines[web].index("cli-web")  # nested deeper
    assert any("cli-web ↔ cli-db" in ln or "cli-db ↔ cli-web" in ln for ln in lines)
    assert any("cli-mesh:" in ln for ln in lines)
    rc, out, _ = await _vnetctl(cfg, "network", "topology", "--json")
    topo = json.loads(out)
    assert len(topo["networks"]) == 3 and len(topo["connections"]) == 1 and topo["mesh_groups"][0]["name"] == "cli-mesh"
    rc, _, err = await _vnetctl(cfg, "network", "create", "cli-bad", "--cidr", "10.90.5.1/24")
    assert rc == 1 and "host bits" in err and "cidr_host_bits" in err
    rc, out, _ = await _vnetctl(cfg, "network", "update", "cli-web", "--isolation", "none", "--json")
    assert rc == 0 and json.loads(out)["isolation_mode"] == "none"
    rc, out, _ = await _vnetctl(cfg, "network", "inspect", "cli-web")
    assert rc == 0 and "10.90.0.0/16" in out
    rc, out, _ = await _vnetctl(cfg, "network", "rm", "cli-web")
    assert rc == 0 and "1 child network(s) now top-level" in out
