"""The policy engine (pure): verdicts with expected results written out, rule
validation, compiled elements, and a property: the compiled ruleset, evaluated the
way nftables evaluates it, agrees with the verdict on random topologies."""

from __future__ import annotations

import ipaddress
import itertools

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnet.core import errors as E
from vnet.core import naming
from vnet.core.model import IsolationMode
from vnet.core.policy import (
    AllowRule,
    Policy,
    PolicyEndpoint,
    PolicyNetwork,
    PortSpec,
    Published,
    Ruleset,
    Selector,
    disjoint_boxes,
    validate_rule,
)

FULL, PEER, MESH, NONE = IsolationMode.FULL, IsolationMode.PEER_ONLY, IsolationMode.MESH_ONLY, IsolationMode.NONE


def net(i: str, mode: IsolationMode, k: int, **kw: object) -> PolicyNetwork:
    return PolicyNetwork(id=i, mode=mode, cidrs=(f"10.9.{k}.0/24",), gateways=(f"10.9.{k}.1",), **kw)  # type: ignore[arg-type]


def ep(i: str, network: str, addr: str, **labels: str) -> PolicyEndpoint:
    return PolicyEndpoint(id=i, network=network, ips=(addr,), mac=naming.local_mac(i.encode().ljust(6, b"x")),
                          labels=labels, node="h1")


def world(rules: list[AllowRule] | None = None) -> Policy:
    nets = [net("f", FULL, 1, connected=("m",)), net("p", PEER, 2, connected=("m",)),
            net("m", MESH, 3, connected=("f", "p", "n"), mesh_groups=("g",)), net("n", NONE, 4, connected=("m",)),
            net("m2", MESH, 5, mesh_groups=("g",)), net("u", NONE, 6)]
    eps = [ep("f1", "f", "10.9.1.10", role="web"), ep("f2", "f", "10.9.1.11", role="db"),
           ep("p1", "p", "10.9.2.10"), ep("p2", "p", "10.9.2.11"), ep("m1", "m", "10.9.3.10"),
           ep("n1", "n", "10.9.4.10"), ep("n2", "n", "10.9.4.11"), ep("x1", "m2", "10.9.5.10"),
           ep("u1", "u", "10.9.6.10")]
    return Policy(nets, eps, rules or [])


@pytest.mark.parametrize(("src", "dst", "proto", "port", "allowed"), [
    ("f1", "f2", "tcp", 80, False),  # Full: nothing, same network included
    ("p1", "p2", "icmp", None, True),  # PeerOnly: peers
    ("p1", "m1", "tcp", 80, False),  # PeerOnly: connections ignored
    ("m1", "p1", "tcp", 80, False),  # ... in both directions
    ("n1", "n2", "udp", 53, True),
    ("m1", "n1", "tcp", 80, True),  # MeshOnly <-> None across a connection
    ("n1", "m1", "icmp", None, True),
    ("m1", "x1", "tcp", 80, True),  # mesh group
    ("n1", "x1", "tcp", 80, False),  # not transitive: n-m and m-m2 do not relate n and m2
    ("n1", "u1", "tcp", 80, False),  # two None networks without a relation: no path
    ("n1", "203.0.113.9", "tcp", 443, True),  # None: external
    ("m1", "203.0.113.9", "tcp", 443, False),
    ("p1", "203.0.113.9", "icmp", None, False),
    ("203.0.113.9", "n1", "tcp", 80, True),  # inbound reaches only None networks
    ("203.0.113.9", "m1", "tcp", 80, False),
    ("m1", "10.9.3.1", "tcp", 22, False),  # the gateway is a host address: external
    ("n1", "10.9.4.1", "tcp", 22, True),
    ("10.9.3.99", "m1", "tcp", 80, False),  # an address no endpoint owns cannot send
])
def test_modes(src: str, dst: str, proto: str, port: int | None, allowed: bool) -> None:
    assert world().verdict(src, dst, proto, port).allowed is allowed


def test_reason_chain() -> None:
    r = AllowRule(id="web-db", from_=[Selector(labels={"role": "web"})], to=[Selector(labels={"role": "db"})],
                  ports=[PortSpec(protocol="tcp", port=5432)])
    v = world([r]).verdict("f1", "f2", "tcp", 5432)
    assert (v.allowed, v.by, v.rules, v.path) == (True, "rule", ["web-db"], ["same"])
    assert v.src.mode == "full" and v.dst.endpoint == "f2"
    assert v.reasons == ["path: same (f -> f)", "network f is full: peers talk only through allow rules",
                         "allowed by rule(s) web-db"]
    v = world([r]).verdict("f2", "f1", "tcp", 5432)  # directional
    assert not v.allowed and v.by == "denied"
    v = world().verdict("m1", "p1", "tcp", 80)
    assert v.path == ["connected"] and "destination network p is peer_only" in v.reasons[2]
    v = world().verdict("n1", "u1")
    assert v.path == [] and v.reasons[0].startswith("no path")


def test_rules_ports_and_paths() -> None:
    rules = [
        AllowRule(id="range", from_=[Selector(endpoint="f1")], to=[Selector(endpoint="f2")],
                  ports=[PortSpec(protocol="tcp", port=8000, end_port=8010)]),
        AllowRule(id="proto", from_=[Selector(network="p")], to=[Selector(endpoint="m1")],
                  ports=[PortSpec(protocol="udp")]),
        AllowRule(id="all", from_=[Selector(endpoint="f2")], to=[Selector(endpoint="f1")]),
        AllowRule(id="nopath", from_=[Selector(endpoint="u1")], to=[Selector(endpoint="f1")]),
        AllowRule(id="ext", from_=[Selector(network="f")], to=[Selector(cidr="198.51.100.0/24")],
                  ports=[PortSpec(protocol="tcp", port=443)]),
        AllowRule(id="in", from_=[Selector(cidr="198.51.100.7/32")], to=[Selector(endpoint="p1")]),
    ]
    p = world(rules)
    cases = [("f1", "f2", "tcp", 8000, True), ("f1", "f2", "tcp", 8010, True), ("f1", "f2", "tcp", 8011, False),
             ("f1", "f2", "udp", 8005, False), ("p2", "m1", "udp", 9, True), ("p2", "m1", "tcp", 9, False),
             ("p2", "m1", "icmp", None, False), ("f2", "f1", "icmp", None, True), ("f2", "f1", "sctp", 1, True),
             ("u1", "f1", "tcp", 1, False), ("f1", "198.51.100.20", "tcp", 443, True),
             ("f1", "198.51.100.20", "tcp", 80, False), ("f1", "198.51.101.20", "tcp", 443, False),
             ("198.51.100.7", "p1", "icmp", None, True), ("198.51.100.8", "p1", "icmp", None, False)]
    for src, dst, proto, port, allowed in cases:
        assert p.verdict(src, dst, proto, port).allowed is allowed, (src, dst, proto, port)


def test_rule_validation_and_wire_form() -> None:
    with pytest.raises(E.VNetError) as ei:
        validate_rule(AllowRule(id="r", from_=[Selector()], to=[Selector(endpoint="a")]))
    assert ei.value.code == "invalid_request"
    with pytest.raises(E.VNetError):
        validate_rule(AllowRule(id="r", from_=[Selector(endpoint="a")], to=[Selector(cidr="10.0.0.1/24")]))
    with pytest.raises(E.VNetError):
        validate_rule(AllowRule(id="r", from_=[Selector(endpoint="a")], to=[Selector(endpoint="b")],
                                ports=[PortSpec(protocol="icmp", port=1)]))
    with pytest.raises(E.VNetError):
        validate_rule(AllowRule(id="r", from_=[Selector(endpoint="a")], to=[Selector(endpoint="b")],
                                ports=[PortSpec(protocol="tcp", port=90, end_port=80)]))
    raw = (b'{"id":"r1","from":[{"labels":{"a":"b"}}],"to":[{"cidr":"1.2.3.0/24"}],'
           b'"ports":[{"protocol":"tcp","port":1}]}')
    r = msgspec.json.decode(raw, type=AllowRule)
    assert r.from_[0].labels == {"a": "b"} and msgspec.json.decode(msgspec.json.encode(r)) == msgspec.json.decode(raw)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"id":"r1","from":[{"lables":{}}],"to":[{"endpoint":"x"}]}', type=AllowRule)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"id":"r1","from":[{"endpoint":"x"}],"to":[{"endpoint":"x"}],"ports":[]}',
                            type=AllowRule)


def test_disjoint_boxes() -> None:
    boxes = [(0, 255, 80, 90), (0, 65535, 85, 100), (10, 20, 443, 443)]
    out = disjoint_boxes(boxes)
    for a, b in itertools.combinations(out, 2):
        assert not (a[0] <= b[1] and b[0] <= a[1] and a[2] <= b[3] and b[2] <= a[3]), (a, b)
    for addr, port in itertools.product([0, 5, 10, 15, 20, 255, 256, 65535], [79, 80, 85, 90, 95, 100, 101, 443]):
        want = any(lo <= addr <= hi and plo <= port <= phi for lo, hi, plo, phi in boxes)
        got = any(lo <= addr <= hi and plo <= port <= phi for lo, hi, plo, phi in out)
        assert want == got, (addr, port)


def test_compile_layout() -> None:
    rules = [AllowRule(id="r", from_=[Selector(endpoint="f1")], to=[Selector(endpoint="f2")],
                       ports=[PortSpec(protocol="tcp", port=80), PortSpec(protocol="tcp", port=81, end_port=90)]),
             AllowRule(id="e", from_=[Selector(network="f")], to=[Selector(cidr="8.8.0.0/16"),
                                                                   Selector(cidr="8.8.8.0/24")])]
    rs = world(rules).compile("h1")
    br = naming.bridge_name
    assert (br("n"), br("n")) in rs.net_pairs and (br("m"), br("n")) in rs.net_pairs
    assert (br("f"), br("f")) not in rs.net_pairs and (br("p"), br("m")) not in rs.net_pairs
    assert (br("f"), br("f")) in rs.rel_pairs and (br("f"), br("m")) in rs.rel_pairs
    assert (br("f"), br("p")) not in rs.rel_pairs  # siblings of m are not related
    assert rs.none_bridges == sorted([br("n"), br("u")])
    sets = {x.name: x for x in rs.sets}
    ports = [(ln.chain, sets[ln.src].elements, sets[ln.dst].elements, ln.proto, ln.lo, ln.hi)
             for ln in rs.lines if ln.proto == "tcp" and ln.family == 4]
    assert sorted(ports) == [("int", ["10.9.1.10"], ["10.9.1.11"], "tcp", 80, 80),
                             ("int", ["10.9.1.10"], ["10.9.1.11"], "tcp", 81, 90)]
    out = [ln for ln in rs.lines if ln.chain == "out" and ln.family == 4]
    assert len(out) == 1 and sets[out[0].src].elements == ["10.9.1.10", "10.9.1.11"]
    assert sets[out[0].dst].elements == ["8.8.0.0/16"]  # covered cidr folded
    f1 = next(p for p in rs.ports if p.endpoint == "f1")
    assert f1.ifname == naming.veth_name("f1") and f1.full and f1.ipv4 == ("10.9.1.10",)
    assert world(rules).compile("other").ports == []
    assert rs.version() == world(rules).compile("h1").version()
    # the structure grows with the rules, never with the endpoints
    more = Policy(list(world().networks.values()),
                  [*world().endpoints.values(), ep("f3", "f", "10.9.1.12"), ep("f4", "f", "10.9.1.13")], rules)
    rs2 = more.compile("h1")
    assert rs2.lines == rs.lines and [x.name for x in rs2.sets] == [x.name for x in rs.sets]


# --------------------------------------------------------------------------- property


def _in(addr: str, spec: str) -> bool:
    a = ipaddress.ip_address(addr)
    if "-" in spec:
        lo, hi = spec.split("-")
        return ipaddress.ip_address(lo) <= a <= ipaddress.ip_address(hi)
    return a in ipaddress.ip_network(spec)


def _lines_match(rs: Ruleset, chain: str, s: str, d: str, proto: str, port: int | None) -> bool:
    sets = {x.name: x for x in rs.sets}
    for ln in rs.lines:
        if ln.chain != chain or ln.family != 4:
            continue
        if not any(_in(s, x) for x in sets[ln.src].elements) or not any(_in(d, x) for x in sets[ln.dst].elements):
            continue
        if not ln.proto or (ln.proto == proto and (not ln.lo or (port is not None and ln.lo <= port <= ln.hi))):
            return True
    return False


def simulate(rs: Ruleset, src_br: str | None, dst_br: str | None, s: str, d: str, proto: str,
             port: int | None) -> bool:
    """The inet ``forward`` path of :mod:`vnet.core.nft`, for a NEW IPv4 flow (bridge None = uplink)."""
    if src_br is not None and dst_br is not None:
        if (src_br, dst_br) in rs.net_pairs:
            return True
        return (src_br, dst_br) in rs.rel_pairs and _lines_match(rs, "int", s, d, proto, port)
    if src_br is not None:
        return src_br in rs.none_bridges or _lines_match(rs, "out", s, d, proto, port)
    assert dst_br is not None
    if dst_br in rs.none_bridges or any(a == d and p == proto and cp == port for p, _, a, cp in rs.published4):
        return True
    return _lines_match(rs, "in", s, d, proto, port)


@st.composite
def topologies(draw: st.DrawFn) -> Policy:
    n = 4
    modes = [draw(st.sampled_from([FULL, PEER, MESH, NONE])) for _ in range(n)]
    ids = [f"n{i}" for i in range(n)]
    conn: dict[str, set[str]] = {i: set() for i in ids}
    mesh: dict[str, list[str]] = {i: [] for i in ids}
    parent: dict[str, str | None] = {i: None for i in ids}
    for a, b in itertools.combinations(ids, 2):
        k = draw(st.sampled_from(["", "", "c", "m", "p"]))
        if k == "c":
            conn[a].add(b)
            conn[b].add(a)
        elif k == "m":
            mesh[a].append(f"{a}{b}")
            mesh[b].append(f"{a}{b}")
        elif k == "p" and parent[b] is None:
            parent[b] = a
    nets = [PolicyNetwork(id=i, mode=modes[k], cidrs=(f"10.7.{k}.0/24",), gateways=(f"10.7.{k}.1",),
                          connected=tuple(sorted(conn[i])), mesh_groups=tuple(mesh[i]), parent=parent[i],
                          children=tuple(c for c in ids if parent[c] == i)) for k, i in enumerate(ids)]
    eps = [ep(f"e{j}", ids[j % n], f"10.7.{j % n}.{10 + j}", tier=draw(st.sampled_from(["a", "b"])))
           for j in range(6)]
    rules: list[AllowRule] = []
    for r in range(draw(st.integers(0, 4))):
        def sel() -> Selector:
            k = draw(st.sampled_from(["ep", "net", "lab", "cidr", "both"]))
            if k == "ep":
                return Selector(endpoint=f"e{draw(st.integers(0, 5))}")
            if k == "net":
                return Selector(network=draw(st.sampled_from(ids)))
            if k == "lab":
                return Selector(labels={"tier": draw(st.sampled_from(["a", "b"]))})
            if k == "cidr":
                return Selector(cidr=draw(st.sampled_from(["10.7.0.0/16", "10.7.1.0/24", "192.0.2.0/24",
                                                           "192.0.2.5/32"])))
            return Selector(network=draw(st.sampled_from(ids)), labels={"tier": "a"})
        ports = draw(st.sampled_from([None, [PortSpec(protocol="tcp", port=80)], [PortSpec(protocol="udp")],
                                      [PortSpec(protocol="tcp", port=70, end_port=90),
                                       PortSpec(protocol="tcp", port=85, end_port=443)],
                                      [PortSpec(protocol="icmp")]]))
        rules.append(AllowRule(id=f"r{r}", from_=[sel(), sel()][: draw(st.integers(1, 2))], to=[sel()],
                               ports=ports))
    return Policy(nets, eps, rules)


@settings(max_examples=200, deadline=None)
@given(p=topologies())
def test_compiled_ruleset_agrees_with_verdict(p: Policy) -> None:
    rs = p.compile("h1")
    br = {e.id: p.networks[e.network].bridge_name() for e in p.endpoints.values()}
    addr = {e.id: e.ips[0] for e in p.endpoints.values()}
    flows = [("tcp", 80), ("tcp", 443), ("udp", 53), ("icmp", None)]
    for a, b in itertools.permutations(sorted(p.endpoints), 2):
        for proto, port in flows:
            want = p.verdict(a, b, proto, port).allowed
            got = simulate(rs, br[a], br[b], addr[a], addr[b], proto, port)
            assert got == want, (a, b, proto, port, p.verdict(a, b, proto, port).reasons)
    for a in sorted(p.endpoints):
        for ext in ("192.0.2.5", "198.51.100.1"):
            for proto, port in flows:
                assert simulate(rs, br[a], None, addr[a], ext, proto, port) == p.verdict(a, ext, proto, port).allowed
                assert simulate(rs, None, br[a], ext, addr[a], proto, port) == p.verdict(ext, a, proto, port).allowed


def test_published_ports() -> None:
    nets = [PolicyNetwork(id="f", mode=FULL, cidrs=("10.9.1.0/24",)),
            PolicyNetwork(id="n", mode=NONE, cidrs=("10.9.4.0/24",))]
    pub = (Published(protocol="tcp", host_port=8080, port=80),)
    eps = [PolicyEndpoint(id="a", network="f", ips=("10.9.1.10",), mac="02:00:00:00:00:0a", node="h", published=pub),
           PolicyEndpoint(id="b", network="f", ips=("10.9.1.11",), mac="02:00:00:00:00:0b", node="h",
                          published=pub),  # the same host port: the first endpoint by id keeps it
           PolicyEndpoint(id="c", network="n", ips=("10.9.4.10",), mac="02:00:00:00:00:0c", node="h",
                          published=(Published(protocol="udp", host_port=53, port=5353),))]
    p = Policy(nets, eps)
    v = p.verdict("198.51.100.1", "a", "tcp", 80)
    assert v.allowed and "published on the host as port 8080" in v.reasons[-1]
    assert not p.verdict("198.51.100.1", "a", "tcp", 81).allowed
    assert not p.verdict("198.51.100.1", "a", "udp", 80).allowed
    rs = p.compile("h")
    assert rs.published4 == [("tcp", 8080, "10.9.1.10", 80), ("udp", 53, "10.9.4.10", 5353)]
    br = p.networks["f"].bridge_name()
    assert simulate(rs, None, br, "198.51.100.1", "10.9.1.10", "tcp", 80)
    assert not simulate(rs, None, br, "198.51.100.1", "10.9.1.10", "tcp", 8080)
    assert not p.verdict("198.51.100.1", "b", "tcp", 80).allowed  # b lost host port 8080 to a
