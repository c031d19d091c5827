"""The planner for overlay, macvlan and ipvlan networks (pure; an in-memory kernel).

Extends test_plan's FakeKernel with VXLAN devices, their FDB/neighbour tables and
sub-interfaces, then checks: one plan converges, a converged host plans nothing, a
host leaving removes exactly its entries, drift is repaired exactly, errors are clear.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_plan import FakeKernel, empty_actual, kinds
from vnet.adapters.wireguard import WgPeer, desired_peers, parse_dump, wg_set_args
from vnet.core import drivers, naming
from vnet.core import plan as P
from vnet.core.dataplane_model import (
    EpDesired,
    LinkState,
    NetDesired,
    NodeActual,
    NodeDesired,
    PeerHost,
    RemoteEndpoint,
    Scope,
    Underlay,
)
from vnet.core.model import DriverType

NID = "ov1"
VX = naming.vxlan_name(NID)
BR = naming.bridge_name(NID)
UNDER = Underlay(address="10.250.0.1", ifname="eth0", wg_address="10.251.0.1/24", wg_ifname="wg0")


class OverlayKernel(FakeKernel):
    def one(self, op: P.PlanOp) -> None:
        host = self.a.host
        if isinstance(op, P.EnsureVxlan):
            host.links[op.name] = LinkState(index=self._idx(), name=op.name, kind="vxlan", mtu=op.mtu, up=True,
                                            master=op.bridge, vni=op.vni, vxlan_local=op.local, vxlan_link=op.dev,
                                            vxlan_port=op.port, vxlan_learning=False, vxlan_proxy=True)
            host.fdb = {**host.fdb, op.name: {}}
            host.neigh = {**host.neigh, op.name: {}}
        elif isinstance(op, P.AddFdb):
            assert op.ifname in host.links
            host.fdb[op.ifname][op.mac] = op.dst
        elif isinstance(op, P.DelFdb):
            host.fdb[op.ifname].pop(op.mac, None)
        elif isinstance(op, P.AddNeigh):
            assert op.ifname in host.links
            host.neigh[op.ifname][op.ip] = op.mac
        elif isinstance(op, P.DelNeigh):
            host.neigh[op.ifname].pop(op.ip, None)
        elif isinstance(op, P.CreateSubIf):
            parent = host.links[op.parent]
            ns = host if op.peer_ns is None else self.a.containers[op.peer_ns]
            ns.links[op.ifname] = LinkState(index=self._idx(), name=op.ifname, kind=op.kind, mtu=op.mtu,
                                            mac=op.mac or parent.mac, up=op.peer_ns is None, sub_mode=op.mode,
                                            peer_index=parent.index, peer_netnsid=None if op.peer_ns is None else 0,
                                            arp_notify=0, accept_dad=1)
        elif isinstance(op, P.DeleteLink) and op.ns is None and op.ifname in host.links:
            super().one(op)
            host.fdb.pop(op.ifname, None)
            host.neigh.pop(op.ifname, None)
        else:
            super().one(op)


def peers(*ks: int) -> list[PeerHost]:
    return [PeerHost(name=f"h{k}", address=f"10.250.0.{k}", wg_public_key=f"{'K' * 42}{k}=",
                     wg_address=f"10.251.0.{k}") for k in ks]


def remote(k: int, i: int) -> RemoteEndpoint:
    return RemoteEndpoint(mac=naming.local_mac(bytes([2, 9, 0, 0, k, i])), host=f"h{k}", ipv4=f"10.77.0.{k * 20 + i}")


def overlay(remotes: tuple[RemoteEndpoint, ...] = (), **kw: object) -> NetDesired:
    base: dict[str, object] = {"id": NID, "driver": DriverType.OVERLAY, "vni": 4242, "gateway4": "10.77.0.1/24",
                               "mtu": 1450, "remotes": remotes}
    base.update(kw)
    return NetDesired(**base)  # type: ignore[arg-type]


def local_ep(i: int) -> EpDesired:
    return EpDesired(id=f"e{i}", network_id=NID, netns=f"c{i}", mac=naming.local_mac(bytes([2, 8, 0, 0, 1, i])),
                     ipv4=f"10.77.0.{i + 100}/24", gw4="10.77.0.1")


def desired(remotes: tuple[RemoteEndpoint, ...], hosts: tuple[int, ...] = (2, 3), n_local: int = 1,
            **kw: object) -> NodeDesired:
    return NodeDesired(networks=[overlay(remotes, **kw)], endpoints=[local_ep(i) for i in range(n_local)],
                       underlay=UNDER, peers=peers(*hosts))


def converge(d: NodeDesired, a: NodeActual, scope: Scope | None = None,
             departed: tuple[P.Departed, ...] = ()) -> tuple[P.Plan, OverlayKernel]:
    p = P.plan(d, a, scope, departed)
    k = OverlayKernel(a)
    k.apply(p)
    return p, k


V4_ENDPOINT_CREATE = ["create_veth", "set_sysctl", "add_addr", "set_link", "add_route"]
REMOTES = tuple(remote(k, i) for k in (2, 3) for i in range(3))


# --------------------------------------------------------------------------- overlay


def test_first_overlay_plan_exact_ops_then_nothing() -> None:
    a = empty_actual("c0")
    p, _ = converge(desired(REMOTES), a)
    assert p.errors == []
    assert kinds(p) == (["set_sysctl", "ensure_bridge", "add_addr", "ensure_vxlan"] + ["add_fdb"] * 6
                        + ["add_neigh"] * 6 + V4_ENDPOINT_CREATE)
    vx = next(op for op in p.ops if isinstance(op, P.EnsureVxlan))
    assert (vx.name, vx.vni, vx.local, vx.dev, vx.port, vx.bridge, vx.mtu) == (VX, 4242, "10.250.0.1", "eth0",
                                                                              4789, BR, 1450)
    assert vx.after is None
    assert a.host.fdb[VX] == {r.mac: f"10.250.0.{r.host[1]}" for r in REMOTES}
    assert a.host.neigh[VX] == {r.ipv4: r.mac for r in REMOTES}
    assert P.plan(desired(REMOTES), a).ops == []  # converged: zero writes
    assert P.plan(desired(REMOTES), a, Scope(networks=frozenset({NID}))).ops == []


def test_host_leaving_removes_exactly_its_entries() -> None:
    a = empty_actual("c0")
    converge(desired(REMOTES), a)
    left = tuple(r for r in REMOTES if r.host != "h3")
    p, k = converge(desired(left, hosts=(2,)), a, Scope(networks=frozenset({NID})))
    assert sorted(kinds(p)) == ["del_fdb"] * 3 + ["del_neigh"] * 3
    assert k.writes == 6
    assert set(a.host.fdb[VX].values()) == {"10.250.0.2"}
    assert P.plan(desired(left, hosts=(2,)), a).ops == []
    # and joining again: exactly the additions
    p, _ = converge(desired(REMOTES), a)
    assert sorted(kinds(p)) == ["add_fdb"] * 3 + ["add_neigh"] * 3


def test_mac_moving_host_is_one_replace() -> None:
    a = empty_actual("c0")
    converge(desired(REMOTES), a)
    moved = (RemoteEndpoint(mac=REMOTES[0].mac, host="h3", ipv4=REMOTES[0].ipv4), *REMOTES[1:])
    p, _ = converge(desired(moved), a)
    assert kinds(p) == ["add_fdb"]
    assert a.host.fdb[VX][REMOTES[0].mac] == "10.250.0.3"


def test_vxlan_drift_rebuilds_device_and_entries() -> None:
    a = empty_actual("c0")
    converge(desired(REMOTES), a)
    a.host.links[VX] = msgspec.structs.replace(a.host.links[VX], vni=99)
    p, _ = converge(desired(REMOTES), a)
    assert kinds(p) == ["delete_link", "ensure_vxlan"] + ["add_fdb"] * 6 + ["add_neigh"] * 6
    a.host.links[VX] = msgspec.structs.replace(a.host.links[VX], up=False, master=None)
    p, _ = converge(desired(REMOTES), a)
    assert kinds(p) == ["set_link"]
    a.host.fdb[VX].pop(REMOTES[1].mac)
    a.host.neigh[VX][REMOTES[2].ipv4 or ""] = "02:00:00:00:00:99"
    p, _ = converge(desired(REMOTES), a)
    assert kinds(p) == ["add_fdb", "add_neigh"]
    assert P.plan(desired(REMOTES), a).ops == []


def test_overlay_errors_are_clear() -> None:
    a = empty_actual("c0")
    d = NodeDesired(networks=[overlay(REMOTES)], endpoints=[local_ep(0)], peers=peers(2, 3))
    p = P.plan(d, a)
    assert {e.owner: e.code for e in p.errors} == {f"net:{NID}": "invalid_option", "ep:e0": "invalid_option"}
    assert "underlay" in p.errors[0].message and p.ops == []
    p = P.plan(NodeDesired(networks=[overlay(vni=None)], underlay=UNDER), a)
    assert p.errors[0].code == "invalid_option" and "VNI" in p.errors[0].message
    p = P.plan(NodeDesired(networks=[overlay(vni=1 << 24)], underlay=UNDER), a)
    assert p.errors[0].code == "invalid_option"
    missing = Underlay(address="10.250.0.1", ifname="nosuch0")
    p = P.plan(NodeDesired(networks=[overlay()], endpoints=[local_ep(0)], underlay=missing), a)
    assert {e.owner: e.code for e in p.errors} == {f"net:{NID}": "unavailable", "ep:e0": "unavailable"}
    assert "nosuch0" in p.errors[0].message and [op for op in p.ops if op.owner != "host"] == []
    # a remote on an unknown host: reported, skipped, the rest proceeds
    stray = RemoteEndpoint(mac="02:00:00:00:00:42", host="h9", ipv4="10.77.0.250")
    p = P.plan(desired((*REMOTES, stray)), a)
    assert [(e.code, e.fatal) for e in p.errors] == [("invalid_request", False)]
    assert "h9" in p.errors[0].message
    assert len([op for op in p.ops if isinstance(op, P.AddFdb)]) == 6


# --------------------------------------------------------------------------- remote deltas

DELTA_MACS = [naming.local_mac(bytes([2, 9, 0, 0, 7, i])) for i in range(4)]
ENTRIES = (P.AddFdb, P.DelFdb, P.AddNeigh, P.DelNeigh)


@settings(max_examples=80, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.sampled_from(["h2", "h3", "h9"]),
                          st.integers(0, 4)), max_size=25))
def test_remote_deltas_build_what_a_plan_from_scratch_renders(steps: list[tuple[bool, int, str, int]]) -> None:
    """Random remote endpoints created and deleted on a host where the network is built (MACs
    and addresses reused, a host that is not a peer): each event's ops as the node applies
    them (the delta when ``remote_delta`` gives one, else a reconcile of the network), and
    after every step a plan from scratch has no FDB or neighbour entry left to write."""
    a = empty_actual("c0")
    remotes: tuple[RemoteEndpoint, ...] = ()
    converge(desired(remotes), a)
    drv = drivers.get("overlay")
    for created, m, host, ip in steps:
        rem = RemoteEndpoint(mac=DELTA_MACS[m], host=host, ipv4=f"10.77.0.{200 + ip}")
        others = tuple(r for r in remotes if r.mac != rem.mac)  # what the node's intake makes of the event
        new = tuple(sorted((*others, rem), key=lambda r: r.mac)) if created else others
        ops = drv.remote_delta(overlay(remotes), peers(2, 3), rem, created)
        if ops is None:
            converge(desired(new), a, Scope(networks=frozenset({NID})))
        else:
            assert all(isinstance(op, ENTRIES) and op.owner == f"net:{NID}" and op.ifname == VX for op in ops)
            OverlayKernel(a).apply(P.Plan(ops=ops, errors=[], networks=[], endpoints=[]))
        remotes = new
        left = [op for op in P.plan(desired(remotes), a).ops if isinstance(op, ENTRIES)]
        assert left == [], (rem, created, left)


def test_remote_delta_ops_and_when_there_is_none() -> None:
    drv = drivers.get("overlay")
    r = remote(2, 1)
    assert kinds(P.Plan(ops=drv.remote_delta(overlay(), peers(2, 3), r, True) or [], errors=[], networks=[],
                        endpoints=[])) == ["add_fdb", "add_neigh"]
    assert [type(op) for op in drv.remote_delta(overlay((r,)), peers(2, 3), r, False) or []] == [P.DelNeigh, P.DelFdb]
    assert drv.remote_delta(overlay(), peers(3), r, True) is None  # its host is not a peer
    assert drv.remote_delta(overlay(encrypted=True), [msgspec.structs.replace(p, wg_address=None)
                                                     for p in peers(2)], r, True) is None
    moved = msgspec.structs.replace(r, host="h3")
    assert drv.remote_delta(overlay((r,)), peers(2, 3), moved, True) is None  # the old host's entry would stay
    twin = RemoteEndpoint(mac="02:00:00:00:00:42", host="h3", ipv4=r.ipv4)
    assert drv.remote_delta(overlay((r,)), peers(2, 3), twin, True) is None  # an address held by another
    assert drv.remote_delta(overlay((twin, r)), peers(2, 3), r, False) is None
    assert drivers.get("bridge").remote_delta(overlay(), peers(2), r, True) is None


def test_a_scoped_observation_without_the_entries_leaves_them_alone() -> None:
    """An endpoint attached into an overlay: its network's remote entries were not read
    (``table_targets``), and nothing is planned for them, even where they differ."""
    a = empty_actual("c0")
    converge(desired(REMOTES), a)
    assert P.table_targets(Scope(endpoints=frozenset({"e1"}))) == set()
    assert P.table_targets(Scope(networks=frozenset({NID}))) == {VX}
    assert P.table_targets(None) is None
    scoped = msgspec.structs.replace(a.host, complete=False, fdb={}, neigh={})
    p = P.plan(desired(REMOTES[:2], n_local=2), NodeActual(host=scoped, containers=a.containers),
               Scope(endpoints=frozenset({"e1"})))
    assert not [op for op in p.ops if isinstance(op, ENTRIES)]
    # read (the network in scope): the two remotes' entries are kept, the others deleted
    p = P.plan(desired(REMOTES[:2]), NodeActual(host=msgspec.structs.replace(a.host, complete=False),
                                                containers=a.containers), Scope(networks=frozenset({NID})))
    assert sorted(kinds(p)) == ["del_fdb"] * 4 + ["del_neigh"] * 4


def test_encrypted_overlay_needs_the_wireguard_interface() -> None:
    a = empty_actual("c0")
    d = desired(REMOTES, encrypted=True)
    p = P.plan(d, a)  # no wg0 yet: fail closed, nothing of the network is made
    assert {e.owner: e.code for e in p.errors} == {f"net:{NID}": "unavailable", "ep:e0": "unavailable"}
    assert "in clear" in p.errors[0].message
    assert [op for op in p.ops if op.owner != "host"] == []
    a.host.links["wg0"] = LinkState(index=50, name="wg0", kind="tun", mtu=1420, up=False)
    p, _ = converge(d, a)
    assert p.errors == []
    assert kinds(p)[:5] == ["set_sysctl", "add_addr", "set_link", "ensure_bridge", "add_addr"]
    vx = next(op for op in p.ops if isinstance(op, P.EnsureVxlan))
    assert (vx.dev, vx.local, vx.after) == ("wg0", "10.251.0.1", P.WG_OWNER)
    assert set(a.host.fdb[VX].values()) == {"10.251.0.2", "10.251.0.3"}  # VTEPs are the mesh addresses
    assert P.plan(d, a).ops == []


def test_overlay_teardown_full_and_scoped() -> None:
    a = empty_actual("c0")
    converge(desired(REMOTES), a)
    p, _ = converge(NodeDesired(underlay=UNDER), a, Scope(networks=frozenset({NID}), endpoints=frozenset({"e0"})))
    assert kinds(p) == ["delete_link"] * 3
    assert not any(naming.is_ours(n) for n in a.host.links)
    converge(desired(REMOTES), a)
    p, _ = converge(NodeDesired(), a)
    assert {op.ifname for op in p.ops if isinstance(op, P.DeleteLink)} == {VX, BR, naming.veth_name("e0")}
    assert not any(naming.is_ours(n) for n in a.host.links)


def test_overlay_observation_targets() -> None:
    d = desired(REMOTES, encrypted=True)
    names, containers = P.observation_targets(d, Scope(networks=frozenset({NID})))
    assert names is not None and {BR, VX, "wg0"} <= names and containers == set()
    names, _ = P.observation_targets(d, Scope(networks=frozenset({"gone"})))
    assert names is not None and naming.vxlan_name("gone") in names


@settings(max_examples=60, deadline=None)
@given(st.sets(st.sampled_from(REMOTES), max_size=6), st.sets(st.sampled_from(REMOTES), max_size=6))
def test_property_any_remote_set_to_any_other_in_one_plan(s1: set[RemoteEndpoint], s2: set[RemoteEndpoint]) -> None:
    a = empty_actual("c0")
    converge(desired(tuple(sorted(s1, key=lambda r: r.mac))), a)
    d2 = desired(tuple(sorted(s2, key=lambda r: r.mac)))
    converge(d2, a, Scope(networks=frozenset({NID})))
    assert P.plan(d2, a).ops == []
    assert a.host.fdb[VX] == {r.mac: f"10.250.0.{r.host[1]}" for r in s2}


# --------------------------------------------------------------------------- macvlan / ipvlan


def subif_actual(*containers: str) -> NodeActual:
    a = empty_actual(*containers)
    a.host.links["par0"] = LinkState(index=7, name="par0", kind="veth", mac="02:aa:00:00:00:07", mtu=1500, up=True)
    return a


def mv_net(**kw: object) -> NetDesired:
    base: dict[str, object] = {"id": "mv", "driver": DriverType.MACVLAN, "parent": "par0", "gateway4": "10.88.0.1/24"}
    base.update(kw)
    return NetDesired(**base)  # type: ignore[arg-type]


def mv_ep(i: int, net: str = "mv") -> EpDesired:
    return EpDesired(id=f"m{i}", network_id=net, netns=f"c{i}", mac=naming.local_mac(bytes([2, 7, 0, 0, 0, i])),
                     ipv4=f"10.88.0.{i + 10}/24", gw4="10.88.0.1")


def test_macvlan_endpoint_created_in_place_then_nothing() -> None:
    a = subif_actual("c0", "c1")
    d = NodeDesired(networks=[mv_net(host_shim="10.88.0.254/24")], endpoints=[mv_ep(0), mv_ep(1)])
    p, _ = converge(d, a)
    assert p.errors == []
    assert kinds(p) == (["create_subif", "add_addr"]
                        + ["create_subif", "set_sysctl", "add_addr", "set_link"] * 2 + ["add_route"] * 2)
    shim, first = [op for op in p.ops if isinstance(op, P.CreateSubIf)][:2]
    assert (shim.peer_ns, shim.ifname, shim.mode, shim.kind, shim.mac) == (None, naming.shim_name("mv"), "bridge",
                                                                           "macvlan", None)
    assert (first.peer_ns, first.ifname, first.mode, first.mac, first.parent) == ("c0", "eth0", "bridge",
                                                                                  mv_ep(0).mac, "par0")
    assert not any(isinstance(op, (P.EnsureBridge, P.CreateVeth, P.SetSysctl)) and op.ns is None for op in p.ops)
    assert P.plan(d, a).ops == []
    # the mode changes: the sub-interface is rebuilt
    d2 = NodeDesired(networks=[mv_net(host_shim="10.88.0.254/24", mode="private")], endpoints=[mv_ep(0), mv_ep(1)])
    p, _ = converge(d2, a)
    assert kinds(p).count("delete_link") == 2 and kinds(p).count("create_subif") == 2
    assert P.plan(d2, a).ops == []


def test_macvlan_departed_and_teardown_remove_only_ours() -> None:
    a = subif_actual("c0", "c1")
    d = NodeDesired(networks=[mv_net(host_shim="10.88.0.254/24")], endpoints=[mv_ep(0), mv_ep(1)])
    converge(d, a)
    gone = P.Departed(id="m1", netns="c1", ifname="eth0", kind="macvlan", mac=mv_ep(1).mac)
    wrong_mac = P.Departed(id="m9", netns="c0", ifname="eth0", kind="macvlan", mac="02:00:00:00:00:01")
    d1 = NodeDesired(networks=d.networks, endpoints=[mv_ep(0)])
    p, _ = converge(d1, a, Scope(endpoints=frozenset({"m1"})), (gone, wrong_mac))
    assert [(op.op_name(), op.ns) for op in p.ops] == [("delete_link", "c1")]
    assert set(a.containers["c1"].links) == {"lo"}
    p, _ = converge(NodeDesired(), a, None, (P.Departed(id="m0", netns="c0", ifname="eth0", kind="macvlan",
                                                        mac=mv_ep(0).mac),))
    assert sorted((op.ns or "", op.ifname) for op in p.ops if isinstance(op, P.DeleteLink)) == [
        ("", naming.shim_name("mv")), ("c0", "eth0")]
    assert "par0" in a.host.links


def test_subif_errors() -> None:
    a = subif_actual("c0")
    cases = [
        (mv_net(parent=None), "invalid_option", "parent"),
        (mv_net(parent="nope0"), "invalid_option", "nope0"),
        (mv_net(mode="fancy"), "invalid_option", "fancy"),
        (mv_net(host_shim="10.99.0.1/24"), "invalid_cidr", "10.99.0.1/24"),
        (NetDesired(id="mv", driver=DriverType.IPVLAN, parent="par0", mode="l3s"), "invalid_option", "l3s"),
        (NetDesired(id="mv", driver=DriverType.IPVLAN, parent="par0", host_shim="10.88.0.2/24"), "invalid_option",
         "shim"),
    ]
    for net, code, word in cases:
        p = P.plan(NodeDesired(networks=[net], endpoints=[mv_ep(0)]), a)
        errs = {e.owner: e for e in p.errors}
        assert errs["net:mv"].code == code and word in errs["net:mv"].message, (net, errs)
        assert errs["ep:m0"].code == code
        assert p.ops == []
    # a foreign interface in the container: conflict, untouched
    a.containers["c0"].links["eth0"] = LinkState(index=90, name="eth0", kind="veth", peer_index=91, peer_netnsid=3)
    p = P.plan(NodeDesired(networks=[mv_net()], endpoints=[mv_ep(0)]), a)
    assert [e.code for e in p.errors] == ["conflict"] and p.ops == []


@pytest.mark.parametrize("mode", ["l2", "l3"])
def test_ipvlan_plan(mode: str) -> None:
    a = subif_actual("c0", "c1")
    net = NetDesired(id="iv", driver=DriverType.IPVLAN, parent="par0", mode=mode, gateway4="10.88.0.1/24")
    d = NodeDesired(networks=[net], endpoints=[mv_ep(0, "iv"), mv_ep(1, "iv")])
    p, _ = converge(d, a)
    assert p.errors == []
    subs = [op for op in p.ops if isinstance(op, P.CreateSubIf)]
    assert [(s.kind, s.mode, s.mac, s.peer_ns) for s in subs] == [("ipvlan", mode, None, "c0"),
                                                                  ("ipvlan", mode, None, "c1")]
    assert P.plan(d, a).ops == []


# --------------------------------------------------------------------------- model, wireguard helpers


def test_node_desired_new_fields_round_trip_and_old_payloads_decode() -> None:
    d = desired(REMOTES, encrypted=True)
    raw = msgspec.json.encode(d)
    assert msgspec.json.decode(raw, type=NodeDesired) == d
    old = b'{"networks":[{"id":"n1","gateway4":"10.1.0.1/24"}],"endpoints":[]}'
    nd = msgspec.json.decode(old, type=NodeDesired)
    assert nd.underlay is None and nd.peers == [] and nd.networks[0].remotes == () and nd.networks[0].vni is None


def test_wireguard_desired_peers_and_zero_write_diff() -> None:
    ps = peers(2, 3)
    want = desired_peers(ps)
    assert want[ps[0].wg_public_key or ""] == WgPeer("10.250.0.2:51820", ("10.251.0.2/32",))
    dump = ("PRIV\tOURPUB\t51820\toff\n"
            f"{ps[0].wg_public_key}\t(none)\t10.250.0.2:51820\t10.251.0.2/32\t0\t0\t0\t25\n"
            f"{ps[1].wg_public_key}\t(none)\t10.250.0.3:51820\t10.251.0.3/32\t0\t0\t0\t25\n"
            "OLDPEER\t(none)\t(none)\t10.251.0.9/32\t0\t0\t0\toff\n")
    pub, port, have = parse_dump(dump)
    assert (pub, port, len(have)) == ("OURPUB", 51820, 3)
    args = wg_set_args("wg0", "/k", 51820, want, pub, "OURPUB", port, have)
    assert args == ["set", "wg0", "peer", "OLDPEER", "remove"]
    del have["OLDPEER"]
    assert wg_set_args("wg0", "/k", 51820, want, pub, "OURPUB", port, have) == []
    fresh = wg_set_args("wg0", "/k", 51820, want, "", "OURPUB", 0, {})
    assert fresh[:6] == ["set", "wg0", "private-key", "/k", "listen-port", "51820"]
    assert fresh.count("peer") == 2
