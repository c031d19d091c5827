"""Topology of networks: connections (symmetric, not transitive), mesh groups, parents and
children (their subnets and the parent's allocated addresses), and what deleting a network
does to its relations. (Real valkey, NATS and IPAM; ``network_env`` gives each test its own
Redis database.)
"""

# ruff: noqa: F811 (a test's argument env or env_factory is network_env's fixture, imported for pytest)

from __future__ import annotations

import asyncio
import itertools

from tests.integration.network_env import Env, env, env_factory, events  # noqa: F401  (the fixtures)
from vnet.adapters.redis import global_key
from vnet.contracts import subjects
from vnet.contracts.ipam import AddrReply, AddrRequest
from vnet.core import addr, topology
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork

# --- 4. topology ---------------------------------------------------------------------------

async def test_connections_are_symmetric_and_not_transitive(env: Env) -> None:
    ev = await events(env)
    m = env.m
    a = await m.create_network("na")
    b = await m.create_network("nb")
    c = await m.create_network("nc")
    r = await m.connect_networks("na", "nb")
    assert r.changed and r.network_a.connected == [b.id] and r.network_b.connected == [a.id]
    assert not (await m.connect_networks("nb", "na")).changed  # symmetric: already connected
    await m.connect_networks(b.id, c.id)
    na, nb, nc = await m.get_network("na"), await m.get_network("nb"), await m.get_network("nc")
    assert sorted(nb.connected) == sorted([a.id, c.id])
    assert topology.related(na, nb) and topology.related(nb, nc)
    assert not topology.related(na, nc)  # not transitive
    d = await m.disconnect_networks("nb", "na")
    assert d.changed and d.network_a.connected == [c.id] and d.network_b.connected == []
    assert not (await m.disconnect_networks("na", "nb")).changed
    await ev.wait_for("connected", 2)
    await ev.wait_for("disconnected", 1)


async def test_mesh_groups(env: Env) -> None:
    m = env.m
    ids = [(await m.create_network(f"m{i}")).id for i in range(4)]
    g = await m.create_mesh("blue", ["m0", "m1"])
    assert g.members == sorted(ids[:2])
    assert (await m.add_to_mesh("blue", "m2")).changed
    assert not (await m.add_to_mesh("blue", "m2")).changed
    await m.create_mesh("red", ["m2", ids[3]])
    n0, n2, n3 = await m.get_network("m0"), await m.get_network("m2"), await m.get_network("m3")
    assert n2.mesh_groups == ["blue", "red"]
    assert topology.related(n0, n2) and topology.related(n2, n3)
    assert not topology.related(n0, n3)  # two meshes chained through m2: not related
    e = await env.err(m.create_mesh("blue"))
    assert e.code == "name_taken" and "'blue'" in e.message
    r = await m.remove_from_mesh("blue", "m0")
    assert r.changed and ids[0] not in r.mesh.members
    assert (await m.get_network("m0")).mesh_groups == []
    assert [x.name for x in await m.list_meshes()] == ["blue", "red"]
    deleted = await m.delete_mesh("blue")
    assert deleted.members == sorted(ids[1:3])
    assert (await m.get_network("m2")).mesh_groups == ["red"]
    e = await env.err(m.get_mesh("blue"))
    assert e.code == "mesh_not_found"
    e = await env.err(m.create_mesh("bad.name"))
    assert e.code == "invalid_request" and "$.name" in e.message


async def test_parent_and_children(env: Env) -> None:
    m = env.m
    p = await m.create_network("parent", "10.40.0.0/16")
    c1 = await m.create_child_network("parent", "c1")
    assert c1.parent == p.id and c1.cidr == "10.40.1.0/24"  # skips the block holding the parent's gateway
    c2 = await m.create_network("c2", "10.40.8.0/22", parent=p.id)
    c3 = await m.create_child_network("parent", "c3", prefix_len=28)
    assert c3.cidr == "10.40.2.0/28"
    p = await m.get_network("parent")
    assert sorted(p.children) == sorted([c1.id, c2.id, c3.id])
    assert topology.related(p, c1) and not topology.related(c1, await m.get_network("c2"))  # siblings
    # The parent's pool excludes the children's ranges.
    pp = (await env.pools(p.id)).pools[0]
    assert sorted(pp.excluded) == sorted([c1.cidr, c2.cidr, c3.cidr])
    # Siblings must not overlap; the parent does not count as an overlap.
    e = await env.err(m.create_network("c4", "10.40.9.0/24", parent="parent"))
    assert e.code == "subnet_overlap" and "sibling" in e.message and "'c2'" in e.message
    # A top-level network may not overlap the parent (or its children).
    e = await env.err(m.create_network("top", "10.40.9.0/24"))
    assert e.code == "subnet_overlap" and "'parent'" in e.message
    # Grandchildren nest in the child; the grandparent is not related to them.
    g = await m.create_child_network("c2", "g1")
    assert addr.is_strict_subnet(addr.parse_prefix(g.cidr), addr.parse_prefix(c2.cidr))
    assert not topology.related(p, g)
    assert [n.name for n in await m.list_children("parent")] == ["c1", "c2", "c3"]
    # Deleting a child frees its range in the parent's pool.
    await m.delete_network("c3")
    assert sorted((await env.pools(p.id)).pools[0].excluded) == sorted([c1.cidr, c2.cidr])
    assert sorted((await m.get_network("parent")).children) == sorted([c1.id, c2.id])
    # Deleting the parent: children become top-level, still guarded against overlap.
    ev = await events(env)
    d = await m.delete_network("parent")
    assert sorted(d.children_detached) == sorted([c1.id, c2.id])
    c2n = await m.get_network("c2")
    assert c2n.parent is None and c2n.children == [g.id]
    e = await env.err(m.create_network("over-c2", "10.40.8.0/21"))
    assert e.code == "subnet_overlap" and "'c2'" in e.message
    assert (await m.create_network("reuse", "10.40.64.0/18")).parent is None  # the parent's other space is free
    await ev.wait_for("deleted")
    await ev.wait_for("updated", 2)
    assert topology.inconsistencies(await m.all_networks(), {x.name: x.members for x in await m.list_meshes()}) == []


async def test_concurrent_children(env: Env) -> None:
    p = await env.m.create_network("p", "10.43.0.0/16")
    # Overlapping explicit children: one wins, the other names it; the parent's pool excludes the winner only.
    results = await asyncio.gather(env.m.create_network("k1", "10.43.4.0/22", parent="p"),
                                   env.m.create_network("k2", "10.43.5.0/24", parent="p"), return_exceptions=True)
    ok = [r for r in results if isinstance(r, VirtualNetwork)]
    bad = [r for r in results if isinstance(r, E.VNetError)]
    assert len(ok) == 1 and len(bad) == 1
    assert bad[0].code == "subnet_overlap" and f"sibling network {ok[0].name!r}" in bad[0].message
    assert (await env.pools(p.id)).pools[0].excluded == [ok[0].cidr]
    # Many automatic children at once: all distinct, all excluded from the parent's pool.
    kids = await asyncio.gather(*(env.m.create_child_network("p", f"auto{i}") for i in range(12)))
    cidrs = sorted(addr.parse_prefix(k.cidr) for k in [*kids, ok[0]])
    assert all(not a.overlaps(b) for a, b in itertools.pairwise(cidrs))
    assert sorted((await env.pools(p.id)).pools[0].excluded) == sorted(str(c) for c in cidrs)
    assert len((await env.m.get_network("p")).children) == 13


async def test_children_avoid_the_parents_allocated_addresses(env: Env) -> None:
    p = await env.m.create_network("busy", "10.41.0.0/24")

    async def alloc(owner: str, address: str | None = None) -> str:
        rep = await env.m.call(subjects.IPAM_ADDR_REQUEST,
                               AddrRequest(network_id=p.id, owner=owner, address=address), AddrReply)
        return rep.address

    assert await alloc("ep1") == "10.41.0.2"
    assert await alloc("ep2", "10.41.0.130") == "10.41.0.130"
    # An explicit child range holding an allocated address: refused, naming the holder; nothing changed.
    e = await env.err(env.m.create_network("kid", "10.41.0.128/26", parent="busy"))
    assert e.code == "address_in_use" and e.status == 409
    assert "'busy'" in e.message and "10.41.0.128/26" in e.message and "ep2" in e.message
    assert (await env.m.get_network("busy")).children == []
    pool = (await env.pools(p.id)).pools[0]
    assert pool.used == 2 and pool.excluded == []
    # Automatic children skip ranges with allocations (and the block holding the gateway).
    kid = await env.m.create_child_network("busy", "kid")  # a /26: 10.41.0.0/26 holds the gateway
    assert kid.cidr == "10.41.0.64/26"
    assert await alloc("ep3", "10.41.0.200") == "10.41.0.200"
    e = await env.err(env.m.create_child_network("busy", "kid2"))  # .128/26 and .192/26 are both in use
    assert e.code == "address_in_use" and "10.41.0.128/26" in e.message and "10.41.0.192/26" in e.message
    assert (await env.pools(p.id)).pools[0].excluded == ["10.41.0.64/26"]
    # Next-fit continues after kid: 10.41.0.128/28 holds .130, so the next /28.
    assert (await env.m.create_child_network("busy", "kid3", prefix_len=28)).cidr == "10.41.0.144/28"
    # Deleting a child gives its range back to the parent's pool.
    d = await env.m.delete_network("kid")
    assert d.warnings == []
    assert (await env.pools(p.id)).pools[0].excluded == ["10.41.0.144/28"]
    assert len(await env.ids_in_index()) == 2


async def test_delete_cleans_relations(env: Env) -> None:
    m = env.m
    for n in ("x", "y", "z"):
        await m.create_network(n)
    await m.connect_networks("x", "y")
    await m.connect_networks("x", "z")
    await m.create_mesh("g", ["x", "y"])
    x = await m.get_network("x")
    ev = await events(env)
    d = await m.delete_network("x")
    assert sorted(d.network.connected) == sorted(x.connected) and d.network.mesh_groups == ["g"]
    y, z = await m.get_network("y"), await m.get_network("z")
    assert y.connected == [] and z.connected == []
    assert (await m.get_mesh("g")).members == [y.id]
    assert await env.ids_in_index() == {y.id, z.id}
    assert (await env.pools(x.id)).pools == []
    assert await env.r.exists(global_key("net", x.id)) == 0
    assert len(await ev.wait_for("disconnected", 2)) == 2
    removed = await ev.wait_for("mesh_member_removed")
    assert removed[0] == {"mesh": "g", "members": [y.id], "network": x.id, "reach": None}
    assert topology.inconsistencies(await m.all_networks(), {g.name: g.members for g in await m.list_meshes()}) == []
