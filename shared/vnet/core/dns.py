"""Names inside networks that follow isolation (pure: no sockets, no wire format).

Every endpoint answers to its container name and to ``<name>.<network>.<domain>``
(``network`` is the network's name or id). A name resolves for a querier only when
the policy engine — the same one that programs the kernel and answers ``explain`` —
allows at least one NEW flow from the querier to that endpoint; otherwise the answer
is NXDOMAIN, exactly as if the name did not exist, so a name never leaks across
isolation. Anything else is forwarded to the host's resolvers when the querier may
reach them (the verdict for ``udp/53`` toward the upstream address), and REFUSED when
it may not. SRV names (``_<port or service>._<tcp|udp>.<name>``) list an endpoint's
published ports, each only when the querier may open that very flow. The host itself
(a query from a gateway address) sees every name.

A querier that is neither an endpoint nor a host address is REFUSED: the resolver is
not an open resolver.

::

    table = NameTable(policy, endpoints, network_names, domain="vnet")
    ans = table.lookup("10.1.0.2", "web-1.front.vnet", "A")
    ans.rcode, ans.addresses          # "NOERROR", ("10.1.0.3",) | "NXDOMAIN", () | "FORWARD" | "REFUSED"
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from vnet.core import errors as E
from vnet.core.policy import Policy

Rcode = Literal["NOERROR", "NXDOMAIN", "REFUSED", "FORWARD"]
QType = Literal["A", "AAAA", "PTR", "SRV", "ANY"]

# Service labels an SRV query may use instead of the port number (RFC 6335 names of the
# ports containers publish most); ``_8080._tcp.web`` works for every port.
SERVICE_PORTS: Mapping[str, int] = {
    "http": 80, "https": 443, "ssh": 22, "domain": 53, "dns": 53, "smtp": 25, "imap": 143,
    "ldap": 389, "mysql": 3306, "postgresql": 5432, "postgres": 5432, "redis": 6379,
    "amqp": 5672, "mongodb": 27017, "memcache": 11211, "nats": 4222, "http-alt": 8080,
}

# The flows tried to decide "may reach at least one way": any protocol the modes allow
# shows with ICMP; a rule limited to ports shows with one of its own ports.
_BASE_FLOWS: tuple[tuple[str, int | None], ...] = (("icmp", None), ("tcp", None), ("udp", None), ("sctp", None))


@dataclass(frozen=True)
class DnsEndpoint:
    """What the resolver knows of an endpoint: its names and addresses."""

    id: str
    name: str  # the container name (container_id)
    network: str  # network id
    ips: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    ports: tuple[tuple[str, int], ...] = ()  # published (protocol, container port): SRV records


@dataclass(frozen=True)
class Answer:
    rcode: Rcode
    addresses: tuple[str, ...] = ()  # A/AAAA answers
    names: tuple[str, ...] = ()  # PTR answers (fully qualified, no trailing dot)
    srv: tuple[tuple[int, str, tuple[str, ...]], ...] = ()  # SRV answers: (port, target name, its addresses)
    why: str = ""
    cacheable: bool = True  # the same table gives the same answer (not so while the table is being built)


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def reverse_pointer_ip(qname: str) -> str | None:
    """``4.3.2.1.in-addr.arpa`` -> ``1.2.3.4`` (and ip6.arpa nibbles); None if not a full address."""
    q = _norm(qname)
    if q.endswith(".in-addr.arpa"):
        parts = q[: -len(".in-addr.arpa")].split(".")
        if len(parts) != 4:
            return None
        try:
            return str(ipaddress.IPv4Address(".".join(reversed(parts))))
        except ValueError:
            return None
    if q.endswith(".ip6.arpa"):
        nibbles = q[: -len(".ip6.arpa")].split(".")
        if len(nibbles) != 32 or any(len(n) != 1 for n in nibbles):
            return None
        try:
            return str(ipaddress.IPv6Address(int("".join(reversed(nibbles)), 16)))
        except ValueError:
            return None
    return None


@dataclass
class NameTable:
    """Names of every endpoint, answered per querier through ``policy``."""

    policy: Policy
    endpoints: Sequence[DnsEndpoint]
    network_names: Mapping[str, str]  # network id -> name
    domain: str = "vnet"
    _by_name: dict[str, list[DnsEndpoint]] = field(init=False, default_factory=dict)
    _by_ip: dict[str, DnsEndpoint] = field(init=False, default_factory=dict)
    _flows: tuple[tuple[str, int | None], ...] = field(init=False, default=())
    _seen: dict[tuple[str, str], bool] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.domain = _norm(self.domain)
        for e in self.endpoints:
            net_name = _norm(self.network_names.get(e.network, e.network))
            for n in {_norm(e.name), *(_norm(a) for a in e.aliases)}:
                if not n:
                    continue
                self._by_name.setdefault(n, []).append(e)
                for net in {net_name, e.network.lower()}:
                    self._by_name.setdefault(f"{n}.{net}.{self.domain}", []).append(e)
            for ip in e.ips:
                self._by_ip[str(ipaddress.ip_address(ip.split("/")[0]))] = e
        flows = list(_BASE_FLOWS)
        for r in self.policy.rules:
            for p in r.ports or ():
                if p.port is not None:
                    flows.append((p.protocol, p.port))
        self._flows = tuple(dict.fromkeys(flows))

    # -- who asks ------------------------------------------------------------------------
    def _querier(self, ip: str) -> tuple[str, str] | None:
        """("endpoint", id) | ("host", ip) | None (not ours: refused)."""
        try:
            party, _ = self.policy.party(ip)
        except (E.VNetError, ValueError):  # a malformed address is simply not one of ours
            return None
        if party.kind == "endpoint" and party.endpoint:
            return "endpoint", party.endpoint
        if party.kind == "host":
            return "host", ip
        return None

    def may_see(self, querier_ip: str, target: DnsEndpoint) -> bool:
        """Whether the querier may reach ``target`` by at least one NEW flow (cached per table)."""
        q = self._querier(querier_ip)
        if q is None:
            return False
        if q[0] == "host":
            return True
        key = (q[1], target.id)
        hit = self._seen.get(key)
        if hit is None:
            hit = q[1] == target.id or any(
                self.policy.verdict(q[1], target.id, proto, port).allowed for proto, port in self._flows)
            self._seen[key] = hit
        return hit

    def may_forward(self, querier_ip: str, upstream: str) -> bool:
        """Whether the querier may send ``udp/53`` to the upstream resolver (isolation says)."""
        q = self._querier(querier_ip)
        if q is None:
            return False
        if q[0] == "host":
            return True
        try:
            return self.policy.verdict(q[1], upstream, "udp", 53).allowed
        except (E.VNetError, ValueError):  # an upstream of the other family: not reachable
            return False

    def is_ours(self, qname: str) -> bool:
        q = _norm(qname)
        return q in self._by_name or q == self.domain or q.endswith("." + self.domain)

    # -- answers -------------------------------------------------------------------------
    def lookup(self, querier_ip: str, qname: str, qtype: QType, *, upstream: str | None = None) -> Answer:
        if self._querier(querier_ip) is None:
            return Answer("REFUSED", why=f"{querier_ip} is neither an endpoint nor a host address")
        q = _norm(qname)
        if qtype == "SRV":
            return self._srv(querier_ip, q, upstream)
        if qtype == "PTR":
            ip = reverse_pointer_ip(q)
            if ip is not None and ip in self._by_ip:
                t = self._by_ip[ip]
                if not self.may_see(querier_ip, t):
                    return Answer("NXDOMAIN", why="isolation: the querier may not reach it")
                net = self.network_names.get(t.network, t.network)
                return Answer("NOERROR", names=(f"{_norm(t.name)}.{_norm(net)}.{self.domain}",))
            if ip is not None and self._in_our_networks(ip):
                return Answer("NXDOMAIN", why="an address of a VNet network that no endpoint owns")
            return self._forward(querier_ip, upstream)
        cands = self._by_name.get(q)
        if cands is None:
            if self.is_ours(q):
                return Answer("NXDOMAIN", why="no such endpoint")
            return self._forward(querier_ip, upstream)
        visible = [t for t in cands if self.may_see(querier_ip, t)]
        if not visible:
            return Answer("NXDOMAIN", why="isolation: the querier may not reach it")
        # a short name that several endpoints share: the querier's own network first
        qe = self._querier(querier_ip)
        own = [t for t in visible if qe is not None and qe[0] == "endpoint"
               and self._network_of(qe[1]) == t.network]
        chosen = own or visible
        fam = {"A": 4, "AAAA": 6}.get(qtype)
        addrs = tuple(dict.fromkeys(
            str(ipaddress.ip_address(a.split("/")[0])) for t in chosen for a in t.ips
            if fam is None or ipaddress.ip_address(a.split("/")[0]).version == fam))
        return Answer("NOERROR", addresses=addrs)  # no address of that family: NOERROR, no data

    def _srv(self, querier_ip: str, q: str, upstream: str | None) -> Answer:
        """``_<service>._<proto>.<name>``: the published ports of the endpoints ``name`` means.

        A record is given for a port only when the querier may open that very flow (the
        verdict for proto/port), so an SRV answer never names a port isolation closes;
        the target is the endpoint's full name, its addresses in the additional section.
        """
        labels = q.split(".", 2)
        if len(labels) < 3 or not labels[0].startswith("_") or labels[1] not in ("_tcp", "_udp"):
            return Answer("NXDOMAIN", why="not an SRV name") if self.is_ours(q) else self._forward(
                querier_ip, upstream)
        svc, proto, name = labels[0][1:], labels[1][1:], labels[2]
        port = int(svc) if svc.isdigit() else SERVICE_PORTS.get(svc)
        cands = self._by_name.get(name)
        if cands is None:
            return Answer("NXDOMAIN", why="no such endpoint") if self.is_ours(name) else self._forward(
                querier_ip, upstream)
        qe = self._querier(querier_ip)
        records: list[tuple[int, str, tuple[str, ...]]] = []
        for t in cands:
            if (proto, port) not in t.ports or not self.may_see(querier_ip, t):
                continue
            if qe is not None and qe[0] == "endpoint" and qe[1] != t.id and port is not None and \
                    not self.policy.verdict(qe[1], t.id, proto, port).allowed:
                continue
            net = self.network_names.get(t.network, t.network)
            records.append((port or 0, f"{_norm(t.name)}.{_norm(net)}.{self.domain}",
                            tuple(str(ipaddress.ip_address(a.split("/")[0])) for a in t.ips)))
        if not records:
            return Answer("NXDOMAIN", why="no published port the querier may reach under that name")
        return Answer("NOERROR", srv=tuple(records))

    def _network_of(self, endpoint_id: str) -> str | None:
        e = self.policy.endpoints.get(endpoint_id)
        return e.network if e else None

    def _in_our_networks(self, ip: str) -> bool:
        a = ipaddress.ip_address(ip)
        for n in self.policy.networks.values():
            for c in n.cidrs:
                net = ipaddress.ip_network(c, strict=False)
                if net.version == a.version and a in net:
                    return True
        return False

    def _forward(self, querier_ip: str, upstream: str | None) -> Answer:
        if upstream is None:
            return Answer("REFUSED", why="no upstream resolver")
        if not self.may_forward(querier_ip, upstream):
            return Answer("REFUSED", why="isolation: the querier's network may not reach external addresses")
        return Answer("FORWARD")


def search_domains(network_name: str, domain: str, host_search: Iterable[str] = ()) -> list[str]:
    """The search list a container of ``network_name`` gets: its network, the domain, the host's."""
    out = [f"{_norm(network_name)}.{_norm(domain)}", _norm(domain)]
    return list(dict.fromkeys([*out, *(_norm(s) for s in host_search if s)]))


def parse_resolv_conf(text: str) -> tuple[list[str], list[str], list[str]]:
    """(nameservers, search domains, options) of a resolv.conf text."""
    servers: list[str] = []
    search: list[str] = []
    options: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        key, *vals = line.split()
        if key == "nameserver" and vals:
            servers.append(vals[0])
        elif key in ("search", "domain"):
            search = list(vals)
        elif key == "options":
            options.extend(vals)
    return servers, search, options
