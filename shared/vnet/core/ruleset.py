"""The ruleset model of one host (pure): what :meth:`vnet.core.policy.Policy.compile`
produces and :mod:`vnet.core.nft` renders — port bindings, address sets, rule lines —
with the per-endpoint deltas the node applies (:meth:`Ruleset.with_endpoint`,
:meth:`Ruleset.without_endpoint`) and the element normalisation (disjoint address and
port intervals) nftables' interval sets need. Re-exported by :mod:`vnet.core.policy`.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import ipaddress
import itertools
from collections.abc import Iterable
from typing import Literal

import msgspec

from vnet.core import naming
from vnet.core.addr import parsed_ip
from vnet.core.policy_inputs import IPAddr, PolicyEndpoint, Selector

# ----------------------------------------------------------------------------- ruleset model

Addr = str  # an address, a CIDR or a range "a-b" (nft syntax)


class PortBinding(msgspec.Struct, frozen=True, kw_only=True):
    """Anti-spoofing binding of one bridge port (a local endpoint)."""

    ifname: str
    mac: str
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]
    full: bool  # non-IP frames are dropped (Full network)
    endpoint: str
    bridge: str = ""  # the bridge of the endpoint's network


class AddrSet(msgspec.Struct, frozen=True, kw_only=True):
    """A named address set the rule lines refer to.

    ``selectors`` (endpoint selectors): the addresses of the endpoints they select,
    one element per address (membership changes with endpoints: an attach adds its
    addresses to the sets whose selectors select it). ``cidrs``: the address ranges
    of ``{cidr}``-only selectors (an interval set that changes only with the rules).
    """

    name: str
    family: int  # 4 | 6
    selectors: tuple[Selector, ...] = ()
    cidrs: tuple[str, ...] = ()
    elements: list[Addr] = []

    def interval(self) -> bool:
        return bool(self.cidrs)


class RuleLine(msgspec.Struct, frozen=True, kw_only=True, order=True):
    """One accept rule: ``src`` set -> ``dst`` set [protocol [port range]].

    ``int``: between endpoints, only across bridges whose networks are related
    (``Ruleset.rel_pairs``); ``out``: endpoint -> external (masqueraded too);
    ``in``: external -> endpoint."""

    chain: Literal["int", "out", "in"]
    family: int
    src: str
    dst: str
    proto: str = ""  # "" = every protocol
    lo: int = 0  # 0 = no port match
    hi: int = 0


class Ruleset(msgspec.Struct, kw_only=True):
    """Everything one host's nftables tables hold (rendered by :mod:`vnet.core.nft`).

    The *structure* (chains, rule lines, set declarations) depends only on the rules;
    everything that changes with endpoints and networks is an element of a set or map:
    port bindings, bridge sets and pairs, set members, published ports. So an attach or
    a detach is a small element delta (:func:`vnet.core.nft.delta`).
    """

    node: str
    bridges: list[str]  # every bridge of a network in play
    none_bridges: list[str]  # bridges whose networks may use the uplink (egress masquerade)
    net_pairs: list[tuple[str, str]]  # (in bridge, out bridge) the modes allow
    ports: list[PortBinding]
    rel_pairs: list[tuple[str, str]] = []  # (in bridge, out bridge) whose networks have a path (rules)
    sets: list[AddrSet] = []
    lines: list[RuleLine] = []
    published4: list[tuple[str, int, str, int]] = []  # (protocol, host port, endpoint address, port): DNAT
    published6: list[tuple[str, int, str, int]] = []  # the same toward the endpoint's IPv6 address (ip6 DNAT)

    def version(self) -> str:
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()[:16]

    # -- deltas computed on the node (no round trip) -----------------------------------
    def with_endpoint(self, e: PolicyEndpoint, *, local: bool, bridge: str = "") -> Ruleset | None:
        """This ruleset with endpoint ``e`` added, or ``None`` when that needs the whole
        picture (:meth:`Policy.compile`): a local endpoint whose network is not in play
        here yet (bridges, pairs and relations change), or a host port already taken.
        Idempotent: a local endpoint already bound is left as it is."""
        ports = self.ports
        published = self.published4
        published6 = self.published6
        if local and e.host_ifname == "-":
            return None  # host driver: no port; the engine decides its published ports
        if local:
            if _find_port(ports, e.id) >= 0:
                return self
            if not bridge or bridge not in self.bridges:
                return None
            v4 = tuple(sorted((a for a in e.ips if parsed_ip(a).version == 4), key=addr_key))
            v6 = tuple(sorted((a for a in e.ips if parsed_ip(a).version == 6), key=addr_key))
            pb = PortBinding(ifname=e.port_name(), mac=naming.normalize_mac(e.mac), ipv4=v4, ipv6=v6,
                             full=(bridge, bridge) not in self.net_pairs, endpoint=e.id, bridge=bridge)
            ports = list(ports)  # sorted by endpoint id: insert in place (O(log n) comparisons)
            bisect.insort(ports, pb, key=_ep_key)
            if e.published:
                a4 = [a for a in e.ips if parsed_ip(a).version == 4]
                a6 = [a for a in e.ips if parsed_ip(a).version == 6]
                taken = {(p, hp) for p, hp, _, _ in (*published, *published6)}
                new: list[tuple[str, int, str, int]] = []
                new6: list[tuple[str, int, str, int]] = []
                for x in e.published:
                    if (x.protocol, x.host_port) in taken:
                        return None  # the first endpoint by id keeps a host port: the engine decides
                    if a4:
                        new.append((x.protocol, x.host_port, a4[0], x.port))
                    if a6:
                        new6.append((x.protocol, x.host_port, a6[0], x.port))
                    taken.add((x.protocol, x.host_port))
                published = sorted([*published, *new])
                published6 = sorted([*published6, *new6])
        sets = [_with_member(s, e) for s in self.sets]
        return msgspec.structs.replace(self, ports=ports, published4=published, published6=published6, sets=sets)

    def without_endpoint(self, e: PolicyEndpoint, *, local: bool) -> Ruleset | None:
        """This ruleset with endpoint ``e`` removed, or ``None`` when that needs the whole
        picture: its network may leave play here, or a host port it held may pass to another."""
        ports = self.ports
        published = self.published4
        if local:
            i = _find_port(ports, e.id)
            if i >= 0:
                bridge = ports[i].bridge
                if not bridge or not any(p.bridge == bridge and p.endpoint != e.id for p in ports):
                    return None
                ports = [*ports[:i], *ports[i + 1:]]
            mine_ips = set(e.ips)
            if any(a in mine_ips for _, _, a, _ in (*published, *self.published6)):
                return None
        gone = {str(parsed_ip(a)) for a in e.ips}
        sets = [s if not s.selectors or not gone & set(s.elements) else
                msgspec.structs.replace(s, elements=[x for x in s.elements if x not in gone]) for s in self.sets]
        return msgspec.structs.replace(self, ports=ports, published4=published, sets=sets)


def _ep_key(p: PortBinding) -> str:
    return p.endpoint


def _find_port(ports: list[PortBinding], endpoint: str) -> int:
    """The index of ``endpoint``'s port in ``ports`` (sorted by endpoint id), or -1: a
    bisection, not a scan (a scan was 0.9 ms of the 1,000th attach)."""
    i = bisect.bisect_left(ports, endpoint, key=_ep_key)
    return i if i < len(ports) and ports[i].endpoint == endpoint else -1


@functools.lru_cache(maxsize=1 << 16)
def addr_key(a: str) -> tuple[int, int]:
    ip = parsed_ip(a)
    return ip.version, int(ip)


def selects(s: Selector, e: PolicyEndpoint, ip: IPAddr) -> bool:
    """Does selector ``s`` select endpoint ``e`` speaking from/to address ``ip``? (pure, no index)"""
    if s.endpoint is not None and s.endpoint != e.id:
        return False
    if s.network is not None and s.network != e.network:
        return False
    if s.labels and any(e.labels.get(k) != v for k, v in s.labels.items()):
        return False
    return s.cidr is None or ip in ipaddress.ip_network(s.cidr, strict=False)


def _with_member(s: AddrSet, e: PolicyEndpoint) -> AddrSet:
    if not s.selectors:
        return s
    add = []
    for a in e.ips:
        ip = parsed_ip(a)
        if ip.version == s.family and any(selects(x, e, ip) for x in s.selectors):
            add.append(str(ip))
    elements = s.elements
    for a in add:  # kept sorted by address: insert in place (O(log n) comparisons), not re-sorted
        i = bisect.bisect_left(elements, addr_key(a), key=addr_key)
        if i < len(elements) and elements[i] == a:
            continue
        if elements is s.elements:
            elements = list(elements)
        elements.insert(i, a)
    if elements is s.elements:
        return s
    return msgspec.structs.replace(s, elements=elements)


# ----------------------------------------------------------------------------- element normalisation

def merge_intervals(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def disjoint_boxes(items: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """(addr lo, hi, port lo, hi) boxes -> boxes covering the same points, none overlapping."""
    if not items:
        return []
    cuts = sorted({lo for lo, _, _, _ in items} | {hi + 1 for _, hi, _, _ in items})
    out: list[tuple[int, int, int, int]] = []
    prev: tuple[int, int, list[tuple[int, int]]] | None = None
    for a, b in itertools.pairwise(cuts):
        ports = merge_intervals((plo, phi) for lo, hi, plo, phi in items if lo <= a and b - 1 <= hi)
        if not ports:
            if prev is not None:
                out += [(prev[0], prev[1], p, q) for p, q in prev[2]]
                prev = None
            continue
        if prev is not None and prev[2] == ports and prev[1] + 1 == a:
            prev = (prev[0], b - 1, ports)
        else:
            if prev is not None:
                out += [(prev[0], prev[1], p, q) for p, q in prev[2]]
            prev = (a, b - 1, ports)
    if prev is not None:
        out += [(prev[0], prev[1], p, q) for p, q in prev[2]]
    return out


def fmt_addr(fam: int, lo: int, hi: int) -> Addr:
    cls = ipaddress.IPv4Address if fam == 4 else ipaddress.IPv6Address
    if lo == hi:
        return str(cls(lo))
    nets = list(ipaddress.summarize_address_range(cls(lo), cls(hi)))
    if len(nets) == 1:
        return str(nets[0])
    return f"{cls(lo)}-{cls(hi)}"
