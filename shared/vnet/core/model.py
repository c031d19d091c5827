"""Value types shared by every layer (msgspec structs, wire-ready)."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec


class DriverType(enum.StrEnum):
    """Network drivers (module description: Bridge, Overlay, Macvlan, IPvlan, Host)."""

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


class VirtualNetwork(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A virtual network (module description's ``VirtualNetwork``)."""

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


class Endpoint(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A container's attachment to one network (module description's ``Endpoint``)."""

    id: str
    container_id: str
    network_id: str
    ip_address: str
    mac_address: str
    interface_name: str
    created_at: str = ""
