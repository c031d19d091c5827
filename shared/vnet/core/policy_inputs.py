"""The policy engine's inputs (pure): networks, endpoints, selectors and allow rules as the
engine reads them (:mod:`vnet.core.policy` decides with them, :mod:`vnet.core.ruleset`
holds what it compiles). Apart from the engine so a reader of the wire types of rules
finds them alone; every name is re-exported by :mod:`vnet.core.policy`.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

import msgspec

from vnet.core import errors as E
from vnet.core import naming
from vnet.core.model import IsolationMode, VirtualNetwork

Protocol = Literal["tcp", "udp", "sctp", "icmp"]
PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp"})
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
RuleId = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")]
SelStr = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]

# ----------------------------------------------------------------------------- inputs


class PolicyNetwork(msgspec.Struct, frozen=True, kw_only=True):
    """A network as the engine sees it."""

    id: str
    mode: IsolationMode
    cidrs: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()  # host addresses on the network's bridge (count as external)
    connected: tuple[str, ...] = ()
    parent: str | None = None
    children: tuple[str, ...] = ()
    mesh_groups: tuple[str, ...] = ()
    bridge: str = ""  # empty: naming.bridge_name(id)

    def bridge_name(self) -> str:
        return self.bridge or naming.bridge_name(self.id)

    @classmethod
    def from_record(cls, n: VirtualNetwork) -> PolicyNetwork:
        cidrs = tuple(c for c in (n.cidr, n.cidr_v6) if c)
        gws = tuple(g for g in (n.gateway, n.gateway_v6) if g)
        return cls(id=n.id, mode=n.isolation_mode, cidrs=cidrs, gateways=gws, connected=tuple(n.connected),
                   parent=n.parent, children=tuple(n.children), mesh_groups=tuple(n.mesh_groups))


class Published(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A container port published on the host's addresses (``host_port`` -> ``port``)."""

    protocol: Literal["tcp", "udp"]
    host_port: Port
    port: Port


class PolicyEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """An endpoint as the engine sees it (addresses without prefix length)."""

    id: str
    network: str
    ips: tuple[str, ...]
    mac: str
    labels: dict[str, str] = {}
    node: str = ""
    host_ifname: str = ""  # empty: naming.veth_name(id); "-": no bridge port (host driver)
    published: tuple[Published, ...] = ()

    def port_name(self) -> str:
        return self.host_ifname or naming.veth_name(self.id)


class Selector(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Selects endpoints (fields AND together) or, with only ``cidr``, addresses."""

    endpoint: SelStr | None = None
    network: SelStr | None = None
    labels: dict[str, str] | None = None
    cidr: SelStr | None = None

    def only_cidr(self) -> bool:
        return self.cidr is not None and self.endpoint is None and self.network is None and not self.labels


class PortSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    protocol: Protocol
    port: Port | None = None
    end_port: Port | None = None

    def range(self) -> tuple[int, int] | None:
        if self.port is None:
            return None
        return self.port, self.end_port if self.end_port is not None else self.port


class AllowRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Allow flows initiated by a ``from`` match toward a ``to`` match (on ``ports``)."""

    id: RuleId
    from_: Annotated[list[Selector], msgspec.Meta(min_length=1, max_length=64)] = msgspec.field(name="from")
    to: Annotated[list[Selector], msgspec.Meta(min_length=1, max_length=64)]
    ports: Annotated[list[PortSpec], msgspec.Meta(min_length=1, max_length=64)] | None = None
    description: Annotated[str, msgspec.Meta(max_length=256)] = ""


def validate_rule(rule: AllowRule) -> None:
    """Raise ``invalid_request`` for a rule the engine cannot compile faithfully."""
    for side, sels in (("from", rule.from_), ("to", rule.to)):
        for s in sels:
            if s.endpoint is None and s.network is None and not s.labels and s.cidr is None:
                raise E.make(E.INVALID_REQUEST, f"rule {rule.id}: an empty selector in {side!r} would select "
                             "everything; name an endpoint, network, labels or cidr", rule=rule.id)
            if s.cidr is not None:
                try:
                    ipaddress.ip_network(s.cidr, strict=True)
                except ValueError as exc:
                    raise E.make(E.INVALID_CIDR, f"rule {rule.id}: selector cidr {s.cidr!r}: {exc}",
                                 rule=rule.id) from None
    for p in rule.ports or []:
        if p.protocol not in PORT_PROTOCOLS and p.port is not None:
            raise E.make(E.INVALID_REQUEST, f"rule {rule.id}: protocol {p.protocol} has no ports", rule=rule.id)
        if p.end_port is not None and (p.port is None or p.end_port < p.port):
            raise E.make(E.INVALID_REQUEST, f"rule {rule.id}: end_port needs a port not above it", rule=rule.id)
