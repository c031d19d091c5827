"""core/topology.py: relations are symmetric and not transitive; tree, edges, consistency."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vnet.core import errors as E
from vnet.core import topology
from vnet.core.model import DriverType, IsolationMode, VirtualNetwork
from vnet.core.topology import Relation


def net(ident: str, **kw: object) -> VirtualNetwork:
    return VirtualNetwork(id=ident, name=f"n-{ident}", cidr="10.0.0.0/24", gateway="10.0.0.1",
                          driver_type=DriverType.BRIDGE, isolation_mode=IsolationMode.FULL, **kw)  # type: ignore[arg-type]


def test_parse_isolation_spellings() -> None:
    for s in ("peer_only", "PeerOnly", "peer-only", "PEER_ONLY"):
        assert topology.parse_isolation(s) is IsolationMode.PEER_ONLY
    assert topology.parse_isolation("MeshOnly") is IsolationMode.MESH_ONLY
    assert topology.parse_isolation("None") is IsolationMode.NONE
    with pytest.raises(E.VNetError) as ei:
        topology.parse_isolation("paranoid")
    assert ei.value.code == "unknown_isolation" and "full, peer_only, mesh_only, none" in ei.value.message


def test_self_connection_refused() -> None:
    a = net("a")
    with pytest.raises(E.VNetError) as ei:
        topology.check_connect(a, a)
    assert ei.value.code == "self_connection"
    topology.check_connect(a, net("b"))


def test_relations_not_transitive() -> None:
    # a-b connected, b-c connected: a and c unrelated.
    a, b, c = net("a", connected=["b"]), net("b", connected=["a", "c"]), net("c", connected=["b"])
    assert topology.relations(a, b) == [(Relation.CONNECTED, None)]
    assert topology.related(b, c)
    assert not topology.related(a, c)
    # grandparent / grandchild and siblings are not related.
    gp, p = net("gp", children=["p"]), net("p", parent="gp", children=["k1", "k2"])
    k1, k2 = net("k1", parent="p"), net("k2", parent="p")
    assert topology.relations(p, gp) == [(Relation.PARENT, None)]
    assert topology.relations(gp, p) == [(Relation.CHILD, None)]
    assert not topology.related(gp, k1)
    assert not topology.related(k1, k2)
    # mesh: a shared group relates; two groups chained do not.
    m1, m2, m3 = net("m1", mesh_groups=["x"]), net("m2", mesh_groups=["x", "y"]), net("m3", mesh_groups=["y"])
    assert topology.relations(m1, m2) == [(Relation.MESH, "x")]
    assert not topology.related(m1, m3)
    assert topology.relations(a, a) == [(Relation.SAME, None)]


@given(st.data())
def test_relations_symmetric_for_consistent_records(data: st.DataObject) -> None:
    ids = [f"n{i}" for i in range(5)]
    pairs = data.draw(st.sets(st.tuples(st.sampled_from(ids), st.sampled_from(ids)).filter(lambda p: p[0] < p[1])))
    meshes = data.draw(st.dictionaries(st.sampled_from(["m1", "m2"]), st.sets(st.sampled_from(ids))))
    conn: dict[str, list[str]] = {i: [] for i in ids}
    for a, b in pairs:
        conn[a].append(b)
        conn[b].append(a)
    nets = {i: net(i, connected=conn[i], mesh_groups=[m for m, ms in meshes.items() if i in ms]) for i in ids}
    assert topology.inconsistencies(list(nets.values()), meshes) == []
    for x in ids:
        for y in ids:
            assert topology.related(nets[x], nets[y]) == topology.related(nets[y], nets[x])


def test_build_tree_and_connections() -> None:
    nets = [net("p", children=["c1", "c2"], connected=["z"]), net("c1", parent="p", children=["g"]),
            net("c2", parent="p"), net("g", parent="c1"), net("z", connected=["p"]), net("o", parent="missing")]
    tree = topology.build_tree(nets)
    assert [t.network.id for t in tree] == ["o", "p", "z"]
    p = tree[1]
    assert [c.network.id for c in p.children] == ["c1", "c2"]
    assert [g.network.id for g in p.children[0].children] == ["g"]
    assert topology.connections(nets) == [("p", "z")]


def test_inconsistencies_found() -> None:
    bad = [net("a", connected=["b"]), net("b"), net("c", parent="a"), net("d", mesh_groups=["m"])]
    problems = topology.inconsistencies(bad, {"m": [], "q": ["zz"]})
    assert any("not the reverse" in p for p in problems)
    assert any("does not list it as a child" in p for p in problems)
    assert any("mesh 'm'" in p for p in problems)
    assert any("missing network zz" in p for p in problems)


def test_child_prefix_len() -> None:
    assert topology.child_prefix_len(16, 24, 30) == 24
    assert topology.child_prefix_len(24, 24, 30) == 26
    assert topology.child_prefix_len(29, 24, 30) == 30
