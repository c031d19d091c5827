"""Host routes that overlap networks (pure).

A node reports the prefixes of its host's routes and addresses that are not VNet's own
(:class:`vnet.contracts.network.HostRoutesReport` ``foreign``). A foreign prefix that
overlaps a network's subnet means part of that network's addresses may be routed by the
host elsewhere (a VPN, a static route, a second interface in the same range): the
network service raises ``route_overlap`` for each new one. Only top-level networks are
checked: a child's subnet lies inside its parent's, so an overlap with a child is one
with its parent too, and the parent is named.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Sequence

from vnet.core.model import VirtualNetwork


def _span(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int, int]:
    return net.version, int(net.network_address), int(net.broadcast_address)


def overlapping(prefixes: Iterable[str], networks: Sequence[VirtualNetwork]) -> list[tuple[str, VirtualNetwork, str]]:
    """``(prefix, network, network's cidr)`` for every prefix that overlaps a top-level
    network's subnet (v4 or v6); unparsable prefixes are skipped. Sorted by prefix, then network.
    Cost: O((P + N) log N) — top-level subnets do not overlap each other, so per prefix a
    binary search finds the first candidate and a scan stops at the first one past it."""
    spans: list[tuple[int, int, int, str, VirtualNetwork]] = []
    for n in networks:
        if n.parent is not None:
            continue
        for cidr in (n.cidr, n.cidr_v6):
            if not cidr:
                continue
            try:
                fam, lo, hi = _span(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                continue
            spans.append((fam, lo, hi, cidr, n))
    spans.sort(key=lambda s: (s[0], s[1]))
    keys = [(s[0], s[1]) for s in spans]
    out: list[tuple[str, VirtualNetwork, str]] = []
    for text in sorted(set(prefixes)):
        try:
            fam, lo, hi = _span(ipaddress.ip_network(text, strict=False))
        except ValueError:
            continue
        # the last network starting at or before ``lo`` may reach into the prefix; then
        # every network starting inside it does
        i = max(bisect.bisect_right(keys, (fam, lo)) - 1, 0)
        while i < len(spans):
            sfam, slo, shi, cidr, n = spans[i]
            if (sfam, slo) > (fam, hi):
                break
            if sfam == fam and slo <= hi and shi >= lo:
                out.append((text, n, cidr))
            i += 1
    return out
