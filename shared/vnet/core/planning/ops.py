"""Plan operations and the plan itself (pure value types, wire-ready).

Every kernel change the planner can ask for is one :class:`Op` subclass here (the
applier, :mod:`vnet.adapters.netlink.apply`, executes each one as one netlink request).
A driver that needs a new kind of kernel object adds its op here and its execution in
the applier; most drivers only combine the existing ones.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from vnet.core.addr import parsed_interface
from vnet.core.dataplane_model import NsRef

BRIDGE_MAX_PORTS = 1023  # BR_MAX_PORTS is 1024 and port number 0 is reserved
ROUTE_PROTO = 86  # rtm_protocol of the routes we add ('V'); shown by `ip route` as "proto 86"
MAIN_TABLE = 254
MIN_MTU = 68
MAX_MTU = 65535
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


def addr_gen_mode_path(ifname: str) -> str:
    return f"net/ipv6/conf/{ifname}/addr_gen_mode"


ADDR_GEN_MODE_NONE = "1"  # IN6_ADDR_GEN_MODE_NONE: the kernel makes no link-local address


def normalize_cidr(cidr: str) -> str:
    """``"FD00:1:0::5/64"`` -> ``"fd00:1::5/64"`` (the form the observer reports)."""
    return parsed_interface(cidr).with_prefixlen


def is_link_local(cidr: str) -> bool:
    return parsed_interface(cidr).ip.is_link_local and ":" in cidr

