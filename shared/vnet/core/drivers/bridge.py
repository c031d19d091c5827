"""The bridge driver: a Linux bridge per network per host, a veth pair per endpoint (pure).

The bridge carries the gateway address(es); each endpoint's veth peer is created
directly in the container namespace under its final name (no move). A Linux bridge
holds at most :data:`BRIDGE_MAX_PORTS` ports: the next endpoint gets ``limit_reached``.
The overlay driver (:mod:`vnet.core.drivers.overlay`) builds on this one.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, ClassVar

from vnet.core import errors as E
from vnet.core import naming
from vnet.core.dataplane_model import LinkState, NetDesired, NodeDesired, NsState
from vnet.core.drivers.base import MTU, Driver, OptionSpec, ifname
from vnet.core.planning.ops import (
    BRIDGE_MAX_PORTS,
    AddAddr,
    CreateVeth,
    DeleteLink,
    EnsureBridge,
    PlanOp,
    SetLink,
    SetSysctl,
    net_owner,
    proxy_arp_path,
    proxy_delay_path,
)

if TYPE_CHECKING:
    from vnet.core.planning.checks import EpView, NetView
    from vnet.core.planning.planner import Planner


class BridgeDriver(Driver):
    name = "bridge"
    description = "a Linux bridge per network per host, veth per endpoint"
    options: ClassVar[tuple[OptionSpec, ...]] = (
        MTU,
        OptionSpec("bridge_name", "name of the bridge device (default: derived from the network id)", ifname),
    )
    kernel_kinds: ClassVar[tuple[str, ...]] = ("bridge", "veth")
    bridged = True
    container_iface = True

    def validate(self, net: NetView, desired: NodeDesired) -> None:
        return None  # the generic checks (MTU, gateways) are all a bridge needs

    # -- network -----------------------------------------------------------------------
    def plan_network(self, p: Planner, net: NetView) -> None:
        self.plan_bridge(p, net)

    def plan_bridge(self, p: Planner, n: NetView) -> bool:
        """The network's bridge, its addresses and proxy ARP; False when it cannot be made."""
        owner = net_owner(n.d.id)
        mac = naming.bridge_mac(n.d.id)
        link = p.host.links.get(n.bridge)
        want = [a for a in (n.gw4, n.gw6) if a is not None]
        if link is None:
            p.ops.append(EnsureBridge(owner=owner, name=n.bridge, mac=mac, mtu=n.d.mtu))
            for a in want:
                p.ops.append(AddAddr(owner=owner, ifname=n.bridge, cidr=a, nodad=":" in a))
        elif link.kind != "bridge":
            p.fail(owner, E.CONFLICT, f"interface {n.bridge} exists in the host namespace and is a "
                   f"{link.kind or 'device'}, not a bridge")
            return False
        else:
            change = SetLink(owner=owner, ifname=n.bridge,
                             up=True if not link.up else None,
                             mtu=n.d.mtu if link.mtu != n.d.mtu else None,
                             mac=mac if (link.mac or "").lower() != mac else None)
            if (change.up, change.mtu, change.mac) != (None, None, None):
                p.ops.append(change)
            p.addrs(owner, None, n.bridge, link, want)
        self.proxy_arp(p, n, link)
        return True

    def proxy_arp(self, p: Planner, n: NetView, link: LinkState | None) -> None:
        """A parent network with a child on this host: the child's subnet lies inside the
        parent's, so the parent's containers take a child's address as on-link and ARP for
        it on the parent's bridge, where nobody would answer. Proxy ARP on that bridge (no
        delay) answers with the bridge's MAC and the host routes to the child's bridge.
        Children are found from the desired networks (a bridged network whose IPv4 subnet
        lies strictly inside this one's), so no control-plane field is needed. Once set it
        stays (harmless without children). IPv6 (NDP proxy) is not handled."""
        if not isinstance(n.net4, ipaddress.IPv4Network):
            return
        parent = n.net4
        has_child = False
        for m in p.desired.networks:
            if m.id == n.d.id or m.gateway4 is None or not p.is_bridged(m):
                continue
            try:
                sub = ipaddress.ip_interface(m.gateway4).network
            except ValueError:
                continue
            if isinstance(sub, ipaddress.IPv4Network) and sub != parent and sub.subnet_of(parent):
                has_child = True
                break
        if not has_child:
            return
        want = ((proxy_arp_path(n.bridge), "1"), (proxy_delay_path(n.bridge), "0"))
        if link is not None and all(p.host.sysctls.get(k) == v for k, v in want):
            return
        p.ops.append(SetSysctl(owner=net_owner(n.d.id), ns=None, settings=want))

    # -- endpoint ----------------------------------------------------------------------
    def plan_endpoint(self, p: Planner, ep: EpView, cns: NsState, ours: set[str]) -> None:
        members = p.bridge_ports.setdefault(ep.net.bridge, set())
        if p.count_ports and ep.hv not in members and len(members) >= BRIDGE_MAX_PORTS:
            p.fail(ep.owner, E.LIMIT_REACHED,
                   f"bridge {ep.net.bridge} of network {ep.net.d.id} is full: a Linux bridge holds at most "
                   f"{BRIDGE_MAX_PORTS} ports; endpoint {ep.d.id} cannot join it on this host")
            return
        self.veth_endpoint(p, ep, cns, ours)
        if ep.owner not in p.failed:
            members.add(ep.hv)

    def veth_endpoint(self, p: Planner, ep: EpView, cns: NsState, ours: set[str]) -> None:
        e, owner, after = ep.d, ep.owner, net_owner(ep.net.d.id)
        h = p.host.links.get(ep.hv)
        c = cns.links.get(e.ifname)
        pair_ok = (h is not None and c is not None and h.kind == "veth" and c.kind == "veth"
                   and h.peer_index == c.index and c.peer_index == h.index
                   and h.peer_netnsid is not None and c.peer_netnsid is not None)
        conflict = p.route_conflicts(ep, cns, ours)
        if conflict is not None:
            p.fail(owner, E.CONFLICT, conflict)
            return
        ops: list[PlanOp] = []
        if h is not None and not pair_ok:
            # ours by name, but its peer is not the container's interface: start over
            ops.append(DeleteLink(owner=owner, ifname=ep.hv, after=after,
                                  reason=f"host veth is not paired with {e.ifname} in {e.netns}"))
            h = None
        if h is None:
            if c is not None:
                p.fail(owner, E.CONFLICT, f"container namespace {e.netns} already has an interface named "
                       f"{e.ifname} that VNet did not make")
                return
            p.ops.extend(ops)
            p.ops.append(CreateVeth(owner=owner, ns=None, after=after, name=ep.hv, bridge=ep.net.bridge,
                                    peer_ns=e.netns, peer_ifname=e.ifname, peer_mac=ep.mac, mtu=ep.net.d.mtu))
            p.container_setup(ep, after)
            return
        assert c is not None
        hs = SetLink(owner=owner, ifname=ep.hv, after=after,
                     master=ep.net.bridge if h.master != ep.net.bridge else None,
                     up=True if not h.up else None,
                     mtu=ep.net.d.mtu if h.mtu != ep.net.d.mtu else None)
        if (hs.master, hs.up, hs.mtu) != (None, None, None):
            ops.append(hs)
        p.ops.extend(ops)
        p.repair_container(ep, c, cns, after, set_mac=True)

    # -- observation and teardown --------------------------------------------------------
    def observe(self, nd: NetDesired, desired: NodeDesired) -> set[str]:
        return set()  # the bridge's name is read for every network

    def teardown(self, network_id: str) -> tuple[str, ...]:
        return (naming.bridge_name(network_id),)

    def wanted_links(self, nd: NetDesired) -> set[str]:
        return {naming.bridge_name(nd.id)}


DRIVER = BridgeDriver()
