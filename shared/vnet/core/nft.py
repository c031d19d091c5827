"""Render a :class:`~vnet.core.policy.Ruleset` as ONE nftables script (pure).

The script replaces our two tables — ``table inet vnet`` and ``table bridge vnet`` —
in one transaction (``table X; delete table X; table X {...}``: the first line makes
the delete valid when the table does not exist yet), so a packet sees either the old
ruleset or the new one, never a mix, and nothing of anybody else's is touched.

Layout (``docs/policy.md`` has the reasoning):

``table bridge vnet`` — anti-spoofing, stateless, before anything else
    ``prerouting`` (priority -300, policy accept) sends every frame entering from one
    of our ports (``vne*``: matched by name shape, so a port the ruleset does not know
    yet is checked too and fails closed) to ``from_port``, which drops a frame whose
    source MAC, source IP or ARP sender does not match the port's binding, any
    VLAN-tagged frame, and non-IP/ARP frames of Full networks.

``table inet vnet`` — isolation and rules (needs br_netfilter: bridged IP traffic
passes the inet ``forward`` hook, where conntrack works)
    ``forward`` (policy accept) dispatches only traffic entering or leaving one of our
    bridges (``vnb-*``) to ``governed``: established/related accepted first, then one
    verdict-map lookup on (in bridge . out bridge) for what the modes allow, then the
    rule sets (``saddr . daddr``, ``. l4proto``, ``. l4proto . dport``), then drop.
    ``input`` treats traffic from our bridges to the host as external.
    ``postrouting`` (nat) masquerades what may leave through the uplink: egress of None
    networks and the flows an egress rule allows.
"""

from __future__ import annotations

from collections.abc import Iterable

from vnet.core.naming import BRIDGE_PREFIX, VETH_PREFIX
from vnet.core.policy import FamilySets, Ruleset

TABLE = "vnet"
FAMILIES = ("inet", "bridge")
PORT_MATCH = f'"{VETH_PREFIX}*"'
BRIDGE_MATCH = f'"{BRIDGE_PREFIX}*"'


def _q(name: str) -> str:
    return '"' + name.replace('"', "") + '"'


def _elements(items: Iterable[str]) -> str:
    lst = list(items)
    if not lst:
        return ""
    body = ",\n\t\t\t".join(lst)
    return f"\n\t\telements = {{\n\t\t\t{body}\n\t\t}}"


def _set(name: str, typ: str, items: Iterable[str], *, interval: bool = False) -> str:
    flags = "\n\t\tflags interval" if interval else ""
    return f"\tset {name} {{\n\t\ttype {typ}{flags}{_elements(items)}\n\t}}\n"


def _fam_sets(prefix: str, fam: int, fs: FamilySets) -> str:
    a = "ipv4_addr" if fam == 4 else "ipv6_addr"
    return (_set(f"{prefix}{fam}_all", f"{a} . {a}", (f"{s} . {d}" for s, d in fs.all), interval=True)
            + _set(f"{prefix}{fam}_proto", f"{a} . {a} . inet_proto", (f"{s} . {d} . {p}" for s, d, p in fs.proto),
                   interval=True)
            + _set(f"{prefix}{fam}_port", f"{a} . {a} . inet_proto . inet_service",
                   (f"{s} . {d} . {p} . {lo}" + (f"-{hi}" if hi != lo else "") for s, d, p, lo, hi in fs.port),
                   interval=True))


def _fam_rules(prefix: str) -> str:
    out = ""
    for fam, k in ((4, "ip"), (6, "ip6")):
        out += (f"\t\t{k} saddr . {k} daddr @{prefix}{fam}_all accept\n"
                f"\t\t{k} saddr . {k} daddr . meta l4proto @{prefix}{fam}_proto accept\n"
                f"\t\t{k} saddr . {k} daddr . meta l4proto . th dport @{prefix}{fam}_port accept\n")
    return out


ND = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept"


def render_inet(rs: Ruleset) -> str:
    s = f"table inet {TABLE} {{\n"
    s += f"\tcomment \"VNet isolation (node {rs.node or '-'}); replaced whole by the node worker\"\n"
    s += _set("bridges", "ifname", (_q(b) for b in rs.bridges))
    s += _set("none_bridges", "ifname", (_q(b) for b in rs.none_bridges))
    s += ("\tmap net_pairs {\n\t\ttype ifname . ifname : verdict"
          + _elements(f"{_q(a)} . {_q(b)} : accept" for a, b in rs.net_pairs) + "\n\t}\n")
    s += ("\tmap published4 {\n\t\ttype inet_proto . inet_service : ipv4_addr . inet_service"
          + _elements(f"{p} . {hp} : {a} . {cp}" for p, hp, a, cp in rs.published4) + "\n\t}\n")
    for prefix, f4, f6 in (("int", rs.internal4, rs.internal6), ("out", rs.egress4, rs.egress6),
                           ("in", rs.ingress4, rs.ingress6)):
        s += _fam_sets(prefix, 4, f4) + _fam_sets(prefix, 6, f6)
    s += ("\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n"
          f"\t\tiifname {BRIDGE_MATCH} jump governed\n"
          f"\t\toifname {BRIDGE_MATCH} jump governed\n\t}}\n")
    s += ("\tchain governed {\n"
          "\t\tct state established,related accept\n"
          "\t\tct state invalid drop\n"
          f"\t\t{ND}\n"
          # hairpin: a container toward a published port on a host address is egress (external)
          f"\t\tct status dnat iifname {BRIDGE_MATCH} oifname {BRIDGE_MATCH} goto hairpin\n"
          "\t\tiifname . oifname vmap @net_pairs\n"
          f"\t\tiifname {BRIDGE_MATCH} oifname {BRIDGE_MATCH} goto between_endpoints\n"
          f"\t\tiifname {BRIDGE_MATCH} goto to_external\n"
          "\t\tgoto from_external\n\t}\n")
    s += "\tchain hairpin {\n\t\tiifname @none_bridges accept\n\t\tdrop\n\t}\n"
    s += "\tchain between_endpoints {\n" + _fam_rules("int") + "\t\tdrop\n\t}\n"
    s += "\tchain to_external {\n\t\tiifname @none_bridges accept\n" + _fam_rules("out") + "\t\tdrop\n\t}\n"
    s += "\tchain from_external {\n\t\toifname @none_bridges accept\n" + _fam_rules("in") + "\t\tdrop\n\t}\n"
    s += ("\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n"
          f"\t\tiifname {BRIDGE_MATCH} jump from_endpoint\n\t}}\n")
    s += ("\tchain from_endpoint {\n"
          "\t\tct state established,related accept\n"
          "\t\tct state invalid drop\n"
          f"\t\t{ND}\n"
          "\t\tgoto to_external\n\t}\n")
    # masquerade what may leave through the uplink: None networks, and the flows an
    # egress rule allows (an external host has no route back to a container subnet)
    s += ("\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
          f"\t\tiifname {BRIDGE_MATCH} oifname != {BRIDGE_MATCH} jump masq\n"
          f"\t\tct status dnat oifname {BRIDGE_MATCH} masquerade\n\t}}\n")
    # published ports: DNAT on the host's own addresses (from outside and from the host itself)
    for chain, hook in (("publish", "prerouting"), ("publish_local", "output")):
        s += (f"\tchain {chain} {{\n\t\ttype nat hook {hook} priority -100; policy accept;\n"
              "\t\tfib daddr type local dnat ip to meta l4proto . th dport map @published4\n\t}\n")
    s += "\tchain masq {\n\t\tiifname @none_bridges masquerade\n"
    for fam, k in ((4, "ip"), (6, "ip6")):
        s += (f"\t\t{k} saddr . {k} daddr @out{fam}_all masquerade\n"
              f"\t\t{k} saddr . {k} daddr . meta l4proto @out{fam}_proto masquerade\n"
              f"\t\t{k} saddr . {k} daddr . meta l4proto . th dport @out{fam}_port masquerade\n")
    s += "\t}\n"
    return s + "}\n"


def render_bridge(rs: Ruleset) -> str:
    mac = [f"{_q(p.ifname)} . {p.mac}" for p in rs.ports]
    ip4 = [f"{_q(p.ifname)} . {p.mac} . {a}" for p in rs.ports for a in p.ipv4]
    arp = ip4 + [f"{_q(p.ifname)} . {p.mac} . 0.0.0.0" for p in rs.ports]
    ip6 = [f"{_q(p.ifname)} . {p.mac} . {a}" for p in rs.ports for a in p.ipv6]
    s = f"table bridge {TABLE} {{\n"
    s += f"\tcomment \"VNet anti-spoofing (node {rs.node or '-'}); replaced whole by the node worker\"\n"
    s += _set("mac_bind", "ifname . ether_addr", mac)
    s += _set("ip4_bind", "ifname . ether_addr . ipv4_addr", ip4)
    s += _set("arp_bind", "ifname . ether_addr . ipv4_addr", arp)
    s += _set("ip6_bind", "ifname . ether_addr . ipv6_addr", ip6)
    s += _set("full_ports", "ifname", (_q(p.ifname) for p in rs.ports if p.full))
    s += ("\tchain prerouting {\n\t\ttype filter hook prerouting priority -300; policy accept;\n"
          f"\t\tiifname {PORT_MATCH} jump from_port\n\t}}\n")
    s += ("\tchain from_port {\n"
          "\t\tiifname . ether saddr != @mac_bind drop\n"
          "\t\tether type { 8021q, 8021ad } drop\n"
          "\t\tether type arp iifname . arp saddr ether . arp saddr ip != @arp_bind drop\n"
          "\t\tether type ip iifname . ether saddr . ip saddr != @ip4_bind drop\n"
          "\t\tether type ip6 ip6 saddr != { fe80::/10, ::/128 } iifname . ether saddr . ip6 saddr != @ip6_bind drop\n"
          "\t\tiifname @full_ports ether type != { ip, ip6, arp } drop\n\t}\n")
    return s + "}\n"


def render(rs: Ruleset) -> str:
    """The whole transaction: both tables replaced at once."""
    head = "".join(f"table {fam} {TABLE}\ndelete table {fam} {TABLE}\n" for fam in FAMILIES)
    return head + render_inet(rs) + render_bridge(rs)


def render_delete() -> str:
    """Remove our tables (explicit teardown only; a stopping worker leaves them: fail static)."""
    return "".join(f"table {fam} {TABLE}\ndelete table {fam} {TABLE}\n" for fam in FAMILIES)
