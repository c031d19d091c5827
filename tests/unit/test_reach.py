"""Reachability diffs and the exposure audit (vnet.core.reach): expected diffs written out,
and properties over random small topologies: the diff equals the difference of the
explain matrices (every party pair, every protocol, ports around every bound) before and
after the change, and the bounded scope misses nothing a full matrix would show."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vnet.core import naming, reach
from vnet.core.model import IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyEndpoint, PolicyNetwork, PortSpec, Published, Selector

FULL, PEER, MESH, NONE = IsolationMode.FULL, IsolationMode.PEER_ONLY, IsolationMode.MESH_ONLY, IsolationMode.NONE


def net(i: str, mode: IsolationMode, k: int, **kw: object) -> PolicyNetwork:
    return PolicyNetwork(id=i, mode=mode, cidrs=(f"10.9.{k}.0/24",), gateways=(f"10.9.{k}.1",), **kw)  # type: ignore[arg-type]


def ep(i: str, network: str, addr: str, published: tuple[Published, ...] = (), **labels: str) -> PolicyEndpoint:
    return PolicyEndpoint(id=i, network=network, ips=(addr,), mac=naming.local_mac(i.encode().ljust(6, b"x")),
                          labels=labels, node="h1", published=published)


def two_peer_nets(rules: list[AllowRule] | None = None, mode_b: IsolationMode = PEER) -> Policy:
    nets = [net("a", PEER, 1), net("b", mode_b, 2)]
    eps = [ep("a1", "a", "10.9.1.10", role="web"), ep("a2", "a", "10.9.1.11", role="web"),
           ep("b1", "b", "10.9.2.10", role="db"), ep("b2", "b", "10.9.2.11", role="db")]
    return Policy(nets, eps, rules or [])


WEB_DB = AllowRule(id="web-db", from_=[Selector(labels={"role": "web"})], to=[Selector(labels={"role": "db"})],
                   ports=[PortSpec(protocol="tcp", port=5432)])


def test_rule_without_a_path_opens_nothing() -> None:
    before = two_peer_nets()
    d = reach.diff(before, reach.with_rule(before, WEB_DB))
    assert (d.opens, d.closes, d.opened, d.closed) == (0, 0, [], [])  # rules never create a path


def test_connect_then_rule_opens_one_group() -> None:
    base = two_peer_nets()
    a, b = reach.connection_changed(base.networks["a"], base.networks["b"], True)
    connected = reach.with_networks(base, [a, b])
    d = reach.diff(connected, reach.with_rule(connected, WEB_DB))
    assert d.opens == 4 and d.closes == 0  # 2 web x 2 db, one port
    assert [(g.src, g.dst, g.ports, g.paths) for g in d.opened] == [("a", "b", "tcp/5432", 4)]
    assert d.opened[0].sample[0] == "a1 -> b1"
    assert d.summary() == "opens 4 paths, closes 0"
    back = reach.diff(reach.with_rule(connected, WEB_DB), connected)
    assert (back.opens, back.closes) == (0, 4)


def test_port_range_split_and_merged() -> None:
    base = two_peer_nets()
    a, b = reach.connection_changed(base.networks["a"], base.networks["b"], True)
    pol = reach.with_networks(base, [a, b])
    wide = AllowRule(id="r", from_=[Selector(endpoint="a1")], to=[Selector(endpoint="b1")],
                     ports=[PortSpec(protocol="tcp", port=1000, end_port=2000), PortSpec(protocol="udp")])
    narrow = AllowRule(id="r", from_=[Selector(endpoint="a1")], to=[Selector(endpoint="b1")],
                       ports=[PortSpec(protocol="tcp", port=1500)])
    d = reach.diff(reach.with_rule(pol, wide), reach.with_rule(pol, narrow))
    assert d.opens == 0
    assert sorted(g.ports for g in d.closed) == ["tcp/1000-1499", "tcp/1501-2000", "udp"]


def test_isolation_to_none_opens_every_protocol_and_external() -> None:
    before = two_peer_nets()
    b_none = reach.isolation_changed(before.networks["b"], NONE)
    d = reach.diff(before, reach.with_networks(before, [b_none]))
    got = {(g.src, g.dst, g.ports): g.paths for g in d.opened}
    # b's endpoints toward and from the outside, every protocol; nothing toward a (no path)
    assert got == {("b", "external", "any"): 2, ("external", "b", "any"): 2}
    assert d.closes == 0


def test_full_mode_closes_peers() -> None:
    before = two_peer_nets()
    d = reach.diff(before, reach.with_networks(before, [reach.isolation_changed(before.networks["a"], FULL)]))
    assert [(g.src, g.dst, g.ports, g.paths) for g in d.closed] == [("a", "a", "any", 2)]


def test_mesh_membership() -> None:
    base = Policy([net("a", MESH, 1), net("b", MESH, 2), net("c", PEER, 3)],
                  [ep("a1", "a", "10.9.1.10"), ep("b1", "b", "10.9.2.10"), ep("c1", "c", "10.9.3.10")])
    after = reach.with_networks(base, [reach.mesh_changed(base.networks[n], "g", True) for n in ("a", "b", "c")])
    d = reach.diff(base, after)
    # c is peer_only: in the group but keeps to itself
    assert {(g.src, g.dst, g.ports) for g in d.opened} == {("a", "b", "any"), ("b", "a", "any")}
    undo = reach.diff(after, base)
    assert (undo.opens, undo.closes) == (0, 2)


def test_cidr_rule_from_outside() -> None:
    base = two_peer_nets()
    r = AllowRule(id="ops", from_=[Selector(cidr="198.51.100.0/24")], to=[Selector(network="b")],
                  ports=[PortSpec(protocol="tcp", port=22)])
    d = reach.diff(base, reach.with_rule(base, r))
    assert [(g.src, g.dst, g.ports, g.paths) for g in d.opened] == [("external:198.51.100.0/24", "b", "tcp/22", 2)]


def test_external_parties_avoid_networks_and_nested_cidrs() -> None:
    pol = Policy([PolicyNetwork(id="x", mode=NONE, cidrs=("192.0.2.0/24",))], [],
                 [AllowRule(id="r", from_=[Selector(cidr="10.0.0.0/8")], to=[Selector(network="x")]),
                  AllowRule(id="s", from_=[Selector(cidr="10.1.0.0/16")], to=[Selector(network="x")])])
    ext = reach.external_parties(pol)
    assert "192.0.2.1" not in ext and ext["198.51.100.1"] == "external"
    inner = [a for a, lbl in ext.items() if lbl == "external:10.1.0.0/16"]
    outer = [a for a, lbl in ext.items() if lbl == "external:10.0.0.0/8"]
    assert inner and outer and not outer[0].startswith("10.1.")


def test_exposure_sorted_by_breadth() -> None:
    nets = [net("a", PEER, 1), net("n", NONE, 2)]
    eps = [ep("a1", "a", "10.9.1.10", published=(Published(protocol="tcp", host_port=8080, port=80),)),
           ep("a2", "a", "10.9.1.11"), ep("n1", "n", "10.9.2.10"), ep("n2", "n", "10.9.2.11")]
    rules = [AllowRule(id="ops", from_=[Selector(cidr="198.51.100.7/32")], to=[Selector(network="a")],
                     ports=[PortSpec(protocol="tcp", port=22)]),
             AllowRule(id="world", from_=[Selector(cidr="0.0.0.0/0")], to=[Selector(endpoint="a2")])]
    got = reach.exposure(Policy(nets, eps, rules))
    assert [(x.kind, x.ident, x.endpoints) for x in got] == [
        ("network", "n", ["n1", "n2"]), ("published", "a1", ["a1"]), ("rule", "world", ["a2"]),
        ("rule", "ops", ["a1", "a2"])]
    assert got[1].ports == "tcp/8080->80" and got[3].sources == ["198.51.100.7/32"]


def test_exposure_rule_to_unrelated_endpoint_still_checked_by_engine() -> None:
    # an inbound rule toward a full network: allowed by the rule (rules are additive)
    pol = Policy([net("f", FULL, 1)], [ep("f1", "f", "10.9.1.10")],
                 [AllowRule(id="in", from_=[Selector(cidr="203.0.113.0/24")], to=[Selector(network="f")],
                            ports=[PortSpec(protocol="udp", port=53)])])
    assert [(x.ident, x.endpoints) for x in reach.exposure(pol)] == [("in", ["f1"])]


# ----------------------------------------------------------------------------- properties

MODES = [FULL, PEER, MESH, NONE]
LABELS = ["web", "db"]


@st.composite
def topologies(draw: st.DrawFn) -> Policy:
    n = draw(st.integers(2, 4))
    nets: list[PolicyNetwork] = []
    for i in range(n):
        nets.append(net(f"n{i}", draw(st.sampled_from(MODES)), i + 1))
    # relations: connections and one mesh group, drawn symmetric as the network service stores them
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    conns = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=len(pairs)))
    mesh = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    out = []
    for i, x in enumerate(nets):
        cs = tuple(sorted({f"n{b}" for a, b in conns if a == i} | {f"n{a}" for a, b in conns if b == i}))
        out.append(PolicyNetwork(id=x.id, mode=x.mode, cidrs=x.cidrs, gateways=x.gateways, connected=cs,
                                 mesh_groups=("g",) if i in mesh else ()))
    eps: list[PolicyEndpoint] = []
    for i in range(n):
        for k in range(draw(st.integers(0, 2))):
            pub: tuple[Published, ...] = ()
            if draw(st.booleans()) and k == 0:
                pub = (Published(protocol="tcp", host_port=8000 + i, port=80),)
            eps.append(ep(f"e{i}{k}", f"n{i}", f"10.9.{i + 1}.{10 + k}", pub, role=draw(st.sampled_from(LABELS))))
    rules = draw(st.lists(rule_st(n), max_size=2, unique_by=lambda r: r.id))
    return Policy(out, eps, rules)


def sel_st(n: int) -> st.SearchStrategy[Selector]:
    return st.one_of(
        st.builds(lambda i: Selector(network=f"n{i}"), st.integers(0, n - 1)),
        st.builds(lambda v: Selector(labels={"role": v}), st.sampled_from(LABELS)),
        st.sampled_from([Selector(cidr="198.51.100.0/24"), Selector(cidr="0.0.0.0/0"), Selector(cidr="10.9.1.0/25")]),
    )


def ports_st() -> st.SearchStrategy[list[PortSpec] | None]:
    spec = st.one_of(
        st.builds(lambda p: PortSpec(protocol="tcp", port=p), st.sampled_from([22, 80, 443])),
        st.builds(lambda p, w: PortSpec(protocol="tcp", port=p, end_port=p + w), st.sampled_from([70, 80]),
                  st.integers(0, 20)),
        st.sampled_from([PortSpec(protocol="udp"), PortSpec(protocol="icmp"), PortSpec(protocol="udp", port=53)]),
    )
    return st.one_of(st.none(), st.lists(spec, min_size=1, max_size=2))


def rule_st(n: int) -> st.SearchStrategy[AllowRule]:
    return st.builds(lambda i, f, t, p: AllowRule(id=f"r{i}", from_=f, to=t, ports=p), st.integers(0, 2),
                     st.lists(sel_st(n), min_size=1, max_size=2), st.lists(sel_st(n), min_size=1, max_size=2),
                     ports_st())


@st.composite
def changes(draw: st.DrawFn, pol: Policy) -> Policy:
    ids = sorted(pol.networks)
    kind = draw(st.sampled_from(["rule_put", "rule_delete", "isolation", "connect", "disconnect", "mesh"]))
    if kind == "rule_put":
        return reach.with_rule(pol, draw(rule_st(len(ids))))
    if kind == "rule_delete":
        return reach.with_rule(pol, None, delete=draw(st.sampled_from(["r0", "r1", "r2"])))
    if kind == "isolation":
        n = pol.networks[draw(st.sampled_from(ids))]
        return reach.with_networks(pol, [reach.isolation_changed(n, draw(st.sampled_from(MODES)))])
    if kind in ("connect", "disconnect"):
        a, b = draw(st.lists(st.sampled_from(ids), min_size=2, max_size=2, unique=True))
        return reach.with_networks(pol, list(reach.connection_changed(pol.networks[a], pol.networks[b],
                                                                      kind == "connect")))
    n = pol.networks[draw(st.sampled_from(ids))]
    return reach.with_networks(pol, [reach.mesh_changed(n, "g", draw(st.booleans()))])


def all_parties(before: Policy, after: Policy) -> list[str]:
    return sorted(before.endpoints) + sorted(reach.external_parties(before, after))


def probe_ports(before: Policy, after: Policy) -> list[int]:
    """Every rule bound, one either side, published ports, and the extremes."""
    out = {1, 2, 65534, 65535, 80, 81, 8080}
    for pol in (before, after):
        for r in pol.rules:
            for p in r.ports or []:
                if p.port is not None:
                    hi = p.end_port or p.port
                    out |= {p.port - 1, p.port, p.port + 1, hi - 1, hi, hi + 1}
    return sorted(x for x in out if 1 <= x <= 65535)


def covered(paths: list[reach.Path], s: str, d: str, proto: str, port: int | None) -> bool | None:
    """True: opened, False: closed, None: unchanged, per the diff."""
    for p in paths:
        if p.src != s or p.dst != d:
            continue
        if p.protocol == "any" or (p.protocol == proto and (proto == "icmp" or p.lo <= (port or 0) <= p.hi)):
            return p.opened
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_diff_equals_difference_of_explain_matrices(data: st.DataObject) -> None:
    before = data.draw(topologies())
    after = data.draw(changes(before))
    found = reach.paths(before, after)
    ports = probe_ports(before, after)
    for s, d in itertools.permutations(all_parties(before, after), 2):
        if s not in before.endpoints and d not in before.endpoints:
            continue
        for proto in ("tcp", "udp", "sctp", "icmp"):
            for port in (ports if proto != "icmp" else [None]):
                vb = before.verdict(s, d, proto, port).allowed
                va = after.verdict(s, d, proto, port).allowed
                want = None if vb == va else va
                assert covered(found, s, d, proto, port) == want, (s, d, proto, port, vb, va)
    # the grouped diff counts exactly these paths
    g = reach.diff(before, after)
    assert g.opens == sum(p.opened for p in found) and g.closes == sum(not p.opened for p in found)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bounded_scope_misses_nothing(data: st.DataObject) -> None:
    before = data.draw(topologies())
    after = data.draw(changes(before))
    every = [(s, d) for s, d in itertools.permutations(all_parties(before, after), 2)]
    assert reach.paths(before, after) == reach.paths(before, after, every)
