"""VNetManager methods of the endpoint service: attach and detach containers, the node registry.

The module description's call works as written (``ip`` / ``mac`` ``None`` for automatic)::

    ep = await vnet.create_endpoint("web-1", network.id, None, None)
    ep = await vnet.create_endpoint("web-1", "example-network", "172.20.0.10", None,
                                    node="host-a", netns="/proc/4242/ns/net", wait=True)
    ep.status            # pending -> ready | failed (ep.reason says why)
    await vnet.delete_endpoint(ep.id, wait=True)

Labels and published ports follow a running workload (every host re-evaluates the rules that
select by label within seconds; established connections keep flowing)::

    rep = await vnet.update_endpoint(ep.id, set_labels={"role": "db"}, dry_run=True)
    rep.reach.summary()  # "opens 4 paths, closes 0": nothing changed yet
    rep = await vnet.update_endpoint(ep.id, set_labels={"role": "db"})
    rep = await vnet.update_endpoint(ep.id, ports=[PortMapping(host_port=8080, container_port=80)])

With ``wait=True`` the call returns once the node worker has reported the endpoint
``ready`` or ``failed`` (or when ``wait_timeout`` passes: then it is still ``pending``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping

from vnet.api.base import ClientBase
from vnet.contracts import subjects
from vnet.contracts.endpoint import (
    DEFAULT_WAIT_S,
    DesiredReply,
    DesiredRequest,
    EndpointCreate,
    EndpointDelete,
    EndpointDeleted,
    EndpointInfo,
    EndpointList,
    EndpointPage,
    EndpointRef,
    EndpointState,
    EndpointUpdate,
    EndpointUpdated,
    NodeInfo,
    NodeList,
    NodeListRequest,
    NodeStats,
    PortMapping,
    ResyncRequest,
    TeardownReply,
    TeardownRequest,
    merge_desired,
)
from vnet.contracts.messages import Empty
from vnet.contracts.node import DriftReply, DriftRequest
from vnet.core.labels import parse_selector


class EndpointAPI(ClientBase):
    def _wait_budget(self, wait: bool, wait_timeout: float) -> float | None:
        """The request timeout: the service waits up to ``wait_timeout``, then answers."""
        return wait_timeout + max(self.config.request_timeout_s, 5.0) if wait else None

    async def create_endpoint(
        self,
        container_id: str,
        network_id: str,
        ip: str | None = None,
        mac: str | None = None,
        *,
        node: str | None = None,
        netns: str | None = None,
        ifname: str | None = None,
        ipv6: str | None = None,
        labels: Mapping[str, str] | None = None,
        ports: Iterable[PortMapping] | None = None,
        wait: bool = False,
        wait_timeout: float = DEFAULT_WAIT_S,
        request_id: str | None = None,
        aliases: Iterable[str] | None = None,
    ) -> EndpointInfo:
        """Attach ``container_id`` to ``network_id`` (id or name); idempotent per (container, network).
        ``ports``: publish container ports on the node's addresses (``PortMapping(host_port=8080,
        container_port=80, protocol="tcp")``)."""
        req = EndpointCreate(container_id=container_id, network_id=network_id, ip=ip, ipv6=ipv6, mac=mac, node=node,
                             netns=netns, ifname=ifname, labels=dict(labels or {}), ports=list(ports or ()),
                             wait=wait,
                             wait_timeout_s=wait_timeout, request_id=request_id, aliases=list(aliases or ()))
        return await self.call(subjects.ENDPOINT_CREATE, req, EndpointInfo,
                               timeout=self._wait_budget(wait, wait_timeout))

    async def get_endpoint(self, endpoint_id: str) -> EndpointInfo:
        return await self.call(subjects.ENDPOINT_GET, EndpointRef(endpoint_id=endpoint_id), EndpointInfo)

    async def list_endpoints_page(self, *, network: str | None = None, node: str | None = None,
                                  container: str | None = None,
                                  labels: Mapping[str, str] | Iterable[str] | None = None,
                                  status: EndpointState | None = None, limit: int = 1000,
                                  cursor: str | None = None) -> EndpointPage:
        req = EndpointList(network=network, node=node, container=container, labels=parse_selector(labels),
                           status=status, limit=limit, cursor=cursor)
        return await self.call(subjects.ENDPOINT_LIST, req, EndpointPage)

    async def iter_endpoints(self, *, network: str | None = None, node: str | None = None,
                             container: str | None = None, labels: Mapping[str, str] | Iterable[str] | None = None,
                             status: EndpointState | None = None, page_size: int = 1000
                             ) -> AsyncIterator[EndpointInfo]:
        cursor: str | None = None
        while True:
            page = await self.list_endpoints_page(network=network, node=node, container=container, labels=labels,
                                                  status=status, limit=page_size, cursor=cursor)
            for e in page.endpoints:
                yield e
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def list_endpoints(self, *, network: str | None = None, node: str | None = None,
                             container: str | None = None, labels: Mapping[str, str] | Iterable[str] | None = None,
                             status: EndpointState | None = None) -> list[EndpointInfo]:
        """Every endpoint matching the filters (they AND together), ordered by id."""
        return [e async for e in self.iter_endpoints(network=network, node=node, container=container, labels=labels,
                                                     status=status)]

    async def delete_endpoint(self, endpoint_id: str, *, force: bool = False, wait: bool = False,
                              wait_timeout: float = DEFAULT_WAIT_S, request_id: str | None = None) -> EndpointDeleted:
        """Detach; ``wait``: until the node confirmed the teardown; ``force``: never wait for the node."""
        req = EndpointDelete(endpoint_id=endpoint_id, force=force, wait=wait, wait_timeout_s=wait_timeout,
                             request_id=request_id)
        return await self.call(subjects.ENDPOINT_DELETE, req, EndpointDeleted,
                               timeout=self._wait_budget(wait and not force, wait_timeout))

    async def update_endpoint(self, endpoint: str, *, labels: Mapping[str, str] | None = None,
                              set_labels: Mapping[str, str] | None = None,
                              remove_labels: Iterable[str] | None = None,
                              published_ports: Iterable[PortMapping] | None = None,
                              expected_revision: int | None = None, dry_run: bool = False,
                              request_id: str | None = None) -> EndpointUpdated:
        """Change a live endpoint's labels (``labels`` replaces them all; ``set_labels`` /
        ``remove_labels`` change single keys) and/or its published ports (``published_ports``
        replaces them; ``[]`` unpublishes all). ``dry_run``: nothing changes, ``reply.reach``
        says which paths it would open and close. ``expected_revision``: only if the endpoint
        is still at that revision (``stale_revision`` otherwise)."""
        req = EndpointUpdate(endpoint_id=endpoint, labels=None if labels is None else dict(labels),
                             set_labels=dict(set_labels or {}), remove_labels=list(remove_labels or ()),
                             ports=None if published_ports is None else list(published_ports),
                             expected_revision=expected_revision, dry_run=dry_run, request_id=request_id)
        return await self.call(subjects.ENDPOINT_UPDATE, req, EndpointUpdated)

    # -- nodes --------------------------------------------------------------------------------
    async def nodes(self, *, include_gone: bool = False) -> list[NodeInfo]:
        """Registered node workers: drivers their kernel supports, last heartbeat, endpoint counts
        (every page of ``endpoint.node.list``, in node id order)."""
        out: list[NodeInfo] = []
        cursor: str | None = None
        while True:
            rep = await self.call(subjects.ENDPOINT_NODE_LIST, NodeListRequest(include_gone=include_gone,
                                                                                cursor=cursor), NodeList)
            out += rep.nodes
            if rep.next_cursor is None:
                return out
            cursor = rep.next_cursor

    async def node_desired(self, node: str) -> DesiredReply:
        """What the endpoint service wants node ``node`` to have (for debugging): every page, merged."""
        pages: list[DesiredReply] = []
        cursor: str | None = None
        while True:
            page = await self.node_desired_page(node, cursor=cursor)
            pages.append(page)
            cursor = page.next_cursor
            if cursor is None:
                return merge_desired(pages)

    async def node_desired_page(self, node: str, *, limit: int = 1000, cursor: str | None = None) -> DesiredReply:
        """One page of ``limit`` endpoints (and their networks) after ``cursor``."""
        return await self.call(subjects.ENDPOINT_DESIRED, DesiredRequest(node=node, limit=limit, cursor=cursor),
                               DesiredReply)

    async def node_stats(self, node: str) -> NodeStats:
        """The node worker's counters: reconciles, kernel writes, the last full resync."""
        return await self.call(subjects.NODE_STATS, Empty(), NodeStats, params={"node": node})

    async def node_resync(self, node: str, *, fetch: bool = True, timeout: float = 60.0) -> NodeStats:
        """Make the node run a full resync now; its counters afterwards."""
        return await self.call(subjects.NODE_RESYNC, ResyncRequest(fetch=fetch), NodeStats, params={"node": node},
                               timeout=timeout)

    async def node_drift(self, node: str, *, limit: int = 100) -> DriftReply:
        """The drift node ``node`` repaired after kernel notifications, newest first: what
        changed, when, how long the repair took, and which process made the change when
        the kernel names it (``vnetctl node drift``)."""
        return await self.call(subjects.NODE_DRIFT, DriftRequest(limit=limit), DriftReply, params={"node": node})

    async def node_teardown(self, node: str, *, deregister: bool = True, timeout: float = 60.0) -> TeardownReply:
        """Make the node stop reconciling and remove everything it made (interfaces, macvlan
        endpoints, nftables tables, wireguard-go); what it removed and every step that failed.
        Its endpoint records stay (a restarted worker rebuilds them)."""
        return await self.call(subjects.NODE_TEARDOWN, TeardownRequest(deregister=deregister), TeardownReply,
                               params={"node": node}, timeout=timeout)
