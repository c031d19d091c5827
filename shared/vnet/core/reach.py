"""Reachability diffs and the exposure audit (pure), from verdicts of :class:`Policy`.

A *path* is ``(source, destination, protocol, port range)`` where each side is an
endpoint or a representative external address; a change *opens* a path whose NEW flows
the engine denied before and allows after, and *closes* one the other way round.

:func:`diff` compares two snapshots (before and after a change) and answers
:class:`ReachDiff`: the opened and closed paths, grouped by (source network, destination
network, protocol/ports) with the number of endpoint pairs in each group. Every answer is
a verdict of the same engine that compiles the kernel ruleset (:meth:`Policy.verdict`);
this module only chooses which flows to ask about:

* **which pairs** (:func:`affected_pairs`): only those whose verdict can differ — a pair
  with an endpoint of a changed network (mode or relations) or a changed endpoint, toward
  the networks related to it before or after (nothing else has a path); and for a changed
  allow rule, its ``from`` endpoints (before or after) times its ``to`` endpoints. So the
  cost follows what the change touches, not the fabric's size;
* **which ports**: a verdict is constant between the port bounds of the rules that can
  match the pair (and the ports the destination publishes), so one verdict per protocol
  and interval between those bounds covers every port (``tcp``, ``udp``, ``sctp``; and
  ``icmp``, which has none);
* **which external addresses**: the outside world is stood for by one address outside
  every network and every rule's CIDR (``external``) and one address per rule CIDR
  (``external:<cidr>``; inside it, outside the more specific CIDRs and our networks).

Flows to a host's own addresses (gateways) are not paths here (``explain`` answers them).

:func:`exposure` lists what is reachable from outside the fabric: published ports,
``none``-mode networks and allow rules whose ``from`` takes external addresses (a
``{cidr}``-only selector), each with the endpoints it exposes, broadest first.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from vnet.core.model import IsolationMode
from vnet.core.policy import (
    PORT_PROTOCOLS,
    AllowRule,
    IPAddr,
    IPNet,
    Policy,
    PolicyEndpoint,
    PolicyNetwork,
)

PROTOCOLS: tuple[str, ...] = ("tcp", "udp", "sctp", "icmp")
MAX_PORT = 65535
EXTERNAL = "external"
SAMPLES = 3  # endpoint pairs named per group

# Candidates for "an address outside every network and rule CIDR" (documentation and
# shared ranges first; the engine sends nothing, it only classifies the address).
_OUTSIDE = {
    4: ("192.0.2.1", "198.51.100.1", "203.0.113.1", "100.64.0.1", "198.18.0.1", "240.0.0.1", "8.8.8.8"),
    6: ("2001:db8:ffff:ffff::1", "3fff:ffff::1", "2001:db8::1", "2600::1", "fd00:ffff::1"),
}


class PathGroup(msgspec.Struct, frozen=True, kw_only=True):
    """Paths of one kind: from endpoints of ``src`` to endpoints of ``dst`` (a network id,
    ``external`` or ``external:<cidr>``) on ``ports`` (``any``, ``icmp``, ``tcp/80``,
    ``udp/1000-2000``); ``paths`` endpoint pairs, the first few in ``sample``."""

    src: str
    dst: str
    ports: str
    paths: int
    sample: list[str] = []  # "src-endpoint -> dst-endpoint"


class ReachDiff(msgspec.Struct, kw_only=True):
    """What a change opens and closes (counts are paths: endpoint pair x ports)."""

    opens: int = 0
    closes: int = 0
    opened: list[PathGroup] = []
    closed: list[PathGroup] = []
    pairs: int = 0  # party pairs evaluated (the bound of the computation)

    def summary(self) -> str:
        return f"opens {self.opens} path{'s' if self.opens != 1 else ''}, closes {self.closes}"


@dataclass(frozen=True, order=True)
class Path:
    """One opened or closed path (``lo``/``hi`` 0 for ``icmp``; protocol ``any`` = all of them)."""

    src: str
    dst: str
    protocol: str
    lo: int
    hi: int
    opened: bool

    def ports(self) -> str:
        if self.protocol in ("any", "icmp"):
            return self.protocol
        if self.lo == 1 and self.hi == MAX_PORT:
            return self.protocol
        return f"{self.protocol}/{self.lo}" if self.lo == self.hi else f"{self.protocol}/{self.lo}-{self.hi}"


# ----------------------------------------------------------------------------- parties

def external_parties(*policies: Policy) -> dict[str, str]:
    """Representative external addresses -> their label (``external`` or ``external:<cidr>``)."""
    nets: list[IPNet] = []
    cidrs: set[IPNet] = set()
    fams: set[int] = set()
    for pol in policies:
        for n in pol.networks.values():
            for text in n.cidrs:
                net = ipaddress.ip_network(text, strict=False)
                nets.append(net)
                fams.add(net.version)
        for r in pol.rules:
            for s in (*r.from_, *r.to):
                if s.only_cidr() and s.cidr is not None:
                    cn = ipaddress.ip_network(s.cidr, strict=False)
                    cidrs.add(cn)
                    fams.add(cn.version)
    gateways = {ipaddress.ip_address(g.split("/")[0]) for pol in policies for n in pol.networks.values()
                for g in n.gateways}
    owned = {ip for pol in policies for ip in pol._by_ip}

    def free(ip: IPAddr, inside: IPNet | None) -> bool:
        if ip in gateways or ip in owned or any(ip.version == n.version and ip in n for n in nets):
            return False
        # outside every CIDR more specific than the one it stands for
        return not any(c.version == ip.version and ip in c and (inside is None or c.prefixlen > inside.prefixlen)
                       for c in cidrs)

    out: dict[str, str] = {}
    for fam in sorted(fams):
        for cand in _OUTSIDE[fam]:
            ip = ipaddress.ip_address(cand)
            if free(ip, None):
                out[str(ip)] = EXTERNAL
                break
    for c in sorted(cidrs, key=lambda n: (n.version, int(n.network_address), n.prefixlen)):
        size = c.num_addresses
        picks = [c.network_address + k for k in (1, size // 2, size - 2, 0, size - 1) if 0 <= k < size]
        for ip in picks:
            if free(ip, c):
                out.setdefault(str(ip), f"{EXTERNAL}:{c}")
                break
    return out


def _label(pol: Policy, party: str, externals: dict[str, str]) -> str:
    e = pol.endpoints.get(party)
    return e.network if e is not None else externals.get(party, EXTERNAL)


# ----------------------------------------------------------------------------- scope

def _related(pol: Policy, net: str, memo: dict[tuple[int, str], set[str]]) -> set[str]:
    key = (id(pol), net)
    got = memo.get(key)
    if got is None:
        got = memo[key] = {o for o in pol.networks if pol.relations(net, o)} | {net}
    return got


def _eps_in(pol: Policy, nets: Iterable[str]) -> set[str]:
    return {e.id for n in nets for e in pol._by_net.get(n, []) if e.ips}


def _changed_rules(before: Policy, after: Policy) -> list[AllowRule]:
    b = {r.id: r for r in before.rules}
    a = {r.id: r for r in after.rules}
    out = []
    for rid in sorted(set(a) | set(b)):
        if a.get(rid) != b.get(rid):
            out += [r for r in (b.get(rid), a.get(rid)) if r is not None]
    return out


def affected_pairs(before: Policy, after: Policy, externals: dict[str, str]) -> set[tuple[str, str]]:
    """The (source, destination) parties whose verdicts the change can alter."""
    pairs: set[tuple[str, str]] = set()
    ext = set(externals)
    memo: dict[tuple[int, str], set[str]] = {}
    changed_nets = {n for n in set(before.networks) | set(after.networks)
                    if before.networks.get(n) != after.networks.get(n)}
    changed_eps = {e for e in set(before.endpoints) | set(after.endpoints)
                   if before.endpoints.get(e) != after.endpoints.get(e)}
    centre = _eps_in(before, changed_nets) | _eps_in(after, changed_nets) | changed_eps
    by_net: dict[str, set[str]] = {}  # the centre's networks: their endpoints share the same others
    for x in centre:
        for pol in (before, after):
            e = pol.endpoints.get(x)
            if e is not None:
                by_net.setdefault(e.network, set()).add(x)
    for net, xs in by_net.items():
        nets: set[str] = set()
        for pol in (before, after):
            nets |= _related(pol, net, memo)
        others = _eps_in(before, nets) | _eps_in(after, nets) | ext
        for x in xs:
            for y in others:
                if y != x:
                    pairs.add((x, y))
                    pairs.add((y, x))
    for r in _changed_rules(before, after):
        srcs: set[str] = set()
        dsts: set[str] = set()
        for pol in (before, after):
            # a {cidr} selector selects endpoints inside it too (Policy.select reads it that way)
            srcs |= {e.id for e in pol.select(r.from_) if e.ips}
            dsts |= {e.id for e in pol.select(r.to) if e.ips}
        if any(s.only_cidr() for s in r.from_):
            srcs |= ext
        if any(s.only_cidr() for s in r.to):
            dsts |= ext
        pairs |= {(s, d) for s in srcs for d in dsts if s != d}
    # external -> external is never governed by VNet
    return {(s, d) for s, d in pairs if s not in ext or d not in ext}


# ----------------------------------------------------------------------------- verdicts per pair

class _Snap:
    """One snapshot and, per rule, whom it can select on each side (a superset: the verdict
    decides), so a pair's port bounds come only from the rules that can match it."""

    def __init__(self, pol: Policy) -> None:
        self.pol = pol
        self.rules: list[tuple[AllowRule, set[str], set[str], bool, bool]] = [
            (r, {e.id for e in pol.select(r.from_)}, {e.id for e in pol.select(r.to)},
             any(x.only_cidr() for x in r.from_), any(x.only_cidr() for x in r.to)) for r in pol.rules]

    def candidates(self, src: str, dst: str) -> list[AllowRule]:
        s_ext, d_ext = src not in self.pol.endpoints, dst not in self.pol.endpoints
        return [r for r, f, t, fx, tx in self.rules if (fx if s_ext else src in f) and (tx if d_ext else dst in t)]

    def shape(self, src: str, dst: str) -> tuple[bool | None, dict[str, set[int]]]:
        """``(allowed, {})`` when every protocol and port has the same verdict, else
        ``(None, cuts)``: the port bounds between which the verdict is constant."""
        pol = self.pol
        if not (_present(pol, src) and _present(pol, dst)):
            return False, {}
        es, ed = pol.endpoints.get(src), pol.endpoints.get(dst)
        if es is not None and ed is not None and not pol.relations(es.network, ed.network):
            return False, {}  # unrelated networks: no path, whatever the rules (most pairs of a rule)
        v = pol.verdict(src, dst, "icmp")
        if not v.path:
            return v.allowed, {}  # no path (or mixed families): no rule can help
        if v.allowed and v.by == "mode":
            return True, {}  # the modes allow it: every protocol, every port
        cands = self.candidates(src, dst)
        de = pol.endpoints.get(dst)
        published = pol.published(de) if de is not None and src not in pol.endpoints else []
        if not cands and not published:
            return False, {}
        cuts: dict[str, set[int]] = {p: set() for p in PORT_PROTOCOLS}
        for r in cands:
            for ps in r.ports or []:
                if ps.protocol in cuts and ps.port is not None:
                    cuts[ps.protocol] |= {ps.port, (ps.end_port or ps.port) + 1}
        for pb in published:
            cuts[pb.protocol] |= {pb.port, pb.port + 1}
        return None, cuts


def pair_verdicts(pol: Policy, src: str, dst: str, cuts: dict[str, set[int]]) -> list[tuple[str, int, int, bool]]:
    """``(protocol, lo, hi, allowed)`` covering every protocol and port of ``src -> dst``."""
    out: list[tuple[str, int, int, bool]] = []
    for proto in PROTOCOLS:
        if proto not in PORT_PROTOCOLS:
            out.append((proto, 0, 0, _allowed(pol, src, dst, proto)))
            continue
        for lo, hi in _intervals(cuts.get(proto, set())):
            out.append((proto, lo, hi, _allowed(pol, src, dst, proto, lo)))
    return out


def _intervals(cuts: set[int]) -> list[tuple[int, int]]:
    bounds = sorted({1, MAX_PORT + 1} | {c for c in cuts if 1 <= c <= MAX_PORT + 1})
    return [(lo, nxt - 1) for lo, nxt in itertools.pairwise(bounds)]


def _present(pol: Policy, party: str) -> bool:
    """An address always is; an endpoint only when this snapshot has it and its network."""
    e = pol.endpoints.get(party)
    if e is not None:
        return bool(e.ips) and e.network in pol.networks
    try:
        ipaddress.ip_address(party)
    except ValueError:
        return False  # an endpoint of the other snapshot only (created or deleted by the change)
    return True


def _allowed(pol: Policy, src: str, dst: str, protocol: str, port: int | None = None) -> bool:
    if not (_present(pol, src) and _present(pol, dst)):
        return False
    return pol.verdict(src, dst, protocol, port).allowed


def _const(allowed: bool, cuts: dict[str, set[int]]) -> list[tuple[str, int, int, bool]]:
    out: list[tuple[str, int, int, bool]] = []
    for proto in PROTOCOLS:
        if proto not in PORT_PROTOCOLS:
            out.append((proto, 0, 0, allowed))
        else:
            out += [(proto, lo, hi, allowed) for lo, hi in _intervals(cuts.get(proto, set()))]
    return out


def _pair(sb: _Snap, sa: _Snap, src: str, dst: str) -> list[Path]:
    cb, cuts_b = sb.shape(src, dst)
    ca, cuts_a = sa.shape(src, dst)
    if cb is not None and ca is not None:  # constant on both sides: one verdict each said it all
        return [] if cb == ca else [Path(src, dst, "any", 0, 0, ca)]
    cuts = {p: cuts_b.get(p, set()) | cuts_a.get(p, set()) for p in PORT_PROTOCOLS}
    vb = _const(cb, cuts) if cb is not None else pair_verdicts(sb.pol, src, dst, cuts)
    va = _const(ca, cuts) if ca is not None else pair_verdicts(sa.pol, src, dst, cuts)
    changed: list[Path] = []
    for (proto, lo, hi, b), (_, _, _, a) in zip(vb, va, strict=True):
        if a == b:
            continue
        last = changed[-1] if changed else None
        if last is not None and last.protocol == proto and last.opened == a and last.hi + 1 == lo:
            changed[-1] = Path(src, dst, proto, last.lo, hi, a)
        else:
            changed.append(Path(src, dst, proto, lo, hi, a))
    whole = [p for p in changed if p.protocol == "icmp" or (p.lo == 1 and p.hi == MAX_PORT)]
    if len(whole) == len(PROTOCOLS) and len(changed) == len(PROTOCOLS) and len({p.opened for p in whole}) == 1:
        return [Path(src, dst, "any", 0, 0, whole[0].opened)]
    return changed


def pair_paths(before: Policy, after: Policy, src: str, dst: str) -> list[Path]:
    """The paths of ``src -> dst`` the change opens or closes (merged port ranges; ``any``
    when every protocol and port changed the same way)."""
    return _pair(_Snap(before), _Snap(after), src, dst)


def paths(before: Policy, after: Policy, pairs: Iterable[tuple[str, str]] | None = None) -> list[Path]:
    """Every opened or closed path over ``pairs`` (default: :func:`affected_pairs`)."""
    ext = external_parties(before, after)
    todo = affected_pairs(before, after, ext) if pairs is None else set(pairs)
    sb, sa = _Snap(before), _Snap(after)
    out: list[Path] = []
    for s, d in sorted(todo):
        out += _pair(sb, sa, s, d)
    return out


def diff(before: Policy, after: Policy) -> ReachDiff:
    """What changing ``before`` into ``after`` opens and closes, grouped."""
    ext = external_parties(before, after)
    todo = affected_pairs(before, after, ext)
    sb, sa = _Snap(before), _Snap(after)
    found: list[Path] = []
    for s, d in sorted(todo):
        found += _pair(sb, sa, s, d)
    groups: dict[tuple[bool, str, str, str], list[Path]] = {}
    for p in found:
        # each side from the snapshot that has it (an endpoint deleted by the change is
        # only in ``before``, one created only in ``after``): never "external" for an endpoint
        src = _label(after if p.src in after.endpoints else before, p.src, ext)
        dst = _label(after if p.dst in after.endpoints else before, p.dst, ext)
        key = (p.opened, src, dst, p.ports())
        groups.setdefault(key, []).append(p)
    out = ReachDiff(pairs=len(todo))
    for (opened, s, d, ports), ps in groups.items():
        g = PathGroup(src=s, dst=d, ports=ports, paths=len(ps),
                      sample=[f"{p.src} -> {p.dst}" for p in ps[:SAMPLES]])
        (out.opened if opened else out.closed).append(g)
    out.opened = _sorted_groups(out.opened)
    out.closed = _sorted_groups(out.closed)
    out.opens = sum(g.paths for g in out.opened)
    out.closes = sum(g.paths for g in out.closed)
    return out


def _sorted_groups(gs: list[PathGroup]) -> list[PathGroup]:
    return sorted(gs, key=lambda g: (-g.paths, g.src, g.dst, g.ports))


# ----------------------------------------------------------------------------- changes (what-if inputs)

def with_networks(pol: Policy, networks: Sequence[PolicyNetwork]) -> Policy:
    """``pol`` with these networks replacing those of the same id."""
    nets = dict(pol.networks)
    nets.update({n.id: n for n in networks})
    return Policy(nets.values(), pol.endpoints.values(), pol.rules)


def with_rule(pol: Policy, rule: AllowRule | None, *, delete: str | None = None) -> Policy:
    """``pol`` with ``rule`` put (replacing its id) and/or rule ``delete`` removed."""
    rules = {r.id: r for r in pol.rules}
    if delete is not None:
        rules.pop(delete, None)
    if rule is not None:
        rules[rule.id] = rule
    return Policy(pol.networks.values(), pol.endpoints.values(), rules.values())


def with_endpoints(pol: Policy, endpoints: Sequence[PolicyEndpoint]) -> Policy:
    eps = dict(pol.endpoints)
    eps.update({e.id: e for e in endpoints})
    return Policy(pol.networks.values(), eps.values(), pol.rules)


def isolation_changed(n: PolicyNetwork, mode: IsolationMode) -> PolicyNetwork:
    return msgspec.structs.replace(n, mode=mode)


def connection_changed(a: PolicyNetwork, b: PolicyNetwork, on: bool) -> tuple[PolicyNetwork, PolicyNetwork]:
    def one(x: PolicyNetwork, other: str) -> PolicyNetwork:
        rest = tuple(c for c in x.connected if c != other)
        return msgspec.structs.replace(x, connected=tuple(sorted((*rest, other))) if on else rest)
    return one(a, b.id), one(b, a.id)


def child_added(parent: PolicyNetwork, child: PolicyNetwork) -> tuple[PolicyNetwork, PolicyNetwork]:
    """A child network created under ``parent`` (both records as the network service stores
    them: the child names its parent, the parent lists its children)."""
    kids = tuple(sorted({*parent.children, child.id}))
    return (msgspec.structs.replace(parent, children=kids), msgspec.structs.replace(child, parent=parent.id))


def without_network(pol: Policy, net_id: str) -> Policy:
    """``pol`` after network ``net_id`` is deleted (as the network service does it): its
    endpoints go with it (a forced delete), its children become top-level networks, and its
    parent, connected peers and mesh groups forget it. Rules stay (a selector naming it then
    selects nothing)."""
    nets = []
    for n in pol.networks.values():
        if n.id == net_id:
            continue
        if net_id in n.connected or net_id in n.children or n.parent == net_id:
            n = msgspec.structs.replace(n, connected=tuple(c for c in n.connected if c != net_id),
                                        children=tuple(c for c in n.children if c != net_id),
                                        parent=None if n.parent == net_id else n.parent)
        nets.append(n)
    eps = [e for e in pol.endpoints.values() if e.network != net_id]
    return Policy(nets, eps, pol.rules)


def mesh_changed(n: PolicyNetwork, mesh: str, member: bool) -> PolicyNetwork:
    rest = tuple(m for m in n.mesh_groups if m != mesh)
    return msgspec.structs.replace(n, mesh_groups=tuple(sorted((*rest, mesh))) if member else rest)


# ----------------------------------------------------------------------------- exposure

ExposureKind = str  # "published" | "network" | "rule"


class Exposure(msgspec.Struct, frozen=True, kw_only=True):
    """One way in from outside the fabric and the endpoints it reaches.

    ``kind``: ``published`` (a host port -> an endpoint's port; ``ports`` ``tcp/8080->80``),
    ``network`` (a ``none``-mode network: every endpoint, every port), ``rule`` (an allow
    rule whose ``from`` takes external addresses: ``sources`` its CIDRs)."""

    kind: str
    ident: str  # the endpoint (published), network or rule id
    sources: list[str]  # who outside can come in: CIDRs, or "any"
    ports: str
    endpoints: list[str]
    breadth: int  # endpoints x (log2 of the addresses it admits, + 1): the sort key


def _breadth(n_eps: int, sources: Sequence[str]) -> int:
    # A rule open to 0.0.0.0/0 is broader than one open to a /32: weigh by the admitted space.
    bits = 0
    for s in sources:
        if s == "any":  # every address: as broad as 0.0.0.0/0
            bits = max(bits, 33)
        else:
            net = ipaddress.ip_network(s, strict=False)
            bits = max(bits, net.max_prefixlen - net.prefixlen + 1)
    return n_eps * max(bits, 1)


def _rule_ports(r: AllowRule) -> str:
    if r.ports is None:
        return "any"
    out = []
    for p in r.ports:
        rg = p.range()
        out.append(p.protocol if rg is None else (f"{p.protocol}/{rg[0]}" if rg[0] == rg[1]
                                                   else f"{p.protocol}/{rg[0]}-{rg[1]}"))
    return ",".join(out)


def exposure(pol: Policy) -> list[Exposure]:
    """Everything reachable from outside the fabric, broadest first.

    Each entry is confirmed by the engine: an endpoint is listed only when
    :meth:`Policy.verdict` allows a NEW flow to it from a representative external address
    (on the published port; any port for a ``none`` network; the rule's first port)."""
    ext = external_parties(pol)
    # a published port or a none network admits any outside address: any representative will do
    v4 = [a for a in ext if ipaddress.ip_address(a).version == 4]
    out: list[Exposure] = []
    for e in sorted(pol.endpoints.values(), key=lambda x: x.id):
        if not e.ips or e.network not in pol.networks:
            continue
        for pb in pol.published(e):
            if v4 and not pol.verdict(v4[0], e.id, pb.protocol, pb.port).allowed:
                continue
            out.append(Exposure(kind="published", ident=e.id, sources=["any"],
                                ports=f"{pb.protocol}/{pb.host_port}->{pb.port}", endpoints=[e.id],
                                breadth=_breadth(1, ["any"])))
    for n in sorted(pol.networks.values(), key=lambda x: x.id):
        if n.mode != IsolationMode.NONE:
            continue
        eps = [e.id for e in pol._by_net.get(n.id, []) if e.ips
               and any(pol.verdict(a, e.id, "icmp").allowed for a in ext)]
        out.append(Exposure(kind="network", ident=n.id, sources=["any"], ports="any", endpoints=sorted(eps),
                            breadth=_breadth(len(eps), ["any"])))
    for r in pol.rules:
        cidrs = [s.cidr for s in r.from_ if s.only_cidr() and s.cidr is not None]
        if not cidrs:
            continue
        spec = r.ports[0] if r.ports else None
        proto = spec.protocol if spec is not None else "icmp"
        port = spec.port if spec is not None else None
        reps = [a for a, lbl in ext.items() if lbl != EXTERNAL and any(
            ipaddress.ip_address(a) in ipaddress.ip_network(c, strict=False)
            for c in cidrs if ipaddress.ip_network(c, strict=False).version == ipaddress.ip_address(a).version)]
        targets = pol.select([s for s in r.to if not s.only_cidr()]) + pol.select([s for s in r.to if s.only_cidr()])
        eps = sorted({e.id for e in targets if e.ips
                      and any(pol.verdict(a, e.id, proto, port).allowed for a in reps)})
        out.append(Exposure(kind="rule", ident=r.id, sources=sorted(cidrs), ports=_rule_ports(r), endpoints=eps,
                            breadth=_breadth(len(eps), cidrs)))
    return sorted(out, key=lambda x: (-x.breadth, -len(x.endpoints), x.kind, x.ident, x.ports))
