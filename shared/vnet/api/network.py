"""VNetManager methods of the network service: lifecycle, topology, host routes.

The module description's example works as written::

    network = await vnet_manager.create_network(
        "example-network", "172.20.0.0/16", "172.20.0.1",
        DriverType.BRIDGE, IsolationMode.FULL, {}, {})

``cidr`` / ``gateway`` may be ``None`` (the service carves the next free subnet and
takes its first usable address); ``driver`` / ``isolation`` ``None`` mean the
*service's* configured defaults. Networks are named by id or name everywhere.

The operations that can change reachability (``create_network`` / ``create_child_network``,
``delete_network``, ``update_network`` with ``isolation``, ``connect_networks`` /
``disconnect_networks``, the mesh operations) take ``dry_run=True``:
nothing changes, and the reply is the record(s) as they would be with ``reply.reach``, the
paths the change would open and close (:class:`vnet.core.reach.ReachDiff`). A real call's
reply carries the same diff (``None`` when it could not be computed)::

    would = await m.update_network("web", isolation="none", dry_run=True)
    would.reach.summary()   # "opens 6 paths, closes 0"
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Literal, overload

from vnet.api.base import ClientBase
from vnet.contracts import subjects
from vnet.contracts.network import (
    ConnectReply,
    HostRoutesInfo,
    HostRoutesRequest,
    MeshCreate,
    MeshGroup,
    MeshList,
    MeshListRequest,
    MeshMember,
    MeshMemberReply,
    MeshRef,
    MeshReply,
    NetworkCreate,
    NetworkDelete,
    NetworkDeleted,
    NetworkList,
    NetworkPage,
    NetworkPair,
    NetworkRef,
    NetworkReply,
    NetworkUpdate,
    NodeRoutes,
)
from vnet.core import topology
from vnet.core.labels import parse_selector
from vnet.core.model import DriverType, IsolationMode, VirtualNetwork

# the one label-filter parser (vnet.core.labels); the name stays for callers of the client module
parse_label_selector = parse_selector


class NetworkAPI(ClientBase):
    # -- lifecycle ---------------------------------------------------------------------------
    @overload
    async def create_network(
        self,
        name: str,
        cidr: str | None = None,
        gateway: str | None = None,
        driver: DriverType | str | None = None,
        isolation: IsolationMode | str | None = None,
        options: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        *,
        parent: str | None = None,
        prefix_len: int | None = None,
        ipv6: bool | None = None,
        cidr_v6: str | None = None,
        gateway_v6: str | None = None,
        prefix_len_v6: int | None = None,
        request_id: str | None = None,
        dry_run: Literal[False] = False,
    ) -> VirtualNetwork: ...

    @overload
    async def create_network(
        self,
        name: str,
        cidr: str | None = None,
        gateway: str | None = None,
        driver: DriverType | str | None = None,
        isolation: IsolationMode | str | None = None,
        options: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        *,
        parent: str | None = None,
        prefix_len: int | None = None,
        ipv6: bool | None = None,
        cidr_v6: str | None = None,
        gateway_v6: str | None = None,
        prefix_len_v6: int | None = None,
        request_id: str | None = None,
        dry_run: Literal[True],
    ) -> NetworkReply: ...

    async def create_network(
        self,
        name: str,
        cidr: str | None = None,
        gateway: str | None = None,
        driver: DriverType | str | None = None,
        isolation: IsolationMode | str | None = None,
        options: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        *,
        parent: str | None = None,
        prefix_len: int | None = None,
        ipv6: bool | None = None,
        cidr_v6: str | None = None,
        gateway_v6: str | None = None,
        prefix_len_v6: int | None = None,
        request_id: str | None = None,
        dry_run: bool = False,
    ) -> VirtualNetwork | NetworkReply:
        """Create a network (module description's argument order). ``dry_run=True``: create
        nothing; the reply (a :class:`NetworkReply`) is the network as it would be and
        ``reply.reach``, the paths creating it would open."""
        req = NetworkCreate(
            name=name, cidr=cidr, gateway=gateway,
            driver=None if driver is None else str(driver), isolation=None if isolation is None else str(isolation),
            options=dict(options or {}), labels=dict(labels or {}), parent=parent, prefix_len=prefix_len,
            ipv6=ipv6, cidr_v6=cidr_v6, gateway_v6=gateway_v6, prefix_len_v6=prefix_len_v6, request_id=request_id,
            dry_run=dry_run)
        rep = await self.call(subjects.NETWORK_CREATE, req, NetworkReply)
        if dry_run:
            return rep
        # The module description's call answers the network itself (equal to what get_network
        # answers); the real create's diff travels in its ``created`` event.
        fields = {f: getattr(rep, f) for f in VirtualNetwork.__struct_fields__}
        return VirtualNetwork(**fields)

    @overload
    async def create_child_network(self, parent: str, name: str, cidr: str | None = None,
                                   gateway: str | None = None, driver: DriverType | str | None = None,
                                   isolation: IsolationMode | str | None = None,
                                   options: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                                   *, prefix_len: int | None = None, ipv6: bool | None = None,
                                   cidr_v6: str | None = None, request_id: str | None = None,
                                   dry_run: Literal[False] = False) -> VirtualNetwork: ...

    @overload
    async def create_child_network(self, parent: str, name: str, cidr: str | None = None,
                                   gateway: str | None = None, driver: DriverType | str | None = None,
                                   isolation: IsolationMode | str | None = None,
                                   options: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                                   *, prefix_len: int | None = None, ipv6: bool | None = None,
                                   cidr_v6: str | None = None, request_id: str | None = None,
                                   dry_run: Literal[True]) -> NetworkReply: ...

    async def create_child_network(self, parent: str, name: str, cidr: str | None = None, gateway: str | None = None,
                                   driver: DriverType | str | None = None,
                                   isolation: IsolationMode | str | None = None,
                                   options: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                                   *, prefix_len: int | None = None, ipv6: bool | None = None,
                                   cidr_v6: str | None = None, request_id: str | None = None,
                                   dry_run: bool = False) -> VirtualNetwork | NetworkReply:
        """A network whose subnet is carved from (or given inside) ``parent``'s (``dry_run``: as
        :meth:`create_network`)."""
        if dry_run:
            return await self.create_network(name, cidr, gateway, driver, isolation, options, labels, parent=parent,
                                             prefix_len=prefix_len, ipv6=ipv6, cidr_v6=cidr_v6, request_id=request_id,
                                             dry_run=True)
        return await self.create_network(name, cidr, gateway, driver, isolation, options, labels, parent=parent,
                                         prefix_len=prefix_len, ipv6=ipv6, cidr_v6=cidr_v6, request_id=request_id)

    async def get_network(self, network: str) -> VirtualNetwork:
        return await self.call(subjects.NETWORK_GET, NetworkRef(network=network), VirtualNetwork)

    async def list_networks(self, labels: Mapping[str, str] | Iterable[str] | None = None, *, limit: int = 100,
                            cursor: str | None = None, parent: str | None = None) -> NetworkPage:
        """One page of networks ordered by name; ``page.next_cursor`` fetches the next."""
        req = NetworkList(labels=parse_label_selector(labels), limit=limit, cursor=cursor, parent=parent)
        return await self.call(subjects.NETWORK_LIST, req, NetworkPage)

    async def iter_networks(self, labels: Mapping[str, str] | Iterable[str] | None = None, *,
                            parent: str | None = None, page_size: int = 500) -> AsyncIterator[VirtualNetwork]:
        cursor: str | None = None
        while True:
            page = await self.list_networks(labels, limit=page_size, cursor=cursor, parent=parent)
            for n in page.networks:
                yield n
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def all_networks(self, labels: Mapping[str, str] | Iterable[str] | None = None, *,
                           parent: str | None = None) -> list[VirtualNetwork]:
        return [n async for n in self.iter_networks(labels, parent=parent)]

    async def list_children(self, network: str) -> list[VirtualNetwork]:
        return await self.all_networks(parent=network)

    async def update_network(self, network: str, *, labels: Mapping[str, str] | None = None,
                             set_labels: Mapping[str, str] | None = None, remove_labels: Iterable[str] = (),
                             isolation: IsolationMode | str | None = None,
                             request_id: str | None = None, dry_run: bool = False) -> NetworkReply:
        """``labels`` replaces the map; ``set_labels`` / ``remove_labels`` change single keys.
        The reply is the network (a :class:`VirtualNetwork`) with ``reach`` for an isolation change."""
        req = NetworkUpdate(network=network, labels=None if labels is None else dict(labels),
                            set_labels=dict(set_labels or {}), remove_labels=list(remove_labels),
                            isolation=None if isolation is None else str(isolation), request_id=request_id,
                            dry_run=dry_run)
        return await self.call(subjects.NETWORK_UPDATE, req, NetworkReply)

    async def delete_network(self, network: str, *, force: bool = False,
                             request_id: str | None = None, dry_run: bool = False) -> NetworkDeleted:
        """Refused (``network_in_use``) while endpoints exist unless ``force``. ``dry_run``:
        delete nothing; ``reply.reach`` says what deleting would close."""
        return await self.call(subjects.NETWORK_DELETE,
                               NetworkDelete(network=network, force=force, request_id=request_id, dry_run=dry_run),
                               NetworkDeleted,
                               timeout=max(self.config.request_timeout_s, 30.0) if force else None)

    # -- topology ----------------------------------------------------------------------------
    async def connect_networks(self, a: str, b: str, *, request_id: str | None = None,
                               dry_run: bool = False) -> ConnectReply:
        return await self.call(subjects.NETWORK_CONNECT,
                               NetworkPair(network_a=a, network_b=b, request_id=request_id, dry_run=dry_run),
                               ConnectReply)

    async def disconnect_networks(self, a: str, b: str, *, request_id: str | None = None,
                                  dry_run: bool = False) -> ConnectReply:
        return await self.call(subjects.NETWORK_DISCONNECT,
                               NetworkPair(network_a=a, network_b=b, request_id=request_id, dry_run=dry_run),
                               ConnectReply)

    async def create_mesh(self, name: str, members: Iterable[str] = (), *,
                          request_id: str | None = None, dry_run: bool = False) -> MeshReply:
        return await self.call(subjects.NETWORK_MESH_CREATE,
                               MeshCreate(name=name, members=list(members), request_id=request_id, dry_run=dry_run),
                               MeshReply)

    async def add_to_mesh(self, mesh: str, network: str, *, request_id: str | None = None,
                          dry_run: bool = False) -> MeshMemberReply:
        return await self.call(subjects.NETWORK_MESH_ADD, MeshMember(mesh=mesh, network=network,
                                                                     request_id=request_id, dry_run=dry_run),
                               MeshMemberReply)

    async def remove_from_mesh(self, mesh: str, network: str, *, request_id: str | None = None,
                               dry_run: bool = False) -> MeshMemberReply:
        return await self.call(subjects.NETWORK_MESH_REMOVE, MeshMember(mesh=mesh, network=network,
                                                                        request_id=request_id, dry_run=dry_run),
                               MeshMemberReply)

    async def delete_mesh(self, mesh: str, *, request_id: str | None = None, dry_run: bool = False) -> MeshReply:
        return await self.call(subjects.NETWORK_MESH_DELETE, MeshRef(mesh=mesh, request_id=request_id,
                                                                     dry_run=dry_run), MeshReply)

    async def get_mesh(self, mesh: str) -> MeshGroup:
        return await self.call(subjects.NETWORK_MESH_GET, MeshRef(mesh=mesh), MeshGroup)

    async def list_meshes(self, *, page_size: int = 200) -> list[MeshGroup]:
        """Every mesh group (all pages), in name order."""
        out: list[MeshGroup] = []
        cursor: str | None = None
        while True:
            page = await self.call(subjects.NETWORK_MESH_LIST, MeshListRequest(limit=page_size, cursor=cursor),
                                   MeshList)
            out += page.meshes
            cursor = page.next_cursor
            if cursor is None:
                return out

    async def network_topology(self) -> tuple[list[topology.TreeNode], list[VirtualNetwork], list[MeshGroup]]:
        """Every network nested under its parent, the flat list, and the mesh groups."""
        nets = await self.all_networks()
        return topology.build_tree(nets), nets, await self.list_meshes()

    async def host_routes(self, *, page_size: int = 100) -> HostRoutesInfo:
        """What node workers reported of their hosts' routes (carving skips these): every
        node (all pages), in name order."""
        nodes: list[NodeRoutes] = []
        cursor: str | None = None
        while True:
            page = await self.call(subjects.NETWORK_HOSTROUTES_LIST,
                                   HostRoutesRequest(limit=page_size, cursor=cursor), HostRoutesInfo)
            nodes += page.nodes
            cursor = page.next_cursor
            if cursor is None:
                return HostRoutesInfo(nodes=nodes)
