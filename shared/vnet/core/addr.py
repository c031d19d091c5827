"""Subnet math, pure: parse and validate CIDRs and gateways, overlap, carving, index keys.

Everything works on both families with the standard library's :mod:`ipaddress`
(an address is an ``int`` underneath, which makes carving and ordering cheap).
Invalid input raises :class:`vnet.core.errors.VNetError` with a message that says
what was wrong and what to write instead::

    >>> parse_cidr("172.20.1.0/24")
    IPv4Network('172.20.1.0/24')
    >>> default_gateway(parse_cidr("172.20.1.0/24"))
    IPv4Address('172.20.1.1')
    >>> find_free(parse_cidr("10.0.0.0/16"), 24, [parse_cidr("10.0.0.0/24")])
    IPv4Network('10.0.1.0/24')

The sorted network index (see ``adapters/network_store.py``) keys networks by
:func:`index_member`: fixed-width lower-case hex of the first and last address, so
lexicographic order is numeric order and a predecessor lookup finds the only
network that can overlap a new one.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Literal

from vnet.core import errors as E

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
Family = Literal[4, 6]

# Each string parsed once: the node parses the same addresses at every reconcile and every
# policy delta (an attach's plan made ~25 address objects, half of its 0.2 ms; its policy
# delta ~10 per rule's address set, on the event loop before the kernel work; cProfile,
# 5 Dec). The objects are immutable; a string that does not parse raises every time
# (exceptions are not cached).
parsed_ip = functools.lru_cache(maxsize=1 << 16)(ipaddress.ip_address)
parsed_interface = functools.lru_cache(maxsize=1 << 16)(ipaddress.ip_interface)

# The longest prefix a network may have: it must hold a gateway and at least one
# more usable address (v4 /30: network, gateway, one host, broadcast).
MAX_PREFIX: dict[int, int] = {4: 30, 6: 126}
HEX_WIDTH: dict[int, int] = {4: 8, 6: 32}

# Ranges a virtual network may never use (they overlap what every host has).
_RESERVED: dict[int, tuple[tuple[IPNet, str], ...]] = {
    4: (
        (ipaddress.ip_network("0.0.0.0/8"), "'this network' (0.0.0.0/8)"),
        (ipaddress.ip_network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
        (ipaddress.ip_network("169.254.0.0/16"), "link-local (169.254.0.0/16)"),
        (ipaddress.ip_network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
        (ipaddress.ip_network("240.0.0.0/4"), "reserved/broadcast (240.0.0.0/4)"),
    ),
    6: (
        (ipaddress.ip_network("::/8"), "loopback/unspecified/v4-mapped (::/8)"),
        (ipaddress.ip_network("fe80::/10"), "link-local (fe80::/10)"),
        (ipaddress.ip_network("ff00::/8"), "multicast (ff00::/8)"),
    ),
}

_EXAMPLE: dict[int, str] = {4: "172.20.1.0/24", 6: "fd00:20:1::/64"}


def _example(family: int | None) -> str:
    if family is None:
        return f"an IPv4 network like {_EXAMPLE[4]} (or IPv6 like {_EXAMPLE[6]})"
    return f"an IPv{family} network like {_EXAMPLE[family]}"


def parse_cidr(text: str, *, field: str = "cidr", family: int | None = None) -> IPNet:
    """Parse a network in CIDR notation, strictly.

    Raises ``invalid_cidr`` (syntax, wrong family, too small, reserved range) or
    ``cidr_host_bits`` (an address with host bits set, e.g. ``10.0.0.1/24``; the
    message suggests the network address).
    """
    s = text.strip()
    if "/" not in s:
        raise E.make(E.INVALID_CIDR, f"{field} {text!r} has no prefix length; write {_example(family)}",
                     field=field, value=text)
    if "%" in s:  # Python accepts an IPv6 zone id (fd00::%eth0/64); a network has none
        raise E.make(E.INVALID_CIDR, f"{field} {text!r} has a zone id (%...): a network is the same on every "
                     f"interface; write {_example(family)}", field=field, value=text)
    try:
        net: IPNet = ipaddress.ip_network(s, strict=True)
    except ValueError as exc:
        try:
            loose: IPNet = ipaddress.ip_network(s, strict=False)
        except ValueError:
            raise E.make(E.INVALID_CIDR, f"{field} {text!r} is not a valid CIDR ({exc}); write {_example(family)}",
                         field=field, value=text) from None
        addr = s.split("/", 1)[0]
        raise E.make(E.CIDR_HOST_BITS,
                     f"{field} {text!r} has host bits set: {addr} is an address inside {loose}, not the start "
                     f"of a network; use {loose} (with gateway {addr} if that was the intent)",
                     field=field, value=text, suggestion=str(loose)) from None
    if family is not None and net.version != family:
        other = "cidr_v6" if family == 4 else "cidr"
        raise E.make(E.INVALID_CIDR, f"{field} {text!r} is IPv{net.version} but IPv{family} is expected here; "
                     f"write {_example(family)} (an IPv{net.version} subnet goes in {other})",
                     field=field, value=text)
    if net.prefixlen > MAX_PREFIX[net.version]:
        raise E.make(E.INVALID_CIDR, f"{field} {net} is too small: a network needs a gateway and at least one "
                     f"more address, so the longest prefix is /{MAX_PREFIX[net.version]}",
                     field=field, value=text)
    for reserved, what in _RESERVED[net.version]:
        if net.overlaps(reserved):
            raise E.make(E.INVALID_CIDR, f"{field} {net} overlaps {what}, which a network cannot use; "
                         f"pick a private range, e.g. {_EXAMPLE[net.version]}", field=field, value=text)
    return net


def parse_prefix(text: str) -> IPNet:
    """A route or interface prefix, host bits allowed (``10.0.2.15/24`` -> ``10.0.2.0/24``)."""
    return ipaddress.ip_network(text.strip(), strict=False)


def family_of(net: IPNet | IPAddr) -> Family:
    return 4 if net.version == 4 else 6


def first_usable(net: IPNet) -> IPAddr:
    return net.network_address + 1


def last_usable(net: IPNet) -> IPAddr:
    """The last address a host may use: broadcast - 1 in IPv4; IPv6 has no broadcast."""
    return net.broadcast_address - 1 if net.version == 4 else net.broadcast_address


def default_gateway(net: IPNet) -> IPAddr:
    """The first usable address (Docker's and the CNI bridge plugin's convention)."""
    return first_usable(net)


def parse_gateway(text: str, net: IPNet, *, field: str = "gateway") -> IPAddr:
    """A gateway must be a usable address of ``net``: inside it, and not its network
    (nor, in IPv4, its broadcast) address. Raises ``invalid_gateway``."""
    s = text.strip()
    usable = f"from {first_usable(net)} to {last_usable(net)}"
    if "/" in s:
        raise E.make(E.INVALID_GATEWAY, f"{field} {text!r} is a prefix; give a plain address {usable} "
                     f"(e.g. {default_gateway(net)})", field=field, value=text)
    if "%" in s:  # an IPv6 zone id: Python accepts it, the kernel's address has none
        raise E.make(E.INVALID_GATEWAY, f"{field} {text!r} has a zone id (%...); give a plain address {usable}",
                     field=field, value=text)
    try:
        gw: IPAddr = ipaddress.ip_address(s)
    except ValueError:
        raise E.make(E.INVALID_GATEWAY, f"{field} {text!r} is not an IP address; give an address of {net} "
                     f"{usable} (e.g. {default_gateway(net)})", field=field, value=text) from None
    if gw.version != net.version:
        raise E.make(E.INVALID_GATEWAY, f"{field} {gw} is IPv{gw.version} but the subnet {net} is "
                     f"IPv{net.version}; give an address {usable}", field=field, value=text)
    if gw not in net:
        raise E.make(E.INVALID_GATEWAY, f"{field} {gw} is outside the subnet {net}; give an address {usable} "
                     f"(e.g. {default_gateway(net)})", field=field, value=text, cidr=str(net))
    if gw == net.network_address:
        raise E.make(E.INVALID_GATEWAY, f"{field} {gw} is the network address of {net}; hosts cannot use it. "
                     f"Give an address {usable} (e.g. {default_gateway(net)})", field=field, value=text,
                     cidr=str(net))
    if net.version == 4 and gw == net.broadcast_address:
        raise E.make(E.INVALID_GATEWAY, f"{field} {gw} is the broadcast address of {net}; hosts cannot use it. "
                     f"Give an address {usable} (e.g. {default_gateway(net)})", field=field, value=text,
                     cidr=str(net))
    return gw


def span(net: IPNet) -> tuple[int, int]:
    """First and last address as integers."""
    return int(net.network_address), int(net.broadcast_address)


def overlaps(a: IPNet, b: IPNet) -> bool:
    """True when the two networks share an address (never across families)."""
    if a.version != b.version:
        return False
    a0, a1 = span(a)
    b0, b1 = span(b)
    return a0 <= b1 and b0 <= a1


def subnet_of(child: IPNet, parent: IPNet) -> bool:
    """``child`` lies inside ``parent`` (or is it); False across families. ``subnet_of`` of the
    stdlib is typed per family, so the union is narrowed here, once, instead of ignored."""
    if isinstance(child, ipaddress.IPv4Network) and isinstance(parent, ipaddress.IPv4Network):
        return child.subnet_of(parent)
    if isinstance(child, ipaddress.IPv6Network) and isinstance(parent, ipaddress.IPv6Network):
        return child.subnet_of(parent)
    return False


def is_strict_subnet(child: IPNet, parent: IPNet) -> bool:
    """``child`` lies inside ``parent`` and is smaller than it."""
    return child.prefixlen > parent.prefixlen and subnet_of(child, parent)


def hex_addr(value: int, family: int) -> str:
    return f"{value:0{HEX_WIDTH[family]}x}"


def index_bounds(net: IPNet) -> tuple[str, str]:
    """Fixed-width hex of the first and last address (lexicographic order = numeric order)."""
    lo, hi = span(net)
    fam = family_of(net)
    return hex_addr(lo, fam), hex_addr(hi, fam)


def index_member(net: IPNet, ident: str) -> str:
    """``<first>:<last>:<id>`` — one member of the sorted (ZSET, lexicographic) network index."""
    lo, hi = index_bounds(net)
    return f"{lo}:{hi}:{ident}"


def parse_index_member(member: str) -> tuple[int, int, str]:
    lo, hi, ident = member.split(":", 2)
    return int(lo, 16), int(hi, 16), ident


def _align_up(value: int, size: int) -> int:
    return -(-value // size) * size


def check_prefix_len(pool: IPNet, prefix_len: int, *, what: str = "prefix_len") -> None:
    """``prefix_len`` must fit inside ``pool`` and leave room for hosts."""
    top = MAX_PREFIX[pool.version]
    if prefix_len <= pool.prefixlen or prefix_len > top:
        lo = pool.prefixlen + 1
        raise E.make(E.INVALID_REQUEST, f"{what} /{prefix_len} cannot be carved from {pool}: it must be between "
                     f"/{lo} and /{top}", prefix_len=prefix_len, pool=str(pool))


def capacity(pool: IPNet, prefix_len: int) -> int:
    """How many subnets of ``prefix_len`` fit in ``pool``."""
    return 1 << (prefix_len - pool.prefixlen) if prefix_len >= pool.prefixlen else 0


def find_free_span(pool: IPNet, prefix_len: int, taken: Iterable[tuple[int, int]], *,
                   lo: int | None = None, hi: int | None = None) -> int | None:
    """First start address of a free, aligned ``/prefix_len`` block inside ``pool``.

    ``taken`` holds inclusive ``(first, last)`` integer ranges in any order (they may
    overlap each other or reach outside the pool). The block starts at or after ``lo``
    and ends at or before ``hi`` (both default to the pool's bounds). Cost is
    O(k log k) in the ranges given, independent of the pool's size.
    """
    p0, p1 = span(pool)
    size = 1 << ((32 if pool.version == 4 else 128) - prefix_len)
    start = max(p0, lo if lo is not None else p0)
    stop = min(p1, hi if hi is not None else p1)
    c = _align_up(start - p0, size) + p0
    for t0, t1 in sorted(taken):
        if c + size - 1 > stop:
            return None
        if t1 < c:
            continue
        if t0 > c + size - 1:
            break
        c = _align_up(t1 + 1 - p0, size) + p0
    return c if c + size - 1 <= stop else None


def find_free(pool: IPNet, prefix_len: int, taken: Iterable[IPNet], *,
              lo: int | None = None, hi: int | None = None) -> IPNet | None:
    """First free ``/prefix_len`` subnet of ``pool`` that overlaps none of ``taken``."""
    check_prefix_len(pool, prefix_len)
    spans = [span(t) for t in taken if t.version == pool.version]
    c = find_free_span(pool, prefix_len, spans, lo=lo, hi=hi)
    return None if c is None else net_from_span(c, prefix_len, pool.version)


def net_from_span(first: int, prefix_len: int, family: int) -> IPNet:
    if family == 4:
        return ipaddress.IPv4Network((first, prefix_len))
    return ipaddress.IPv6Network((first, prefix_len))


_IGNORED_HOST: tuple[IPNet, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("224.0.0.0/4"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("ff00::/8"),
)


def host_prefixes(raw: Iterable[str]) -> list[IPNet]:
    """Normalise what a host reports (routes and interface addresses) into the prefixes
    carving must skip: host bits cleared, duplicates and covered prefixes kept once;
    default routes (``0.0.0.0/0``, ``::/0``), loopback, link-local and multicast dropped,
    unparsable entries ignored. Sorted by family, then address."""
    out: set[IPNet] = set()
    for text in raw:
        try:
            net = parse_prefix(text)
        except ValueError:
            continue
        if net.prefixlen == 0:
            continue
        if any(subnet_of(net, ign) for ign in _IGNORED_HOST):
            continue
        out.add(net)
    return sorted(out, key=lambda n: (n.version, int(n.network_address), n.prefixlen))


def describe(nets: Sequence[IPNet]) -> str:
    return ", ".join(str(n) for n in nets)
