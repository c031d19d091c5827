"""Render a :class:`~vnet.core.policy.Ruleset` as ONE nftables script, or as the element
delta from one ruleset to another (pure).

Two kinds of transaction:

* :func:`render` — the whole ruleset, only when the *structure* changed (a rule added,
  removed or changed; the first apply; drift of a chain). It replaces our two tables
  — ``table inet vnet`` and ``table bridge vnet`` — in one transaction (``table X;
  delete table X; table X {...}``: the first line makes the delete valid when the
  table does not exist yet), so a packet sees either the old ruleset or the new one,
  never a mix, and nothing of anybody else's is touched.

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
    rule lines (one per rule, port spec and family: ``iifname . oifname @rel_pairs ip
    saddr @<from set> ip daddr @<to set> [meta l4proto P [th dport A-B]] accept``),
    then drop.
    ``input`` treats traffic from our bridges to the host as external.
    ``postrouting`` (nat) masquerades what may leave through the uplink: egress of None
    networks and the flows an egress rule allows.

* :func:`delta` — everything that changes with endpoints and networks is an element
  of a named set or map (port bindings, set members, bridges and bridge pairs,
  published ports), so an attach or a detach is ``delete element`` / ``add element``
  lines in one transaction; its size does not depend on how many endpoints exist.

:func:`decls` lists every set and map with its elements; :func:`structure` is the
script without elements (equal structures -> a delta suffices); :func:`parse_listing`
splits a kernel listing (``nft -j list table``) into structure and elements, so a
resync compares the kernel with the ruleset without writing anything.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Hashable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, NamedTuple, TypeVar

from vnet.core.naming import BRIDGE_PREFIX, VETH_PREFIX
from vnet.core.policy import AddrSet, PortBinding, RuleLine, Ruleset

TABLE = "vnet"
FAMILIES = ("inet", "bridge")
PORT_MATCH = f'"{VETH_PREFIX}*"'
BRIDGE_MATCH = f'"{BRIDGE_PREFIX}*"'


def _q(name: str) -> str:
    return '"' + name.replace('"', "") + '"'


class SetDecl(NamedTuple):
    """One named set or map of our tables, with its elements (nft syntax)."""

    family: str  # "inet" | "bridge"
    name: str
    key: tuple[str, ...]  # key type components
    value: tuple[str, ...] | None  # map value type components; None: a set
    interval: bool
    elements: list[str]

    def type_(self) -> str:
        k = " . ".join(self.key)
        return f"type {k}" + (f" : {' . '.join(self.value)}" if self.value is not None else "")


def _small_decls(rs: Ruleset) -> list[SetDecl]:
    """The inet sets and maps that change with networks and published ports (a few elements)."""
    return [
        SetDecl("inet", "bridges", ("ifname",), None, False, [_q(b) for b in rs.bridges]),
        SetDecl("inet", "none_bridges", ("ifname",), None, False, [_q(b) for b in rs.none_bridges]),
        SetDecl("inet", "net_pairs", ("ifname", "ifname"), ("verdict",), False,
                [f"{_q(a)} . {_q(b)} : accept" for a, b in rs.net_pairs]),
        SetDecl("inet", "rel_pairs", ("ifname", "ifname"), None, False,
                [f"{_q(a)} . {_q(b)}" for a, b in rs.rel_pairs]),
        SetDecl("inet", "published4", ("inet_proto", "inet_service"), ("ipv4_addr", "inet_service"), False,
                [f"{p} . {hp} : {a} . {cp}" for p, hp, a, cp in rs.published4]),
        SetDecl("inet", "pub4_in", ("ipv4_addr", "inet_proto", "inet_service"), None, False,
                sorted({f"{a} . {p} . {cp}" for p, _, a, cp in rs.published4})),
        SetDecl("inet", "published6", ("inet_proto", "inet_service"), ("ipv6_addr", "inet_service"), False,
                [f"{p} . {hp} : {a} . {cp}" for p, hp, a, cp in rs.published6]),
        SetDecl("inet", "pub6_in", ("ipv6_addr", "inet_proto", "inet_service"), None, False,
                sorted({f"{a} . {p} . {cp}" for p, _, a, cp in rs.published6})),
    ]


def _addr_decl(s: AddrSet, with_elements: bool = True) -> SetDecl:
    return SetDecl("inet", s.name, ("ipv4_addr" if s.family == 4 else "ipv6_addr",), None, s.interval(),
                   list(s.elements) if with_elements else [])


def _port_decls(ports: Iterable[PortBinding]) -> list[SetDecl]:
    """The anti-spoofing sets of the bridge table for these port bindings."""
    ports = list(ports)
    ip4 = [f"{_q(p.ifname)} . {p.mac} . {a}" for p in ports for a in p.ipv4]
    return [
        SetDecl("bridge", "mac_bind", ("ifname", "ether_addr"), None, False,
                [f"{_q(p.ifname)} . {p.mac}" for p in ports]),
        SetDecl("bridge", "ip4_bind", ("ifname", "ether_addr", "ipv4_addr"), None, False, ip4),
        SetDecl("bridge", "arp_bind", ("ifname", "ether_addr", "ipv4_addr"), None, False,
                ip4 + [f"{_q(p.ifname)} . {p.mac} . 0.0.0.0" for p in ports]),
        SetDecl("bridge", "ip6_bind", ("ifname", "ether_addr", "ipv6_addr"), None, False,
                [f"{_q(p.ifname)} . {p.mac} . {a}" for p in ports for a in p.ipv6]),
        SetDecl("bridge", "full_ports", ("ifname",), None, False, [_q(p.ifname) for p in ports if p.full]),
    ]


def decls(rs: Ruleset, *, with_elements: bool = True) -> list[SetDecl]:
    """Every set and map of both tables, elements included (the order of the script)."""
    if not with_elements:  # the structure: no element is even formatted (cost independent of endpoints)
        empty = Ruleset(node=rs.node, bridges=[], none_bridges=[], net_pairs=[], ports=[])
        return (_small_decls(empty) + [d._replace(elements=[]) for d in _dispatch_decls(rs)]
                + [_addr_decl(s, False) for s in rs.sets] + _port_decls(()))
    return _small_decls(rs) + _dispatch_decls(rs) + [_addr_decl(s) for s in rs.sets] + _port_decls(rs.ports)


def _decl_text(d: SetDecl, with_elements: bool) -> str:
    kind = "map" if d.value is not None else "set"
    flags = "\n\t\tflags interval" if d.interval else ""
    elems = ""
    if with_elements and d.elements:
        body = ",\n\t\t\t".join(d.elements)
        elems = f"\n\t\telements = {{\n\t\t\t{body}\n\t\t}}"
    return f"\t{kind} {d.name} {{\n\t\t{d.type_()}{flags}{elems}\n\t}}\n"


def _match(ln: RuleLine) -> str:
    k = "ip" if ln.family == 4 else "ip6"
    m = f"{k} saddr @{ln.src} {k} daddr @{ln.dst}"
    if ln.proto:
        m += f" meta l4proto {ln.proto}"
        if ln.lo:
            m += f" th dport {ln.lo}" + (f"-{ln.hi}" if ln.hi != ln.lo else "")
    return m


PORT_PROTOS = ("tcp", "udp", "sctp")
DISPATCH_MIN = 8  # port-protocol lines in one chain from which they are dispatched by port


class _Segment(NamedTuple):
    proto: str
    lo: int
    hi: int
    lines: tuple[RuleLine, ...]


@functools.lru_cache(maxsize=16)
def _segments(lines: tuple[RuleLine, ...]) -> tuple[_Segment, ...]:
    """Disjoint (protocol, port range) segments, each with the lines that cover it (a
    line without ports covers every port of its protocol); adjacent segments with the
    same lines are merged. A sweep over the range boundaries: the cost grows with the
    rules, and it is computed once per structure."""
    out: list[_Segment] = []
    for proto in PORT_PROTOS:
        mine = [ln for ln in lines if ln.proto == proto]
        if not mine:
            continue
        always = [ln for ln in mine if not ln.lo]
        starts: dict[int, list[RuleLine]] = {}
        ends: dict[int, list[RuleLine]] = {}
        for ln in mine:
            if ln.lo:
                starts.setdefault(ln.lo, []).append(ln)
                ends.setdefault(ln.hi + 1, []).append(ln)
        cuts = sorted({0, 65536} | set(starts) | set(ends))
        active: set[RuleLine] = set()
        prev: _Segment | None = None
        for a, b in itertools.pairwise(cuts):
            active -= set(ends.get(a, ()))
            active |= set(starts.get(a, ()))
            cov = tuple(sorted(always + list(active)))
            if prev is not None and prev.lines == cov:
                prev = prev._replace(hi=b - 1)
                continue
            if prev is not None and prev.lines:
                out.append(prev)
            prev = _Segment(proto, a, b - 1, cov)
        if prev is not None and prev.lines:
            out.append(prev)
    return tuple(out)


def _dispatched(rs: Ruleset, kind: str) -> tuple[list[RuleLine], tuple[_Segment, ...]]:
    """(lines checked one by one, port segments looked up in one map) of chain ``kind``.
    Many rules would otherwise be many lines for every new flow (per-packet cost growing
    with the rules): from DISPATCH_MIN port-protocol lines on, one ``meta l4proto . th
    dport`` verdict-map lookup jumps to the chain of the lines that can match."""
    lines = [ln for ln in rs.lines if ln.chain == kind]
    if sum(1 for ln in lines if ln.proto in PORT_PROTOS) < DISPATCH_MIN:
        return lines, ()
    return [ln for ln in lines if ln.proto not in PORT_PROTOS], _segments(tuple(ln for ln in lines
                                                                               if ln.proto in PORT_PROTOS))


def _seg_chain(prefix: str, g: _Segment) -> str:
    return f"{prefix}_{g.proto}_{g.lo}_{g.hi}"


def _dispatch_decls(rs: Ruleset) -> list[SetDecl]:
    out = []
    for kind, prefix in (("int", "int"), ("out", "out"), ("in", "in"), ("out", "masq")):
        _, segs = _dispatched(rs, kind)
        if segs:
            out.append(SetDecl("inet", f"{prefix}_ports", ("inet_proto", "inet_service"), ("verdict",), True,
                               [f"{g.proto} . {g.lo}" + (f"-{g.hi}" if g.hi != g.lo else "")
                                + f" : jump {_seg_chain(prefix, g)}" for g in segs]))
    return out


def _lines(rs: Ruleset, chain: str, verdict: str = "accept", prefix: str = "") -> str:
    pre = "iifname . oifname @rel_pairs " if chain == "int" else ""
    direct, segs = _dispatched(rs, chain)
    out = "".join(f"\t\t{pre}{_match(ln)} {verdict}\n" for ln in direct)
    if segs:
        out += f"\t\tmeta l4proto . th dport vmap @{prefix or chain}_ports\n"
    return out


def _seg_chains(rs: Ruleset, chain: str, verdict: str = "accept", prefix: str = "") -> str:
    pre = "iifname . oifname @rel_pairs " if chain == "int" else ""
    _, segs = _dispatched(rs, chain)
    return "".join(f"\tchain {_seg_chain(prefix or chain, g)} {{\n"
                   + "".join(f"\t\t{pre}{_match(ln)} {verdict}\n" for ln in g.lines) + "\t}\n" for g in segs)


ND = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept"
RESOLVER = "meta l4proto { tcp, udp } th dport 53 fib daddr . iif type local accept"


def render_inet(rs: Ruleset, *, with_elements: bool = True) -> str:
    s = f"table inet {TABLE} {{\n"
    s += f"\tcomment \"VNet isolation (node {rs.node or '-'}); owned by the node worker\"\n"
    s += "".join(_decl_text(d, with_elements) for d in decls(rs, with_elements=with_elements)
                 if d.family == "inet")
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
    s += "\tchain between_endpoints {\n" + _lines(rs, "int") + "\t\tdrop\n\t}\n"
    s += "\tchain to_external {\n\t\tiifname @none_bridges accept\n" + _lines(rs, "out") + "\t\tdrop\n\t}\n"
    s += ("\tchain from_external {\n\t\toifname @none_bridges accept\n"
          "\t\tip daddr . meta l4proto . th dport @pub4_in accept\n"
          "\t\tip6 daddr . meta l4proto . th dport @pub6_in accept\n" + _lines(rs, "in") + "\t\tdrop\n\t}\n")
    s += ("\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n"
          f"\t\tiifname {BRIDGE_MATCH} jump from_endpoint\n\t}}\n")
    # DNS to the node's resolver on the gateway of the bridge the query came in on (and on
    # no other host address) is always allowed, like ARP/NDP: explain says the same
    s += ("\tchain from_endpoint {\n"
          "\t\tct state established,related accept\n"
          "\t\tct state invalid drop\n"
          f"\t\t{ND}\n"
          f"\t\t{RESOLVER}\n"
          "\t\tgoto to_external\n\t}\n")
    # masquerade what may leave through the uplink: None networks, and the flows an
    # egress rule allows (an external host has no route back to a container subnet)
    s += ("\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
          f"\t\tiifname {BRIDGE_MATCH} oifname != {BRIDGE_MATCH} jump masq\n"
          f"\t\tct status dnat oifname {BRIDGE_MATCH} masquerade\n\t}}\n")
    # published ports: DNAT on the host's own addresses (from outside and from the host itself),
    # IPv4 and IPv6 alike (the same compiled list, one map per family)
    for chain, hook in (("publish", "prerouting"), ("publish_local", "output")):
        s += (f"\tchain {chain} {{\n\t\ttype nat hook {hook} priority -100; policy accept;\n"
              "\t\tfib daddr type local dnat ip to meta l4proto . th dport map @published4\n"
              "\t\tfib daddr type local dnat ip6 to meta l4proto . th dport map @published6\n\t}\n")
    s += ("\tchain masq {\n\t\tiifname @none_bridges masquerade\n" + _lines(rs, "out", "masquerade", "masq")
          + "\t}\n")
    s += (_seg_chains(rs, "int") + _seg_chains(rs, "out") + _seg_chains(rs, "in")
          + _seg_chains(rs, "out", "masquerade", "masq"))
    return s + "}\n"


def render_bridge(rs: Ruleset, *, with_elements: bool = True) -> str:
    s = f"table bridge {TABLE} {{\n"
    s += f"\tcomment \"VNet anti-spoofing (node {rs.node or '-'}); owned by the node worker\"\n"
    s += "".join(_decl_text(d, with_elements) for d in decls(rs, with_elements=with_elements)
                 if d.family == "bridge")
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


def structure(rs: Ruleset) -> str:
    """The script without any element: two rulesets with the same structure differ by a delta."""
    return render_inet(rs, with_elements=False) + render_bridge(rs, with_elements=False)


def render_delete() -> str:
    """Remove our tables (explicit teardown only; a stopping worker leaves them: fail static)."""
    return "".join(f"table {fam} {TABLE}\ndelete table {fam} {TABLE}\n" for fam in FAMILIES)


# ----------------------------------------------------------------------------- elements and deltas

Elements = dict[tuple[str, str], frozenset[str]]  # (family, set name) -> canonical elements


def canon(elem: str) -> str:
    """An element in the form :func:`parse_listing` gives the kernel's (names unquoted)."""
    return elem.replace('"', "")


def elements(rs: Ruleset) -> Elements:
    return {(d.family, d.name): frozenset(canon(x) for x in d.elements) for d in decls(rs)}


def _script_elem(d: SetDecl, c: str, *, key_only: bool = False) -> str:
    """Canonical element -> nft syntax (ifname components quoted)."""
    key, _, val = c.partition(" : ")
    parts = key.split(" . ")
    k = " . ".join(_q(p) if t == "ifname" else p for p, t in zip(parts, d.key, strict=False))
    if d.value is None or key_only:
        return k
    return f"{k} : {val}"


def delta(have: Mapping[tuple[str, str], AbstractSet[str]], rs: Ruleset) -> tuple[str, int]:
    """The transaction taking our sets from ``have`` to ``rs`` (same structure), and how
    many elements it changes ("" and 0 when there is nothing to do). Deletions come
    first, so an element whose value changes (a map) is replaced in the same transaction."""
    changes, meta = delta_changes(have, rs)
    return delta_script(changes, meta)


def delta_changes(have: Mapping[tuple[str, str], AbstractSet[str]], rs: Ruleset
                  ) -> tuple[Changes, dict[tuple[str, str], SetDecl]]:
    """:func:`delta` as data: the canonical changes per set, and every set's declaration
    (elements left out) in the order of the script."""
    changes: Changes = {}
    meta: dict[tuple[str, str], SetDecl] = {}
    for d in decls(rs):
        key = (d.family, d.name)
        meta[key] = d._replace(elements=[])
        want = frozenset(canon(x) for x in d.elements)
        old = have.get(key, frozenset())
        gone = frozenset(old - want)
        new = want - old
        if gone or new:
            changes[key] = (gone, new)
    return changes, meta


Changes = dict[tuple[str, str], tuple[frozenset[str], frozenset[str]]]  # key -> (removed, added), canonical


def delta_script(changes: Changes, meta: Mapping[tuple[str, str], SetDecl]) -> tuple[str, int]:
    """The nft script of ``changes`` (``delete element`` lines, then ``add element`` lines,
    sets in the order of ``meta``) and how many elements it changes."""
    dels: list[str] = []
    adds: list[str] = []
    n = 0
    for key in meta:
        if key not in changes:
            continue
        gone, new = changes[key]
        d = meta[key]
        if gone:
            n += len(gone)
            items = ", ".join(_script_elem(d, c, key_only=True) for c in sorted(gone))
            dels.append(f"delete element {d.family} {TABLE} {d.name} {{ {items} }}\n")
        if new:
            n += len(new)
            items = ", ".join(_script_elem(d, c) for c in sorted(new))
            adds.append(f"add element {d.family} {TABLE} {d.name} {{ {items} }}\n")
    return "".join(dels + adds), n


_T = TypeVar("_T", bound=Hashable)


def _differ(old: Sequence[_T], new: Sequence[_T]) -> tuple[set[_T], set[_T]]:
    """(in ``old`` only, in ``new`` only) for two lists without duplicates where the node
    changed a few items of ``old`` to make ``new``: the common head and tail (the very same
    objects: a pointer comparison each) are skipped and only the middle is hashed. Hashing
    every port binding was most of the 1,000th attach's delta (~1 ms)."""
    lo, m = 0, min(len(old), len(new))
    while lo < m and old[lo] is new[lo]:
        lo += 1
    ho, hn = len(old), len(new)
    while ho > lo and hn > lo and old[ho - 1] is new[hn - 1]:
        ho -= 1
        hn -= 1
    a, b = set(old[lo:ho]), set(new[lo:hn])
    return a - b, b - a


def delta_between(old: Ruleset, new: Ruleset) -> tuple[Changes, dict[tuple[str, str], SetDecl]]:
    """:func:`delta_changes` from ruleset ``old`` (what the kernel holds) to ``new`` (same
    structure), looking only at what differs: lists the node left untouched (the same
    objects) are skipped, changed port bindings are formatted alone — the cost of an attach
    does not grow with the endpoints already there. The script is :func:`delta_script`."""
    changes: Changes = {}
    meta: dict[tuple[str, str], SetDecl] = {}

    def diff(d_old: list[str], d_new: SetDecl) -> None:
        meta[(d_new.family, d_new.name)] = d_new
        a = {canon(x) for x in d_old}
        b = {canon(x) for x in d_new.elements}
        if a != b:
            changes[(d_new.family, d_new.name)] = (frozenset(a - b), frozenset(b - a))

    for d_o, d_n in zip(_small_decls(old), _small_decls(new), strict=True):
        diff(d_o.elements, d_n)
    olds = {s.name: s for s in old.sets}
    for s in new.sets:
        o = olds.get(s.name)
        d = _addr_decl(s, False)
        meta[(d.family, d.name)] = d
        if o is s or (o is not None and o.elements is s.elements):
            continue
        gone_e, new_e = _differ(o.elements if o is not None else [], s.elements)
        if gone_e or new_e:
            changes[(d.family, d.name)] = (frozenset(gone_e), frozenset(new_e))
    if old.ports is not new.ports:
        po, pn = _differ(old.ports, new.ports)
        for d_gone, d_new in zip(_port_decls(sorted(po, key=lambda p: p.endpoint)),
                                 _port_decls(sorted(pn, key=lambda p: p.endpoint)), strict=True):
            a = {canon(x) for x in d_gone.elements}
            b = {canon(x) for x in d_new.elements}
            if a != b:
                changes[(d_new.family, d_new.name)] = (frozenset(a - b), frozenset(b - a))
    for d in _port_decls(()):
        meta[(d.family, d.name)] = d
    return changes, meta


def _canon_json(x: Any) -> str:
    if isinstance(x, dict):
        if "concat" in x:
            return " . ".join(_canon_json(i) for i in x["concat"])
        if "prefix" in x:
            return f"{_canon_json(x['prefix']['addr'])}/{x['prefix']['len']}"
        if "range" in x:
            lo, hi = x["range"]
            return f"{_canon_json(lo)}-{_canon_json(hi)}"
        if "elem" in x:
            return _canon_json(x["elem"].get("val"))
        if len(x) == 1 and next(iter(x.values())) is None:  # a verdict: {"accept": null}
            return str(next(iter(x)))
        for v in ("jump", "goto"):  # {"jump": {"target": "chain"}}
            if v in x and isinstance(x[v], dict):
                return f"{v} {x[v].get('target')}"
        return json.dumps(x, sort_keys=True)
    if isinstance(x, list) and len(x) == 2:  # a map element: [key, value]
        return f"{_canon_json(x[0])} : {_canon_json(x[1])}"
    return str(x)


def parse_listing(docs: Iterable[tuple[str, Any]]) -> tuple[str, Elements]:
    """``(family, nft -j list table <family> vnet)`` documents -> (structure digest text,
    elements). The structure text leaves out handles and elements, so it is equal for
    any two listings of the same structure whatever their elements."""
    elems: dict[tuple[str, str], frozenset[str]] = {}
    parts: list[str] = []

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "handle"}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    for fam, doc in docs:
        items = []
        for item in doc.get("nftables", []):
            if "metainfo" in item:
                continue
            kind = "set" if "set" in item else "map" if "map" in item else None
            if kind is not None:
                body = dict(item[kind])
                el = body.pop("elem", [])
                elems[(fam, str(body.get("name")))] = frozenset(_canon_json(e) for e in el)
                item = {kind: body}
            items.append(strip(item))
        parts.append(json.dumps(items, sort_keys=True))
    return "\n".join(parts), elems
