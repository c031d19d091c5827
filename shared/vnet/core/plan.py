"""The plan: desired vs actual data-plane state -> ordered kernel operations (pure).

``plan(desired, actual, scope=None)`` looks at what the control plane wants on this
host (:class:`~vnet.core.dataplane_model.NodeDesired`) and what the kernel has
(:class:`~vnet.core.dataplane_model.NodeActual`, read by the netlink observer) and
returns a :class:`Plan`: the operations that close the gap, in the order they must
run, plus a planning error for each object that cannot be realised (the others
proceed). No I/O happens here, so every decision is unit-testable.

Properties the node worker relies on:

* **converged host -> empty plan**: a resync of an unchanged host performs no kernel
  write;
* **drift -> exactly the repair**: a missing veth is recreated with its addresses and
  routes, a missing address is added back, a link set down is set up again, a wrong
  default route is replaced — nothing else is touched;
* **teardown removes exactly what we made**: only interfaces whose names have our
  shapes (``vnb-…``, ``vne…``, see :mod:`vnet.core.naming`) are ever deleted; removing
  a host veth removes its container peer, that peer's addresses and routes with it;
* **limits are errors, not crashes**: a Linux bridge holds at most 1023 ports; the
  1024th endpoint of one bridge gets a ``limit_reached`` error and the rest proceed.

Order of a plan: teardown (stale veths, then stale bridges), host sysctls, networks
(bridge, its addresses), then endpoints one by one (veth created with its peer
directly in the container namespace, interface sysctls, addresses, link up), and
last the default routes to add (after every deletion, so a default route moving
from one interface to another never meets the old one). Each op names its *owner* (``net:<id>``, ``ep:<id>``, ``host``,
``link:<name>``) and, for an endpoint, the network it needs (``after``): the applier
skips the rest of an owner's ops once one fails, and an endpoint's ops when its
network failed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Literal

import msgspec

from vnet.core import errors as E
from vnet.core import naming
from vnet.core.dataplane_model import (
    EpDesired,
    LinkState,
    NetDesired,
    NodeActual,
    NodeDesired,
    NsRef,
    NsState,
    PeerHost,
    RouteState,
    Scope,
)
from vnet.core.model import DriverType

BRIDGE_MAX_PORTS = 1023  # BR_MAX_PORTS is 1024 and port number 0 is reserved
ROUTE_PROTO = 86  # rtm_protocol of the routes we add ('V'); shown by `ip route` as "proto 86"
MAIN_TABLE = 254
MIN_MTU = 68
MAX_MTU = 65535
VXLAN_PORT = 4789  # IANA
MAX_VNI = (1 << 24) - 1
MACVLAN_MODES = ("bridge", "private", "vepa", "passthru")
IPVLAN_MODES = ("l2", "l3")
BRIDGED = frozenset({DriverType.BRIDGE, DriverType.OVERLAY})  # a Linux bridge per network, veths per endpoint
SUBIF = frozenset({DriverType.MACVLAN, DriverType.IPVLAN})  # a sub-interface of a parent per endpoint
WG_OWNER = "wg"  # owner of the WireGuard interface's address and link state

Family = Literal[4, 6]


# --------------------------------------------------------------------------- operations


class Op(msgspec.Struct, frozen=True, kw_only=True, tag_field="op"):
    owner: str
    ns: NsRef = None  # None: the host namespace
    after: str | None = None  # skip this op when that owner failed (an endpoint's network)

    def op_name(self) -> str:
        """The op's tag (``create_veth``, ...)."""
        tag = self.__struct_config__.tag
        return tag if isinstance(tag, str) else type(self).__name__


class EnsureBridge(Op, frozen=True, tag="ensure_bridge"):
    """Create a Linux bridge, up, with a fixed MAC and MTU."""

    name: str
    mac: str
    mtu: int


class CreateVeth(Op, frozen=True, tag="create_veth"):
    """One request: a veth whose host side is up on ``bridge`` and whose peer is
    created directly in ``peer_ns`` under its final name and MAC (no move)."""

    name: str
    bridge: str
    peer_ns: str
    peer_ifname: str
    peer_mac: str
    mtu: int


class SetLink(Op, frozen=True, tag="set_link"):
    ifname: str
    up: bool | None = None
    master: str | None = None
    mtu: int | None = None
    mac: str | None = None


class AddAddr(Op, frozen=True, tag="add_addr"):
    ifname: str
    cidr: str
    nodad: bool = False


class DelAddr(Op, frozen=True, tag="del_addr"):
    ifname: str
    cidr: str


class AddRoute(Op, frozen=True, tag="add_route"):
    ifname: str
    family: Family
    gateway: str
    dst: str = "default"


class DelRoute(Op, frozen=True, tag="del_route"):
    ifname: str | None
    family: Family
    dst: str
    gateway: str | None
    table: int = MAIN_TABLE
    metric: int = 0


class SetSysctl(Op, frozen=True, tag="set_sysctl"):
    """Write ``/proc/sys/<path>`` values inside the op's namespace."""

    settings: tuple[tuple[str, str], ...]


class DeleteLink(Op, frozen=True, tag="delete_link"):
    ifname: str
    reason: str = ""


class EnsureVxlan(Op, frozen=True, tag="ensure_vxlan"):
    """Create a VXLAN device, up, on ``bridge``: VNI, source ``local`` bound to ``dev``,
    UDP ``port``, ``nolearning`` and ``proxy`` (ARP/ND answered from static neighbours)."""

    name: str
    vni: int
    local: str
    dev: str
    port: int
    mtu: int
    bridge: str


class AddFdb(Op, frozen=True, tag="add_fdb"):
    """Static FDB entry on a VXLAN device: frames for ``mac`` go to VTEP ``dst``
    (created or replaced: a MAC that moved host is re-pointed in one write)."""

    ifname: str
    mac: str
    dst: str


class DelFdb(Op, frozen=True, tag="del_fdb"):
    ifname: str
    mac: str
    dst: str


class AddNeigh(Op, frozen=True, tag="add_neigh"):
    """Permanent neighbour entry (``ip`` -> ``mac``) on a VXLAN device (created or replaced)."""

    ifname: str
    ip: str
    mac: str


class DelNeigh(Op, frozen=True, tag="del_neigh"):
    ifname: str
    ip: str


class CreateSubIf(Op, frozen=True, tag="create_subif"):
    """One request: a macvlan/ipvlan sub-interface of host interface ``parent``,
    created directly in ``peer_ns`` (``None``: in the host namespace, up — the shim)."""

    kind: Literal["macvlan", "ipvlan"]
    parent: str
    mode: str
    peer_ns: str | None
    ifname: str
    mac: str | None
    mtu: int


PlanOp = (EnsureBridge | CreateVeth | SetLink | AddAddr | DelAddr | AddRoute | DelRoute | SetSysctl | DeleteLink
          | EnsureVxlan | AddFdb | DelFdb | AddNeigh | DelNeigh | CreateSubIf)


class Departed(msgspec.Struct, frozen=True, kw_only=True):
    """A sub-interface endpoint (macvlan/ipvlan) no longer desired: nothing on the host
    side names it, so the caller remembers where it was to remove it."""

    id: str
    netns: str
    ifname: str
    kind: str
    mac: str | None = None  # macvlan: only an interface with this MAC is ours to delete


def op_writes(op: PlanOp) -> int:
    """Kernel writes an op performs when it runs in full."""
    return len(op.settings) if isinstance(op, SetSysctl) else 1


class PlanError(msgspec.Struct, frozen=True, kw_only=True):
    owner: str
    code: str
    message: str
    fatal: bool = True  # False: reported, but the owner still proceeds (e.g. a duplicate ignored)


class Plan(msgspec.Struct, kw_only=True):
    ops: list[PlanOp]
    errors: list[PlanError]
    networks: list[str]  # desired network ids considered
    endpoints: list[str]  # desired endpoint ids considered

    def __len__(self) -> int:
        return len(self.ops)

    def writes(self) -> int:
        return sum(op_writes(op) for op in self.ops)

    def failed(self) -> dict[str, PlanError]:
        """Owners that cannot be realised this round, with their error."""
        return {e.owner: e for e in self.errors if e.fatal}


def net_owner(network_id: str) -> str:
    return f"net:{network_id}"


def ep_owner(endpoint_id: str) -> str:
    return f"ep:{endpoint_id}"


FORWARD4 = "net/ipv4/ip_forward"
FORWARD6 = "net/ipv6/conf/all/forwarding"


def proxy_arp_path(ifname: str) -> str:
    return f"net/ipv4/conf/{ifname}/proxy_arp"


def proxy_delay_path(ifname: str) -> str:
    return f"net/ipv4/neigh/{ifname}/proxy_delay"


def arp_notify_path(ifname: str) -> str:
    return f"net/ipv4/conf/{ifname}/arp_notify"


def accept_dad_path(ifname: str) -> str:
    return f"net/ipv6/conf/{ifname}/accept_dad"


def normalize_cidr(cidr: str) -> str:
    """``"FD00:1:0::5/64"`` -> ``"fd00:1::5/64"`` (the form the observer reports)."""
    return ipaddress.ip_interface(cidr).with_prefixlen


def is_link_local(cidr: str) -> bool:
    return ipaddress.ip_interface(cidr).ip.is_link_local and ":" in cidr


# --------------------------------------------------------------------------- validation


class _Invalid(Exception):
    def __init__(self, code: E.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _iface(value: str, family: Family, what: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        itf = ipaddress.ip_interface(value)
    except ValueError:
        raise _Invalid(E.INVALID_CIDR, f"{what} {value!r} is not an address with prefix length") from None
    if itf.version != family:
        raise _Invalid(E.INVALID_CIDR, f"{what} {value!r} is not an IPv{family} address")
    if "/" not in value:
        raise _Invalid(E.INVALID_CIDR, f"{what} {value!r} needs a prefix length (e.g. /24)")
    return itf


def _usable(itf: ipaddress.IPv4Interface | ipaddress.IPv6Interface, what: str) -> None:
    net = itf.network
    if net.prefixlen < net.max_prefixlen - 1:
        if itf.ip == net.network_address:
            raise _Invalid(E.INVALID_CIDR, f"{what} {itf} is the network address of {net}")
        if itf.version == 4 and itf.ip == net.broadcast_address:
            raise _Invalid(E.INVALID_CIDR, f"{what} {itf} is the broadcast address of {net}")


def _addr(value: str, family: Family, what: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise _Invalid(E.INVALID_GATEWAY, f"{what} {value!r} is not an IP address") from None
    if ip.version != family:
        raise _Invalid(E.INVALID_GATEWAY, f"{what} {value!r} is not an IPv{family} address")
    return str(ip)


def _addr_any(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value.split("/", 1)[0]))
    except ValueError:
        raise _Invalid(E.INVALID_REQUEST, f"{what} {value!r} is not an IP address") from None


def _check_netns(ref: str) -> None:
    if ref.startswith("/"):
        if "/../" in ref + "/" or ref.endswith("/.."):
            raise _Invalid(E.INVALID_REQUEST, f"container namespace path {ref!r} contains '..'")
        return
    if not ref or ref in (".", "..") or "/" in ref or any(c.isspace() for c in ref):
        raise _Invalid(E.INVALID_REQUEST, f"container namespace {ref!r} is neither a name under /run/netns "
                       "nor an absolute path")


class _Net:
    def __init__(self, nd: NetDesired, gw4: str | None, gw6: str | None,
                 net4: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
                 net6: ipaddress.IPv4Network | ipaddress.IPv6Network | None) -> None:
        self.d = nd
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
        return self.d.driver in BRIDGED

    @property
    def subif(self) -> bool:
        return self.d.driver in SUBIF


class _Ep:
    def __init__(self, ed: EpDesired, net: _Net, mac: str, ipv4: str | None, ipv6: str | None,
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


# --------------------------------------------------------------------------- planner


class _Planner:
    def __init__(self, desired: NodeDesired, actual: NodeActual, scope: Scope | None,
                 departed: Iterable[Departed] = ()) -> None:
        self.desired = desired
        wanted = {e.id for e in desired.endpoints}
        self.departed = [d for d in departed if d.id not in wanted]
        self.actual = actual
        self.host = actual.host
        self.scope = scope
        self.ops: list[PlanOp] = []
        self.routes_last: list[PlanOp] = []  # default routes go after every deletion (no EEXIST race)
        self.errors: list[PlanError] = []
        self.failed: set[str] = set()
        self.our_host_veths = {link.index for link in self.host.links.values() if naming.is_our_veth(link.name)}

    def fail(self, owner: str, code: E.ErrorCode | str, message: str, *, fatal: bool = True) -> None:
        if owner in self.failed:
            return
        if fatal:
            self.failed.add(owner)
        self.errors.append(PlanError(owner=owner, code=code if isinstance(code, str) else code.code,
                                     message=message, fatal=fatal))

    def reason(self, owner: str) -> PlanError | None:
        return next((x for x in self.errors if x.owner == owner and x.fatal), None)

    # -- selection ---------------------------------------------------------------------
    def select(self) -> tuple[list[NetDesired], list[EpDesired]]:
        nets: list[NetDesired] = []
        seen: set[str] = set()
        for n in self.desired.networks:
            if n.id in seen:
                self.fail(net_owner(n.id), E.CONFLICT, f"network {n.id} appears twice in the desired state; "
                          "the first is used", fatal=False)
                continue
            seen.add(n.id)
            nets.append(n)
        eps: list[EpDesired] = []
        seen = set()
        for e in self.desired.endpoints:
            if e.id in seen:
                self.fail(ep_owner(e.id), E.CONFLICT, f"endpoint {e.id} appears twice in the desired state; "
                          "the first is used", fatal=False)
                continue
            seen.add(e.id)
            eps.append(e)
        if self.scope is None:
            return nets, eps
        ep_ids = set(self.scope.endpoints)
        # endpoints sharing a container namespace decide its default routes together
        shared = {e.netns for e in eps if e.id in ep_ids}
        ep_sel = [e for e in eps if e.id in ep_ids or e.netns in shared]
        net_ids = set(self.scope.networks) | {e.network_id for e in ep_sel}
        return [n for n in nets if n.id in net_ids], ep_sel

    # -- validation --------------------------------------------------------------------
    def validate_net(self, n: NetDesired) -> _Net | None:
        owner = net_owner(n.id)
        try:
            if not n.id:
                raise _Invalid(E.INVALID_REQUEST, "network id is empty")
            if n.bridge and n.bridge != naming.bridge_name(n.id):
                raise _Invalid(E.INVALID_REQUEST, f"bridge name {n.bridge!r} of network {n.id} is not the "
                               f"derived name {naming.bridge_name(n.id)!r}")
            if n.driver == DriverType.HOST:
                return _Net(n, None, None, None, None)
            if not MIN_MTU <= n.mtu <= MAX_MTU:
                raise _Invalid(E.INVALID_OPTION, f"mtu {n.mtu} of network {n.id} is outside {MIN_MTU}..{MAX_MTU}")
            gw4 = gw6 = None
            net4 = net6 = None
            if n.gateway4 is not None:
                i4 = _iface(n.gateway4, 4, "gateway")
                _usable(i4, "gateway")
                gw4, net4 = i4.with_prefixlen, i4.network
            if n.gateway6 is not None:
                i6 = _iface(n.gateway6, 6, "gateway")
                _usable(i6, "gateway")
                gw6, net6 = i6.with_prefixlen, i6.network
            net = _Net(n, gw4, gw6, net4, net6)
            if n.driver == DriverType.OVERLAY:
                self.validate_overlay(net)
            elif n.driver in SUBIF:
                self.validate_subif(net)
            return net
        except _Invalid as exc:
            self.fail(owner, exc.code, exc.message)
            return None

    def validate_overlay(self, net: _Net) -> None:
        n = net.d
        if n.vni is None or not 1 <= n.vni <= MAX_VNI:
            raise _Invalid(E.INVALID_OPTION, f"overlay network {n.id} needs a VNI in 1..{MAX_VNI}, not {n.vni}")
        u = self.desired.underlay
        if u is None:
            raise _Invalid(E.INVALID_OPTION, f"overlay network {n.id}: this node's desired state has no underlay "
                           "(address and interface)")
        if n.encrypted:
            if u.wg_address is None:
                raise _Invalid(E.INVALID_OPTION, f"encrypted overlay network {n.id}: this node has no WireGuard "
                               "mesh address (underlay.wg_address)")
            net.local = str(_iface(u.wg_address, 4 if ":" not in u.wg_address else 6, "WireGuard address").ip)
            net.dev = u.wg_ifname
        else:
            net.local = _addr_any(u.address, "underlay address")
            net.dev = u.ifname
        try:
            naming.check_ifname(net.dev)
        except naming.InvalidName as exc:
            raise _Invalid(E.INVALID_OPTION, str(exc)) from None

    def validate_subif(self, net: _Net) -> None:
        n = net.d
        kind = n.driver.value
        if not n.parent:
            raise _Invalid(E.INVALID_OPTION, f"{kind} network {n.id} needs a parent interface (option parent)")
        try:
            naming.check_ifname(n.parent)
        except naming.InvalidName as exc:
            raise _Invalid(E.INVALID_OPTION, f"parent: {exc}") from None
        modes = MACVLAN_MODES if n.driver == DriverType.MACVLAN else IPVLAN_MODES
        mode = n.mode or modes[0]
        if mode not in modes:
            raise _Invalid(E.INVALID_OPTION, f"{kind} mode {mode!r} of network {n.id} is not one of "
                           f"{', '.join(modes)}")
        net.mode = mode
        if n.host_shim is not None:
            if n.driver != DriverType.MACVLAN:
                raise _Invalid(E.INVALID_OPTION, "a host shim is offered for macvlan networks only")
            fam: Family = 6 if ":" in n.host_shim else 4
            itf = _iface(n.host_shim, fam, "host shim address")
            _usable(itf, "host shim address")
            subnet = net.net4 if fam == 4 else net.net6
            if subnet is not None and itf.network != subnet:
                raise _Invalid(E.INVALID_CIDR, f"host shim address {n.host_shim} is not in network {subnet}")
            net.shim_addr = itf.with_prefixlen

    def validate_ep(self, e: EpDesired, nets: dict[str, _Net]) -> _Ep | None:
        owner = ep_owner(e.id)
        try:
            if not e.id:
                raise _Invalid(E.INVALID_REQUEST, "endpoint id is empty")
            net = nets.get(e.network_id)
            if net is None:
                err = self.reason(net_owner(e.network_id))
                if err is not None:
                    raise _Invalid(E.lookup(err.code), f"network {e.network_id} cannot be set up: {err.message}")
                raise _Invalid(E.NETWORK_NOT_FOUND, f"network {e.network_id} of endpoint {e.id} is not in this "
                               "node's desired state")
            if net.d.driver == DriverType.HOST:  # the container shares the host namespace: nothing to make
                return _Ep(e, net, "", None, None, None, None)
            try:
                naming.check_ifname(e.ifname)
                mac = naming.normalize_mac(e.mac)
            except naming.InvalidName as exc:
                raise _Invalid(E.INVALID_REQUEST, str(exc)) from None
            _check_netns(e.netns)
            ipv4 = ipv6 = gw4 = gw6 = None
            if e.ipv4 is not None:
                i4 = _iface(e.ipv4, 4, "address")
                _usable(i4, "address")
                if net.net4 is not None and i4.network != net.net4:
                    raise _Invalid(E.INVALID_CIDR, f"address {e.ipv4} is not in network {net.net4}")
                if net.gw4 is not None and i4.with_prefixlen == net.gw4:
                    raise _Invalid(E.ADDRESS_IN_USE, f"address {e.ipv4} is the gateway's")
                ipv4 = i4.with_prefixlen
            if e.ipv6 is not None:
                i6 = _iface(e.ipv6, 6, "address")
                if net.net6 is not None and i6.network != net.net6:
                    raise _Invalid(E.INVALID_CIDR, f"address {e.ipv6} is not in network {net.net6}")
                if net.gw6 is not None and i6.with_prefixlen == net.gw6:
                    raise _Invalid(E.ADDRESS_IN_USE, f"address {e.ipv6} is the gateway's")
                ipv6 = i6.with_prefixlen
            if e.gw4 is not None:
                if ipv4 is None:
                    raise _Invalid(E.INVALID_GATEWAY, "an IPv4 gateway needs an IPv4 address")
                gw4 = _addr(e.gw4, 4, "gateway")
                if ipaddress.ip_address(gw4) not in ipaddress.ip_interface(ipv4).network:
                    raise _Invalid(E.INVALID_GATEWAY, f"gateway {gw4} is not on-link for {ipv4}")
            if e.gw6 is not None:
                if ipv6 is None:
                    raise _Invalid(E.INVALID_GATEWAY, "an IPv6 gateway needs an IPv6 address")
                gw6 = _addr(e.gw6, 6, "gateway")
            return _Ep(e, net, mac, ipv4, ipv6, gw4, gw6)
        except _Invalid as exc:
            self.fail(owner, exc.code, exc.message)
            return None

    def uniqueness(self, eps: list[_Ep]) -> list[_Ep]:
        """Two endpoints must not share a host veth, an interface, a MAC or an address."""
        out: list[_Ep] = []
        veths: dict[str, str] = {}
        ifaces: dict[tuple[str, str], str] = {}
        macs: dict[tuple[str, str], str] = {}
        ips: dict[tuple[str, str], str] = {}
        for ep in eps:
            e = ep.d
            if ep.net.d.driver == DriverType.HOST:
                out.append(ep)
                continue
            clash: str | None = None
            if ep.hv in veths:
                clash = f"host interface name {ep.hv} collides with endpoint {veths[ep.hv]}'s"
            elif (e.netns, e.ifname) in ifaces:
                clash = f"interface {e.ifname} in {e.netns} is already endpoint {ifaces[(e.netns, e.ifname)]}'s"
            elif (e.network_id, ep.mac) in macs:
                clash = f"MAC {ep.mac} is already used by endpoint {macs[(e.network_id, ep.mac)]} in the network"
            else:
                for a in (ep.ipv4, ep.ipv6):
                    if a is not None and (e.network_id, a.split("/")[0]) in ips:
                        clash = f"address {a} is already endpoint {ips[(e.network_id, a.split('/')[0])]}'s"
            if clash is not None:
                self.fail(ep.owner, E.CONFLICT, clash)
                continue
            veths[ep.hv] = e.id
            ifaces[(e.netns, e.ifname)] = e.id
            macs[(e.network_id, ep.mac)] = e.id
            for a in (ep.ipv4, ep.ipv6):
                if a is not None:
                    ips[(e.network_id, a.split("/")[0])] = e.id
            out.append(ep)
        return out

    # -- teardown ----------------------------------------------------------------------
    def teardown(self, nets: list[NetDesired], eps: list[EpDesired]) -> set[str]:
        """Delete what is ours and undesired; returns the names being deleted."""
        gone: set[str] = set()
        links = self.host.links
        for dep in self.departed:
            cns = self.actual.containers.get(dep.netns)
            link = cns.links.get(dep.ifname) if cns is not None and cns.exists else None
            if link is not None and link.kind == dep.kind and (dep.mac is None or (link.mac or "") == dep.mac):
                self.ops.append(DeleteLink(owner=ep_owner(dep.id), ns=dep.netns, ifname=dep.ifname,
                                           reason="endpoint removed"))
        if self.scope is None:
            desired_veths = {naming.veth_name(e.id) for e in self.desired.endpoints if e.id}
            desired_bridges = {naming.bridge_name(n.id) for n in self.desired.networks if n.id and n.driver in BRIDGED}
            desired_vxlans = {naming.vxlan_name(n.id) for n in self.desired.networks
                              if n.id and n.driver == DriverType.OVERLAY}
            desired_shims = {naming.shim_name(n.id) for n in self.desired.networks
                             if n.id and n.driver == DriverType.MACVLAN and n.host_shim is not None}
            for name in sorted(links):
                if naming.is_our_veth(name) and name not in desired_veths:
                    self.ops.append(DeleteLink(owner=f"link:{name}", ifname=name, reason="no endpoint wants it"))
                    gone.add(name)
            for name in sorted(links):
                if ((naming.is_our_vxlan(name) and name not in desired_vxlans)
                        or (naming.is_our_shim(name) and name not in desired_shims)):
                    self.ops.append(DeleteLink(owner=f"link:{name}", ifname=name, reason="no network wants it"))
                    gone.add(name)
            for name in sorted(links):
                if naming.is_our_bridge(name) and name not in desired_bridges:
                    self.ops.append(DeleteLink(owner=f"link:{name}", ifname=name, reason="no network wants it"))
                    gone.add(name)
            return gone
        wanted_eps = {e.id for e in self.desired.endpoints}
        for eid in sorted(self.scope.endpoints - wanted_eps):
            name = naming.veth_name(eid)
            if name in links:
                self.ops.append(DeleteLink(owner=ep_owner(eid), ifname=name, reason="endpoint removed"))
                gone.add(name)
        wanted_nets = {n.id for n in self.desired.networks}
        for nid in sorted(self.scope.networks - wanted_nets):
            for name in (naming.vxlan_name(nid), naming.shim_name(nid), naming.bridge_name(nid)):
                if name in links:
                    self.ops.append(DeleteLink(owner=net_owner(nid), ifname=name, reason="network removed"))
                    gone.add(name)
        return gone

    # -- host --------------------------------------------------------------------------
    def host_sysctls(self, nets: list[_Net]) -> None:
        want: list[tuple[str, str]] = []
        bridges = [n for n in nets if n.bridged]
        if any(n.gw4 for n in bridges) and self.host.sysctls.get(FORWARD4) != "1":
            want.append((FORWARD4, "1"))
        if any(n.gw6 for n in bridges) and self.host.sysctls.get(FORWARD6) != "1":
            want.append((FORWARD6, "1"))
        if want:
            self.ops.append(SetSysctl(owner="host", ns=None, settings=tuple(want)))

    def wireguard(self, nets: list[_Net]) -> None:
        """The WireGuard interface (made by wireguard-go or the kernel module, keyed and
        peered by the node's WireGuard manager) gets its mesh address and is set up.
        Encrypted networks fail closed without it: no VXLAN device, nothing in clear."""
        u = self.desired.underlay
        enc = [n for n in nets if n.d.driver == DriverType.OVERLAY and n.d.encrypted]
        if not enc or u is None or u.wg_address is None:
            return
        link = self.host.links.get(u.wg_ifname)
        if link is None:
            for n in enc:
                self.fail(net_owner(n.d.id), E.UNAVAILABLE,
                          f"encrypted overlay network {n.d.id}: the WireGuard interface {u.wg_ifname} is not up on "
                          "this node; the network stays down rather than send its traffic in clear")
            return
        self.addrs(WG_OWNER, None, u.wg_ifname, link, [normalize_cidr(u.wg_address)])
        if not link.up:
            self.ops.append(SetLink(owner=WG_OWNER, ifname=u.wg_ifname, up=True))

    def network(self, n: _Net) -> None:
        if n.subif:
            self.subif_network(n)
            return
        if not n.bridged:
            return
        owner = net_owner(n.d.id)
        if n.d.driver == DriverType.OVERLAY:
            lower = self.host.links.get(n.dev)
            if lower is None:
                what = "WireGuard interface" if n.d.encrypted else "underlay interface"
                self.fail(owner, E.UNAVAILABLE, f"overlay network {n.d.id}: the {what} {n.dev} does not exist on "
                          "this node")
                return
        mac = naming.bridge_mac(n.d.id)
        link = self.host.links.get(n.bridge)
        want = [a for a in (n.gw4, n.gw6) if a is not None]
        if link is None:
            self.ops.append(EnsureBridge(owner=owner, name=n.bridge, mac=mac, mtu=n.d.mtu))
            for a in want:
                self.ops.append(AddAddr(owner=owner, ifname=n.bridge, cidr=a, nodad=":" in a))
        elif link.kind != "bridge":
            self.fail(owner, E.CONFLICT, f"interface {n.bridge} exists in the host namespace and is a "
                      f"{link.kind or 'device'}, not a bridge")
            return
        else:
            change = SetLink(owner=owner, ifname=n.bridge,
                             up=True if not link.up else None,
                             mtu=n.d.mtu if link.mtu != n.d.mtu else None,
                             mac=mac if (link.mac or "").lower() != mac else None)
            if (change.up, change.mtu, change.mac) != (None, None, None):
                self.ops.append(change)
            self.addrs(owner, None, n.bridge, link, want)
        self.proxy_arp(n, link)
        if n.d.driver == DriverType.OVERLAY:
            self.overlay(n)

    def proxy_arp(self, n: _Net, link: LinkState | None) -> None:
        """A parent network with a child on this host: the child's subnet lies inside the
        parent's, so the parent's containers take a child's address as on-link and ARP for
        it on the parent's bridge, where nobody would answer. Proxy ARP on that bridge (no
        delay) answers with the bridge's MAC and the host routes to the child's bridge.
        Children are found from the desired networks (a bridged network whose IPv4 subnet
        lies strictly inside this one's), so no control-plane field is needed. Once set it
        stays (harmless without children). IPv6 (NDP proxy) is not handled."""
        if not isinstance(n.net4, ipaddress.IPv4Network):
            return
        parent = n.net4
        has_child = False
        for m in self.desired.networks:
            if m.id == n.d.id or m.gateway4 is None or m.driver not in BRIDGED:
                continue
            try:
                sub = ipaddress.ip_interface(m.gateway4).network
            except ValueError:
                continue
            if isinstance(sub, ipaddress.IPv4Network) and sub != parent and sub.subnet_of(parent):
                has_child = True
                break
        if not has_child:
            return
        want = ((proxy_arp_path(n.bridge), "1"), (proxy_delay_path(n.bridge), "0"))
        if link is not None and all(self.host.sysctls.get(k) == v for k, v in want):
            return
        self.ops.append(SetSysctl(owner=net_owner(n.d.id), ns=None, settings=want))

    def _remote_entries(self, n: _Net) -> tuple[dict[str, str], dict[str, str]]:
        """Wanted ``{mac: vtep}`` and ``{ip: mac}`` of a network's remote endpoints."""
        owner = net_owner(n.d.id)
        peers: dict[str, PeerHost] = {p.name: p for p in self.desired.peers}
        fdb: dict[str, str] = {}
        neigh: dict[str, str] = {}
        for r in n.d.remotes:
            peer = peers.get(r.host)
            vtep = None if peer is None else (peer.wg_address if n.d.encrypted else peer.address)
            if vtep is None:
                self.fail(owner, E.INVALID_REQUEST, f"remote endpoint {r.mac} of network {n.d.id}: host {r.host} "
                          f"is not among this node's peers{' with a WireGuard address' if n.d.encrypted else ''}; "
                          "entry skipped", fatal=False)
                continue
            try:
                mac = naming.normalize_mac(r.mac)
                dst = str(ipaddress.ip_address(vtep.split("/", 1)[0]))
                ips = [str(ipaddress.ip_address(a.split("/", 1)[0])) for a in (r.ipv4, r.ipv6) if a is not None]
            except (naming.InvalidName, ValueError) as exc:
                self.fail(owner, E.INVALID_REQUEST, f"remote endpoint {r.mac} of network {n.d.id}: {exc}; entry "
                          "skipped", fatal=False)
                continue
            if fdb.get(mac, dst) != dst:
                self.fail(owner, E.CONFLICT, f"remote MAC {mac} of network {n.d.id} is announced on two hosts; "
                          "the first is used", fatal=False)
                continue
            fdb[mac] = dst
            for ip in ips:
                neigh.setdefault(ip, mac)
        return fdb, neigh

    def overlay(self, n: _Net) -> None:
        """The network's VXLAN device on its bridge, and one static FDB entry and one
        permanent neighbour entry per remote endpoint (no learning, no flooding)."""
        owner = net_owner(n.d.id)
        vni = n.d.vni if n.d.vni is not None else 0
        want_fdb, want_neigh = self._remote_entries(n)
        link = self.host.links.get(n.vxlan)
        ensure = EnsureVxlan(owner=owner, name=n.vxlan, vni=vni, local=n.local, dev=n.dev, port=VXLAN_PORT,
                             mtu=n.d.mtu, bridge=n.bridge, after=WG_OWNER if n.d.encrypted else None)
        have_fdb: dict[str, str] = {}
        have_neigh: dict[str, str] = {}
        if link is not None and (link.kind != "vxlan" or link.vni != vni or link.vxlan_local != n.local
                                 or link.vxlan_link != n.dev or link.vxlan_port != VXLAN_PORT
                                 or link.vxlan_learning or link.vxlan_proxy is False):
            self.ops.append(DeleteLink(owner=owner, ifname=n.vxlan, reason="VXLAN device differs from the desired"))
            link = None
        if link is None:
            self.ops.append(ensure)
        else:
            change = SetLink(owner=owner, ifname=n.vxlan, up=True if not link.up else None,
                             master=n.bridge if link.master != n.bridge else None,
                             mtu=n.d.mtu if link.mtu != n.d.mtu else None)
            if (change.up, change.master, change.mtu) != (None, None, None):
                self.ops.append(change)
            have_fdb = self.host.fdb.get(n.vxlan, {})
            have_neigh = self.host.neigh.get(n.vxlan, {})
        for mac, dst in sorted(have_fdb.items()):
            if mac not in want_fdb:
                self.ops.append(DelFdb(owner=owner, ifname=n.vxlan, mac=mac, dst=dst))
        for ip in sorted(have_neigh):
            if ip not in want_neigh:
                self.ops.append(DelNeigh(owner=owner, ifname=n.vxlan, ip=ip))
        for mac, dst in sorted(want_fdb.items()):
            if have_fdb.get(mac) != dst:
                self.ops.append(AddFdb(owner=owner, ifname=n.vxlan, mac=mac, dst=dst))
        for ip, mac in sorted(want_neigh.items()):
            if have_neigh.get(ip) != mac:
                self.ops.append(AddNeigh(owner=owner, ifname=n.vxlan, ip=ip, mac=mac))

    def subif_network(self, n: _Net) -> None:
        """A macvlan/ipvlan network needs its parent (validated here, on the node) and,
        when asked, the host shim: a macvlan of the parent in the host namespace with an
        address in the network (the kernel forbids parent<->child traffic)."""
        owner = net_owner(n.d.id)
        parent = n.d.parent or ""
        plink = self.host.links.get(parent)
        if plink is None:
            self.fail(owner, E.INVALID_OPTION, f"{n.d.driver.value} network {n.d.id}: parent interface {parent} "
                      "does not exist on this node")
            return
        if naming.is_ours(parent):
            self.fail(owner, E.INVALID_OPTION, f"parent interface {parent} is one of VNet's own interfaces")
            return
        if not plink.up:
            self.ops.append(SetLink(owner=owner, ifname=parent, up=True))
        shim = self.host.links.get(n.shim)
        if n.shim_addr is None:
            return
        if shim is not None and (shim.kind != "macvlan" or shim.peer_index != plink.index):
            self.ops.append(DeleteLink(owner=owner, ifname=n.shim, reason="host shim is not a macvlan of the parent"))
            shim = None
        if shim is None:
            self.ops.append(CreateSubIf(owner=owner, kind="macvlan", parent=parent, mode="bridge", peer_ns=None,
                                        ifname=n.shim, mac=None, mtu=n.d.mtu))
            self.ops.append(AddAddr(owner=owner, ifname=n.shim, cidr=n.shim_addr, nodad=":" in n.shim_addr))
            return
        if not shim.up:
            self.ops.append(SetLink(owner=owner, ifname=n.shim, up=True))
        self.addrs(owner, None, n.shim, shim, [n.shim_addr])

    def addrs(self, owner: str, ns: NsRef, ifname: str, link: LinkState | None, want: Iterable[str],
              after: str | None = None) -> None:
        have = {a for a in (link.addrs if link else ()) if not is_link_local(a)}
        want_set = set(want)
        for a in sorted(have - want_set):
            self.ops.append(DelAddr(owner=owner, ns=ns, ifname=ifname, cidr=a, after=after))
        for a in sorted(want_set - have, key=lambda x: (":" in x, x)):
            self.ops.append(AddAddr(owner=owner, ns=ns, ifname=ifname, cidr=a, nodad=":" in a, after=after))

    # -- endpoints ---------------------------------------------------------------------
    def assign_default_routes(self, eps: list[_Ep]) -> None:
        """Per container namespace and family, the first endpoint with a gateway holds
        the default route (one default route per family; eth0 before eth1)."""
        taken: set[tuple[str, int]] = set()
        for ep in sorted(eps, key=lambda x: (x.d.netns, x.d.ifname)):
            if ep.gw4 is not None and (ep.d.netns, 4) not in taken:
                ep.default4 = True
                taken.add((ep.d.netns, 4))
            if ep.gw6 is not None and (ep.d.netns, 6) not in taken:
                ep.default6 = True
                taken.add((ep.d.netns, 6))

    def container(self, ep: _Ep) -> NsState | None:
        c = self.actual.containers.get(ep.d.netns)
        if c is None or not c.exists:
            self.fail(ep.owner, E.NOT_FOUND, f"container network namespace {ep.d.netns} does not exist")
            return None
        if c.error:
            self.fail(ep.owner, E.UNAVAILABLE, f"container network namespace {ep.d.netns} cannot be read: "
                      f"{c.error}")
            return None
        return c

    def route_conflicts(self, ep: _Ep, cns: NsState, ours: set[str]) -> str | None:
        ours = ours | {link.name for link in cns.links.values()
                       if link.kind == "veth" and link.peer_netnsid is not None
                       and link.peer_index in self.our_host_veths}
        for fam in (4, 6):
            family: Family = 4 if fam == 4 else 6
            if not ep.holds_default(family):
                continue
            for r in cns.routes:
                if (r.family == family and r.dst == "default" and r.table == MAIN_TABLE
                        and r.oif is not None and r.oif not in ours):
                    return (f"container namespace {ep.d.netns} already has an IPv{family} default route via "
                            f"{r.oif} that VNet did not make; not replacing it")
        return None

    def endpoints(self, eps: list[_Ep], gone: set[str]) -> None:
        # ports per bridge: whatever is enslaved now, minus what this plan deletes
        ports: dict[str, set[str]] = {}
        for link in self.host.links.values():
            if link.master is not None and link.name not in gone:
                ports.setdefault(link.master, set()).add(link.name)
        count_ports = self.host.complete
        attached = [ep for ep in eps if (h := self.host.links.get(ep.hv)) is not None and h.master == ep.net.bridge]
        attached_ids = {id(ep) for ep in attached}
        rest = [ep for ep in eps if id(ep) not in attached_ids]
        ifaces_by_ns: dict[str, set[str]] = {}
        for ep in eps:
            ifaces_by_ns.setdefault(ep.d.netns, set()).add(ep.d.ifname)
        for ep in attached + rest:
            if not ep.net.bridged and not ep.net.subif:
                continue
            cns = self.container(ep)
            if cns is None:
                continue
            if ep.net.subif:
                self.sub_endpoint(ep, cns, ifaces_by_ns.get(ep.d.netns, set()))
                continue
            members = ports.setdefault(ep.net.bridge, set())
            if count_ports and ep.hv not in members and len(members) >= BRIDGE_MAX_PORTS:
                self.fail(ep.owner, E.LIMIT_REACHED,
                          f"bridge {ep.net.bridge} of network {ep.net.d.id} is full: a Linux bridge holds at most "
                          f"{BRIDGE_MAX_PORTS} ports; endpoint {ep.d.id} cannot join it on this host")
                continue
            self.endpoint(ep, cns, ifaces_by_ns.get(ep.d.netns, set()))
            if ep.owner not in self.failed:
                members.add(ep.hv)

    def endpoint(self, ep: _Ep, cns: NsState, ours: set[str]) -> None:
        e, owner, after = ep.d, ep.owner, net_owner(ep.net.d.id)
        h = self.host.links.get(ep.hv)
        c = cns.links.get(e.ifname)
        pair_ok = (h is not None and c is not None and h.kind == "veth" and c.kind == "veth"
                   and h.peer_index == c.index and c.peer_index == h.index
                   and h.peer_netnsid is not None and c.peer_netnsid is not None)
        conflict = self.route_conflicts(ep, cns, ours)
        if conflict is not None:
            self.fail(owner, E.CONFLICT, conflict)
            return
        ops: list[PlanOp] = []
        if h is not None and not pair_ok:
            # ours by name, but its peer is not the container's interface: start over
            ops.append(DeleteLink(owner=owner, ifname=ep.hv, after=after,
                                  reason=f"host veth is not paired with {e.ifname} in {e.netns}"))
            h = None
        if h is None:
            if c is not None:
                self.fail(owner, E.CONFLICT, f"container namespace {e.netns} already has an interface named "
                          f"{e.ifname} that VNet did not make")
                return
            self.ops.extend(ops)
            self.create(ep, after)
            return
        assert c is not None
        hs = SetLink(owner=owner, ifname=ep.hv, after=after,
                     master=ep.net.bridge if h.master != ep.net.bridge else None,
                     up=True if not h.up else None,
                     mtu=ep.net.d.mtu if h.mtu != ep.net.d.mtu else None)
        if (hs.master, hs.up, hs.mtu) != (None, None, None):
            ops.append(hs)
        self.ops.extend(ops)
        self.repair_container(ep, c, cns, after, set_mac=True)

    def repair_container(self, ep: _Ep, c: LinkState, cns: NsState, after: str, *, set_mac: bool) -> None:
        """The container side of an existing endpoint interface: sysctls, MAC, MTU,
        addresses, link up, default routes."""
        e, owner = ep.d, ep.owner
        ops: list[PlanOp] = []
        sysctls: list[tuple[str, str]] = []
        if c.arp_notify is not None and c.arp_notify != 1:
            sysctls.append((arp_notify_path(e.ifname), "1"))
        if ep.ipv6 is not None and c.accept_dad is not None and c.accept_dad != 0:
            sysctls.append((accept_dad_path(e.ifname), "0"))
        if sysctls:
            ops.append(SetSysctl(owner=owner, ns=e.netns, after=after, settings=tuple(sysctls)))
        cs = SetLink(owner=owner, ns=e.netns, ifname=e.ifname, after=after,
                     mac=ep.mac if set_mac and (c.mac or "").lower() != ep.mac else None,
                     mtu=ep.net.d.mtu if c.mtu != ep.net.d.mtu else None)
        if (cs.mac, cs.mtu) != (None, None):
            ops.append(cs)
        self.ops.extend(ops)
        self.addrs(owner, e.netns, e.ifname, c, [a for a in (ep.ipv4, ep.ipv6) if a is not None], after)
        if not c.up:
            self.ops.append(SetLink(owner=owner, ns=e.netns, ifname=e.ifname, up=True, after=after))
        self.routes(ep, cns, after)

    def sub_endpoint(self, ep: _Ep, cns: NsState, ours: set[str]) -> None:
        """A macvlan/ipvlan endpoint: the sub-interface of the network's parent, made
        directly in the container namespace (no host-side interface)."""
        e, owner, after = ep.d, ep.owner, net_owner(ep.net.d.id)
        kind: Literal["macvlan", "ipvlan"] = "macvlan" if ep.net.d.driver == DriverType.MACVLAN else "ipvlan"
        parent = ep.net.d.parent or ""
        plink = self.host.links.get(parent)
        if plink is None:  # the network failed already (checked in subif_network)
            self.fail(owner, E.INVALID_OPTION, f"parent interface {parent} does not exist on this node")
            return
        conflict = self.route_conflicts(ep, cns, ours)
        if conflict is not None:
            self.fail(owner, E.CONFLICT, conflict)
            return
        c = cns.links.get(e.ifname)
        mac = ep.mac if kind == "macvlan" else None
        if c is not None:
            mine = c.kind == kind and c.peer_netnsid is not None and c.peer_index == plink.index
            if not mine:
                self.fail(owner, E.CONFLICT, f"container namespace {e.netns} already has an interface named "
                          f"{e.ifname} that is not a {kind} of {parent}")
                return
            if c.sub_mode is not None and c.sub_mode != ep.net.mode:
                self.ops.append(DeleteLink(owner=owner, ns=e.netns, ifname=e.ifname, after=after,
                                           reason=f"{kind} mode is {c.sub_mode}, not {ep.net.mode}"))
                c = None
        if c is None:
            self.ops.append(CreateSubIf(owner=owner, after=after, kind=kind, parent=parent, mode=ep.net.mode,
                                        peer_ns=e.netns, ifname=e.ifname, mac=mac, mtu=ep.net.d.mtu))
            self.container_setup(ep, after)
            return
        self.repair_container(ep, c, cns, after, set_mac=mac is not None)

    def create(self, ep: _Ep, after: str) -> None:
        e, owner = ep.d, ep.owner
        self.ops.append(CreateVeth(owner=owner, ns=None, after=after, name=ep.hv, bridge=ep.net.bridge,
                                   peer_ns=e.netns, peer_ifname=e.ifname, peer_mac=ep.mac, mtu=ep.net.d.mtu))
        self.container_setup(ep, after)

    def container_setup(self, ep: _Ep, after: str) -> None:
        """A freshly made container interface: sysctls, addresses, up, default routes."""
        e, owner = ep.d, ep.owner
        sysctls = [(arp_notify_path(e.ifname), "1")]
        if ep.ipv6 is not None:
            sysctls.append((accept_dad_path(e.ifname), "0"))
        self.ops.append(SetSysctl(owner=owner, ns=e.netns, after=after, settings=tuple(sysctls)))
        for a in (ep.ipv4, ep.ipv6):
            if a is not None:
                self.ops.append(AddAddr(owner=owner, ns=e.netns, ifname=e.ifname, cidr=a, nodad=":" in a,
                                        after=after))
        self.ops.append(SetLink(owner=owner, ns=e.netns, ifname=e.ifname, up=True, after=after))
        for fam in (4, 6):
            family: Family = 4 if fam == 4 else 6
            gw = ep.gw(family)
            if gw is not None and ep.holds_default(family):
                self.routes_last.append(AddRoute(owner=owner, ns=e.netns, ifname=e.ifname, family=family,
                                                 gateway=gw, after=after))

    def routes(self, ep: _Ep, cns: NsState, after: str) -> None:
        e = ep.d
        for fam in (4, 6):
            family: Family = 4 if fam == 4 else 6
            mine = [r for r in cns.routes if r.family == family and r.dst == "default" and r.table == MAIN_TABLE
                    and r.oif == e.ifname]
            gw = ep.gw(family)
            want = gw is not None and ep.holds_default(family)
            keep: RouteState | None = None
            if want:
                keep = next((r for r in mine if r.gateway == gw), None)
            for r in mine:
                if r is not keep:
                    self.ops.append(DelRoute(owner=ep.owner, ns=e.netns, ifname=e.ifname, family=family, dst=r.dst,
                                             gateway=r.gateway, table=r.table, metric=r.metric, after=after))
            if want and keep is None and gw is not None:
                self.routes_last.append(AddRoute(owner=ep.owner, ns=e.netns, ifname=e.ifname, family=family,
                                                 gateway=gw, after=after))

    # -- all ---------------------------------------------------------------------------
    def run(self) -> Plan:
        nets_d, eps_d = self.select()
        nets: dict[str, _Net] = {}
        seen_bridges: dict[str, str] = {}
        for nd in nets_d:
            n = self.validate_net(nd)
            if n is None:
                continue
            if n.bridge in seen_bridges:
                self.fail(net_owner(nd.id), E.CONFLICT, f"bridge name {n.bridge} collides with network "
                          f"{seen_bridges[n.bridge]}'s")
                continue
            seen_bridges[n.bridge] = nd.id
            nets[nd.id] = n
        eps = [ep for e in eps_d if (ep := self.validate_ep(e, nets)) is not None]
        eps = self.uniqueness(eps)
        self.assign_default_routes(eps)
        gone = self.teardown(nets_d, eps_d)
        self.host_sysctls(list(nets.values()))
        self.wireguard(list(nets.values()))
        for n in nets.values():
            if net_owner(n.d.id) not in self.failed:
                self.network(n)
        ready_eps: list[_Ep] = []
        for ep in eps:
            err = self.reason(net_owner(ep.net.d.id))
            if err is None:
                ready_eps.append(ep)
            else:
                self.fail(ep.owner, err.code, f"network {ep.net.d.id} cannot be set up on this host: {err.message}")
        self.endpoints(ready_eps, gone)
        self.ops.extend(self.routes_last)
        return Plan(ops=self.ops, errors=self.errors, networks=[n.id for n in nets_d],
                    endpoints=[e.id for e in eps_d])


def observation_targets(desired: NodeDesired, scope: Scope | None = None) -> tuple[set[str] | None, set[str]]:
    """What the observer must read for ``plan(desired, ..., scope)``.

    Returns ``(host interface names or None for the whole host namespace,
    container namespaces)``.
    """
    ns_nets = {n.id for n in desired.networks if n.driver in BRIDGED or n.driver in SUBIF}
    if scope is None:
        return None, {e.netns for e in desired.endpoints if e.network_id in ns_nets}
    ids = set(scope.endpoints)
    shared = {e.netns for e in desired.endpoints if e.id in ids}
    eps = [e for e in desired.endpoints if e.id in ids or e.netns in shared]
    nets = set(scope.networks) | {e.network_id for e in eps}
    names = {naming.bridge_name(n) for n in nets if n}
    names |= {naming.veth_name(e.id) for e in eps if e.id}
    names |= {naming.veth_name(i) for i in ids if i}
    by_id = {n.id: n for n in desired.networks}
    for nid in nets:
        nd = by_id.get(nid)
        if nd is None:  # removed: whatever it had
            if nid:
                names |= {naming.vxlan_name(nid), naming.shim_name(nid)}
            continue
        if nd.driver == DriverType.OVERLAY:
            names.add(naming.vxlan_name(nid))
        if nd.driver == DriverType.MACVLAN:
            names.add(naming.shim_name(nid))
        if nd.parent:
            names.add(nd.parent)
        if nd.driver == DriverType.OVERLAY and desired.underlay is not None:
            names.add(desired.underlay.wg_ifname if nd.encrypted else desired.underlay.ifname)
    return names, {e.netns for e in eps if e.network_id in ns_nets}


def plan(desired: NodeDesired, actual: NodeActual, scope: Scope | None = None,
         departed: Iterable[Departed] = ()) -> Plan:
    """Ordered operations that turn ``actual`` into ``desired`` (see the module doc).

    ``departed``: sub-interface endpoints (macvlan/ipvlan) the caller saw desired
    before and that are gone now; their interfaces are removed from their containers.
    """
    return _Planner(desired, actual, scope, departed).run()
