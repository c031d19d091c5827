"""The gratuitous ARP frame the node sends for a new endpoint (vnet.adapters.netlink.announce)."""

from __future__ import annotations

import struct

from vnet.adapters.netlink.announce import garp_frame


def test_garp_frame_is_an_rfc5227_announcement() -> None:
    f = garp_frame("02:42:0a:01:00:05", "10.1.0.5")
    assert len(f) == 42  # Ethernet header + ARP for IPv4 over Ethernet (the NIC pads to 60)
    dst, src, ethertype = f[:6], f[6:12], struct.unpack("!H", f[12:14])[0]
    assert dst == b"\xff" * 6 and src == bytes.fromhex("02420a010005") and ethertype == 0x0806
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", f[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)  # a request, as arp_notify sends
    sha, spa, tha, tpa = f[22:28], f[28:32], f[32:38], f[38:42]
    assert sha == src and spa == tpa == bytes([10, 1, 0, 5]) and tha == b"\x00" * 6
