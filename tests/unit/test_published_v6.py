"""IPv6 published ports in the compiled ruleset (issue 18): the same ports as IPv4, toward the
endpoint's IPv6 address, kept by the node's incremental path exactly as a compile would."""

from __future__ import annotations

from vnet.core import nft
from vnet.core.model import IsolationMode
from vnet.core.policy import Policy, PolicyEndpoint, PolicyNetwork, Published

NET = PolicyNetwork(id="n1", mode=IsolationMode.FULL, cidrs=("10.1.0.0/24", "fd00:1::/64"),
                    gateways=("10.1.0.1", "fd00:1::1"))
WEB = PolicyEndpoint(id="e1", network="n1", ips=("10.1.0.2", "fd00:1::2"), mac="02:00:00:00:00:01", node="h",
                     published=(Published(protocol="tcp", host_port=8080, port=80),
                                Published(protocol="udp", host_port=5353, port=53)))
V4ONLY = PolicyEndpoint(id="e2", network="n1", ips=("10.1.0.3",), mac="02:00:00:00:00:02", node="h",
                        published=(Published(protocol="tcp", host_port=9090, port=90),))
TAKEN = PolicyEndpoint(id="e3", network="n1", ips=("10.1.0.4", "fd00:1::4"), mac="02:00:00:00:00:03", node="h",
                       published=(Published(protocol="tcp", host_port=8080, port=81),))


def test_compile_publishes_both_families_to_the_endpoint_of_that_family() -> None:
    rs = Policy([NET], [WEB, V4ONLY], []).compile("h")
    assert rs.published4 == [("tcp", 8080, "10.1.0.2", 80), ("tcp", 9090, "10.1.0.3", 90),
                             ("udp", 5353, "10.1.0.2", 53)]
    assert rs.published6 == [("tcp", 8080, "fd00:1::2", 80), ("udp", 5353, "fd00:1::2", 53)]  # e2 has no IPv6
    script = nft.render(rs)
    assert "dnat ip6 to meta l4proto . th dport map @published6" in script
    assert "ip6 daddr . meta l4proto . th dport @pub6_in accept" in script
    assert "tcp . 8080 : fd00:1::2 . 80" in script and "fd00:1::2 . udp . 53" in script


def test_incremental_attach_and_detach_equal_a_compile() -> None:
    empty = Policy([NET], [V4ONLY], []).compile("h")  # the network is in play here already
    bridge = NET.bridge_name()
    rs = empty.with_endpoint(WEB, local=True, bridge=bridge)
    assert rs is not None
    full = Policy([NET], [WEB, V4ONLY], []).compile("h")
    assert (rs.published4, rs.published6) == (full.published4, full.published6)
    script, _ = nft.delta_script(*nft.delta_between(empty, rs))
    assert "add element inet vnet published6 { tcp . 8080 : fd00:1::2 . 80, udp . 5353 : fd00:1::2 . 53 }" \
        in script, script
    # a host port another endpoint holds (in either family's map) is the engine's decision: fetch
    assert rs.with_endpoint(TAKEN, local=True, bridge=bridge) is None
    # a detach of an endpoint holding a published port is the engine's too (the port may pass on)
    assert rs.without_endpoint(WEB, local=True) is None
