"""The macvlan tables (vnet.core.mvpolicy) agree with the engine's verdicts (pure, no kernel).

Every endpoint of a random topology is a macvlan endpoint of host ``h1``; a NEW flow is
simulated the way the chains of :func:`mvpolicy.render_inet` decide it — the source's
``to_net`` (egress) and the destination's ``from_net`` (ingress), external parties and
addresses of our networks that no endpoint owns having no table — and compared with
:meth:`Policy.verdict`. The kernel tests (tests/netns/test_macvlan_isolation.py) check the
same with packets on fewer topologies.
"""

from __future__ import annotations

import itertools

import msgspec
from hypothesis import given, settings

from tests.unit.test_policy import _in, _lines_match, ep, topologies
from vnet.core import mvpolicy as mvp
from vnet.core.model import IsolationMode
from vnet.core.policy import Policy, PolicyNetwork, Ruleset

FLOWS: list[tuple[str, int | None]] = [("tcp", 80), ("tcp", 443), ("udp", 53), ("icmp", None)]


class Tables:
    def __init__(self, p: Policy) -> None:
        self.p = p
        self.rs = p.compile("h1")
        self.mv = mvp.compile_macvlan(p, "h1", p.networks)
        self.sets: dict[str, dict[str, list[str]]] = {}
        for e in p.endpoints.values():
            loc = mvp.MvLocal(e.id, e.network, "ns", "eth0", e.mac, e.ips)
            self.sets[e.id] = {d.name: [x.replace('"', "") for x in d.elements]
                               for d in mvp.decls(self.mv, self.rs, loc)}

    @staticmethod
    def has(elems: list[str], a: str) -> bool:
        return any(_in(a, x) for x in elems)

    def egress(self, e: str, s: str, d: str, proto: str, port: int | None) -> bool:
        t = self.sets[e]
        if self.has(t["owngw4"], d) and proto in ("tcp", "udp") and port == 53:
            return True
        if self.has(t["reach4"], d):
            return True
        if not self.has(t["gw4"], d) and self.has(t["nets4"], d):  # to_endpoints
            return self.has(t["relp4"], d) and _lines_match(self.rs, "int", s, d, proto, port)
        return bool(t["none_if"]) or _lines_match(self.rs, "out", s, d, proto, port)  # to_external

    def ingress(self, e: str, s: str, d: str, proto: str, port: int | None) -> bool:
        t = self.sets[e]
        if self.has(t["peer4"], s) or self.has(t["gw4"], s):
            return True
        if self.has(t["nets4"], s):  # from_endpoints
            return self.has(t["relp4"], s) and _lines_match(self.rs, "int", s, d, proto, port)
        return bool(t["none_if"]) or _lines_match(self.rs, "in", s, d, proto, port)

    def flow(self, src: str, dst: str, proto: str, port: int | None) -> bool:
        """``src``/``dst``: endpoint ids or addresses (with no table)."""
        es, ed = self.p.endpoints.get(src), self.p.endpoints.get(dst)
        s = es.ips[0] if es is not None else src
        d = ed.ips[0] if ed is not None else dst
        ok = True
        if es is not None:
            ok = ok and self.egress(es.id, s, d, proto, port)
        if ed is not None:
            ok = ok and self.ingress(ed.id, s, d, proto, port)
        return ok


def check(p: Policy) -> None:
    t = Tables(p)
    others = ["192.0.2.5", "198.51.100.1"]  # external (one inside a rule CIDR of the strategy)
    others += [g for n in p.networks.values() for g in n.gateways]  # host addresses
    others += [f"10.7.{k}.250" for k in range(4)]  # addresses of our networks that nobody owns
    for a, b in itertools.permutations(sorted(p.endpoints), 2):
        for proto, port in FLOWS:
            want = p.verdict(a, b, proto, port).allowed
            assert t.flow(a, b, proto, port) == want, (a, b, proto, port, p.verdict(a, b, proto, port).reasons)
    for a in sorted(p.endpoints):
        for o in others:
            for proto, port in FLOWS:
                v = p.verdict(a, o, proto, port)
                assert t.flow(a, o, proto, port) == v.allowed, (a, o, proto, port, v.reasons)
                v = p.verdict(o, a, proto, port)
                assert t.flow(o, a, proto, port) == v.allowed, (o, a, proto, port, v.reasons)


@settings(max_examples=100, deadline=None)
@given(p=topologies())
def test_macvlan_tables_agree_with_verdict(p: Policy) -> None:
    check(p)


@settings(max_examples=50, deadline=None)
@given(p=topologies())
def test_carved_child_subnet(p: Policy) -> None:
    """A child's subnet inside its parent's: each address belongs to its most specific network."""
    nets = dict(p.networks)
    n0, n3 = nets["n0"], nets["n3"]
    nets["n3"] = msgspec.structs.replace(n3, cidrs=("10.7.0.128/25",), gateways=("10.7.0.129",), parent="n0")
    nets["n0"] = msgspec.structs.replace(n0, children=tuple(sorted({*n0.children, "n3"})))
    for k, n in list(nets.items()):
        if k not in ("n0", "n3") and n.parent == "n3":
            nets[k] = msgspec.structs.replace(n, parent=None)
    nets["n3"] = msgspec.structs.replace(nets["n3"], children=())
    eps = [msgspec.structs.replace(e, ips=(e.ips[0].replace("10.7.3.", "10.7.0.2"),)) if e.network == "n3" else e
           for e in p.endpoints.values()]
    check(Policy(list(nets.values()), eps, p.rules))


def test_members_follow_attaches_like_a_fresh_compile() -> None:
    nets = [PolicyNetwork(id="a", mode=IsolationMode.PEER_ONLY, cidrs=("10.7.0.0/24",), gateways=("10.7.0.1",)),
            PolicyNetwork(id="b", mode=IsolationMode.MESH_ONLY, cidrs=("10.7.1.0/24",), gateways=("10.7.1.1",)),
            PolicyNetwork(id="z", mode=IsolationMode.NONE, cidrs=("10.7.9.0/24",))]
    e1, e2, e3, e4 = (ep("e1", "a", "10.7.0.10"), ep("e2", "a", "10.7.0.11"), ep("e3", "b", "10.7.1.10"),
                      ep("e4", "z", "10.7.9.10"))
    mv = mvp.compile_macvlan(Policy(nets, [e1]), "h1", {"a"})
    assert mv is not None and [m.endpoint for m in mv.members] == ["e1"]
    mv2 = mv.with_endpoint(e2).with_endpoint(e3).with_endpoint(e4)  # e3: not related to a; e4 neither
    assert mv2.members == mvp.compile_macvlan(Policy(nets, [e1, e2, e3, e4]), "h1", {"a"}).members  # type: ignore[union-attr]
    assert [m.endpoint for m in mv2.members] == ["e1", "e2"]
    assert mv2.without_endpoint(e2).members == mv.members
    assert mv2.with_endpoint(e2) is mv2  # idempotent
    assert mvp.compile_macvlan(Policy(nets, [e3]), "h1", {"a"}) is None  # no local macvlan endpoint


def test_delta_is_only_the_difference() -> None:
    nets = [PolicyNetwork(id="a", mode=IsolationMode.PEER_ONLY, cidrs=("10.7.0.0/24",), gateways=("10.7.0.1",))]
    e1, e2 = ep("e1", "a", "10.7.0.10"), ep("e2", "a", "10.7.0.11")
    p = Policy(nets, [e1])
    rs: Ruleset = p.compile("h1")
    mv = mvp.compile_macvlan(p, "h1", {"a"})
    loc = mvp.MvLocal("e1", "a", "ns", "eth0", e1.mac, e1.ips)
    have = mvp.elements(mv, rs, loc)
    assert mvp.delta(have, have, mvp.decls(mv, rs, loc), "e1") == ("", 0)
    mv2 = mv.with_endpoint(e2) if mv is not None else None
    sets = mvp.decls(mv2, rs, loc)
    script, n = mvp.delta(have, mvp.elements(mv2, rs, loc), sets, "e1")
    # e2's address joins peer4 and relp4, its MAC l2peers: three elements, one transaction's lines
    assert n == 3, script
    t = mvp.table_name("e1")
    assert f"add element inet {t} peer4 {{ 10.7.0.11 }}" in script
    assert f"add element netdev {t} l2peers {{ {e2.mac} }}" in script
    assert mvp.structure(rs, loc) == mvp.structure(rs, loc._replace(endpoint="e1"))


def test_ipv6_sets() -> None:
    """Dual-stack networks: the IPv6 sets are filled the way the IPv4 ones are (the kernel
    tests probe IPv4 only)."""
    nets = [PolicyNetwork(id="a", mode=IsolationMode.MESH_ONLY, cidrs=("10.7.0.0/24", "fd00:7::/64"),
                          gateways=("10.7.0.1", "fd00:7::1"), connected=("b",)),
            PolicyNetwork(id="b", mode=IsolationMode.MESH_ONLY, cidrs=("fd00:8::/64",), gateways=("fd00:8::1",),
                          connected=("a",)),
            PolicyNetwork(id="c", mode=IsolationMode.PEER_ONLY, cidrs=("fd00:9::/64",))]
    e1 = msgspec.structs.replace(ep("e1", "a", "10.7.0.10"), ips=("10.7.0.10", "fd00:7::10"))
    e2 = msgspec.structs.replace(ep("e2", "b", "fd00:8::10"), node="h2")
    e3 = ep("e3", "c", "fd00:9::10")
    p = Policy(nets, [e1, e2, e3])
    mv = mvp.compile_macvlan(p, "h1", {"a", "b", "c"})
    loc = mvp.MvLocal("e1", "a", "ns", "eth0", e1.mac, e1.ips)
    sets = {d.name: d.elements for d in mvp.decls(mv, p.compile("h1"), loc)}
    assert sets["peer6"] == ["fd00:7::10", "fd00:8::10"] and sets["peer4"] == ["10.7.0.10"]
    assert sets["bip6"] == ["fd00:7::10"] and sets["bip4"] == ["10.7.0.10"]
    assert sets["owngw6"] == ["fd00:7::1"]
    # a's and b's ranges without their gateways; c (unrelated) is not reachable
    assert sets["reach6"] == ["fd00:7::", "fd00:7::2-fd00:7::ffff:ffff:ffff:ffff",
                              "fd00:8::", "fd00:8::2-fd00:8::ffff:ffff:ffff:ffff"]
    assert sets["nets6"] == ["fd00:7::/64", "fd00:8::/64", "fd00:9::/64"]
    assert "fd00:9::10" not in sets["relp6"]
    assert p.verdict("e1", "e2", "tcp", 80).allowed and not p.verdict("e1", "e3", "tcp", 80).allowed
