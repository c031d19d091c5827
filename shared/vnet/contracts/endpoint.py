"""Endpoint and node-registry wire types (``vnet.endpoint.*``, ``vnet.node.*``, endpoint events).

An *endpoint* is one container attached to one network on one node. The endpoint
service records it (status ``pending``), the node worker realises it in its kernel
and reports ``ready`` or ``failed`` with a reason (event
``vnet.evt.endpoint.status.<node>.<id>``), which the endpoint service folds into the record.

The node worker holds no Redis credentials: it registers itself (``vnet.node.<node>.register``,
request/reply, repeated as a heartbeat), reads its desired state with
``vnet.endpoint.desired.get`` and follows the endpoint and network events. The
translation from a stored endpoint to the data plane's :class:`EpDesired` /
:class:`NetDesired` is :func:`to_desired`, used by both sides so they cannot disagree.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec

from vnet.contracts.messages import RequestId
from vnet.contracts.network import NetRef, NodeId
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired, PeerHost, RemoteEndpoint, Support
from vnet.core.model import DriverType, Endpoint, LabelKey, Labels
from vnet.core.reach import ReachDiff

# Container ids become a network namespace name by default and a key part in Redis:
# no '/', no ':', no whitespace.
ContainerId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
EndpointId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
# Checked by the service (a name under /run/netns or an absolute path), with a specific error.
NetnsRef = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
# Checked by the service (at most 15 bytes, the kernel's rule), with a specific error.
IfName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Mac = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Aliases = Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=63,
                                                       pattern=r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")]],
                    msgspec.Meta(max_length=16)]
Addr = Annotated[str, msgspec.Meta(min_length=2, max_length=64)]
WaitS = Annotated[float, msgspec.Meta(gt=0, le=600)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Cursor = Annotated[str, msgspec.Meta(max_length=256)]

EndpointState = Literal["pending", "ready", "failed"]
# What a node reports: the endpoint's state, or that it tore an endpoint down.
ReportedState = Literal["ready", "failed", "deleted"]

DEFAULT_WAIT_S = 30.0


# --- records ----------------------------------------------------------------------------

class PortMapping(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A container port published on its node's addresses (DNAT, no user-space proxy):
    ``host_port`` on any address of the host -> ``container_port`` of the endpoint."""

    host_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    container_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    protocol: Literal["tcp", "udp"] = "tcp"


Ports = Annotated[list[PortMapping], msgspec.Meta(max_length=64)]


class EndpointDns(msgspec.Struct, kw_only=True):
    """The resolver a container should use (a CNI result's ``dns``): the node's resolver on
    the network's gateway, with the network's and the domain's search list (``docs/dns.md``)."""

    nameservers: list[str] = []
    search: list[str] = []
    options: list[str] = []


class EndpointInfo(Endpoint, kw_only=True):
    """An endpoint as stored and returned: the module description's ``Endpoint`` fields
    (``id``, ``container_id``, ``network_id``, ``ip_address``, ``mac_address``,
    ``interface_name``, ``created_at``) plus where it lives and how it is doing."""

    node: str = ""
    netns: str = ""  # a name under /run/netns or an absolute path; the host's namespace for the host driver
    labels: dict[str, str] = {}
    status: EndpointState = "pending"
    reason: str = ""  # why it failed (empty unless failed)
    status_code: str = ""  # stable error code of a failure (vnet.core.errors)
    status_at: str = ""  # when the node last reported
    ipv6_address: str | None = None
    prefix_len: int = 0  # of ip_address's subnet
    prefix_len_v6: int | None = None
    gateway: str | None = None
    gateway_v6: str | None = None
    driver: DriverType = DriverType.BRIDGE
    mtu: int = 1500
    network_options: dict[str, str] = {}  # the network's driver options (vni, parent, mode, ...) at attach time
    request_id: str | None = None
    ports: list[PortMapping] = []  # published ports (host port -> container port)
    dns: EndpointDns | None = None  # set when its node runs the resolver (vnet-node --dns)
    aliases: list[str] = []  # names in DNS besides container_id
    revision: int = 0  # bumped by every update (labels, ports): ``expected_revision`` of an update
    # no one held ip_address since its pool was made (IPAM's first_use): no peer can cache a
    # MAC for it, so the node sends no gratuitous ARP for this endpoint
    ip_first_use: bool = False


def _int_or_none(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def to_desired(ep: EndpointInfo) -> tuple[NetDesired, EpDesired]:
    """The data plane's view of one stored endpoint (and of its network on that node,
    without the remote endpoints of an overlay: :func:`remote_of` makes those)."""
    gw4 = f"{ep.gateway}/{ep.prefix_len}" if ep.gateway and ep.prefix_len else None
    gw6 = f"{ep.gateway_v6}/{ep.prefix_len_v6}" if ep.gateway_v6 and ep.prefix_len_v6 else None
    opts = ep.network_options
    net = NetDesired(id=ep.network_id, driver=ep.driver, gateway4=gw4, gateway6=gw6, mtu=ep.mtu,
                     vni=_int_or_none(opts.get("vni")), encrypted=opts.get("encrypted", "false") == "true",
                     parent=opts.get("parent"), mode=opts.get("mode"))
    ipv4 = f"{ep.ip_address}/{ep.prefix_len}" if ep.ip_address and ep.prefix_len else None
    ipv6 = f"{ep.ipv6_address}/{ep.prefix_len_v6}" if ep.ipv6_address and ep.prefix_len_v6 else None
    epd = EpDesired(id=ep.id, network_id=ep.network_id, netns=ep.netns, mac=ep.mac_address, ipv4=ipv4, ipv6=ipv6,
                    ifname=ep.interface_name, gw4=ep.gateway if ipv4 else None,
                    gw6=ep.gateway_v6 if ipv6 else None)
    return net, epd


def remote_of(ep: EndpointInfo) -> RemoteEndpoint:
    """How an overlay endpoint on host ``ep.node`` is programmed on the other hosts."""
    return RemoteEndpoint(mac=ep.mac_address, host=ep.node, ipv4=ep.ip_address or None, ipv6=ep.ipv6_address)


def node_desired(eps: list[EndpointInfo]) -> NodeDesired:
    """The desired state of a node holding ``eps``: their networks (once each) and them."""
    nets: dict[str, NetDesired] = {}
    out: list[EpDesired] = []
    for ep in sorted(eps, key=lambda e: e.id):
        net, epd = to_desired(ep)
        nets.setdefault(net.id, net)
        out.append(epd)
    return NodeDesired(networks=[nets[k] for k in sorted(nets)], endpoints=out)


# --- requests and replies -----------------------------------------------------------------

class EndpointCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Attach container ``container_id`` to network ``network_id`` (an id or a name).

    ``ip`` / ``mac`` absent: automatic (the next free address; a random locally
    administered MAC). ``ipv6``: a static IPv6 address when the network has an IPv6
    subnet (one is allocated automatically otherwise). ``node``: where the container
    runs (default: the only registered node). ``netns``: the container's network
    namespace, a name under ``/run/netns`` or a path such as ``/proc/<pid>/ns/net``
    (default: the namespace named like the container). ``ifname``: the interface
    inside the container (default ``eth0``, then ``eth1``, ... per container).
    ``ports``: container ports published on the node's addresses; a host port (per
    protocol) belongs to one endpoint of a node (``port_in_use`` names the holder).

    Idempotent: repeating it for the same (container, network), or with the same
    ``request_id``, returns the first result. ``wait``: reply once the node has
    reported ``ready`` or ``failed``, or after ``wait_timeout_s`` (then still ``pending``).
    """

    container_id: ContainerId
    network_id: NetRef
    ip: Addr | None = None
    ipv6: Addr | None = None
    mac: Mac | None = None
    node: NodeId | None = None
    netns: NetnsRef | None = None
    ifname: IfName | None = None
    labels: Labels = {}
    ports: Ports = []  # publish: [{host_port, container_port, protocol tcp|udp}], a host port once per node
    # more names the endpoint answers to in DNS besides container_id (docs/dns.md): DNS labels
    aliases: Aliases = []
    wait: bool = False
    wait_timeout_s: WaitS = DEFAULT_WAIT_S
    request_id: RequestId | None = None


class EndpointRef(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    endpoint_id: EndpointId


class EndpointDelete(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Detach: the node tears the interface down, the address is released, the record
    and its indexes go. ``wait``: reply once the node confirmed the teardown (or after
    ``wait_timeout_s``). ``force``: never wait for the node (the network service's forced
    delete uses it); the record goes even when the node is gone."""

    endpoint_id: EndpointId
    force: bool = False
    wait: bool = False
    wait_timeout_s: WaitS = DEFAULT_WAIT_S
    request_id: RequestId | None = None


class EndpointDeleted(msgspec.Struct, kw_only=True):
    endpoint: EndpointInfo  # as it was
    released: list[str] = []  # addresses given back to IPAM
    node_confirmed: bool = False  # the node reported the teardown done (only looked for with wait)
    warnings: list[str] = []


class RuntimeDetach(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A container runtime's DEL, by the node the container runs on: detach ``container_id``
    from ``network_id`` (an id or a name) on that node. Nothing attached is not an error
    (``found`` is false): a runtime may repeat a DEL."""

    container_id: ContainerId
    network_id: NetRef
    ifname: IfName | None = None  # when given, only the endpoint with that interface
    wait: bool = True
    wait_timeout_s: WaitS = DEFAULT_WAIT_S


class RuntimeDetached(msgspec.Struct, kw_only=True):
    found: bool
    deleted: EndpointDeleted | None = None


class EndpointUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Change a live endpoint's labels and/or published ports (``vnet.endpoint.update``).

    ``labels`` replaces the whole map; ``set_labels`` / ``remove_labels`` change single keys
    (applied after ``labels``). ``ports`` replaces the published ports (``[]``: none); a host
    port is claimed atomically with the change (``port_in_use`` names the holder). Every host
    re-evaluates the allow rules that select by label from the ``updated`` event (new
    connections follow the new labels; established ones keep flowing).

    ``expected_revision``: apply only if the endpoint is still at that revision (409
    ``stale_revision`` otherwise); without it a concurrent change is merged (the request's
    label edits are re-applied to the latest record). ``dry_run``: change nothing, answer the
    endpoint as it would be and ``reach``, the paths the change would open and close.
    ``request_id``: a repeat returns the first reply."""

    endpoint_id: EndpointId
    labels: Labels | None = None
    set_labels: Labels = {}
    remove_labels: Annotated[list[LabelKey], msgspec.Meta(max_length=64)] = []
    ports: Ports | None = None
    expected_revision: Annotated[int, msgspec.Meta(ge=0)] | None = None
    dry_run: bool = False
    request_id: RequestId | None = None


class EndpointUpdated(msgspec.Struct, kw_only=True):
    """The endpoint after the update (a dry run: as it would be), what changed (``labels``,
    ``ports``; empty: nothing) and the paths the change opens and closes (``reach``; ``null``
    when the fabric could not be read on a real update). The ``updated`` event carries the same."""

    endpoint: EndpointInfo
    changes: list[str] = []
    dry_run: bool = False
    reach: ReachDiff | None = None


class EndpointUpdatedEvent(msgspec.Struct, kw_only=True):
    """``vnet.evt.endpoint.updated.<id>``: the endpoint as it is now and as it was."""

    endpoint: EndpointInfo
    previous: EndpointInfo
    changes: list[str] = []
    reach: ReachDiff | None = None


class EndpointList(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Endpoints ordered by id; filters AND together (``labels``: exact matches).
    Pass the reply's ``next_cursor`` as ``cursor`` for the next page."""

    network: NetRef | None = None  # a network id (or name)
    node: NodeId | None = None
    container: ContainerId | None = None
    labels: Labels = {}
    status: EndpointState | None = None
    limit: Limit = 1000
    cursor: Cursor | None = None


class EndpointPage(msgspec.Struct, kw_only=True):
    endpoints: list[EndpointInfo]
    next_cursor: str | None = None


# --- node registry --------------------------------------------------------------------------

class NodeRegister(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A node worker announcing itself on ``vnet.node.<node>.register`` (request/reply),
    again every ``heartbeat_s``; it counts as gone after ``3 * heartbeat_s``."""

    node: NodeId
    instance: Annotated[str, msgspec.Meta(max_length=128)] = ""
    underlay: Addr | None = None  # the host's address other hosts reach it on (overlay VTEP)
    underlay_ifname: Annotated[str, msgspec.Meta(max_length=15)] | None = None  # the interface it is on
    host_netns: Annotated[str, msgspec.Meta(max_length=512)] | None = None
    privileged: bool = False
    dataplane: bool = False  # False: it will not change its kernel (not root, or a test without a namespace)
    drivers: dict[str, Support] = {}  # bridge, overlay, macvlan, ipvlan, host: found by the probe
    kinds: dict[str, Support] = {}  # link kinds the probe tried
    heartbeat_s: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 10.0
    version: Annotated[str, msgspec.Meta(max_length=64)] = ""
    isolation: Support | None = None  # stateful nftables filtering (br_netfilter on), or why not
    # What the node can do beyond its drivers: "encrypted_overlay" (WireGuard), or why not.
    capabilities: dict[str, Support] = {}
    # WireGuard mesh (encrypted overlays): only the public key ever leaves the node; the
    # registry answers with the node's mesh address (NodeRegistered.wg_address).
    wg_public_key: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")] | None = None
    wg_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 51820
    # the domain of endpoint names when the node runs its resolver (vnet-node --dns); None: no resolver
    dns_domain: Annotated[str, msgspec.Meta(max_length=253)] | None = None
    # the host's own search domains and options (its resolv.conf), passed on to containers
    dns_search: Annotated[list[Annotated[str, msgspec.Meta(max_length=253)]], msgspec.Meta(max_length=6)] = []
    dns_options: Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=16)] = []


class NodeInfo(msgspec.Struct, kw_only=True):
    node: str
    instance: str = ""
    underlay: str | None = None
    underlay_ifname: str | None = None
    host_netns: str | None = None
    privileged: bool = False
    dataplane: bool = False
    drivers: dict[str, Support] = {}
    kinds: dict[str, Support] = {}
    heartbeat_s: float = 10.0
    version: str = ""
    registered_at: str = ""  # first registration of this instance
    last_seen: float = 0.0  # seconds since the epoch
    alive: bool = True  # seen within 3 heartbeats
    endpoints: int = 0
    isolation: Support | None = None  # stateful nftables filtering available, or why not
    capabilities: dict[str, Support] = {}  # "encrypted_overlay": WireGuard available, or why not
    wg_public_key: str | None = None  # its WireGuard public key (encrypted overlays)
    wg_address: str | None = None  # its address in the WireGuard mesh ("10.255.3.7/16"), unique per node
    wg_port: int = 51820
    dns_domain: str | None = None  # it runs the resolver for names under this domain
    dns_search: list[str] = []  # the host's search domains, after the network's and the domain
    dns_options: list[str] = []  # the host's resolv.conf options


class NodeRegistered(msgspec.Struct, kw_only=True):
    node: str
    ttl_s: float
    endpoints: int  # endpoints recorded on this node
    wg_address: str | None = None  # the node's WireGuard mesh address (when it sent a public key)
    # The full-resync period the control plane asks of every node: the cluster's live nodes
    # over the desired-state fetches a second it plans for (RESYNC_FETCHES_PER_S), so the
    # safety net costs the same at 1,000 nodes as at 200. A node uses the longer of this
    # and its own setting (0: its own).
    resync_s: float = 0.0


class NodeDeregister(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``vnet.node.<node>.deregister``: a node worker stopping gracefully (fire and forget). Only the
    registration of that ``instance`` is removed (a restarted worker's is kept)."""

    node: str
    instance: str


class NodeMembership(msgspec.Struct, kw_only=True):
    """``vnet.evt.node.left.<node>`` / ``vnet.evt.node.joined.<node>`` (endpoint service)."""

    node: str
    reason: Literal["deregistered", "timeout", "registered"]
    last_seen: float = 0.0  # its last heartbeat (seconds since the epoch)


NodeListLimit = Annotated[int, msgspec.Meta(ge=1, le=1000)]


class NodeListRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The registered nodes in id order, ``limit`` per reply, after ``cursor`` (the previous
    reply's ``next_cursor``): at 1,000 nodes one unpaged reply was ~1 MB (docs/scale.md)."""

    include_gone: bool = False  # also nodes whose heartbeat stopped (kept a day)
    limit: NodeListLimit = 200
    cursor: NodeId | None = None


class NodeList(msgspec.Struct, kw_only=True):
    nodes: list[NodeInfo]
    next_cursor: str | None = None  # more nodes after this page: ask again with it as ``cursor``


DesiredLimit = Annotated[int, msgspec.Meta(ge=1, le=2000)]


class DesiredRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One page of node ``node``'s desired state: ``limit`` of its endpoints in id order,
    after ``cursor`` (the previous reply's ``next_cursor``). Pages keep one reply far below
    the bus's message limit however many endpoints a node holds (10,000 endpoints are about
    1.8 MB of JSON; the default page about 180 KB)."""

    node: NodeId
    limit: DesiredLimit = 1000
    cursor: Cursor | None = None


class DesiredReply(msgspec.Struct, kw_only=True):
    """What node ``node`` must realise, and the status recorded for each endpoint (so a
    restarted worker reports only what changed). Overlay networks carry their endpoints
    on other hosts (``remotes``) and ``desired.peers`` those hosts' underlay addresses;
    ``desired.underlay`` is left to the node (it knows its own).

    A page holds its endpoints and their networks (and, on the first page, the overlays
    routed here without an endpoint here); :func:`merge_desired` joins the pages."""

    node: str
    desired: NodeDesired
    statuses: dict[str, str] = {}  # endpoint id -> pending | ready | failed
    reasons: dict[str, str] = {}  # endpoint id -> recorded failure reason
    next_cursor: str | None = None  # more endpoints follow: pass it as ``cursor``


def merge_desired(pages: list[DesiredReply]) -> DesiredReply:
    """The whole desired state from its pages: networks and peers once each (a network on
    several pages is the same record), endpoints and their statuses all."""
    if not pages:
        raise ValueError("merge_desired needs at least one page")
    nets: dict[str, NetDesired] = {}
    peers: dict[str, PeerHost] = {}
    eps: dict[str, EpDesired] = {}
    statuses: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for p in pages:
        for n in p.desired.networks:
            nets.setdefault(n.id, n)
        for h in p.desired.peers:
            peers.setdefault(h.name, h)
        for e in p.desired.endpoints:
            eps[e.id] = e
        statuses.update(p.statuses)
        reasons.update(p.reasons)
    desired = NodeDesired(networks=[nets[k] for k in sorted(nets)], endpoints=[eps[k] for k in sorted(eps)],
                          peers=[peers[k] for k in sorted(peers)], underlay=pages[0].desired.underlay)
    return DesiredReply(node=pages[0].node, desired=desired, statuses=statuses, reasons=reasons)


# --- node worker operations (vnet.node.<node>.*) ---------------------------------------------

class NetnsCheck(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    netns: NetnsRef


class NetnsCheckReply(msgspec.Struct, kw_only=True):
    netns: str
    path: str
    exists: bool
    reason: str = ""


class NodeStats(msgspec.Struct, kw_only=True):
    """What the node worker did: reconciles, kernel writes, the last full resync."""

    node: str
    dataplane: bool
    endpoints: int  # in its desired state
    networks: int
    writes: int  # kernel writes since start (the reconciler's counter)
    reconciles: int
    full_resyncs: int
    events: int  # events handled
    batches: int  # scoped reconciles they caused
    remote_deltas: int = 0  # of the batches: other hosts' endpoints' entries written as a delta, no reconcile
    last_full_writes: int = 0
    last_full_duration_s: float = 0.0
    last_full_errors: int = 0
    last_errors: list[str] = []  # the last full resync's errors ("<owner>: <message>"), at most 20
    last_full_at: float = 0.0
    desired_fetched: bool = False  # has it ever received its desired state
    failed: dict[str, str] = {}  # endpoint id -> reason, for endpoints currently failed
    resync_s: float = 10.0
    isolation: Support | None = None  # stateful nftables filtering available, or why not
    policy: PolicyStats | None = None  # None: no data plane, no nftables


class PolicyStats(msgspec.Struct, kw_only=True):
    """The node worker's nftables syncs (``PolicyAgent``)."""

    syncs: int = 0  # rulesets fetched and checked against the kernel
    applies: int = 0  # of which written (new ruleset, or a deleted/altered table restored)
    version: str = ""  # the ruleset version in force
    last_reason: str = ""  # "unchanged", "new ruleset", "table missing", ...
    last_error: str = ""  # the last failed sync's error ("" after a good one)


class ResyncRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Run a full resync now (fetch the desired state, reconcile the whole host)."""

    fetch: bool = True  # False: reconcile against the desired state it already has


class TeardownRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``vnet.node.<node>.teardown``: the node stops reconciling and removes everything it made."""

    deregister: bool = True  # also leave the registry at once (the other hosts drop this one's entries)


class TeardownReply(msgspec.Struct, kw_only=True):
    """What a node teardown removed, and every step that failed (it goes on past errors)."""

    node: str
    removed: list[str] = []  # "interface vnb-...", "wireguard-go vnw-...", "nftables tables", ...
    errors: list[str] = []
    ok: bool = True  # no error
    duration_s: float = 0.0


# --- events (vnet.evt.endpoint.<event>.<id>) ----------------------------------------------------

class EndpointEvent(msgspec.Struct, kw_only=True):
    """``created`` / ``deleted``: the endpoint (as it is, or as it was)."""

    endpoint: EndpointInfo


def status_time(version_us: int) -> str:
    """``EndpointInfo.status_at`` of a report: its version (microseconds since the epoch) as
    an ISO 8601 UTC time in milliseconds."""
    t = dt.datetime.fromtimestamp(version_us / 1e6, dt.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EndpointStatusEvent(msgspec.Struct, kw_only=True):
    """``status``, published by the node worker: what its kernel has for the endpoint.
    ``version`` orders reports of one node (later wins)."""

    endpoint_id: str
    node: str
    status: ReportedState
    reason: str = ""
    code: str = ""
    version: int = 0

