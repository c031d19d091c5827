"""Validation of desired objects and the views the planner and the drivers share (pure).

:class:`Invalid` is how any check refuses an object (the planner turns it into a
``PlanError`` of that object's owner). :class:`NetView` / :class:`EpView` are a desired
network / endpoint once validated: normalised addresses, derived interface names, and
the driver that realises it (looked up once in the registry by the planner).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Literal

from vnet.core import errors as E
from vnet.core import naming
from vnet.core.addr import parsed_interface, parsed_ip
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired
from vnet.core.planning.ops import MAX_MTU, MIN_MTU, ep_owner

if TYPE_CHECKING:
    from vnet.core.drivers.base import Driver

Family = Literal[4, 6]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Invalid(Exception):
    """A desired object that cannot be realised: its error code and a message for a person."""

    def __init__(self, code: E.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def iface(value: str, family: Family, what: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        itf = parsed_interface(value)
    except ValueError:
        raise Invalid(E.INVALID_CIDR, f"{what} {value!r} is not an address with prefix length") from None
    if itf.version != family:
        raise Invalid(E.INVALID_CIDR, f"{what} {value!r} is not an IPv{family} address")
    if "/" not in value:
        raise Invalid(E.INVALID_CIDR, f"{what} {value!r} needs a prefix length (e.g. /24)")
    return itf


def usable(itf: ipaddress.IPv4Interface | ipaddress.IPv6Interface, what: str) -> None:
    net = itf.network
    if net.prefixlen < net.max_prefixlen - 1:
        if itf.ip == net.network_address:
            raise Invalid(E.INVALID_CIDR, f"{what} {itf} is the network address of {net}")
        if itf.version == 4 and itf.ip == net.broadcast_address:
            raise Invalid(E.INVALID_CIDR, f"{what} {itf} is the broadcast address of {net}")


def addr(value: str, family: Family, what: str) -> str:
    try:
        ip = parsed_ip(value)
    except ValueError:
        raise Invalid(E.INVALID_GATEWAY, f"{what} {value!r} is not an IP address") from None
    if ip.version != family:
        raise Invalid(E.INVALID_GATEWAY, f"{what} {value!r} is not an IPv{family} address")
    return str(ip)


def addr_any(value: str, what: str) -> str:
    try:
        return str(parsed_ip(value.split("/", 1)[0]))
    except ValueError:
        raise Invalid(E.INVALID_REQUEST, f"{what} {value!r} is not an IP address") from None


def check_netns(ref: str) -> None:
    if ref.startswith("/"):
        if "/../" in ref + "/" or ref.endswith("/.."):
            raise Invalid(E.INVALID_REQUEST, f"container namespace path {ref!r} contains '..'")
        return
    if not ref or ref in (".", "..") or "/" in ref or any(c.isspace() for c in ref):
        raise Invalid(E.INVALID_REQUEST, f"container namespace {ref!r} is neither a name under /run/netns "
                      "nor an absolute path")


class NetView:
    """A validated desired network. ``local``, ``dev``, ``mode`` and ``shim_addr`` are
    filled by the driver's ``validate`` (overlay: VTEP source and lower device;
    macvlan/ipvlan: mode and host shim) and read by the same driver's planner."""

    def __init__(self, nd: NetDesired, driver: Driver, gw4: str | None, gw6: str | None,
                 net4: IPNetwork | None, net6: IPNetwork | None) -> None:
        self.d = nd
        self.driver = driver
        self.bridge = naming.bridge_name(nd.id)
        self.vxlan = naming.vxlan_name(nd.id)
        self.shim = naming.shim_name(nd.id)
        self.gw4 = gw4
        self.gw6 = gw6
        self.net4 = net4
        self.net6 = net6
        self.local = ""  # overlay: VTEP source address
        self.dev = ""  # overlay: the device the VXLAN is bound to (underlay or WireGuard)
        self.mode = ""  # macvlan/ipvlan mode
        self.shim_addr: str | None = None

    @property
    def bridged(self) -> bool:
        """A Linux bridge per network on this host (its gateway address, forwarding)."""
        return self.driver.bridged


class EpView:
    """A validated desired endpoint of a :class:`NetView`."""

    def __init__(self, ed: EpDesired, net: NetView, mac: str, ipv4: str | None, ipv6: str | None,
                 gw4: str | None, gw6: str | None) -> None:
        self.d = ed
        self.net = net
        self.mac = mac
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.gw4 = gw4
        self.gw6 = gw6
        self.hv = naming.veth_name(ed.id)
        self.owner = ep_owner(ed.id)
        self.default4 = False  # this endpoint holds the container's IPv4 default route
        self.default6 = False

    def gw(self, family: Family) -> str | None:
        return self.gw4 if family == 4 else self.gw6

    def holds_default(self, family: Family) -> bool:
        return self.default4 if family == 4 else self.default6


def validate_net(n: NetDesired, driver: Driver, desired: NodeDesired) -> NetView:
    """The generic checks of a desired network, then its driver's; raises :class:`Invalid`."""
    if not n.id:
        raise Invalid(E.INVALID_REQUEST, "network id is empty")
    if n.bridge and n.bridge != naming.bridge_name(n.id):
        raise Invalid(E.INVALID_REQUEST, f"bridge name {n.bridge!r} of network {n.id} is not the "
                      f"derived name {naming.bridge_name(n.id)!r}")
    if not driver.realised:
        return NetView(n, driver, None, None, None, None)
    if not MIN_MTU <= n.mtu <= MAX_MTU:
        raise Invalid(E.INVALID_OPTION, f"mtu {n.mtu} of network {n.id} is outside {MIN_MTU}..{MAX_MTU}")
    gw4 = gw6 = None
    net4 = net6 = None
    if n.gateway4 is not None:
        i4 = iface(n.gateway4, 4, "gateway")
        usable(i4, "gateway")
        gw4, net4 = i4.with_prefixlen, i4.network
    if n.gateway6 is not None:
        i6 = iface(n.gateway6, 6, "gateway")
        usable(i6, "gateway")
        gw6, net6 = i6.with_prefixlen, i6.network
    net = NetView(n, driver, gw4, gw6, net4, net6)
    driver.validate(net, desired)
    return net


def validate_ep(e: EpDesired, net: NetView) -> EpView:
    """The checks of a desired endpoint of a validated network; raises :class:`Invalid`."""
    if not net.driver.realised:  # e.g. the container shares the host namespace: nothing to make
        return EpView(e, net, "", None, None, None, None)
    try:
        naming.check_ifname(e.ifname)
        mac = naming.normalize_mac(e.mac)
    except naming.InvalidName as exc:
        raise Invalid(E.INVALID_REQUEST, str(exc)) from None
    check_netns(e.netns)
    ipv4 = ipv6 = gw4 = gw6 = None
    if e.ipv4 is not None:
        i4 = iface(e.ipv4, 4, "address")
        usable(i4, "address")
        if net.net4 is not None and i4.network != net.net4:
            raise Invalid(E.INVALID_CIDR, f"address {e.ipv4} is not in network {net.net4}")
        if net.gw4 is not None and i4.with_prefixlen == net.gw4:
            raise Invalid(E.ADDRESS_IN_USE, f"address {e.ipv4} is the gateway's")
        ipv4 = i4.with_prefixlen
    if e.ipv6 is not None:
        i6 = iface(e.ipv6, 6, "address")
        if net.net6 is not None and i6.network != net.net6:
            raise Invalid(E.INVALID_CIDR, f"address {e.ipv6} is not in network {net.net6}")
        if net.gw6 is not None and i6.with_prefixlen == net.gw6:
            raise Invalid(E.ADDRESS_IN_USE, f"address {e.ipv6} is the gateway's")
        ipv6 = i6.with_prefixlen
    if e.gw4 is not None:
        if ipv4 is None:
            raise Invalid(E.INVALID_GATEWAY, "an IPv4 gateway needs an IPv4 address")
        gw4 = addr(e.gw4, 4, "gateway")
        if parsed_ip(gw4) not in parsed_interface(ipv4).network:
            raise Invalid(E.INVALID_GATEWAY, f"gateway {gw4} is not on-link for {ipv4}")
    if e.gw6 is not None:
        if ipv6 is None:
            raise Invalid(E.INVALID_GATEWAY, "an IPv6 gateway needs an IPv6 address")
        gw6 = addr(e.gw6, 6, "gateway")
    return EpView(e, net, mac, ipv4, ipv6, gw4, gw6)
