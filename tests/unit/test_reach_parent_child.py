"""Reachability diffs of parent/child changes (issue 16): creating a child network carved
from its parent and deleting a network (its endpoints with it, its children detached) —
the diff equals the difference of the explain matrices before and after, over random small
topologies with parent/child edges."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_reach import LABELS, MODES, covered, ep, probe_ports, rule_st
from vnet.core import reach
from vnet.core.policy import Policy, PolicyEndpoint, PolicyNetwork


@st.composite
def family_topologies(draw: st.DrawFn) -> Policy:
    """n0..n(k-1) top-level /24s; some are parents of children carved from their upper half
    (``c<i>``, 10.9.<i>.128/25), related as the network service stores it (both records)."""
    k = draw(st.integers(1, 3))
    nets: dict[str, PolicyNetwork] = {}
    for i in range(k):
        nets[f"n{i}"] = PolicyNetwork(id=f"n{i}", mode=draw(st.sampled_from(MODES)), cidrs=(f"10.9.{i + 1}.0/24",),
                                      gateways=(f"10.9.{i + 1}.1",))
    for i in draw(st.lists(st.integers(0, k - 1), unique=True, max_size=k)):
        cid = f"c{i}"
        nets[cid] = PolicyNetwork(id=cid, mode=draw(st.sampled_from(MODES)), cidrs=(f"10.9.{i + 1}.128/25",),
                                  gateways=(f"10.9.{i + 1}.129",), parent=f"n{i}")
        nets[f"n{i}"] = PolicyNetwork(**{**{f: getattr(nets[f"n{i}"], f) for f in PolicyNetwork.__struct_fields__},
                                         "children": (cid,)})
    ids = sorted(nets)
    if len(ids) >= 2 and draw(st.booleans()):  # a connection too, stored on both sides
        a, b = draw(st.lists(st.sampled_from(ids), min_size=2, max_size=2, unique=True))
        na, nb = reach.connection_changed(nets[a], nets[b], True)
        nets[a], nets[b] = na, nb
    eps: list[PolicyEndpoint] = []
    for nid in ids:
        i = int(nid[1:]) + 1
        base = 130 if nid.startswith("c") else 10
        for j in range(draw(st.integers(0, 2))):
            eps.append(ep(f"e{nid}{j}", nid, f"10.9.{i}.{base + j}", role=draw(st.sampled_from(LABELS))))
    rules = draw(st.lists(rule_st(k), max_size=2, unique_by=lambda r: r.id))
    return Policy(nets.values(), eps, rules)


@st.composite
def family_changes(draw: st.DrawFn, pol: Policy) -> Policy:
    tops = sorted(n for n in pol.networks if n.startswith("n"))
    free = [n for n in tops if not pol.networks[n].children]
    if free and draw(st.booleans()):  # create a child (no endpoint yet) under a network without one
        p = pol.networks[draw(st.sampled_from(free))]
        i = int(p.id[1:]) + 1
        child = PolicyNetwork(id=f"c{i - 1}", mode=draw(st.sampled_from(MODES)), cidrs=(f"10.9.{i}.128/25",),
                              gateways=(f"10.9.{i}.129",))
        return reach.with_networks(pol, list(reach.child_added(p, child)))
    return reach.without_network(pol, draw(st.sampled_from(sorted(pol.networks))))


def _allowed(pol: Policy, s: str, d: str, proto: str, port: int | None) -> bool:
    """explain's answer; an endpoint that does not exist (deleted) reaches nothing."""
    if any(x.startswith("e") and x not in pol.endpoints for x in (s, d)):
        return False
    return pol.verdict(s, d, proto, port).allowed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_parent_child_diff_equals_difference_of_explain_matrices(data: st.DataObject) -> None:
    before = data.draw(family_topologies())
    after = data.draw(family_changes(before))
    found = reach.paths(before, after)
    ports = probe_ports(before, after)
    parties = sorted(set(before.endpoints) | set(after.endpoints)) + sorted(reach.external_parties(before, after))
    for s, d in itertools.permutations(parties, 2):
        if s not in before.endpoints and d not in before.endpoints and s not in after.endpoints \
                and d not in after.endpoints:
            continue
        for proto in ("tcp", "udp", "sctp", "icmp"):
            for port in (ports if proto != "icmp" else [None]):
                vb, va = _allowed(before, s, d, proto, port), _allowed(after, s, d, proto, port)
                assert covered(found, s, d, proto, port) == (None if vb == va else va), (s, d, proto, port, vb, va)
    g = reach.diff(before, after)
    assert g.opens == sum(p.opened for p in found) and g.closes == sum(not p.opened for p in found)


def test_child_added_and_without_network_keep_both_records() -> None:
    p = PolicyNetwork(id="p", mode=MODES[2], cidrs=("10.9.1.0/24",))
    c = PolicyNetwork(id="c", mode=MODES[2], cidrs=("10.9.1.128/25",))
    p2, c2 = reach.child_added(p, c)
    assert p2.children == ("c",) and c2.parent == "p"
    pol = Policy([p2, c2], [ep("e1", "p", "10.9.1.10"), ep("e2", "c", "10.9.1.130")], [])
    assert pol.verdict("e1", "e2", "tcp", 80).allowed  # mesh_only: parent and child reach each other
    gone = reach.without_network(pol, "p")
    assert set(gone.networks) == {"c"} and gone.networks["c"].parent is None and set(gone.endpoints) == {"e2"}
    d = reach.diff(pol, gone)
    assert (d.opens, d.closes) == (0, 2)  # e1 <-> e2, every protocol, both directions
    # each side named by its network, the deleted one's too (not "external")
    assert sorted((g.src, g.dst, g.ports) for g in d.closed) == [("c", "p", "any"), ("p", "c", "any")]
    assert reach.diff(reach.without_network(pol, "c"), pol).opens == 2  # re-creating the child with e2
