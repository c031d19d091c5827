"""The policy engine (pure): isolation verdicts with their reasons, and the per-host ruleset.

One engine answers two questions from the same inputs (networks with their isolation
mode and relations, endpoints with addresses, MACs and labels, and allow rules):

* :meth:`Policy.verdict` — is a NEW flow ``(src, dst, protocol, port)`` allowed, and
  why (the path relation, each side's mode, the rule(s) that allowed it);
* :meth:`Policy.compile` — the ruleset model of one host (:class:`Ruleset`: port
  bindings, bridge pairs the modes allow, rule elements), rendered to one nftables
  script by :mod:`vnet.core.nft`.

Semantics (DESIGN section 4), as built here:

* a path exists between two endpoints when they share a network or their networks
  are directly related (connected, parent/child edge, shared mesh group) — symmetric
  and not transitive; every endpoint also has a path to external addresses;
* a flow between two endpoints is allowed by the modes iff a path exists and
  both sides allow it: same network — the mode is not ``full``; two related networks —
  both are ``mesh_only`` or ``none`` (``peer_only`` keeps to its own network, ``full``
  to nothing);
* endpoint -> external (including any host/gateway address): only ``none``;
  external -> endpoint: only ``none``, or a port the endpoint publishes (on the host's
  addresses: DNAT, no user-space proxy; hairpin from None networks);
* allow rules are directional (``from`` initiates toward ``to``), additive in every
  mode, authorise both sides of exactly those flows and never create a path between
  unrelated networks; selector fields AND together, list entries OR; a selector with
  only ``cidr`` also selects external addresses; ``ports`` absent = every protocol
  (ICMP included); ``{protocol}``, ``{protocol, port}``, ``{protocol, port,
  end_port}`` inclusive; ``icmp`` means ICMP for IPv4 and ICMPv6 for IPv6;
* anti-spoofing is not a verdict: a source address that no endpoint owns (and that
  is inside one of our networks) can never send (:class:`Verdict` says so).

The data-plane sets are expanded per endpoint pair (rules) and per bridge pair
(modes) so the per-packet cost is a fixed number of set lookups whatever the number
of rules or endpoints; see ``docs/policy.md``.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import msgspec

from vnet.core import errors as E
from vnet.core import naming
from vnet.core.model import IsolationMode
from vnet.core.policy_inputs import (
    PORT_PROTOCOLS,
    AllowRule,
    IPAddr,
    IPNet,
    PolicyEndpoint,
    PolicyNetwork,
    Port,
    PortSpec,
    Protocol,
    Published,
    RuleId,
    Selector,
    SelStr,
    validate_rule,
)
from vnet.core.ruleset import (
    Addr,
    AddrSet,
    PortBinding,
    RuleLine,
    Ruleset,
    addr_key,
    disjoint_boxes,
    fmt_addr,
    merge_intervals,
    selects,
)

# The engine, and re-exported: its inputs (vnet.core.policy_inputs) and the model it compiles
# (vnet.core.ruleset), so callers import everything of policy from here.
__all__ = [
    "PORT_PROTOCOLS",
    "Addr",
    "AddrSet",
    "AllowRule",
    "IPAddr",
    "IPNet",
    "Party",
    "PartyKind",
    "Policy",
    "PolicyEndpoint",
    "PolicyNetwork",
    "Port",
    "PortBinding",
    "PortSpec",
    "Protocol",
    "Published",
    "RuleId",
    "RuleLine",
    "Ruleset",
    "SelStr",
    "Selector",
    "Verdict",
    "VerdictBy",
    "addr_key",
    "disjoint_boxes",
    "endpoint_from_parts",
    "fmt_addr",
    "merge_intervals",
    "networks_in_play",
    "relations",
    "selects",
    "validate_rule",
]

# ----------------------------------------------------------------------------- topology


def relations(networks: Mapping[str, PolicyNetwork], a: str, b: str) -> list[str]:
    """Direct relations between networks ``a`` and ``b`` of ``networks`` (symmetric, not
    transitive): "same", "connected", "parent", "child", "mesh:<group>"; [] = no path."""
    if a == b:
        return ["same"]
    na, nb = networks.get(a), networks.get(b)
    if na is None or nb is None:
        return []
    out: list[str] = []
    if b in na.connected or a in nb.connected:
        out.append("connected")
    if na.parent == b or a in nb.children:
        out.append("parent")
    if nb.parent == a or b in na.children:
        out.append("child")
    out += [f"mesh:{m}" for m in sorted(set(na.mesh_groups) & set(nb.mesh_groups))]
    return out


def networks_in_play(networks: Mapping[str, PolicyNetwork], local_networks: Iterable[str]) -> set[str]:
    """The networks in play on a host whose endpoints are in ``local_networks``: those of them
    that exist in ``networks``, and every network directly related to one of those (a path
    exists). Nothing of another network ever appears in the host's ruleset (a rule never
    makes a path to an unrelated network), so its ruleset needs the networks and the
    endpoints of these only (:meth:`Policy.compile` decides with this, and the policy
    service reads a node's endpoints with it)."""
    local = {n for n in local_networks if n in networks}
    out = set(local)
    for nid in local:
        out |= {o for o in networks if relations(networks, nid, o)}
    return out


# ----------------------------------------------------------------------------- verdict

PartyKind = Literal["endpoint", "external", "host", "unassigned"]
# "ungoverned": neither side is an endpoint, so no rule of VNet's is on the path; such a flow
# is reported allowed=True (VNet does not block it) but never as allowed *by* VNet.
VerdictBy = Literal["mode", "rule", "denied", "ungoverned"]


class Party(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    kind: PartyKind
    address: str
    endpoint: str | None = None
    network: str | None = None
    mode: str | None = None


class Verdict(msgspec.Struct, kw_only=True):
    """The answer for one NEW flow (replies of an allowed flow always pass)."""

    allowed: bool
    src: Party
    dst: Party
    protocol: str
    port: int | None
    path: list[str]  # relations: "same", "connected", "parent", "child", "mesh:<group>", "external"; [] = none
    by: VerdictBy
    rules: list[str]  # ids of the rules that allow the flow (when the modes do not)
    reasons: list[str]  # the chain, for people


# ----------------------------------------------------------------------------- engine

_PROTO_ALL = "*"


def _mode_allows(a: PolicyNetwork, b: PolicyNetwork, rel: Sequence[str]) -> bool:
    if not rel:
        return False
    if a.id == b.id:
        return a.mode != IsolationMode.FULL
    relaxed = (IsolationMode.MESH_ONLY, IsolationMode.NONE)
    return a.mode in relaxed and b.mode in relaxed


def _l4(protocol: str, family: int) -> str:
    if protocol == "icmp":
        return "icmp" if family == 4 else "ipv6-icmp"
    return protocol


class Policy:
    """The engine over one snapshot of networks, endpoints and rules."""

    def __init__(self, networks: Iterable[PolicyNetwork], endpoints: Iterable[PolicyEndpoint],
                 rules: Iterable[AllowRule] = ()) -> None:
        self.networks: dict[str, PolicyNetwork] = {n.id: n for n in networks}
        self.endpoints: dict[str, PolicyEndpoint] = {e.id: e for e in endpoints}
        self.rules: list[AllowRule] = sorted(rules, key=lambda r: r.id)
        self._by_ip: dict[IPAddr, PolicyEndpoint] = {}
        self._ips: dict[str, tuple[IPAddr, ...]] = {}
        for e in self.endpoints.values():
            self._ips[e.id] = tuple(ipaddress.ip_address(a) for a in e.ips)
            for ip in self._ips[e.id]:
                self._by_ip[ip] = e
        self._gateways: dict[IPAddr, str] = {}
        self._nets: list[tuple[IPNet, str]] = []
        for n in self.networks.values():
            for g in n.gateways:
                self._gateways[ipaddress.ip_address(g.split("/")[0])] = n.id
            for c in n.cidrs:
                self._nets.append((ipaddress.ip_network(c, strict=False), n.id))
        self._nets.sort(key=lambda t: -t[0].prefixlen)  # most specific first (children inside parents)
        self._cidrs: dict[str, IPNet] = {}
        # indexes for selector matching: compile cost ~ the endpoints a rule selects, not all of them
        self._by_net: dict[str, list[PolicyEndpoint]] = {}
        self._sorted_ips_ready = False
        self._by_label: dict[tuple[str, str], list[PolicyEndpoint]] = {}
        self._sorted_ips: dict[int, list[tuple[int, str]]] = {4: [], 6: []}
        # a host port of one node maps to one endpoint: the first by id that publishes it
        self._pub_owner: dict[tuple[str, str, int], str] = {}
        for e in sorted(self.endpoints.values(), key=lambda x: x.id):
            for pb in e.published:
                self._pub_owner.setdefault((e.node, pb.protocol, pb.host_port), e.id)
            self._by_net.setdefault(e.network, []).append(e)
            for ip in self._ips[e.id]:
                self._sorted_ips[ip.version].append((int(ip), e.id))
            for kv in e.labels.items():
                self._by_label.setdefault(kv, []).append(e)

    # -- topology ------------------------------------------------------------------
    def relations(self, a: str, b: str) -> list[str]:
        """Direct relations between networks ``a`` and ``b`` (symmetric, not transitive)."""
        return relations(self.networks, a, b)

    def _cidr(self, c: str) -> IPNet:
        n = self._cidrs.get(c)
        if n is None:
            n = self._cidrs[c] = ipaddress.ip_network(c, strict=False)
        return n

    # -- selectors -----------------------------------------------------------------
    def _sel_ep(self, s: Selector, e: PolicyEndpoint) -> bool:
        if s.endpoint is not None and s.endpoint != e.id:
            return False
        if s.network is not None and s.network != e.network:
            return False
        if s.labels and any(e.labels.get(k) != v for k, v in s.labels.items()):
            return False
        if s.cidr is not None:
            net = self._cidr(s.cidr)
            if not any(a in net for a in self._ips.get(e.id, ())):
                return False
        return True

    def published(self, e: PolicyEndpoint) -> list[Published]:
        """The ports ``e`` really publishes (a host port another endpoint took first is not)."""
        return [pb for pb in e.published if self._pub_owner.get((e.node, pb.protocol, pb.host_port)) == e.id]

    def _candidates(self, s: Selector) -> list[PolicyEndpoint]:
        if s.endpoint is not None:
            e = self.endpoints.get(s.endpoint)
            return [e] if e is not None else []
        if s.network is not None:
            return self._by_net.get(s.network, [])
        if s.labels:
            return min((self._by_label.get(kv, []) for kv in s.labels.items()), key=len)
        if s.cidr is not None:
            net = self._cidr(s.cidr)
            lst = self._sorted_ips[net.version]
            if not self._sorted_ips_ready:
                for v in lst, self._sorted_ips[10 - net.version]:
                    v.sort()
                self._sorted_ips_ready = True
            lo = bisect.bisect_left(lst, (int(net.network_address), ""))
            hi = bisect.bisect_right(lst, (int(net.broadcast_address), "\U0010ffff"))
            return [self.endpoints[i] for _, i in lst[lo:hi]]
        return sorted(self.endpoints.values(), key=lambda x: x.id)

    def select(self, sels: Sequence[Selector]) -> list[PolicyEndpoint]:
        """The endpoints any of ``sels`` selects, sorted by id."""
        out: dict[str, PolicyEndpoint] = {}
        for s in sels:
            for e in self._candidates(s):
                if e.id not in out and self._sel_ep(s, e):
                    out[e.id] = e
        return [out[k] for k in sorted(out)]

    def _sel_ep_ip(self, s: Selector, e: PolicyEndpoint, ip: IPAddr) -> bool:
        """Does ``s`` select endpoint ``e`` speaking from/to address ``ip``?"""
        if not self._sel_ep(s, e):
            return False
        return s.cidr is None or ip in self._cidr(s.cidr)

    def _sel_ext(self, s: Selector, ip: IPAddr) -> bool:
        return s.only_cidr() and s.cidr is not None and ip in self._cidr(s.cidr)

    @staticmethod
    def _port_match(rule: AllowRule, protocol: str, port: int | None) -> bool:
        if rule.ports is None:
            return True
        for p in rule.ports:
            if p.protocol != protocol:
                continue
            r = p.range()
            if r is None or (port is not None and r[0] <= port <= r[1]):
                return True
        return False

    # -- parties -------------------------------------------------------------------
    def party(self, ref: str) -> tuple[Party, IPAddr]:
        """An endpoint id or an address -> who it is."""
        e = self.endpoints.get(ref)
        if e is not None:
            if not e.ips:
                raise E.make(E.INVALID_REQUEST, f"endpoint {ref} has no address", endpoint=ref)
            ip = ipaddress.ip_address(e.ips[0])
            return self._ep_party(e, ip), ip
        try:
            ip = ipaddress.ip_address(ref)
        except ValueError:
            raise E.make(E.ENDPOINT_NOT_FOUND, f"{ref!r} is neither an endpoint id nor an IP address",
                         ref=ref) from None
        e = self._by_ip.get(ip)
        if e is not None:
            return self._ep_party(e, ip), ip
        if ip in self._gateways:
            return Party(kind="host", address=str(ip), network=self._gateways[ip]), ip
        for net, nid in self._nets:
            if net.version == ip.version and ip in net:
                return Party(kind="unassigned", address=str(ip), network=nid,
                             mode=self.networks[nid].mode.value), ip
        return Party(kind="external", address=str(ip)), ip

    def _ep_party(self, e: PolicyEndpoint, ip: IPAddr) -> Party:
        n = self.networks.get(e.network)
        return Party(kind="endpoint", address=str(ip), endpoint=e.id, network=e.network,
                     mode=n.mode.value if n else None)

    # -- verdict -------------------------------------------------------------------
    def verdict(self, src: str, dst: str, protocol: str = "tcp", port: int | None = None) -> Verdict:
        """The verdict for a NEW flow from ``src`` to ``dst`` (endpoint ids or addresses)."""
        if protocol not in ("tcp", "udp", "sctp", "icmp"):
            raise E.make(E.INVALID_REQUEST, f"protocol {protocol!r}: choose tcp, udp, sctp or icmp",
                         protocol=protocol)
        if protocol not in PORT_PROTOCOLS:
            port = None
        sp, sip = self.party(src)
        dp, dip = self.party(dst)
        if sip.version != dip.version and sp.kind == "endpoint" and src in self.endpoints:
            e = self.endpoints[src]
            alt = [ipaddress.ip_address(a) for a in e.ips if ipaddress.ip_address(a).version == dip.version]
            if alt:
                sip = alt[0]
                sp = self._ep_party(e, sip)
        if dip.version != sip.version and dp.kind == "endpoint" and dst in self.endpoints:
            e = self.endpoints[dst]
            alt = [ipaddress.ip_address(a) for a in e.ips if ipaddress.ip_address(a).version == sip.version]
            if alt:
                dip = alt[0]
                dp = self._ep_party(e, dip)

        def out(allowed: bool, path: list[str], by: VerdictBy, rules: list[str],
                reasons: list[str]) -> Verdict:
            return Verdict(allowed=allowed, src=sp, dst=dp, protocol=protocol, port=port, path=path, by=by,
                           rules=rules, reasons=reasons)

        reasons: list[str] = []
        if sp.kind == "external" and dp.kind == "unassigned":
            return out(False, [], "denied", [],
                       [f"no endpoint owns {dp.address} (network {dp.network}): there is nothing there to reach"])
        if sp.kind == "external" and dp.kind != "endpoint":
            # Checked first: whatever else is true of the pair, VNet is not in the way.
            return out(True, [], "ungoverned", [],
                       ["neither side is an endpoint: VNet does not govern this flow (it neither allows nor "
                        "blocks it)"])
        if sip.version != dip.version:
            return out(False, [], "denied", [], ["source and destination are of different IP families"])
        if sp.kind in ("unassigned", "host"):
            what = "no endpoint owns it" if sp.kind == "unassigned" else "it is a host address"
            return out(sp.kind == "host", [], "mode" if sp.kind == "host" else "denied", [],
                       [f"source {sp.address} is in network {sp.network} but {what}"
                        + ("; anti-spoofing drops it" if sp.kind == "unassigned"
                           else "; traffic the host starts is always allowed")])

        # -- the path and the modes
        path: list[str]
        mode_ok: bool
        if sp.kind == "endpoint" and dp.kind in ("endpoint", "unassigned"):
            assert sp.network is not None and dp.network is not None
            path = self.relations(sp.network, dp.network)
            if not path:
                reasons.append(f"no path: networks {sp.network} and {dp.network} are not related "
                               "(relations are not transitive)")
                return out(False, [], "denied", [], reasons)
            reasons.append(f"path: {', '.join(path)} ({sp.network} -> {dp.network})")
            a, b = self.networks[sp.network], self.networks[dp.network]
            mode_ok = _mode_allows(a, b, path)
            if a.id == b.id:
                reasons.append(f"network {a.id} is {a.mode.value}: peers "
                               + ("may talk" if mode_ok else "talk only through allow rules"))
            else:
                reasons.append(f"source network {a.id} is {a.mode.value} (egress "
                               + ("allowed" if a.mode in (IsolationMode.MESH_ONLY, IsolationMode.NONE)
                                  else "to other networks blocked") + ")")
                reasons.append(f"destination network {b.id} is {b.mode.value} (ingress "
                               + ("allowed" if b.mode in (IsolationMode.MESH_ONLY, IsolationMode.NONE)
                                  else "from other networks blocked") + ")")
        elif sp.kind == "endpoint":  # toward external or a host address
            assert sp.network is not None
            path = ["external"]
            a = self.networks[sp.network]
            mode_ok = a.mode == IsolationMode.NONE
            where = "a host address" if dp.kind == "host" else "an external address"
            reasons.append(f"path: external ({dp.address} is {where}, reached through the host)")
            if (dp.kind == "host" and dp.network == sp.network and protocol in ("tcp", "udp") and port == 53
                    and not mode_ok):
                reasons.append(f"{protocol}/53 to its own network's gateway is the node's resolver: "
                               "always allowed (names follow isolation there)")
                return out(True, path, "mode", [], reasons)
            reasons.append(f"source network {a.id} is {a.mode.value}: external traffic "
                           + ("allowed" if mode_ok else "blocked"))
        else:  # external -> endpoint
            assert dp.network is not None
            path = ["external"]
            b = self.networks[dp.network]
            mode_ok = b.mode == IsolationMode.NONE
            reasons.append(f"path: external (inbound from {sp.address})")
            reasons.append(f"destination network {b.id} is {b.mode.value}: inbound from external "
                           + ("allowed" if mode_ok else "blocked"))
            de_ = self.endpoints.get(dp.endpoint or "")
            pub = [x for x in self.published(de_) if x.protocol == protocol and x.port == port] if de_ else []
            if not mode_ok and pub:
                reasons.append(f"{protocol}/{port} is published on the host as port {pub[0].host_port}")
                return out(True, path, "mode", [], reasons)
        if mode_ok:
            return out(True, path, "mode", [], reasons)

        # -- allow rules
        matched: list[str] = []
        se = self.endpoints.get(sp.endpoint) if sp.endpoint else None
        de = self.endpoints.get(dp.endpoint) if dp.endpoint else None
        for r in self.rules:
            if not self._port_match(r, protocol, port):
                continue
            if se is not None:
                fm = any(self._sel_ep_ip(s, se, sip) for s in r.from_)
            else:
                fm = any(self._sel_ext(s, sip) for s in r.from_)
            if not fm:
                continue
            if de is not None:
                tm = any(self._sel_ep_ip(s, de, dip) for s in r.to)
            elif dp.kind in ("external", "host"):
                tm = any(self._sel_ext(s, dip) for s in r.to)
            else:
                tm = False  # an unassigned address of one of our networks: rules select endpoints
            if tm:
                matched.append(r.id)
        if matched:
            reasons.append(f"allowed by rule(s) {', '.join(matched)}")
            return out(True, path, "rule", matched, reasons)
        ports = f"{protocol}/{port}" if port is not None else protocol
        reasons.append(f"no allow rule matches {sp.address} -> {dp.address} {ports}")
        return out(False, path, "denied", [], reasons)

    # -- compile -------------------------------------------------------------------
    def compile(self, node: str | None = None) -> Ruleset:
        """The ruleset of host ``node`` (``None``: every endpoint is local).

        Rules become rule lines over named address sets (one per distinct selector list
        and family), so the structure grows with the rules, never with the endpoints;
        endpoints are set members (:meth:`Ruleset.with_endpoint` adds one the same way)."""
        local = [e for e in self.endpoints.values() if node is None or e.node == node]
        nets_in_play = networks_in_play(self.networks, (e.network for e in local))
        nets = [self.networks[n] for n in sorted(nets_in_play) if n in self.networks]
        bridges = sorted({n.bridge_name() for n in nets})
        none_bridges = sorted({n.bridge_name() for n in nets if n.mode == IsolationMode.NONE})
        pairs: set[tuple[str, str]] = set()
        rel: set[tuple[str, str]] = set()
        for a in nets:
            for b in nets:
                how = self.relations(a.id, b.id)
                if how:
                    rel.add((a.bridge_name(), b.bridge_name()))
                if _mode_allows(a, b, how):
                    pairs.add((a.bridge_name(), b.bridge_name()))
        ports: list[PortBinding] = []
        for e in sorted(local, key=lambda x: x.id):
            if e.host_ifname == "-" or e.network not in self.networks:
                continue
            v4 = tuple(sorted((a for a in e.ips if ipaddress.ip_address(a).version == 4), key=addr_key))
            v6 = tuple(sorted((a for a in e.ips if ipaddress.ip_address(a).version == 6), key=addr_key))
            n = self.networks[e.network]
            ports.append(PortBinding(ifname=e.port_name(), mac=naming.normalize_mac(e.mac), ipv4=v4, ipv6=v6,
                                     full=n.mode == IsolationMode.FULL, endpoint=e.id, bridge=n.bridge_name()))

        sets: dict[str, AddrSet] = {}
        lines: set[RuleLine] = set()

        def ep_set(sels: list[Selector], fam: int) -> str | None:
            if not sels:
                return None
            key = msgspec.json.encode(sorted(msgspec.json.encode(x) for x in sels))
            name = f"e{fam}_{hashlib.sha256(key).hexdigest()[:12]}"
            if name not in sets:
                # members: endpoints of the networks in play here only: a rule never makes a path
                # to an unrelated network, so another node's endpoint there never meets these
                # lines (and the node hears of no event of it: the endpoint service addresses
                # set members to the nodes in play for their network)
                members = [str(ip) for x in self.select(sels) if x.network in self.networks
                           and (node is None or x.network in nets_in_play)
                           for ip in self._ips[x.id] if ip.version == fam and any(selects(s, x, ip) for s in sels)]
                sets[name] = AddrSet(name=name, family=fam, selectors=tuple(sels),
                                     elements=sorted(set(members), key=addr_key))
            return name

        def cidr_set(cidrs: list[str], fam: int) -> str | None:
            mine = sorted({c for c in cidrs if self._cidr(c).version == fam})
            if not mine:
                return None
            name = f"c{fam}_{hashlib.sha256(' '.join(mine).encode()).hexdigest()[:12]}"
            if name not in sets:
                ivs = merge_intervals((int(self._cidr(c).network_address), int(self._cidr(c).broadcast_address))
                             for c in mine)
                sets[name] = AddrSet(name=name, family=fam, cidrs=tuple(mine),
                                     elements=[fmt_addr(fam, lo, hi) for lo, hi in ivs])
            return name

        for r in self.rules:
            specs = self._specs(r)
            f_eps = [x for x in r.from_ if not x.only_cidr()]
            t_eps = [x for x in r.to if not x.only_cidr()]
            f_cidr = [x.cidr for x in r.from_ if x.only_cidr() and x.cidr is not None]
            t_cidr = [x.cidr for x in r.to if x.only_cidr() and x.cidr is not None]
            for fam in (4, 6):
                fe, fc = ep_set(f_eps, fam), cidr_set(f_cidr, fam)
                te, tc = ep_set(t_eps, fam), cidr_set(t_cidr, fam)
                for spec in specs:
                    if spec is None:
                        proto, lo, hi = "", 0, 0
                    else:
                        proto, lo, hi = _l4(spec[0], fam), max(spec[1], 0), max(spec[2], 0)

                    todo: list[tuple[Literal["int", "out", "in"], str | None, str | None]] = []
                    # a {cidr} selector selects every address inside it, endpoints included
                    # (between endpoints only where a path exists: rel_pairs), and external ones
                    for src in (fe, fc):
                        todo += [("int", src, te), ("int", src, tc), ("out", src, tc)]
                    todo += [("in", fc, te), ("in", fc, tc)]
                    for chain, src_, dst_ in todo:
                        if src_ is not None and dst_ is not None:
                            lines.add(RuleLine(chain=chain, family=fam, src=src_, dst=dst_, proto=proto, lo=lo, hi=hi))
        published4: list[tuple[str, int, str, int]] = []
        published6: list[tuple[str, int, str, int]] = []
        for e in sorted(local, key=lambda x: x.id):
            if e.network not in self.networks:
                continue
            # a published port answers on the host's addresses of both families: to the
            # endpoint's first address of the same family (explain treats them alike)
            for fam, out in ((4, published4), (6, published6)):
                addrs = [a for a in self._ips.get(e.id, ()) if a.version == fam]
                if addrs:
                    out += [(pb.protocol, pb.host_port, str(addrs[0]), pb.port) for pb in self.published(e)]
        return Ruleset(node=node or "", bridges=bridges, none_bridges=none_bridges, net_pairs=sorted(pairs),
                       rel_pairs=sorted(rel), ports=ports, sets=[sets[k] for k in sorted(sets)],
                       lines=sorted(lines), published4=sorted(published4), published6=sorted(published6))

    @staticmethod
    def _specs(r: AllowRule) -> list[tuple[str, int, int] | None]:
        """``None`` = every protocol; (protocol, lo, hi) with lo = -1 for protocol-only."""
        if r.ports is None:
            return [None]
        out: list[tuple[str, int, int] | None] = []
        for p in r.ports:
            rg = p.range()
            out.append((p.protocol, -1, -1) if rg is None else (p.protocol, rg[0], rg[1]))
        return out


# ----------------------------------------------------------------------------- helpers for callers


def endpoint_from_parts(ep_id: str, network: str, ips: Sequence[str], mac: str,
                        labels: dict[str, str] | None = None, node: str = "") -> PolicyEndpoint:
    """A :class:`PolicyEndpoint` from addresses given with or without prefix length."""
    return PolicyEndpoint(id=ep_id, network=network, ips=tuple(a.split("/")[0] for a in ips if a), mac=mac,
                          labels=dict(labels or {}), node=node)
