"""Host routes against networks (vnet.core.routes) and the route watch's message count."""

from __future__ import annotations

import struct

from vnet.core.model import DriverType, IsolationMode, VirtualNetwork
from vnet.core.routes import overlapping
from vnet.svc.node.routewatch import route_changes

RTM_NEWLINK = 16


def net(i: str, cidr: str, cidr_v6: str | None = None, parent: str | None = None) -> VirtualNetwork:
    return VirtualNetwork(id=i, name=f"n-{i}", cidr=cidr, gateway=cidr.split("/")[0], driver_type=DriverType.BRIDGE,
                          isolation_mode=IsolationMode.FULL, cidr_v6=cidr_v6, parent=parent)


def test_overlapping_prefixes() -> None:
    nets = [net("a", "10.1.0.0/24"), net("b", "10.1.2.0/24", "fd00:1::/64"), net("c", "10.1.4.0/23"),
            net("kid", "10.1.4.0/25", parent="c")]
    found = overlapping(["10.1.0.128/25", "10.0.0.0/8", "10.1.1.0/24", "10.1.5.7/32", "fd00:1::/48", "junk",
                         "192.168.0.0/16", "10.1.3.255/32"], nets)
    got = [(p, n.id, c) for p, n, c in found]
    assert ("10.1.0.128/25", "a", "10.1.0.0/24") in got
    # a covering prefix overlaps every network inside it (never the child: its parent is named)
    assert [x for x in got if x[0] == "10.0.0.0/8"] == [("10.0.0.0/8", "a", "10.1.0.0/24"),
                                                          ("10.0.0.0/8", "b", "10.1.2.0/24"),
                                                          ("10.0.0.0/8", "c", "10.1.4.0/23")]
    assert ("10.1.5.7/32", "c", "10.1.4.0/23") in got and ("fd00:1::/48", "b", "fd00:1::/64") in got
    assert not [x for x in got if x[0] in ("10.1.1.0/24", "192.168.0.0/16", "10.1.3.255/32", "junk")]
    assert len(got) == 6


def test_route_changes_counts_route_and_address_messages() -> None:
    def msg(mtype: int, payload: bytes) -> bytes:
        length = 16 + len(payload)
        return struct.pack("=IHHII", length, mtype, 0, 0, 0) + payload + b"\0" * ((-length) % 4)

    def route(family: int, dst_len: int, dst: bytes, *, table: int = 254, rtype: int = 1) -> bytes:
        attr = struct.pack("=HH", 4 + len(dst), 1) + dst + b"\0" * ((-len(dst)) % 4)
        return struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, table, 4, 0, rtype, 0) + attr

    def address(scope: int) -> bytes:
        return struct.pack("=BBBBI", 2, 24, 0, scope, 7)

    blackhole = route(2, 24, bytes([198, 18, 78, 0]), rtype=6)
    assert route_changes(msg(24, blackhole) + msg(25, blackhole) + msg(20, address(0))) == 3
    # what bringing up a host-side veth makes: a link-local address and route, local-table entries
    link_local = route(10, 64, bytes.fromhex("fe800000000000000000000000000000"))
    local = route(2, 32, bytes([10, 1, 0, 1]), table=255, rtype=2)
    assert route_changes(msg(20, address(253)) + msg(24, link_local) + msg(24, local)) == 0
    assert route_changes(msg(24, route(10, 48, bytes.fromhex("fd000001000000000000000000000000")))) == 1
    assert route_changes(msg(RTM_NEWLINK, b"\0" * 16)) == 0
    assert route_changes(b"") == 0 and route_changes(b"\x01\x02") == 0
