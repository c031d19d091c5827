"""macvlan enforcement (pure): the policy of one host's macvlan endpoints, and the two
nftables tables that enforce it inside each endpoint's container namespace.

Why there (``docs/dataplane.md`` "macvlan enforcement" has the measurements): frames
between two macvlan sub-interfaces of one parent are switched inside the macvlan driver
and never reach the host namespace's IP stack, so the host's ``inet``/``bridge`` tables
(:mod:`vnet.core.nft`) never see them. A hook on the parent in the host namespace
(``netdev`` ingress/egress) does see unicast between siblings, but without the sender's
identity (every frame arrives "from the parent") and without conntrack, so it can
neither bind a frame to its sender (anti-spoofing) nor let replies of an allowed
connection through (stateful isolation). The sub-interface itself is the one place that
knows its sender and has conntrack (the container namespace's), so each macvlan endpoint
gets, in its container namespace:

``table netdev vnetm_<h>`` — anti-spoofing, stateless, on the sub-interface's egress hook
    (also sees frames a raw packet socket sends, ``PACKET_QDISC_BYPASS`` included): a
    frame whose source MAC, source IP or ARP sender is not the endpoint's binding is
    dropped, VLAN-tagged frames are dropped, non-IP/ARP frames only go to a peer of the
    same network (none in Full).

``table inet vnetm_<h>`` — isolation and rules, stateful (``ct state``), for traffic in
    and out of that interface only: a NEW flow passes iff :meth:`Policy.verdict` allows
    it. Egress decides by the destination address (the ranges of the networks the modes
    allow, every network's ranges, the gateways, which count as external), ingress by
    the source address (the addresses of the endpoints the modes allow: an address of
    one of our networks that no endpoint owns never sends). The rule lines and their
    address sets are the host ruleset's own (:class:`Ruleset` ``lines``/``sets``),
    gated by "a path exists" (the addresses of endpoints of related networks).

Everything that changes with endpoints, modes and relations is a set element; the
structure depends only on the rules and the interface name, so a change is an element
delta and a rule change a whole write of the table pair (one transaction either way).

The input is :class:`MvPolicy` (compiled by the same engine as the host ruleset:
:func:`compile_macvlan`), plus the host ruleset's rule sets and lines, plus the
endpoint's own binding and place (:class:`MvLocal`, from the node's desired state).
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from vnet.core import drivers, naming
from vnet.core.dataplane_model import EpDesired, NetDesired
from vnet.core.nft import ND, SetDecl, _decl_text, _match, _script_elem, canon
from vnet.core.policy import PolicyEndpoint, RuleLine, Ruleset

if TYPE_CHECKING:
    from vnet.core.policy import Policy

TABLE_PREFIX = "vnetm_"
FAMILIES = ("inet", "netdev")

# ----------------------------------------------------------------------------- the compiled policy


class MvMember(msgspec.Struct, frozen=True, kw_only=True):
    """An endpoint (of any driver, on any host) of a network a local macvlan network relates to."""

    endpoint: str
    network: str
    mac: str
    ips: tuple[str, ...]


class MvNet(msgspec.Struct, frozen=True, kw_only=True):
    """A network of one of this host's macvlan endpoints, as its tables see the others."""

    id: str
    none: bool  # may reach external addresses (and be reached from them)
    full: bool  # non-IP frames dropped
    allow: tuple[str, ...]  # networks whose endpoints the modes allow both ways (itself unless Full)
    related: tuple[str, ...]  # networks with a path (itself included): where rules may apply
    reach4: tuple[str, ...] = ()  # egress the modes allow: address ranges (gateways left out)
    reach6: tuple[str, ...] = ()
    gw4: tuple[str, ...] = ()  # its own gateways: DNS to them is always allowed (the resolver)
    gw6: tuple[str, ...] = ()


class MvPolicy(msgspec.Struct, kw_only=True):
    """What one host's macvlan tables need beyond the host ruleset (rule sets and lines)."""

    nets: list[MvNet] = []
    members: list[MvMember] = []  # sorted by endpoint id
    nets4: list[str] = []  # every network's IPv4 ranges (merged): what is outside is external
    nets6: list[str] = []
    gw4: list[str] = []  # every gateway address (a host address counts as external)
    gw6: list[str] = []

    def net(self, nid: str) -> MvNet | None:
        return next((n for n in self.nets if n.id == nid), None)

    def interest(self) -> set[str]:
        out: set[str] = set()
        for n in self.nets:
            out |= set(n.allow) | set(n.related)
        return out

    # -- deltas computed on the node (no round trip), as Ruleset.with_endpoint ----------
    def with_endpoint(self, e: PolicyEndpoint) -> MvPolicy:
        """This policy with endpoint ``e`` a member (when its network matters here)."""
        if e.network not in self.interest():
            return self
        m = MvMember(endpoint=e.id, network=e.network, mac=naming.normalize_mac(e.mac), ips=_canon_ips(e.ips))
        i = bisect.bisect_left(self.members, e.id, key=_member_key)
        if i < len(self.members) and self.members[i] == m:
            return self
        members = list(self.members)
        if i < len(members) and members[i].endpoint == e.id:
            members[i] = m
        else:
            members.insert(i, m)
        return msgspec.structs.replace(self, members=members)

    def without_endpoint(self, e: PolicyEndpoint) -> MvPolicy:
        i = bisect.bisect_left(self.members, e.id, key=_member_key)
        if i >= len(self.members) or self.members[i].endpoint != e.id:
            return self
        return msgspec.structs.replace(self, members=self.members[:i] + self.members[i + 1:])


def _canon_ips(ips: Iterable[str]) -> tuple[str, ...]:
    """Addresses as nft lists them (so a readback compares equal)."""
    return tuple(str(ipaddress.ip_address(a.split("/")[0])) for a in ips)


def _member_key(m: MvMember) -> str:
    return m.endpoint


IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


def _fmt(fam: int, lo: int, hi: int) -> str:
    cls = ipaddress.IPv4Address if fam == 4 else ipaddress.IPv6Address
    if lo == hi:
        return str(cls(lo))
    nets = list(ipaddress.summarize_address_range(cls(lo), cls(hi)))
    return str(nets[0]) if len(nets) == 1 else f"{cls(lo)}-{cls(hi)}"


def _merge(ivs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ivs):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _minus_points(ivs: list[tuple[int, int]], points: Iterable[int]) -> list[tuple[int, int]]:
    out = list(ivs)
    for p in sorted(set(points)):
        nxt: list[tuple[int, int]] = []
        for lo, hi in out:
            if lo <= p <= hi:
                if lo < p:
                    nxt.append((lo, p - 1))
                if p < hi:
                    nxt.append((p + 1, hi))
            else:
                nxt.append((lo, hi))
        out = nxt
    return out


def owner_ranges(cidrs: Sequence[tuple[IPNet, str]], fam: int) -> list[tuple[int, int, str]]:
    """Disjoint (lo, hi, network) ranges: each address belongs to the most specific network
    holding it, as :meth:`Policy.party` decides (a child's subnet inside its parent's)."""
    mine = [(int(n.network_address), int(n.broadcast_address), n.prefixlen, nid) for n, nid in cidrs
            if n.version == fam]
    cuts = sorted({lo for lo, _, _, _ in mine} | {hi + 1 for _, hi, _, _ in mine})
    out: list[tuple[int, int, str]] = []
    for a, b in itertools.pairwise(cuts):
        owners = [(pl, nid) for lo, hi, pl, nid in mine if lo <= a and b - 1 <= hi]
        if not owners:
            continue
        nid = max(owners, key=lambda t: (t[0], t[1]))[1]
        if out and out[-1][2] == nid and out[-1][1] + 1 == a:
            out[-1] = (out[-1][0], b - 1, nid)
        else:
            out.append((a, b - 1, nid))
    return out


def compile_macvlan(pol: Policy, node: str | None, macvlan_networks: Iterable[str]) -> MvPolicy | None:
    """The macvlan part of host ``node``'s policy (``None``: no local endpoint in a macvlan
    network, nothing to enforce). ``macvlan_networks``: the ids of the macvlan networks."""
    from vnet.core.model import IsolationMode
    from vnet.core.policy import _mode_allows

    mv = set(macvlan_networks)
    local_nets = sorted({e.network for e in pol.endpoints.values()
                         if (node is None or e.node == node) and e.network in mv and e.network in pol.networks})
    if not local_nets:
        return None
    cidrs: list[tuple[IPNet, str]] = []
    gws: dict[int, set[int]] = {4: set(), 6: set()}
    for n in pol.networks.values():
        for c in n.cidrs:
            cidrs.append((ipaddress.ip_network(c, strict=False), n.id))
        for g in n.gateways:
            ip = ipaddress.ip_address(g.split("/")[0])
            gws[ip.version].add(int(ip))
    ranges = {fam: owner_ranges(cidrs, fam) for fam in (4, 6)}
    nets: list[MvNet] = []
    interest: set[str] = set()
    for nid in local_nets:
        a = pol.networks[nid]
        allow = tuple(sorted(o for o in pol.networks if _mode_allows(a, pol.networks[o], pol.relations(nid, o))))
        related = tuple(sorted(o for o in pol.networks if pol.relations(nid, o)))
        interest |= set(allow) | set(related)
        reach: dict[int, tuple[str, ...]] = {}
        for fam in (4, 6):
            ivs = _merge((lo, hi) for lo, hi, owner in ranges[fam] if owner in allow)
            reach[fam] = tuple(_fmt(fam, lo, hi) for lo, hi in _minus_points(ivs, gws[fam]))
        own = [ipaddress.ip_address(g.split("/")[0]) for g in a.gateways]
        nets.append(MvNet(id=nid, none=a.mode == IsolationMode.NONE, full=a.mode == IsolationMode.FULL,
                          allow=allow, related=related, reach4=reach[4], reach6=reach[6],
                          gw4=tuple(str(g) for g in own if g.version == 4),
                          gw6=tuple(str(g) for g in own if g.version == 6)))
    members = [MvMember(endpoint=e.id, network=e.network, mac=naming.normalize_mac(e.mac), ips=_canon_ips(e.ips))
               for e in sorted(pol.endpoints.values(), key=lambda x: x.id) if e.network in interest]
    allnets = {fam: [_fmt(fam, lo, hi) for lo, hi in _merge((lo, hi) for lo, hi, _ in ranges[fam])]
               for fam in (4, 6)}
    gw_out = {fam: [_fmt(fam, g, g) for g in sorted(gws[fam])] for fam in (4, 6)}
    return MvPolicy(nets=nets, members=members, nets4=allnets[4], nets6=allnets[6], gw4=gw_out[4], gw6=gw_out[6])


# ----------------------------------------------------------------------------- one endpoint's tables


class MvLocal(NamedTuple):
    """A macvlan endpoint of this host: where its tables live and its binding."""

    endpoint: str
    network: str
    netns: str  # name under /run/netns or a path
    ifname: str  # the sub-interface inside the container
    mac: str
    ips: tuple[str, ...]  # without prefix length


def table_name(endpoint: str) -> str:
    """``vnetm_`` + 12 hex of SHA-256(endpoint id): both tables of one endpoint."""
    return TABLE_PREFIX + hashlib.sha256(endpoint.encode()).hexdigest()[:12]


def _q(name: str) -> str:
    return '"' + name.replace('"', "") + '"'


def _fam_of(a: str) -> int:
    return 6 if ":" in a else 4  # addresses as the engine gives them (no parsing: the hot path)


class MvIndex:
    """The members of one :class:`MvPolicy` by network (addresses per family, MACs), built
    once per sync and shared by every table: a table's sets are then unions of a few
    lists, not a scan of every member (an attach touches every table whose sets take the
    new address, so this is on the attach path)."""

    def __init__(self, mv: MvPolicy | None) -> None:
        self.mv = mv
        self.addrs: dict[tuple[str, int], list[str]] = {}
        self.macs: dict[str, list[tuple[str, str]]] = {}
        for m in mv.members if mv is not None else ():
            for a in m.ips:
                self.addrs.setdefault((m.network, _fam_of(a)), []).append(a)
            self.macs.setdefault(m.network, []).append((m.endpoint, m.mac))

    def union(self, nets: Iterable[str], fam: int) -> list[str]:
        out: set[str] = set()
        for n in nets:
            out.update(self.addrs.get((n, fam), ()))
        return sorted(out)


def _rule_sets(rs: Ruleset) -> list[SetDecl]:
    used = {ln.src for ln in rs.lines} | {ln.dst for ln in rs.lines}
    return [SetDecl("inet", s.name, ("ipv4_addr" if s.family == 4 else "ipv6_addr",), None, s.interval(),
                    list(s.elements)) for s in rs.sets if s.name in used]


def decls(mv: MvPolicy | None, rs: Ruleset, loc: MvLocal, ix: MvIndex | None = None) -> list[SetDecl]:
    """Every set of the endpoint's two tables, with its elements (``ix``: :class:`MvIndex` of
    ``mv``, when the caller has one)."""
    if ix is None or ix.mv is not mv:
        ix = MvIndex(mv)
    n = mv.net(loc.network) if mv is not None else None
    allow = set(n.allow) if n is not None else set()
    related = set(n.related) if n is not None else set()
    own = [a.split("/")[0] for a in loc.ips]
    own4 = [a for a in own if _fam_of(a) == 4]
    own6 = [a for a in own if _fam_of(a) == 6]

    addrs = ix.union
    l2 = sorted({mac for e, mac in ix.macs.get(loc.network, ()) if e != loc.endpoint}) \
        if n is not None and not n.full else []
    mac = naming.normalize_mac(loc.mac)
    inet = [
        SetDecl("inet", "none_if", ("ifname",), None, False, [_q(loc.ifname)] if n is not None and n.none else []),
        SetDecl("inet", "peer4", ("ipv4_addr",), None, False, addrs(allow, 4)),
        SetDecl("inet", "peer6", ("ipv6_addr",), None, False, addrs(allow, 6)),
        SetDecl("inet", "relp4", ("ipv4_addr",), None, False, addrs(related, 4)),
        SetDecl("inet", "relp6", ("ipv6_addr",), None, False, addrs(related, 6)),
        SetDecl("inet", "reach4", ("ipv4_addr",), None, True, list(n.reach4) if n is not None else []),
        SetDecl("inet", "reach6", ("ipv6_addr",), None, True, list(n.reach6) if n is not None else []),
        SetDecl("inet", "nets4", ("ipv4_addr",), None, True, list(mv.nets4) if mv is not None else []),
        SetDecl("inet", "nets6", ("ipv6_addr",), None, True, list(mv.nets6) if mv is not None else []),
        SetDecl("inet", "gw4", ("ipv4_addr",), None, False, list(mv.gw4) if mv is not None else []),
        SetDecl("inet", "gw6", ("ipv6_addr",), None, False, list(mv.gw6) if mv is not None else []),
        SetDecl("inet", "owngw4", ("ipv4_addr",), None, False, list(n.gw4) if n is not None else []),
        SetDecl("inet", "owngw6", ("ipv6_addr",), None, False, list(n.gw6) if n is not None else []),
        *_rule_sets(rs),
    ]
    netdev = [
        SetDecl("netdev", "bmac", ("ether_addr",), None, False, [mac]),
        SetDecl("netdev", "bip4", ("ipv4_addr",), None, False, own4),
        SetDecl("netdev", "barp4", ("ipv4_addr",), None, False, [*own4, "0.0.0.0"]),
        SetDecl("netdev", "bip6", ("ipv6_addr",), None, False, own6),
        SetDecl("netdev", "l2peers", ("ether_addr",), None, False, l2),
    ]
    return inet + netdev


def _lines(lines: Iterable[RuleLine], chain: str, gate: str = "") -> str:
    out = ""
    for ln in lines:
        if ln.chain != chain:
            continue
        pre = ""
        if gate:
            k = "ip" if ln.family == 4 else "ip6"
            pre = f"{k} {gate}addr @relp{ln.family} "
        out += f"\t\t{pre}{_match(ln)} accept\n"
    return out


def render_inet(rs: Ruleset, loc: MvLocal, sets: Sequence[SetDecl], *, with_elements: bool = True) -> str:
    name, dev = table_name(loc.endpoint), _q(loc.ifname)
    s = (f"table inet {name} {{\n"
         f"\tcomment \"VNet macvlan isolation of endpoint {loc.endpoint}; owned by the node worker\"\n")
    s += "".join(_decl_text(d, with_elements) for d in sets if d.family == "inet")
    s += ("\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n"
          f"\t\tiifname {dev} jump from_net\n\t}}\n")
    s += ("\tchain output {\n\t\ttype filter hook output priority filter; policy accept;\n"
          f"\t\toifname {dev} jump to_net\n\t}}\n")
    # NEW flows into the endpoint: by the source address (bound to its sender at the sender)
    s += ("\tchain from_net {\n\t\tct state established,related accept\n\t\tct state invalid drop\n"
          f"\t\t{ND}\n"
          "\t\tip saddr @peer4 accept\n\t\tip6 saddr @peer6 accept\n"
          # a gateway is a host address: traffic the host starts is always allowed
          "\t\tip saddr @gw4 accept\n\t\tip6 saddr @gw6 accept\n"
          "\t\tip saddr @nets4 goto from_endpoints\n\t\tip6 saddr @nets6 goto from_endpoints\n"
          "\t\tiifname @none_if accept\n" + _lines(rs.lines, "in") + "\t\tdrop\n\t}\n")
    # an address of our networks: an endpoint (rules, where a path exists) or nobody (never)
    s += "\tchain from_endpoints {\n" + _lines(rs.lines, "int", "s") + "\t\tdrop\n\t}\n"
    s += ("\tchain to_net {\n\t\tct state established,related accept\n\t\tct state invalid drop\n"
          f"\t\t{ND}\n"
          "\t\tip daddr @owngw4 meta l4proto { tcp, udp } th dport 53 accept\n"
          "\t\tip6 daddr @owngw6 meta l4proto { tcp, udp } th dport 53 accept\n"
          "\t\tip daddr @reach4 accept\n\t\tip6 daddr @reach6 accept\n"
          "\t\tip daddr @gw4 goto to_external\n\t\tip6 daddr @gw6 goto to_external\n"
          "\t\tip daddr @nets4 goto to_endpoints\n\t\tip6 daddr @nets6 goto to_endpoints\n"
          "\t\tgoto to_external\n\t}\n")
    s += "\tchain to_endpoints {\n" + _lines(rs.lines, "int", "d") + "\t\tdrop\n\t}\n"
    s += "\tchain to_external {\n\t\toifname @none_if accept\n" + _lines(rs.lines, "out") + "\t\tdrop\n\t}\n"
    return s + "}\n"


def render_netdev(loc: MvLocal, sets: Sequence[SetDecl], *, with_elements: bool = True) -> str:
    name, dev = table_name(loc.endpoint), _q(loc.ifname)
    s = (f"table netdev {name} {{\n"
         f"\tcomment \"VNet macvlan anti-spoofing of endpoint {loc.endpoint}; owned by the node worker\"\n")
    s += "".join(_decl_text(d, with_elements) for d in sets if d.family == "netdev")
    # the egress hook of the sub-interface: every frame the container sends, raw sockets included
    s += (f"\tchain egress {{\n\t\ttype filter hook egress device {dev} priority -300; policy accept;\n"
          "\t\tether saddr != @bmac drop\n"
          "\t\tether type { 8021q, 8021ad } drop\n"
          "\t\tether type arp arp saddr ether != @bmac drop\n"
          "\t\tether type arp arp saddr ip != @barp4 drop\n"
          "\t\tether type ip ip saddr != @bip4 drop\n"
          "\t\tether type ip6 ip6 saddr != { fe80::/10, ::/128 } ip6 saddr != @bip6 drop\n"
          "\t\tether type != { ip, ip6, arp } ether daddr != @l2peers drop\n\t}\n")
    return s + "}\n"


def render(mv: MvPolicy | None, rs: Ruleset, loc: MvLocal) -> str:
    """The whole transaction for one endpoint: both tables replaced at once."""
    sets = decls(mv, rs, loc)
    return render_delete(loc.endpoint) + render_inet(rs, loc, sets) + render_netdev(loc, sets)


def structure(rs: Ruleset, loc: MvLocal) -> str:
    """The tables without any element (equal structures: a delta suffices)."""
    sets = decls(None, rs, loc)
    return render_inet(rs, loc, sets, with_elements=False) + render_netdev(loc, sets, with_elements=False)


def render_delete(endpoint: str) -> str:
    name = table_name(endpoint)
    return "".join(f"table {fam} {name}\ndelete table {fam} {name}\n" for fam in FAMILIES)


Elements = dict[tuple[str, str], frozenset[str]]


def elements(mv: MvPolicy | None, rs: Ruleset, loc: MvLocal, ix: MvIndex | None = None) -> Elements:
    return {(d.family, d.name): frozenset(canon(x) for x in d.elements) for d in decls(mv, rs, loc, ix)}


def delta(have: Mapping[tuple[str, str], frozenset[str] | set[str]], want_elems: Elements,
          sets: Sequence[SetDecl], endpoint: str) -> tuple[str, int]:
    """The transaction taking the endpoint's sets from ``have`` to ``want_elems`` (same
    structure; ``sets``: the declarations, :func:`decls`)."""
    name = table_name(endpoint)
    dels: list[str] = []
    adds: list[str] = []
    n = 0
    for d in sets:
        want = want_elems.get((d.family, d.name), frozenset())
        old = have.get((d.family, d.name), frozenset())
        gone, new = sorted(old - want), sorted(want - old)
        if gone:
            n += len(gone)
            dels.append(f"delete element {d.family} {name} {d.name} {{ "
                        + ", ".join(_script_elem(d, c, key_only=True) for c in gone) + " }\n")
        if new:
            n += len(new)
            adds.append(f"add element {d.family} {name} {d.name} {{ "
                        + ", ".join(_script_elem(d, c) for c in new) + " }\n")
    return "".join(dels + adds), n


def locals_from_desired(eps: Iterable[EpDesired], nets: Mapping[str, NetDesired]) -> dict[str, MvLocal]:
    """The node's macvlan endpoints (its desired state) as the tables need them."""
    out: dict[str, MvLocal] = {}
    for e in eps:
        n = nets.get(e.network_id)
        if n is None or not drivers.get(n.driver).enforced_in_container:
            continue
        ips = tuple(a.split("/")[0] for a in (e.ipv4, e.ipv6) if a)
        out[e.id] = MvLocal(e.id, e.network_id, e.netns, e.ifname, e.mac, ips)
    return out
