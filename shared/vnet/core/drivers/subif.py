"""What macvlan and ipvlan share: endpoints are sub-interfaces of a host interface (pure).

The sub-interface is created directly in the container namespace (no host side, so
the reconciler remembers departed endpoints to remove them). The network needs its
``parent`` on the node; macvlan may also put a *host shim* (a macvlan of the parent
with an address in the network) in the host namespace, since the kernel forbids
parent <-> child traffic. :mod:`.macvlan` and :mod:`.ipvlan` set the kind and modes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from vnet.core import errors as E
from vnet.core import naming
from vnet.core.dataplane_model import NetDesired, NodeDesired, NsState
from vnet.core.drivers.base import Driver
from vnet.core.planning.checks import Family, Invalid, iface, usable
from vnet.core.planning.ops import AddAddr, CreateSubIf, DeleteLink, SetLink, net_owner

if TYPE_CHECKING:
    from vnet.core.planning.checks import EpView, NetView
    from vnet.core.planning.planner import Planner


class SubIfDriver(Driver):
    """A driver whose endpoints are ``kind`` sub-interfaces of the network's parent."""

    kind: ClassVar[Literal["macvlan", "ipvlan"]]
    modes: ClassVar[tuple[str, ...]]  # the modes offered; the first is the default
    host_shim: ClassVar[bool] = False  # the network may ask for a host shim
    container_iface = True

    def validate(self, net: NetView, desired: NodeDesired) -> None:
        n = net.d
        kind = self.name
        if not n.parent:
            raise Invalid(E.INVALID_OPTION, f"{kind} network {n.id} needs a parent interface (option parent)")
        try:
            naming.check_ifname(n.parent)
        except naming.InvalidName as exc:
            raise Invalid(E.INVALID_OPTION, f"parent: {exc}") from None
        mode = n.mode or self.modes[0]
        if mode not in self.modes:
            raise Invalid(E.INVALID_OPTION, f"{kind} mode {mode!r} of network {n.id} is not one of "
                          f"{', '.join(self.modes)}")
        net.mode = mode
        if n.host_shim is not None:
            if not self.host_shim:
                raise Invalid(E.INVALID_OPTION, "a host shim is offered for macvlan networks only")
            fam: Family = 6 if ":" in n.host_shim else 4
            itf = iface(n.host_shim, fam, "host shim address")
            usable(itf, "host shim address")
            subnet = net.net4 if fam == 4 else net.net6
            if subnet is not None and itf.network != subnet:
                raise Invalid(E.INVALID_CIDR, f"host shim address {n.host_shim} is not in network {subnet}")
            net.shim_addr = itf.with_prefixlen

    def plan_network(self, p: Planner, net: NetView) -> None:
        """The parent must exist on the node (validated here) and be up; the host shim
        when asked for."""
        n = net
        owner = net_owner(n.d.id)
        parent = n.d.parent or ""
        plink = p.host.links.get(parent)
        if plink is None:
            p.fail(owner, E.INVALID_OPTION, f"{self.name} network {n.d.id}: parent interface {parent} "
                   "does not exist on this node")
            return
        if naming.is_ours(parent):
            p.fail(owner, E.INVALID_OPTION, f"parent interface {parent} is one of VNet's own interfaces")
            return
        if not plink.up:
            p.ops.append(SetLink(owner=owner, ifname=parent, up=True))
        shim = p.host.links.get(n.shim)
        if n.shim_addr is None:
            return
        if shim is not None and (shim.kind != "macvlan" or shim.peer_index != plink.index):
            p.ops.append(DeleteLink(owner=owner, ifname=n.shim, reason="host shim is not a macvlan of the parent"))
            shim = None
        if shim is None:
            p.ops.append(CreateSubIf(owner=owner, kind="macvlan", parent=parent, mode="bridge", peer_ns=None,
                                     ifname=n.shim, mac=None, mtu=n.d.mtu))
            p.ops.append(AddAddr(owner=owner, ifname=n.shim, cidr=n.shim_addr, nodad=":" in n.shim_addr))
            return
        if not shim.up:
            p.ops.append(SetLink(owner=owner, ifname=n.shim, up=True))
        p.addrs(owner, None, n.shim, shim, [n.shim_addr])

    def plan_endpoint(self, p: Planner, ep: EpView, cns: NsState, ours: set[str]) -> None:
        """The sub-interface of the network's parent, made directly in the container
        namespace (no host-side interface)."""
        e, owner, after = ep.d, ep.owner, net_owner(ep.net.d.id)
        kind = self.kind
        parent = ep.net.d.parent or ""
        plink = p.host.links.get(parent)
        if plink is None:  # the network failed already (checked in plan_network)
            p.fail(owner, E.INVALID_OPTION, f"parent interface {parent} does not exist on this node")
            return
        conflict = p.route_conflicts(ep, cns, ours)
        if conflict is not None:
            p.fail(owner, E.CONFLICT, conflict)
            return
        c = cns.links.get(e.ifname)
        mac = ep.mac if self.departed_by_mac else None
        if c is not None:
            mine = c.kind == kind and c.peer_netnsid is not None and c.peer_index == plink.index
            if not mine:
                p.fail(owner, E.CONFLICT, f"container namespace {e.netns} already has an interface named "
                       f"{e.ifname} that is not a {kind} of {parent}")
                return
            if c.sub_mode is not None and c.sub_mode != ep.net.mode:
                p.ops.append(DeleteLink(owner=owner, ns=e.netns, ifname=e.ifname, after=after,
                                        reason=f"{kind} mode is {c.sub_mode}, not {ep.net.mode}"))
                c = None
        if c is None:
            p.ops.append(CreateSubIf(owner=owner, after=after, kind=kind, parent=parent, mode=ep.net.mode,
                                     peer_ns=e.netns, ifname=e.ifname, mac=mac, mtu=ep.net.d.mtu))
            p.container_setup(ep, after)
            return
        p.repair_container(ep, c, cns, after, set_mac=mac is not None)

    def observe(self, nd: NetDesired, desired: NodeDesired) -> set[str]:
        names = {naming.shim_name(nd.id)} if self.host_shim else set()
        if nd.parent:
            names.add(nd.parent)
        return names

    def teardown(self, network_id: str) -> tuple[str, ...]:
        return (naming.shim_name(network_id),) if self.host_shim else ()

    def wanted_links(self, nd: NetDesired) -> set[str]:
        return {naming.shim_name(nd.id)} if self.host_shim and nd.host_shim is not None else set()
