"""Value types shared by every layer (msgspec structs, wire-ready)."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec


class DriverType(enum.StrEnum):
    """Network drivers (module description: Bridge, Overlay, Macvlan, IPvlan, Host)."""

    # The wire's names of the drivers a client may ask for (strictly decoded, listed in the
    # contract document; a comment, not the docstring, which the contract quotes). What a
    # driver *is* lives in its modules behind the registry (vnet.core.drivers): code asks
    # the registry rather than comparing members (docs/drivers.md).

    BRIDGE = "bridge"
    OVERLAY = "overlay"
    MACVLAN = "macvlan"
    IPVLAN = "ipvlan"
    HOST = "host"


class IsolationMode(enum.StrEnum):
    """Isolation modes; exact semantics in DESIGN.md section 4."""

    FULL = "full"
    PEER_ONLY = "peer_only"
    MESH_ONLY = "mesh_only"
    NONE = "none"


Name = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")]
LabelKey = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_./-]*$")]
LabelValue = Annotated[str, msgspec.Meta(max_length=255)]
Labels = Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=64)]
Options = Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=64)]


class NetworkRecord(msgspec.Struct, kw_only=True):
    """A network's own fields; the stored record is exactly this (relations live apart)."""

    id: str
    name: str
    cidr: str
    gateway: str
    driver_type: DriverType
    isolation_mode: IsolationMode
    options: dict[str, str] = {}
    labels: dict[str, str] = {}
    created_at: str = ""
    updated_at: str = ""
    # IPv6 subnet and gateway when the network has one (added by the network service).
    cidr_v6: str | None = None
    gateway_v6: str | None = None
    parent: str | None = None  # id of the parent network; this one's subnet is carved from the parent's


class VirtualNetwork(NetworkRecord, forbid_unknown_fields=True, kw_only=True):
    """A virtual network (module description's ``VirtualNetwork``)."""

    # Topology: relations are part of the record (DESIGN section 4, "Topology").
    children: list[str] = []  # ids of child networks
    connected: list[str] = []  # ids of networks explicitly connected to this one (symmetric)
    mesh_groups: list[str] = []  # names of the mesh groups this network is a member of


class Endpoint(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A container's attachment to one network (module description's ``Endpoint``)."""

    id: str
    container_id: str
    network_id: str
    ip_address: str
    mac_address: str
    interface_name: str
    created_at: str = ""
