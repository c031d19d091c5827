"""``desired.get``: a node's desired state (its endpoints, networks, the remotes and routed overlays)."""

from __future__ import annotations

import bisect
import ipaddress
import logging

import msgspec

from vnet.contracts import subjects
from vnet.contracts.endpoint import (
    DesiredReply,
    DesiredRequest,
    NodeInfo,
    node_desired,
    remote_of,
    to_desired,
)
from vnet.contracts.network import MeshGroup, MeshRef, NetworkRef
from vnet.core import drivers
from vnet.core import errors as E
from vnet.core.dataplane_model import NetDesired, NodeDesired, PeerHost
from vnet.core.model import VirtualNetwork
from vnet.runtime.ports import EndpointStorePort as EndpointStore
from vnet.runtime.service import Ctx
from vnet.svc.endpoint.common import _mtu, _store

log = logging.getLogger(__name__)


async def desired_get(ctx: Ctx, req: DesiredRequest) -> DesiredReply:
    """What a node must realise: its endpoints and their networks (the data plane's types),
    one page of ``req.limit`` endpoints in id order (a page reads only its own records)."""
    store = _store(ctx)
    ids = await store.ids_of_node(req.node)
    start = bisect.bisect_right(ids, req.cursor) if req.cursor else 0
    page_ids = ids[start:start + req.limit]
    more = start + req.limit < len(ids)
    eps = [e for e in await store.get_many(page_ids) if e is not None]
    desired = node_desired(eps)
    next_cursor = page_ids[-1] if more and page_ids else None
    if any(drivers.get(n.driver).spans_hosts for n in desired.networks):
        # Each page names the overlays related to its own networks; one that also has an
        # endpoint here on another page is the same record there (merge_desired keeps one).
        routed = await _routed_overlays(ctx, store, desired)
        if routed:
            nets = sorted([*desired.networks, *routed], key=lambda n: n.id)
            desired = NodeDesired(networks=nets, endpoints=desired.endpoints, peers=desired.peers)
        desired = await _with_remotes(store, req.node, desired)
    return DesiredReply(node=req.node, desired=desired, statuses={e.id: e.status for e in eps},
                        reasons={e.id: e.reason for e in eps if e.reason}, next_cursor=next_cursor)


async def _routed_overlays(ctx: Ctx, store: EndpointStore, desired: NodeDesired) -> list[NetDesired]:
    """Overlay networks with no endpoint on this node but related (connected, parent/child,
    a shared mesh group) to an overlay that has one: the distributed gateway routes to them
    on this host, so it needs their bridge, gateway and remote entries too (isolation is the
    ruleset's business: a PeerOnly side gets the bridge but no allowed pair)."""
    here = {n.id for n in desired.networks}
    related: set[str] = set()
    for n in desired.networks:
        if not drivers.get(n.driver).spans_hosts:
            continue
        try:
            net = await ctx.request(subjects.NETWORK_GET, NetworkRef(network=n.id), VirtualNetwork)
        except E.VNetError as err:  # this resync goes without; the next one tries again
            log.info("desired state: relations of network %s unknown: %s", n.id, err.message)
            continue
        related |= set(net.connected) | set(net.children) | ({net.parent} if net.parent else set())
        for g in net.mesh_groups:
            try:
                related |= set((await ctx.request(subjects.NETWORK_MESH_GET, MeshRef(mesh=g), MeshGroup)).members)
            except E.VNetError as err:
                log.info("desired state: mesh group %s unknown: %s", g, err.message)
    out: list[NetDesired] = []
    for nid in sorted(related - here):
        eps = [e for e in await store.get_many(await store.of_network(nid)) if e is not None]
        if eps:
            if drivers.get(eps[0].driver).spans_hosts:
                out.append(to_desired(eps[0])[0])
            continue
        # No endpoint anywhere yet: this host still needs the network's bridge and VXLAN
        # device, so that the create event of its first endpoint (on another host) is a
        # remote of a network the worker already has, applied at once (not at the resync).
        try:
            rel = await ctx.request(subjects.NETWORK_GET, NetworkRef(network=nid), VirtualNetwork)
        except E.VNetError as err:
            log.info("desired state: related network %s unknown: %s", nid, err.message)
            continue
        if drivers.get(rel.driver_type).spans_hosts:
            out.append(_net_desired(rel))
    return out


def _net_desired(net: VirtualNetwork) -> NetDesired:
    """A network's data-plane view from its record, the same as :func:`to_desired` makes
    from one of its endpoints (gateway with the subnet's prefix, MTU, VNI, options)."""
    def gw(gateway: str | None, cidr: str | None) -> str | None:
        if not gateway or not cidr:
            return None
        return f"{gateway}/{ipaddress.ip_network(cidr, strict=False).prefixlen}"

    opts = net.options
    vni = opts.get("vni")
    return NetDesired(id=net.id, driver=net.driver_type, gateway4=gw(net.gateway, net.cidr),
                      gateway6=gw(net.gateway_v6, net.cidr_v6), mtu=_mtu(net),
                      vni=int(vni) if vni is not None and vni.isdigit() else None,
                      encrypted=opts.get("encrypted", "false") == "true", parent=opts.get("parent"),
                      mode=opts.get("mode"))


async def _with_remotes(store: EndpointStore, node: str, desired: NodeDesired) -> NodeDesired:
    """Overlay networks: their endpoints on other hosts, and those hosts' underlay addresses
    (and WireGuard public keys and mesh addresses). Hosts that are gone (deregistered, or
    silent past 3 heartbeats) are left out, so their entries leave every other host."""
    nets = []
    infos: dict[str, NodeInfo | None] = {}
    for n in desired.networks:
        if not drivers.get(n.driver).spans_hosts:
            nets.append(n)
            continue
        others = [e for e in await store.get_many(await store.of_network(n.id)) if e is not None and e.node != node]
        for h in {e.node for e in others} - infos.keys():
            info = await store.node(h)
            infos[h] = info if info is not None and info.underlay else None
        nets.append(msgspec.structs.replace(n, remotes=tuple(remote_of(e) for e in others if infos[e.node])))
    peers = [PeerHost(name=h, address=info.underlay, wg_public_key=info.wg_public_key,
                      wg_address=info.wg_address.split("/")[0] if info.wg_address else None, wg_port=info.wg_port)
             for h, info in sorted(infos.items()) if info is not None and info.underlay]
    return NodeDesired(networks=nets, endpoints=desired.endpoints, peers=peers)
