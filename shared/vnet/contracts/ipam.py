"""IPAM wire types (``vnet.ipam.*``). The network service creates and deletes pools;
the endpoint service requests and releases addresses."""

from __future__ import annotations

from typing import Annotated

import msgspec

from vnet.contracts.messages import RequestId
from vnet.core.forecast import PoolForecast

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
Cidr = Annotated[str, msgspec.Meta(min_length=3, max_length=64)]
Addr = Annotated[str, msgspec.Meta(min_length=2, max_length=64)]
CheckLimit = Annotated[int, msgspec.Meta(ge=1, le=2000)]
PoolLimit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
CheckCursor = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


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
    # Added by the IPAM service (defaults keep older senders valid):
    window: int = 0  # addresses managed (the subnet size, capped at 2**24 for large IPv6 subnets)
    reserved: list[str] = []
    excluded: list[str] = []
    created_at: float = 0.0
    # pool.get / pool.list: allocation and release rates and the time to exhaustion
    forecast: PoolForecast | None = None


class PoolsReply(msgspec.Struct, kw_only=True):
    pools: list[PoolInfo]
    next_cursor: str | None = None  # pool.list: more pools follow; pass it as ``cursor``


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
    # no one has held this address since the pool was made, so no peer can hold a stale ARP
    # or neighbour entry for it (the node skips its gratuitous ARP); False when not known
    first_use: bool = False


class AddrRelease(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Release every address ``owner`` holds in ``network_id`` (idempotent)."""

    network_id: Id
    owner: Id
    request_id: RequestId | None = None


class ReleaseReply(msgspec.Struct, kw_only=True):
    released: list[str]


# --- additions by the IPAM service (wire-compatible: new types and defaulted fields) ----------

Family = Annotated[int, msgspec.Meta(ge=4, le=6)]
GraceS = Annotated[float, msgspec.Meta(ge=0, le=30 * 24 * 3600)]


class PoolDelete(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Delete the pool(s) of a network (idempotent: no pool is not an error).

    A superset of :class:`PoolRef` on the wire. Refused with 409 ``pool_in_use`` while
    addresses are allocated, unless ``force`` (which releases them).
    """

    network_id: Id
    family: Family | None = None  # None: every family
    force: bool = False
    request_id: RequestId | None = None


class PoolDeleteReply(msgspec.Struct, kw_only=True):
    pools: list[PoolInfo]  # the pools deleted, as they were just before
    released: int = 0  # allocations dropped by a forced delete


class PoolList(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every pool, or those of one network, in (network_id, family) order, ``limit`` per
    reply; the reply's ``next_cursor`` (given as ``cursor``) fetches the next page."""

    network_id: Id | None = None
    family: Family | None = None
    limit: PoolLimit = 200
    cursor: CheckCursor | None = None


class Allocation(msgspec.Struct, kw_only=True):
    network_id: str
    family: int
    address: str
    owner: str
    allocated_at: float  # Redis server time, seconds since the epoch


class GcRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Release allocations whose owner (endpoint) is gone and delete pools whose network is gone.

    Only what is older than ``grace_s`` is collected (default: the service's setting).
    """

    grace_s: GraceS | None = None
    network_id: Id | None = None  # None: every pool
    request_id: RequestId | None = None
    # At most this many releases and pool deletions per reply; when the reply has
    # ``next_cursor``, more may be left: call again with it as ``cursor``.
    limit: CheckLimit = 1000
    cursor: CheckCursor | None = None


class GcPool(msgspec.Struct, kw_only=True):
    network_id: str
    family: int
    cidr: str
    released: int  # allocations it still had


class GcReply(msgspec.Struct, kw_only=True):
    grace_s: float
    pools_scanned: int
    released: list[Allocation]
    pools_deleted: list[GcPool]
    index_repaired: int = 0  # pool index entries without a pool, removed
    skipped: list[str] = []  # why a part of the collection did not run
    next_cursor: str | None = None  # the page's limit was reached: more may be collectable


class CheckRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One page of the check. Pools are checked in (network_id, family) order; a page ends
    after ``limit`` findings (leaks, inconsistencies, orphan pools together) and its
    ``next_cursor`` resumes right there, inside a pool if need be: one reply stays far
    below the bus's message limit however many allocations leak."""

    network_id: Id | None = None
    grace_s: GraceS | None = None  # a leak older than this is marked collectable
    limit: CheckLimit = 1000
    cursor: CheckCursor | None = None


class Leak(msgspec.Struct, kw_only=True):
    network_id: str
    family: int
    address: str
    owner: str
    allocated_at: float
    age_s: float
    collectable: bool  # older than the grace period: the next GC releases it


class Inconsistency(msgspec.Struct, kw_only=True):
    network_id: str
    family: int
    kind: str  # bit_without_owner | owner_without_bit | holder_mismatch | blocked_bit_clear | ...
    message: str
    address: str | None = None
    owner: str | None = None


class OrphanPool(msgspec.Struct, kw_only=True):
    network_id: str
    family: int
    cidr: str
    used: int
    age_s: float
    collectable: bool


class CheckReply(msgspec.Struct, kw_only=True):
    """What ``vnetctl ipam check`` prints; nothing was changed to produce it."""

    clean: bool  # no leak, no inconsistency, no orphan pool
    pools_checked: int
    allocations: int
    leaks: list[Leak]
    inconsistencies: list[Inconsistency]
    orphan_pools: list[OrphanPool]
    notes: list[str] = []
    # Set when more findings follow: pass it as ``cursor``. ``clean`` and the counts are this
    # page's; the whole check is clean when every page is (the client's ipam_check merges).
    next_cursor: str | None = None


class PoolEvent(msgspec.Struct, kw_only=True):
    """Payload of ``vnet.evt.ipam.pool_created.<id>`` / ``pool_deleted.<id>``."""

    network_id: str
    family: int
    cidr: str
    capacity: int
    released: int = 0


class PoolFullness(msgspec.Struct, kw_only=True):
    """Payload of ``vnet.evt.ipam.pool_fullness.<id>``: the pool reached ``level`` (0.8, 0.95)
    of its capacity (once per crossing; again only after it fell below and rose again)."""

    network_id: str
    family: int
    cidr: str
    level: float
    used: int
    capacity: int
    forecast: PoolForecast | None = None


class PoolExclude(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Carve child subnets out of an existing pool (``add``) or give them back (``remove``).

    For parent/child networks: the parent's pool excludes each child's subnet. All CIDRs
    are of one family (that pool's). Adding is refused with 409 ``address_in_use`` naming
    the holders while an address inside is allocated. Idempotent.
    """

    network_id: Id
    add: Annotated[list[Cidr], msgspec.Meta(max_length=1024)] = []
    remove: Annotated[list[Cidr], msgspec.Meta(max_length=1024)] = []
    request_id: RequestId | None = None
