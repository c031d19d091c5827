"""IPAM wire types (``vnet.ipam.*``). The network service creates and deletes pools;
the endpoint service requests and releases addresses."""

from __future__ import annotations

from typing import Annotated

import msgspec

from vnet.contracts.messages import RequestId

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
Cidr = Annotated[str, msgspec.Meta(min_length=3, max_length=64)]
Addr = Annotated[str, msgspec.Meta(min_length=2, max_length=64)]


class PoolCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Create the pool of one network and family (idempotent for the same arguments)."""

    network_id: Id
    cidr: Cidr
    gateway: Addr | None = None
    # Addresses never handed out besides network, broadcast and gateway.
    reserved: Annotated[list[Addr], msgspec.Meta(max_length=1024)] = []
    # Sub-ranges carved out of this pool (children of a parent network).
    excluded: Annotated[list[Cidr], msgspec.Meta(max_length=1024)] = []
    request_id: RequestId | None = None


class PoolRef(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    network_id: Id
    family: Annotated[int, msgspec.Meta(ge=4, le=6)] | None = None  # None: every family


class PoolInfo(msgspec.Struct, kw_only=True):
    network_id: str
    family: int
    cidr: str
    gateway: str | None
    capacity: int  # assignable addresses (excludes network/broadcast/gateway/reserved/excluded)
    used: int
    free: int
    cursor: str | None  # the last address handed out (serial allocation continues after it)


class PoolsReply(msgspec.Struct, kw_only=True):
    pools: list[PoolInfo]


class AddrRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Allocate one address to ``owner`` (an endpoint id); ``address`` asks for a static one."""

    network_id: Id
    owner: Id
    family: Annotated[int, msgspec.Meta(ge=4, le=6)] = 4
    address: Addr | None = None
    request_id: RequestId | None = None


class AddrReply(msgspec.Struct, kw_only=True):
    network_id: str
    family: int
    address: str  # plain address, no prefix
    prefix_len: int
    gateway: str | None
    owner: str
    allocated_at: float


class AddrRelease(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Release every address ``owner`` holds in ``network_id`` (idempotent)."""

    network_id: Id
    owner: Id
    request_id: RequestId | None = None


class ReleaseReply(msgspec.Struct, kw_only=True):
    released: list[str]
