"""Names follow isolation: the pure name table (vnet.core.dns) against the policy engine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnet.core.dns import DnsEndpoint, NameTable, parse_resolv_conf, reverse_pointer_ip, search_domains
from vnet.core.model import IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyEndpoint, PolicyNetwork, PortSpec, Selector

UPSTREAM = "192.0.2.53"


def _net(nid: str, mode: IsolationMode, cidr: str, **kw: object) -> PolicyNetwork:
    gw = cidr.rsplit(".", 1)[0] + ".1"
    return PolicyNetwork(id=nid, mode=mode, cidrs=(cidr,), gateways=(gw,), **kw)  # type: ignore[arg-type]


def _table(rules: list[AllowRule] | None = None, front_mode: IsolationMode = IsolationMode.PEER_ONLY) -> NameTable:
    nets = [_net("nf", front_mode, "10.1.0.0/24"), _net("nb", IsolationMode.FULL, "10.2.0.0/24"),
            _net("nn", IsolationMode.NONE, "10.3.0.0/24")]
    eps = [("a", "nf", "10.1.0.2"), ("b", "nf", "10.1.0.3"), ("c", "nb", "10.2.0.2"), ("d", "nb", "10.2.0.3"),
           ("n", "nn", "10.3.0.2")]
    pol = Policy(nets, [PolicyEndpoint(id=f"e-{n}", network=net, ips=(ip,), mac=f"02:00:00:00:00:0{i}")
                        for i, (n, net, ip) in enumerate(eps)], rules or [])
    dns = [DnsEndpoint(id=f"e-{n}", name=n, network=net, ips=(ip,)) for n, net, ip in eps]
    return NameTable(pol, dns, {"nf": "front", "nb": "back", "nn": "open"}, domain="vnet")


def test_peers_resolve_each_other_and_isolated_names_do_not_exist() -> None:
    t = _table()
    assert t.lookup("10.1.0.2", "b", "A").addresses == ("10.1.0.3",)
    assert t.lookup("10.1.0.2", "b.front.vnet.", "A").addresses == ("10.1.0.3",)
    assert t.lookup("10.1.0.2", "B.FRONT.VNET", "A").rcode == "NOERROR"
    # another network, no relation: the name does not exist for this querier
    assert t.lookup("10.1.0.2", "c", "A").rcode == "NXDOMAIN"
    assert t.lookup("10.1.0.2", "c.back.vnet", "A").rcode == "NXDOMAIN"
    # Full: peers of one network do not talk without a rule, so they do not see names either
    assert t.lookup("10.2.0.2", "d", "A").rcode == "NXDOMAIN"
    # but every endpoint sees its own name
    assert t.lookup("10.2.0.2", "c", "A").addresses == ("10.2.0.2",)


def test_a_rule_makes_the_name_visible_in_its_direction_only() -> None:
    rule = AllowRule(id="r1", from_=[Selector(endpoint="e-c")], to=[Selector(endpoint="e-d")],
                     ports=[PortSpec(protocol="tcp", port=5432)])
    t = _table([rule])
    assert t.lookup("10.2.0.2", "d", "A").addresses == ("10.2.0.3",)
    assert t.lookup("10.2.0.3", "c", "A").rcode == "NXDOMAIN"


def test_relations_decide_across_networks() -> None:
    nets = [_net("x", IsolationMode.MESH_ONLY, "10.4.0.0/24", connected=("y",)),
            _net("y", IsolationMode.MESH_ONLY, "10.5.0.0/24", connected=("x",)),
            _net("z", IsolationMode.MESH_ONLY, "10.6.0.0/24")]
    eps = [PolicyEndpoint(id="ex", network="x", ips=("10.4.0.2",), mac="02:00:00:00:01:01"),
           PolicyEndpoint(id="ey", network="y", ips=("10.5.0.2",), mac="02:00:00:00:01:02"),
           PolicyEndpoint(id="ez", network="z", ips=("10.6.0.2",), mac="02:00:00:00:01:03")]
    t = NameTable(Policy(nets, eps), [DnsEndpoint(id=e.id, name=e.id[1:], network=e.network, ips=e.ips)
                                      for e in eps], {"x": "x", "y": "y", "z": "z"})
    assert t.lookup("10.4.0.2", "y", "A").addresses == ("10.5.0.2",)
    assert t.lookup("10.4.0.2", "z", "A").rcode == "NXDOMAIN"


def test_forwarding_follows_external_access_and_strangers_are_refused() -> None:
    t = _table()
    assert t.lookup("10.3.0.2", "example.org", "A", upstream=UPSTREAM).rcode == "FORWARD"  # None network
    assert t.lookup("10.1.0.2", "example.org", "A", upstream=UPSTREAM).rcode == "REFUSED"  # peer_only
    assert t.lookup("10.1.0.2", "nosuch.vnet", "A", upstream=UPSTREAM).rcode == "NXDOMAIN"  # ours: never forwarded
    assert t.lookup("198.51.100.7", "b", "A").rcode == "REFUSED"  # not an endpoint nor a host address
    assert t.lookup("10.1.0.99", "b", "A").rcode == "REFUSED"  # an unassigned address (spoofed)
    # the host (a gateway address) sees everything and may forward
    assert t.lookup("10.1.0.1", "c.back.vnet", "A").addresses == ("10.2.0.2",)
    assert t.lookup("10.1.0.1", "example.org", "A", upstream=UPSTREAM).rcode == "FORWARD"


def test_reverse_lookups_follow_isolation_too() -> None:
    t = _table()
    assert t.lookup("10.1.0.2", "3.0.1.10.in-addr.arpa", "PTR").names == ("b.front.vnet",)
    assert t.lookup("10.1.0.2", "2.0.2.10.in-addr.arpa", "PTR").rcode == "NXDOMAIN"
    assert t.lookup("10.1.0.2", "77.0.1.10.in-addr.arpa", "PTR").rcode == "NXDOMAIN"  # ours, unowned
    assert reverse_pointer_ip("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa") == "fd00::1"
    assert reverse_pointer_ip("1.2.in-addr.arpa") is None


def test_aaaa_without_v6_is_nodata_not_nxdomain() -> None:
    ans = _table().lookup("10.1.0.2", "b", "AAAA")
    assert ans.rcode == "NOERROR" and ans.addresses == ()


def test_resolv_conf_and_search_list() -> None:
    servers, search, options = parse_resolv_conf("# c\nnameserver 192.0.2.1\nnameserver ::1 ; x\n"
                                                 "search corp.example lab.example\noptions ndots:2 edns0\n")
    assert servers == ["192.0.2.1", "::1"] and search == ["corp.example", "lab.example"]
    assert options == ["ndots:2", "edns0"]
    assert search_domains("Front", "vnet", search) == ["front.vnet", "vnet", "corp.example", "lab.example"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list(IsolationMode)), min_size=3, max_size=3),
       st.sampled_from(["10.1.0.2", "10.1.0.3", "10.2.0.2", "10.2.0.3", "10.3.0.2"]),
       st.sampled_from(["a", "b", "c", "d", "n"]))
def test_a_name_resolves_iff_explain_allows_some_flow(modes: list[IsolationMode], querier: str, name: str) -> None:
    """The property: NOERROR with an address exactly when the engine allows a flow (any protocol)."""
    t = _table(front_mode=modes[0])
    target = next(e for e in t.endpoints if e.name == name)
    q = t.policy.party(querier)[0].endpoint
    assert q is not None
    allowed = q == target.id or any(t.policy.verdict(q, target.id, p).allowed for p in ("icmp", "tcp", "udp"))
    ans = t.lookup(querier, name, "A")
    assert (ans.rcode == "NOERROR" and ans.addresses == target.ips) == allowed, (querier, name, ans)


@pytest.mark.parametrize("bad", ["", ".", "x" * 300, "a..b", "\x00"])
def test_odd_names_never_raise(bad: str) -> None:
    assert _table().lookup("10.1.0.2", bad, "A", upstream=UPSTREAM).rcode in ("NXDOMAIN", "REFUSED", "FORWARD")


def test_the_resolver_on_the_own_gateway_is_always_reachable_and_nothing_else_of_the_host() -> None:
    """explain and the kernel (core/nft.py's RESOLVER line) agree: DNS to the querier's own
    gateway passes in every mode; other ports and other networks' gateways stay external."""
    from vnet.core.nft import RESOLVER

    pol = _table().policy
    for proto in ("udp", "tcp"):
        v = pol.verdict("e-a", "10.1.0.1", proto, 53)
        assert v.allowed and "resolver" in v.reasons[-1]
    assert not pol.verdict("e-a", "10.1.0.1", "tcp", 80).allowed
    assert not pol.verdict("e-a", "10.2.0.1", "udp", 53).allowed
    assert "th dport 53 fib daddr . iif type local accept" in RESOLVER


def _srv_table(rules: list[AllowRule] | None = None) -> NameTable:
    nets = [_net("nb", IsolationMode.FULL, "10.2.0.0/24"), _net("nx", IsolationMode.PEER_ONLY, "10.7.0.0/24")]
    pol = Policy(nets, [PolicyEndpoint(id="e-c", network="nb", ips=("10.2.0.2",), mac="02:00:00:00:00:01"),
                        PolicyEndpoint(id="e-db", network="nb", ips=("10.2.0.3",), mac="02:00:00:00:00:02"),
                        PolicyEndpoint(id="e-x", network="nx", ips=("10.7.0.2",), mac="02:00:00:00:00:03")],
                 rules or [])
    dns = [DnsEndpoint(id="e-c", name="c", network="nb", ips=("10.2.0.2",)),
           DnsEndpoint(id="e-db", name="db", network="nb", ips=("10.2.0.3",),
                       ports=(("tcp", 5432), ("tcp", 9187), ("udp", 5432))),
           DnsEndpoint(id="e-x", name="x", network="nx", ips=("10.7.0.2",))]
    return NameTable(pol, dns, {"nb": "back", "nx": "other"}, domain="vnet")


def test_srv_names_a_published_port_only_where_its_flow_is_allowed() -> None:
    rule = AllowRule(id="r1", from_=[Selector(endpoint="e-c")], to=[Selector(endpoint="e-db")],
                     ports=[PortSpec(protocol="tcp", port=5432)])
    t = _srv_table([rule])
    by_service = t.lookup("10.2.0.2", "_postgresql._tcp.db", "SRV")
    assert by_service.rcode == "NOERROR"
    assert by_service.srv == ((5432, "db.back.vnet", ("10.2.0.3",)),)
    assert t.lookup("10.2.0.2", "_5432._tcp.db.back.vnet.", "SRV").srv == by_service.srv
    # the same endpoint publishes 9187 and udp/5432, but the rule opens tcp/5432 only
    assert t.lookup("10.2.0.2", "_9187._tcp.db", "SRV").rcode == "NXDOMAIN"
    assert t.lookup("10.2.0.2", "_5432._udp.db", "SRV").rcode == "NXDOMAIN"
    # a port the endpoint does not publish, and a name of another (isolated) network
    assert t.lookup("10.2.0.2", "_80._tcp.db", "SRV").rcode == "NXDOMAIN"
    assert t.lookup("10.7.0.2", "_5432._tcp.db", "SRV").rcode == "NXDOMAIN"
    # the host sees every published port
    assert len(t.lookup("10.2.0.1", "_9187._tcp.db", "SRV").srv) == 1
    # without the rule Full mode hides it
    assert _srv_table().lookup("10.2.0.2", "_5432._tcp.db", "SRV").rcode == "NXDOMAIN"


def test_srv_of_names_not_ours_is_forwarded_and_malformed_ones_do_not_exist() -> None:
    t = _srv_table()
    assert t.lookup("10.2.0.1", "_http._tcp.example.org", "SRV", upstream=UPSTREAM).rcode == "FORWARD"
    assert t.lookup("10.2.0.1", "_http._sctp.db.back.vnet", "SRV").rcode == "NXDOMAIN"
    assert t.lookup("10.2.0.1", "db.back.vnet", "SRV").rcode == "NXDOMAIN"
