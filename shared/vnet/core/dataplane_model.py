"""Desired and actual data-plane state of one node, and what a reconcile reports (pure).

``NodeDesired`` is what the control plane wants on this host (networks and the
endpoints of its containers); ``NodeActual`` is what the kernel has, as read by the
netlink observer. :func:`vnet.core.plan.plan` turns the two into an ordered list of
operations; the applier executes them. Every type here is a msgspec struct, so the
node worker can receive desired state and send results over the bus unchanged.

Conventions:

* addresses are interface CIDRs, ``"10.1.0.5/24"`` / ``"fd00:1::5/64"``
  (the address and the on-link prefix, like ``ip addr``);
* a namespace is referred to as the node worker's *host* namespace (``None`` in
  operations) or by the string the endpoint carries: a name under ``/run/netns`` or
  an absolute path (``/proc/<pid>/ns/net``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from vnet.core import naming
from vnet.core.model import DriverType

NsRef = str | None
"""A namespace in an operation: ``None`` is the host namespace, else a container's."""


class RemoteEndpoint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An endpoint of an overlay network that lives on another host.

    Programmed on this host as a static FDB entry (``mac`` -> the VTEP of ``host``)
    and static neighbour entries (``ipv4``/``ipv6`` -> ``mac``) on the network's
    VXLAN device, which answers the containers' ARP/ND from them (no flooding).
    """

    mac: str
    host: str  # a PeerHost.name of NodeDesired.peers: its VTEP is that host's address
    ipv4: str | None = None  # "10.1.0.7" (a "/len" suffix is accepted and ignored)
    ipv6: str | None = None


class NetDesired(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One network as this host must realise it.

    Overlay networks also need ``vni`` (and ``NodeDesired.underlay``); macvlan and
    ipvlan networks need ``parent``. Every field added after the bridge driver is
    optional, so older desired states decode unchanged.
    """

    id: str
    driver: DriverType = DriverType.BRIDGE
    bridge: str = ""  # empty: naming.bridge_name(id); anything else must equal it
    gateway4: str | None = None  # "10.1.0.1/24": the bridge's address, the containers' gateway
    gateway6: str | None = None  # "fd00:1::1/64"
    mtu: int = 1500
    # overlay
    vni: int | None = None  # 1..16777215, unique per network (the network service allocates it)
    encrypted: bool = False  # VXLAN over the WireGuard mesh (NodeDesired.underlay.wg_*)
    remotes: tuple[RemoteEndpoint, ...] = ()  # this network's endpoints on other hosts
    # macvlan / ipvlan
    parent: str | None = None  # the host interface the sub-interfaces hang off
    mode: str | None = None  # macvlan: bridge|private|vepa|passthru (bridge); ipvlan: l2|l3 (l2)
    host_shim: str | None = None  # macvlan: "10.1.0.254/24" puts a macvlan with this address on the host

    def bridge_name(self) -> str:
        return self.bridge or naming.bridge_name(self.id)


class EpDesired(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One endpoint (a container's interface in one network) on this host."""

    id: str
    network_id: str
    netns: str  # a name under /run/netns or an absolute path
    mac: str
    ipv4: str | None = None  # "10.1.0.5/24"
    ipv6: str | None = None  # "fd00:1::5/64"
    ifname: str = "eth0"
    gw4: str | None = None  # default route via this gateway ("10.1.0.1"); None: no default route
    gw6: str | None = None

    def host_ifname(self) -> str:
        return naming.veth_name(self.id)


class Underlay(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """This host's side of the overlay: its underlay address and, for encrypted
    networks, its place in the WireGuard mesh."""

    address: str  # "10.250.0.1": the VTEP source address of clear overlays (on ``ifname``)
    ifname: str  # the underlay interface the VXLAN devices are bound to
    wg_address: str | None = None  # "10.251.0.1/24": this host's address inside the WireGuard mesh
    wg_ifname: str = "vnwg0"  # the WireGuard interface (wireguard-go tun, or the kernel module's)
    wg_port: int = 51820  # UDP listen port on the underlay


class PeerHost(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Another host of the overlay (the VTEP of its remote endpoints)."""

    name: str
    address: str  # its underlay address ("10.250.0.2"): the VTEP of clear overlays
    wg_public_key: str | None = None  # base64 WireGuard public key (never a private key)
    wg_address: str | None = None  # "10.251.0.2": its mesh address, the VTEP of encrypted overlays
    wg_port: int = 51820


class NodeDesired(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    networks: list[NetDesired] = []
    endpoints: list[EpDesired] = []
    underlay: Underlay | None = None  # needed by overlay networks
    peers: list[PeerHost] = []  # the other hosts of this host's overlay networks


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    """Limit a reconcile to some objects (an event's targeted work).

    Ids in scope but absent from the desired state are torn down. ``None`` for a
    whole reconcile (start-up and the periodic resync), which also sweeps every
    interface of ours that nothing desires.
    """

    networks: frozenset[str] = frozenset()
    endpoints: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- actual


class LinkState(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str
    kind: str | None = None  # IFLA_INFO_KIND: "bridge", "veth", ... (None for lo/physical)
    mac: str | None = None
    mtu: int = 0
    up: bool = False  # administratively up (IFF_UP)
    master: str | None = None  # name of the master (bridge) in the same namespace
    peer_index: int | None = None  # IFLA_LINK when it names another interface (veth peer)
    peer_netnsid: int | None = None  # IFLA_LINK_NETNSID: the peer lives in another namespace
    addrs: tuple[str, ...] = ()  # every address, as CIDR, normalised
    arp_notify: int | None = None  # ipv4 devconf, from the link dump
    accept_dad: int | None = None  # ipv6 devconf, from the link dump
    # vxlan (IFLA_INFO_DATA)
    vni: int | None = None
    vxlan_local: str | None = None
    vxlan_link: str | None = None  # name of the lower device (same namespace)
    vxlan_port: int | None = None
    vxlan_learning: bool | None = None
    vxlan_proxy: bool | None = None
    # macvlan / ipvlan (IFLA_INFO_DATA): the mode as a name ("bridge", "l2", ...)
    sub_mode: str | None = None


class RouteState(msgspec.Struct, frozen=True, kw_only=True):
    family: Literal[4, 6]
    dst: str  # "default" or a CIDR
    gateway: str | None = None
    oif: str | None = None  # interface name
    table: int = 254
    proto: int = 0
    metric: int = 0


class NsState(msgspec.Struct, kw_only=True):
    exists: bool = True
    error: str | None = None  # could not be read (and why)
    links: dict[str, LinkState] = {}
    routes: list[RouteState] = []
    sysctls: dict[str, str] = {}  # path under /proc/sys -> value (only those we read)
    fdb: dict[str, dict[str, str]] = {}  # our VXLAN devices: ifname -> {mac: remote VTEP} (static entries)
    neigh: dict[str, dict[str, str]] = {}  # our VXLAN devices: ifname -> {ip: mac} (permanent entries)
    complete: bool = True  # False: only some links were read (scoped observation)


class NodeActual(msgspec.Struct, kw_only=True):
    host: NsState
    containers: dict[str, NsState] = {}


# --------------------------------------------------------------------------- results

OpStatus = Literal["ready", "failed"]


class ObjectStatus(msgspec.Struct, frozen=True, kw_only=True):
    state: OpStatus
    reason: str = ""
    code: str = ""  # a vnet.core.errors code when failed


class ReconcileError(msgspec.Struct, frozen=True, kw_only=True):
    owner: str  # "ep:<id>", "net:<id>", "host" (host sysctls), "link:<name>" (teardown of an interface
    # no desired object names) or "node" (the whole reconcile failed: host namespace unreadable, a bug)
    code: str  # stable code (vnet.core.errors) or "kernel"
    message: str
    op: str = ""  # the operation that failed ("" for planning errors)
    errno: int = 0


class ReconcileResult(msgspec.Struct, kw_only=True):
    ops_planned: int
    ops_applied: int
    writes: int  # kernel writes: state-changing netlink requests + sysctl writes
    errors: list[ReconcileError]
    endpoints: dict[str, ObjectStatus]  # every desired endpoint in scope
    networks: dict[str, ObjectStatus]  # every desired network in scope
    duration: float  # seconds
    observe_s: float = 0.0
    plan_s: float = 0.0
    apply_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors


class Support(msgspec.Struct, frozen=True, kw_only=True):
    available: bool
    reason: str = ""


class ProbeResult(msgspec.Struct, kw_only=True):
    """What this kernel can do, found by trying in a scratch namespace."""

    kinds: dict[str, Support]  # link kinds: bridge, veth, vxlan, macvlan, ipvlan, wireguard
    drivers: dict[str, Support]  # VNet drivers: bridge, overlay, macvlan, ipvlan, host
