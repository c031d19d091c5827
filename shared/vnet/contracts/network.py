"""Network wire types (``vnet.network.*``): lifecycle, topology, host routes, events.

Networks are named by id or name wherever a request takes a ``network`` (an id wins
if a name happens to equal another network's id). Driver and isolation travel as
strings and are checked by the service, so a wrong one gets its own error code
(``unknown_driver`` / ``unknown_isolation``) naming the allowed values; when they are
absent the service applies its own configuration's defaults.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from vnet.contracts.messages import RequestId
from vnet.core.model import LabelKey, Labels, Name, Options, VirtualNetwork
from vnet.core.reach import ReachDiff

# An id or a name (names and ids share this alphabet).
NetRef = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")]
# Mesh names become a subject token in events: no dots.
MeshName = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_-]*$")]
NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Cidr = Annotated[str, msgspec.Meta(min_length=3, max_length=64)]
Addr = Annotated[str, msgspec.Meta(min_length=2, max_length=64)]
Word = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
PrefixV4 = Annotated[int, msgspec.Meta(ge=1, le=32)]
PrefixV6 = Annotated[int, msgspec.Meta(ge=1, le=128)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Cursor = Annotated[str, msgspec.Meta(max_length=256)]


class NetworkCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Create a network. Without ``cidr`` the next free ``/prefix_len`` (default: the
    service's ``default_prefix_len``) is carved from ``default_subnet`` — or, with a
    ``parent``, from the parent's subnet."""

    name: Name
    cidr: Cidr | None = None
    gateway: Addr | None = None  # default: the first usable address
    driver: Word | None = None  # bridge | overlay | macvlan | ipvlan | host; default: config
    isolation: Word | None = None  # full | peer_only | mesh_only | none; default: config
    options: Options = {}
    labels: Labels = {}
    prefix_len: PrefixV4 | None = None  # size of an automatic IPv4 subnet
    # IPv6: on when ``ipv6`` is true, when ``cidr_v6`` is given, or (ipv6 absent) when the
    # service's config has ipv6_enabled; ``ipv6: false`` turns it off for this network.
    ipv6: bool | None = None
    cidr_v6: Cidr | None = None
    gateway_v6: Addr | None = None
    prefix_len_v6: PrefixV6 | None = None
    parent: NetRef | None = None  # create as a child of this network
    request_id: RequestId | None = None
    # Change nothing; answer the network as it would be (subnet carved as the real create
    # would now; id and VNI are placeholders) and ``reach``, the paths creating it opens.
    dry_run: bool = False


class NetworkRef(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    network: NetRef


class NetworkList(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Networks ordered by name; ``labels`` are AND-ed exact matches. Pass the reply's
    ``next_cursor`` as ``cursor`` for the next page."""

    labels: Labels = {}
    parent: NetRef | None = None  # only the children of this network
    limit: Limit = 100
    cursor: Cursor | None = None


class NetworkPage(msgspec.Struct, kw_only=True):
    networks: list[VirtualNetwork]
    next_cursor: str | None = None  # None: this was the last page


class NetworkUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Change labels and/or the isolation mode. ``labels`` replaces the whole map;
    ``set_labels`` / ``remove_labels`` change single keys (applied after ``labels``)."""

    network: NetRef
    labels: Labels | None = None
    set_labels: Labels = {}
    remove_labels: Annotated[list[LabelKey], msgspec.Meta(max_length=64)] = []
    isolation: Word | None = None
    request_id: RequestId | None = None
    dry_run: bool = False  # change nothing; answer the network as it would be and ``reach``


class NetworkReply(VirtualNetwork, kw_only=True):
    """The network after a create or an update (on a dry run: as it would be) and the paths
    the change opens and closes (``reach``: a create, an isolation change; ``null`` when nothing
    reachability-related changed or the fabric could not be read). The ``created`` /
    ``updated`` event carries the same diff."""

    dry_run: bool = False
    reach: ReachDiff | None = None


class NetworkDelete(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Delete a network; refused while it has endpoints unless ``force`` (which deletes
    them through the endpoint service first)."""

    network: NetRef
    force: bool = False
    request_id: RequestId | None = None
    dry_run: bool = False  # change nothing; answer what deleting would close (``reach``)


class NetworkDeleted(msgspec.Struct, kw_only=True):
    """Reply of a delete and payload of the ``deleted`` event (on a dry run: what would be
    deleted and detached). ``reach``: the paths the delete closes (its endpoints' and the
    parent/child, connection and mesh relations it ends); ``null`` when the fabric could not
    be read."""

    network: VirtualNetwork  # as it was, relations included
    endpoints_deleted: list[str] = []
    children_detached: list[str] = []  # former children, now top-level networks
    warnings: list[str] = []
    dry_run: bool = False
    reach: ReachDiff | None = None


class NetworkPair(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    network_a: NetRef
    network_b: NetRef
    request_id: RequestId | None = None
    dry_run: bool = False  # change nothing; answer what (dis)connecting would open or close


class ConnectReply(msgspec.Struct, kw_only=True):
    network_a: VirtualNetwork
    network_b: VirtualNetwork
    changed: bool  # False: they already were (dis)connected (dry run: would be changed)
    dry_run: bool = False
    reach: ReachDiff | None = None  # paths opened / closed (the event carries the same)


class MeshCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: MeshName
    members: Annotated[list[NetRef], msgspec.Meta(max_length=1000)] = []
    request_id: RequestId | None = None
    dry_run: bool = False


class MeshMember(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mesh: MeshName
    network: NetRef
    request_id: RequestId | None = None
    dry_run: bool = False


class MeshRef(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mesh: MeshName
    request_id: RequestId | None = None
    dry_run: bool = False  # mesh.delete: change nothing, answer what deleting would close


class MeshGroup(msgspec.Struct, kw_only=True):
    name: str
    members: list[str]  # network ids, sorted
    created_at: str = ""


class MeshReply(MeshGroup, kw_only=True):
    """A mesh group created or deleted (dry run: as it would be) and the paths that opens or
    closes (``reach``; the event carries the same)."""

    dry_run: bool = False
    reach: ReachDiff | None = None


class MeshMemberReply(msgspec.Struct, kw_only=True):
    mesh: MeshGroup
    changed: bool  # False: the network already was (or was not) a member
    dry_run: bool = False
    reach: ReachDiff | None = None


class MeshListRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Mesh groups in name order, ``limit`` per reply; pass the reply's ``next_cursor`` as
    ``cursor`` for the next page (an empty body asks for the first page)."""

    limit: Limit = 200
    cursor: Cursor | None = None


class MeshList(msgspec.Struct, kw_only=True):
    meshes: list[MeshGroup]
    next_cursor: str | None = None  # None: this was the last page


# --- host routes ---------------------------------------------------------------------

class HostRoutesReport(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A node worker's view of its host: every route and interface address prefix.
    Replaces that node's previous report; kept for ``3 * interval_s`` (at least 30 s)."""

    node: NodeId
    prefixes: Annotated[list[Cidr], msgspec.Meta(max_length=16384)]
    interval_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 60.0
    # The prefixes among them that are not VNet's own (routes and addresses on interfaces
    # other than our bridges, VXLAN, WireGuard and veth devices; blackhole/unreachable routes).
    # The network service checks them against the networks: a new one that overlaps a network
    # is an event (``route_overlap``). None: the node does not tell (no check).
    foreign: Annotated[list[Cidr], msgspec.Meta(max_length=16384)] | None = None


class HostRoutesReply(msgspec.Struct, kw_only=True):
    node: str
    accepted: int  # prefixes kept (after dropping default, loopback, link-local, multicast)
    ttl_s: float


class RouteOverlap(msgspec.Struct, kw_only=True):
    """A host route (or interface address) of node ``node`` that overlaps network ``network``:
    traffic for that part of the network may leave through the host's route instead of the
    network's bridge. Payload of ``vnet.evt.network.route_overlap.<network id>``, published
    at once when a node reports the route (its route watch reports on every change)."""

    node: str
    prefix: str
    network: str  # id (a top-level network: a child's space is inside its parent's)
    network_name: str
    cidr: str  # the network's subnet the prefix overlaps
    at: str = ""  # when the network service saw it (ISO 8601, UTC)


class NodeRoutes(msgspec.Struct, kw_only=True):
    node: str
    prefixes: list[str]
    expires_in_s: float
    overlaps: list[RouteOverlap] = []  # its non-VNet prefixes that overlap a network now


class HostRoutesRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The nodes' host-route reports in node order, at most ``limit`` nodes per reply (fewer
    when their prefixes add up to many: a node may report 16,384); pass the reply's
    ``next_cursor`` as ``cursor`` for the next page (an empty body asks for the first page)."""

    limit: Limit = 100
    cursor: Cursor | None = None


class HostRoutesInfo(msgspec.Struct, kw_only=True):
    nodes: list[NodeRoutes]
    next_cursor: str | None = None  # None: this was the last page


# --- events (vnet.evt.network.<event>.<id>) -----------------------------------------------

class NetworkEvent(msgspec.Struct, kw_only=True):
    """``created`` / ``updated``: the network as it is now."""

    network: VirtualNetwork
    changes: list[str] = []  # for ``updated``: labels, isolation, parent, ...
    reach: ReachDiff | None = None  # a create or an isolation change: the paths it opened and closed


class ConnectionEvent(msgspec.Struct, kw_only=True):
    """``connected`` / ``disconnected`` (subject id: ``network_a``)."""

    network_a: str
    network_b: str
    reach: ReachDiff | None = None  # the paths the change opened or closed


class MeshEvent(msgspec.Struct, kw_only=True):
    """``mesh_created`` / ``mesh_member_added`` / ``mesh_member_removed`` / ``mesh_deleted``
    (subject id: the mesh name)."""

    mesh: str
    members: list[str]
    network: str | None = None  # the member added or removed
    reach: ReachDiff | None = None  # the paths the change opened or closed
