"""A node's ruleset compiled from the endpoints the policy service now reads for it (the node's
own and those of the networks in play on it, :func:`vnet.core.policy.networks_in_play`) is the
ruleset compiled from every endpoint of the cluster: the same reply, byte for byte (version,
ruleset, macvlan part, rendered script).

Random topologies: networks of every mode with connected (both sides or one), mesh and
parent/child relations, dual-stack or not, bridge/macvlan/host/overlay drivers; endpoints on
several nodes with labels, published ports (host ports that collide on a node), endpoints of
a network that is gone; allow rules over endpoint ids, networks, labels and CIDRs.
"""

from __future__ import annotations

import itertools

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from vnet.contracts.endpoint import EndpointInfo, PortMapping
from vnet.contracts.policy import policy_endpoint
from vnet.core.model import DriverType, IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyNetwork, PortSpec, Selector, networks_in_play
from vnet.svc.policy.service import compiled_ruleset

NODES = ["h1", "h2", "h3", "h4"]
DRIVERS = [DriverType.BRIDGE, DriverType.BRIDGE, DriverType.MACVLAN, DriverType.HOST, DriverType.OVERLAY]
PUBLISHED = [PortMapping(protocol="tcp", host_port=8080, container_port=80),
             PortMapping(protocol="tcp", host_port=8443, container_port=443),
             PortMapping(protocol="udp", host_port=5353, container_port=53)]


class World(msgspec.Struct):
    nets: list[PolicyNetwork]
    eps: list[EndpointInfo]
    rules: list[AllowRule]
    node: str


def _ep(j: int, net: str, k: int, node: str, driver: DriverType, v6: bool, tier: str,
        ports: list[PortMapping]) -> EndpointInfo:
    return EndpointInfo(id=f"e{j:02d}", container_id=f"c{j}", network_id=net, ip_address=f"10.8.{k}.{10 + j}",
                        ipv6_address=f"fd00:8:{k}::{10 + j:x}" if v6 else None,
                        mac_address=f"02:00:00:08:{k:02x}:{j:02x}", interface_name="eth0", node=node,
                        labels={"tier": tier}, driver=driver, ports=ports)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    n = draw(st.integers(2, 7))
    ids = [f"n{i}" for i in range(n)]
    modes = [draw(st.sampled_from(list(IsolationMode))) for _ in ids]
    v6 = [draw(st.booleans()) for _ in ids]
    driver = [draw(st.sampled_from(DRIVERS)) for _ in ids]
    conn: dict[str, set[str]] = {i: set() for i in ids}
    mesh: dict[str, list[str]] = {i: [] for i in ids}
    parent: dict[str, str | None] = {i: None for i in ids}
    for a, b in itertools.combinations(ids, 2):
        how = draw(st.sampled_from(["", "", "", "c", "c1", "m", "p"]))
        if how == "c":
            conn[a].add(b)
            conn[b].add(a)
        elif how == "c1":  # recorded on one side only: still a relation
            conn[a].add(b)
        elif how == "m":
            g = draw(st.sampled_from(["g1", "g2", f"{a}{b}"]))
            mesh[a] = sorted({*mesh[a], g})
            mesh[b] = sorted({*mesh[b], g})
        elif how == "p" and parent[b] is None:
            parent[b] = a
    nets = [PolicyNetwork(id=i, mode=modes[k], cidrs=(f"10.8.{k}.0/24",) + ((f"fd00:8:{k}::/64",) if v6[k] else ()),
                          gateways=(f"10.8.{k}.1",), connected=tuple(sorted(conn[i])), mesh_groups=tuple(mesh[i]),
                          parent=parent[i], children=tuple(c for c in ids if parent[c] == i))
            for k, i in enumerate(ids)]
    eps = []
    for j in range(draw(st.integers(0, 14))):
        k = draw(st.integers(0, n))  # n: a network that is gone (deleted while its endpoint stays)
        net = ids[k] if k < n else "gone"
        drv = driver[k] if k < n else DriverType.BRIDGE
        pub = draw(st.lists(st.sampled_from(PUBLISHED), max_size=2, unique=True))
        eps.append(_ep(j, net, k, draw(st.sampled_from(NODES)), drv, k < n and v6[k] and draw(st.booleans()),
                       draw(st.sampled_from(["a", "b"])), pub))
    rules: list[AllowRule] = []
    for r in range(draw(st.integers(0, 4))):
        def sel() -> Selector:
            kind = draw(st.sampled_from(["ep", "net", "lab", "cidr", "net+lab", "cidr+lab", "cidr6"]))
            if kind == "ep":
                return Selector(endpoint=f"e{draw(st.integers(0, 13)):02d}")
            if kind == "net":
                return Selector(network=draw(st.sampled_from(ids)))
            if kind == "lab":
                return Selector(labels={"tier": draw(st.sampled_from(["a", "b"]))})
            if kind == "cidr":
                return Selector(cidr=draw(st.sampled_from(["10.8.0.0/16", "10.8.1.0/24", "192.0.2.0/24"])))
            if kind == "cidr6":
                return Selector(cidr=draw(st.sampled_from(["fd00:8::/32", "2001:db8::/64"])))
            if kind == "cidr+lab":
                return Selector(cidr="10.8.0.0/16", labels={"tier": "a"})
            return Selector(network=draw(st.sampled_from(ids)), labels={"tier": "b"})
        ports = draw(st.sampled_from([None, [PortSpec(protocol="tcp", port=80)], [PortSpec(protocol="udp")],
                                      [PortSpec(protocol="tcp", port=70, end_port=90)], [PortSpec(protocol="icmp")]]))
        rules.append(AllowRule(id=f"r{r}", from_=[sel(), sel()][:draw(st.integers(1, 2))],
                               to=[sel(), sel()][:draw(st.integers(1, 2))], ports=ports))
    return World(nets=nets, eps=eps, rules=rules, node=draw(st.sampled_from([*NODES, "h9"])))


def reduced(nets: list[PolicyNetwork], eps: list[EndpointInfo], node: str) -> list[EndpointInfo]:
    """What the policy service reads for ``node``'s ruleset: the node's endpoints (a listing by
    node), then every endpoint of each network in play (a listing per network), by id."""
    mine = [e for e in eps if e.node == node]
    in_play = networks_in_play({n.id: n for n in nets}, (e.network_id for e in mine))
    byid = {e.id: e for e in mine} | {e.id: e for e in eps if e.network_id in in_play}
    return [byid[k] for k in sorted(byid)]


def _same_reply(w: World) -> tuple[int, int]:
    part = reduced(w.nets, w.eps, w.node)
    full_pol = Policy(w.nets, [policy_endpoint(e) for e in w.eps], w.rules)
    part_pol = Policy(w.nets, [policy_endpoint(e) for e in part], w.rules)
    for structured in (True, False):
        want = compiled_ruleset(full_pol, w.eps, w.node, structured=structured)
        got = compiled_ruleset(part_pol, part, w.node, structured=structured)
        assert msgspec.json.encode(got) == msgspec.json.encode(want), (w.node, structured)
        assert got == want
    return len(part), len(w.eps)


@settings(max_examples=400, deadline=None)
@given(w=worlds())
def test_a_nodes_ruleset_from_its_networks_in_play_equals_the_one_from_every_endpoint(w: World) -> None:
    _same_reply(w)


def test_compile_keeps_the_networks_in_play_and_the_reduction_leaves_the_rest_out() -> None:
    """One fixed case, so the property above is not vacuous: a macvlan network, a label rule,
    a CIDR rule and published ports, and most of the cluster out of play for h1."""
    nets = [PolicyNetwork(id="a", mode=IsolationMode.FULL, cidrs=("10.8.0.0/24",), connected=("b",)),
            PolicyNetwork(id="b", mode=IsolationMode.MESH_ONLY, cidrs=("10.8.1.0/24",), mesh_groups=("g",)),
            PolicyNetwork(id="c", mode=IsolationMode.MESH_ONLY, cidrs=("10.8.2.0/24",), mesh_groups=("g",)),
            PolicyNetwork(id="d", mode=IsolationMode.NONE, cidrs=("10.8.3.0/24",), children=("e",)),
            PolicyNetwork(id="e", mode=IsolationMode.PEER_ONLY, cidrs=("10.8.4.0/24",), parent="d")]
    eps = [_ep(0, "a", 0, "h1", DriverType.MACVLAN, False, "a", [PUBLISHED[0]]),
           _ep(1, "a", 0, "h2", DriverType.MACVLAN, False, "a", [PUBLISHED[0]]),
           _ep(2, "b", 1, "h2", DriverType.BRIDGE, False, "a", []),
           _ep(3, "c", 2, "h3", DriverType.BRIDGE, False, "a", []),  # related to b, not to a: out
           _ep(4, "d", 3, "h3", DriverType.BRIDGE, False, "a", []),
           _ep(5, "e", 4, "h4", DriverType.BRIDGE, False, "a", [PUBLISHED[0]]),
           _ep(6, "gone", 9, "h1", DriverType.BRIDGE, False, "a", [PUBLISHED[1]])]
    rules = [AllowRule(id="lab", from_=[Selector(labels={"tier": "a"})], to=[Selector(labels={"tier": "a"})]),
             AllowRule(id="cidr", from_=[Selector(cidr="10.8.0.0/16")], to=[Selector(cidr="192.0.2.0/24")])]
    pnets = {n.id: n for n in nets}
    assert networks_in_play(pnets, ["a", "gone"]) == {"a", "b"}
    assert networks_in_play(pnets, ["e"]) == {"d", "e"} and networks_in_play(pnets, []) == set()
    w = World(nets=nets, eps=eps, rules=rules, node="h1")
    assert [e.id for e in reduced(nets, eps, "h1")] == ["e00", "e01", "e02", "e06"]
    assert _same_reply(w) == (4, 7)
    got = compiled_ruleset(Policy(nets, [policy_endpoint(e) for e in eps], rules), eps, "h1", structured=True)
    assert got.ruleset is not None and got.macvlan is not None
    assert {x for s in got.ruleset.sets if s.selectors for x in s.elements} == {"10.8.0.10", "10.8.0.11", "10.8.1.12"}
    assert sorted(m.endpoint for m in got.macvlan.members) == ["e00", "e01", "e02"]
    for node in ("h2", "h3", "h4", "h9"):
        _same_reply(World(nets=nets, eps=eps, rules=rules, node=node))
