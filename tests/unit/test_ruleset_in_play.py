"""A host's compiled address sets hold only endpoints of the networks in play on it (its own
networks and those related to them): a rule never makes a path to an unrelated network, and
the endpoint service addresses set members only to the nodes in play for their network
(docs/scale.md), so a node's ruleset must not grow with the cluster's selected endpoints."""

from __future__ import annotations

from vnet.core.model import IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyEndpoint, PolicyNetwork, Selector

NETS = [PolicyNetwork(id="a", mode=IsolationMode.FULL, cidrs=("10.6.1.0/24",), connected=("b",)),
        PolicyNetwork(id="b", mode=IsolationMode.FULL, cidrs=("10.6.2.0/24",), connected=("a",)),
        PolicyNetwork(id="c", mode=IsolationMode.FULL, cidrs=("10.6.3.0/24",))]
WEB = {"app": "web"}


def _ep(i: int, net: str, node: str) -> PolicyEndpoint:
    k = "abc".index(net) + 1
    return PolicyEndpoint(id=f"e{i}", network=net, ips=(f"10.6.{k}.{10 + i}",), mac=f"02:00:00:00:06:{i:02x}",
                          node=node, labels=dict(WEB))


def _members(pol: Policy, node: str | None) -> set[str]:
    return {x for s in pol.compile(node).sets if s.selectors for x in s.elements}


def test_a_hosts_sets_hold_the_selected_endpoints_of_its_networks_and_related_ones_only() -> None:
    eps = [_ep(1, "a", "h"), _ep(2, "a", "o"), _ep(3, "b", "o"), _ep(4, "c", "o"), _ep(5, "c", "p")]
    for sel in ([Selector(labels=WEB)], [Selector(network="c"), Selector(labels=WEB)],
                [Selector(cidr="10.6.0.0/16", labels=WEB)]):
        pol = Policy(NETS, eps, [AllowRule(id="r", from_=sel, to=sel)])
        # h holds network a; b is connected to a; c is unrelated (its endpoints never meet h's)
        assert _members(pol, "h") == {"10.6.1.11", "10.6.1.12", "10.6.2.13"}, sel
        # p holds c only: a and b are not in play there
        assert _members(pol, "p") == {"10.6.3.14", "10.6.3.15"}, sel
        # o holds a, b and c: everything; no node (explain's view): everything
        every = {"10.6.1.11", "10.6.1.12", "10.6.2.13", "10.6.3.14", "10.6.3.15"}
        assert _members(pol, "o") == every and _members(pol, None) == every, sel


def test_the_node_side_delta_of_an_in_play_endpoint_equals_the_engine() -> None:
    eps = [_ep(1, "a", "h"), _ep(4, "c", "o")]
    sel = [Selector(labels=WEB)]
    rules = [AllowRule(id="r", from_=sel, to=sel)]
    rs = Policy(NETS, eps, rules).compile("h")
    new = _ep(3, "b", "o")  # related network b: addressed to h, and a member there
    nxt = rs.with_endpoint(new, local=False)
    assert nxt is not None
    assert nxt.version() == Policy(NETS, [*eps, new], rules).compile("h").version()
