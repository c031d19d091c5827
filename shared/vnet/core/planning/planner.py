"""The generic planner: desired vs actual -> ordered ops, dispatching to the drivers (pure).

This file knows the order of a plan and what every driver shares (selection,
validation, uniqueness, teardown, host sysctls, container-side repair: addresses,
sysctls, default routes). What is particular to a driver is in its module under
:mod:`vnet.core.drivers`, reached through the registry; no driver is named here.
The module docstring of :mod:`vnet.core.plan` describes the properties and the order.
"""

from __future__ import annotations

from collections.abc import Iterable

from vnet.core import drivers, naming
from vnet.core import errors as E
from vnet.core.dataplane_model import (
    EpDesired,
    LinkState,
    NetDesired,
    NodeActual,
    NodeDesired,
    NsRef,
    NsState,
    RouteState,
    Scope,
)
from vnet.core.drivers.base import Driver
from vnet.core.planning.checks import EpView, Family, Invalid, NetView, validate_ep, validate_net
from vnet.core.planning.ops import (
    ADDR_GEN_MODE_NONE,
    FORWARD4,
    FORWARD6,
    MAIN_TABLE,
    AddAddr,
    AddRoute,
    DelAddr,
    DeleteLink,
    DelRoute,
    Departed,
    Plan,
    PlanError,
    PlanOp,
    SetLink,
    SetSysctl,
    accept_dad_path,
    addr_gen_mode_path,
    ep_owner,
    is_link_local,
    net_owner,
)


def driver_of(nd: NetDesired) -> Driver:
    return drivers.get(nd.driver)


class Planner:
    """One planning run. Drivers append to :attr:`ops` (and :attr:`routes_last`) and call
    :meth:`fail`, :meth:`addrs`, :meth:`route_conflicts`, :meth:`container_setup` and
    :meth:`repair_container`; they read :attr:`desired`, :attr:`host` and :attr:`failed`."""

    def __init__(self, desired: NodeDesired, actual: NodeActual, scope: Scope | None,
                 departed: Iterable[Departed] = ()) -> None:
        self.desired = desired
        wanted = {e.id for e in desired.endpoints}
        self.departed = [d for d in departed if d.id not in wanted]
        self.actual = actual
        self.host = actual.host
        self.scope = scope
        self.ops: list[PlanOp] = []
        self.routes_last: list[PlanOp] = []  # default routes go after every deletion (no EEXIST race)
        self.errors: list[PlanError] = []
        self.failed: set[str] = set()
        self.our_host_veths = {link.index for link in self.host.links.values() if naming.is_our_veth(link.name)}
        self.bridge_ports: dict[str, set[str]] = {}  # bridge -> its ports (filled in endpoints())
        self.count_ports = self.host.complete  # a scoped observation does not see every port

    def fail(self, owner: str, code: E.ErrorCode | str, message: str, *, fatal: bool = True) -> None:
        if owner in self.failed:
            return
        if fatal:
            self.failed.add(owner)
        self.errors.append(PlanError(owner=owner, code=code if isinstance(code, str) else code.code,
                                     message=message, fatal=fatal))

    def reason(self, owner: str) -> PlanError | None:
        return next((x for x in self.errors if x.owner == owner and x.fatal), None)

    def is_bridged(self, nd: NetDesired) -> bool:
        """A desired network (any, validated or not) whose driver makes a bridge per network."""
        try:
            return driver_of(nd).bridged
        except E.VNetError:
            return False

    # -- selection ---------------------------------------------------------------------
    def select(self) -> tuple[list[NetDesired], list[EpDesired]]:
        nets: list[NetDesired] = []
        seen: set[str] = set()
        for n in self.desired.networks:
            if n.id in seen:
                self.fail(net_owner(n.id), E.CONFLICT, f"network {n.id} appears twice in the desired state; "
                          "the first is used", fatal=False)
                continue
            seen.add(n.id)
            nets.append(n)
        eps: list[EpDesired] = []
        seen = set()
        for e in self.desired.endpoints:
            if e.id in seen:
                self.fail(ep_owner(e.id), E.CONFLICT, f"endpoint {e.id} appears twice in the desired state; "
                          "the first is used", fatal=False)
                continue
            seen.add(e.id)
            eps.append(e)
        if self.scope is None:
            return nets, eps
        ep_ids = set(self.scope.endpoints)
        # endpoints sharing a container namespace decide its default routes together
        shared = {e.netns for e in eps if e.id in ep_ids}
        ep_sel = [e for e in eps if e.id in ep_ids or e.netns in shared]
        net_ids = set(self.scope.networks) | {e.network_id for e in ep_sel}
        return [n for n in nets if n.id in net_ids], ep_sel

    # -- validation --------------------------------------------------------------------
    def validate_net(self, n: NetDesired) -> NetView | None:
        try:
            try:
                driver = driver_of(n)
            except E.VNetError as exc:
                raise Invalid(E.UNKNOWN_DRIVER, exc.message) from None
            return validate_net(n, driver, self.desired)
        except Invalid as exc:
            self.fail(net_owner(n.id), exc.code, exc.message)
            return None

    def validate_ep(self, e: EpDesired, nets: dict[str, NetView]) -> EpView | None:
        try:
            if not e.id:
                raise Invalid(E.INVALID_REQUEST, "endpoint id is empty")
            net = nets.get(e.network_id)
            if net is None:
                err = self.reason(net_owner(e.network_id))
                if err is not None:
                    raise Invalid(E.lookup(err.code), f"network {e.network_id} cannot be set up: {err.message}")
                raise Invalid(E.NETWORK_NOT_FOUND, f"network {e.network_id} of endpoint {e.id} is not in this "
                              "node's desired state")
            return validate_ep(e, net)
        except Invalid as exc:
            self.fail(ep_owner(e.id), exc.code, exc.message)
            return None

    def uniqueness(self, eps: list[EpView]) -> list[EpView]:
        """Two endpoints must not share a host veth, an interface, a MAC or an address."""
        out: list[EpView] = []
        veths: dict[str, str] = {}
        ifaces: dict[tuple[str, str], str] = {}
        macs: dict[tuple[str, str], str] = {}
        ips: dict[tuple[str, str], str] = {}
        for ep in eps:
            e = ep.d
            if not ep.net.driver.realised:
                out.append(ep)
                continue
            clash: str | None = None
            if ep.hv in veths:
                clash = f"host interface name {ep.hv} collides with endpoint {veths[ep.hv]}'s"
            elif (e.netns, e.ifname) in ifaces:
                clash = f"interface {e.ifname} in {e.netns} is already endpoint {ifaces[(e.netns, e.ifname)]}'s"
            elif (e.network_id, ep.mac) in macs:
                clash = f"MAC {ep.mac} is already used by endpoint {macs[(e.network_id, ep.mac)]} in the network"
            else:
                for a in (ep.ipv4, ep.ipv6):
                    if a is not None and (e.network_id, a.split("/")[0]) in ips:
                        clash = f"address {a} is already endpoint {ips[(e.network_id, a.split('/')[0])]}'s"
            if clash is not None:
                self.fail(ep.owner, E.CONFLICT, clash)
                continue
            veths[ep.hv] = e.id
            ifaces[(e.netns, e.ifname)] = e.id
            macs[(e.network_id, ep.mac)] = e.id
            for a in (ep.ipv4, ep.ipv6):
                if a is not None:
                    ips[(e.network_id, a.split("/")[0])] = e.id
            out.append(ep)
        return out

    # -- teardown ----------------------------------------------------------------------
    def teardown(self, nets: list[NetDesired], eps: list[EpDesired]) -> set[str]:
        """Delete what is ours and undesired; returns the names being deleted.

        Order: endpoints' interfaces, then the devices enslaved to or hanging off a
        network (VXLAN, shim), then bridges."""
        gone: set[str] = set()
        links = self.host.links
        for dep in self.departed:
            cns = self.actual.containers.get(dep.netns)
            link = cns.links.get(dep.ifname) if cns is not None and cns.exists else None
            if link is not None and link.kind == dep.kind and (dep.mac is None or (link.mac or "") == dep.mac):
                self.ops.append(DeleteLink(owner=ep_owner(dep.id), ns=dep.netns, ifname=dep.ifname,
                                           reason="endpoint removed"))
        if self.scope is None:
            desired_veths = {naming.veth_name(e.id) for e in self.desired.endpoints if e.id}
            desired_links: set[str] = set()
            for n in self.desired.networks:
                if n.id:
                    try:
                        desired_links |= driver_of(n).wanted_links(n)
                    except E.VNetError:
                        continue  # an unknown driver keeps nothing
            for name in sorted(links):
                if naming.is_our_veth(name) and name not in desired_veths:
                    self.ops.append(DeleteLink(owner=f"link:{name}", ifname=name, reason="no endpoint wants it"))
                    gone.add(name)
            for name in sorted(links):
                if (naming.is_ours(name) and not naming.is_our_veth(name) and not naming.is_our_bridge(name)
                        and name not in desired_links):
                    self.ops.append(DeleteLink(owner=f"link:{name}", ifname=name, reason="no network wants it"))
                    gone.add(name)
            for name in sorted(links):
                if naming.is_our_bridge(name) and name not in desired_links:
                    self.ops.append(DeleteLink(owner=f"link:{name}", ifname=name, reason="no network wants it"))
                    gone.add(name)
            return gone
        wanted_eps = {e.id for e in self.desired.endpoints}
        for eid in sorted(self.scope.endpoints - wanted_eps):
            name = naming.veth_name(eid)
            if name in links:
                self.ops.append(DeleteLink(owner=ep_owner(eid), ifname=name, reason="endpoint removed"))
                gone.add(name)
        wanted_nets = {n.id for n in self.desired.networks}
        for nid in sorted(self.scope.networks - wanted_nets):
            for name in removed_network_links(nid):
                if name in links:
                    self.ops.append(DeleteLink(owner=net_owner(nid), ifname=name, reason="network removed"))
                    gone.add(name)
        return gone

    # -- host --------------------------------------------------------------------------
    def host_sysctls(self, nets: list[NetView]) -> None:
        want: list[tuple[str, str]] = []
        bridges = [n for n in nets if n.bridged]
        if any(n.gw4 for n in bridges) and self.host.sysctls.get(FORWARD4) != "1":
            want.append((FORWARD4, "1"))
        if any(n.gw6 for n in bridges) and self.host.sysctls.get(FORWARD6) != "1":
            want.append((FORWARD6, "1"))
        if want:
            self.ops.append(SetSysctl(owner="host", ns=None, settings=tuple(want)))

    def addrs(self, owner: str, ns: NsRef, ifname: str, link: LinkState | None, want: Iterable[str],
              after: str | None = None) -> None:
        have = {a for a in (link.addrs if link else ()) if not is_link_local(a)}
        want_set = set(want)
        for a in sorted(have - want_set):
            self.ops.append(DelAddr(owner=owner, ns=ns, ifname=ifname, cidr=a, after=after))
        for a in sorted(want_set - have, key=lambda x: (":" in x, x)):
            self.ops.append(AddAddr(owner=owner, ns=ns, ifname=ifname, cidr=a, nodad=":" in a, after=after))

    # -- endpoints ---------------------------------------------------------------------
    def assign_default_routes(self, eps: list[EpView]) -> None:
        """Per container namespace and family, the first endpoint with a gateway holds
        the default route (one default route per family; eth0 before eth1)."""
        taken: set[tuple[str, int]] = set()
        for ep in sorted(eps, key=lambda x: (x.d.netns, x.d.ifname)):
            if ep.gw4 is not None and (ep.d.netns, 4) not in taken:
                ep.default4 = True
                taken.add((ep.d.netns, 4))
            if ep.gw6 is not None and (ep.d.netns, 6) not in taken:
                ep.default6 = True
                taken.add((ep.d.netns, 6))

    def container(self, ep: EpView) -> NsState | None:
        c = self.actual.containers.get(ep.d.netns)
        if c is None or not c.exists:
            # its own code: a create that waits for its node learns of a missing namespace here
            # (it asks no question before: svc/endpoint/create.py) and undoes itself
            self.fail(ep.owner, E.NETNS_NOT_FOUND, f"container network namespace {ep.d.netns} does not exist")
            return None
        if c.error:
            self.fail(ep.owner, E.UNAVAILABLE, f"container network namespace {ep.d.netns} cannot be read: "
                      f"{c.error}")
            return None
        return c

    def route_conflicts(self, ep: EpView, cns: NsState, ours: set[str]) -> str | None:
        ours = ours | {link.name for link in cns.links.values()
                       if link.kind == "veth" and link.peer_netnsid is not None
                       and link.peer_index in self.our_host_veths}
        for fam in (4, 6):
            family: Family = 4 if fam == 4 else 6
            if not ep.holds_default(family):
                continue
            for r in cns.routes:
                if (r.family == family and r.dst == "default" and r.table == MAIN_TABLE
                        and r.oif is not None and r.oif not in ours):
                    return (f"container namespace {ep.d.netns} already has an IPv{family} default route via "
                            f"{r.oif} that VNet did not make; not replacing it")
        return None

    def endpoints(self, eps: list[EpView], gone: set[str]) -> None:
        # ports per bridge: whatever is enslaved now, minus what this plan deletes
        for link in self.host.links.values():
            if link.master is not None and link.name not in gone:
                self.bridge_ports.setdefault(link.master, set()).add(link.name)
        attached = [ep for ep in eps if (h := self.host.links.get(ep.hv)) is not None and h.master == ep.net.bridge]
        attached_ids = {id(ep) for ep in attached}
        rest = [ep for ep in eps if id(ep) not in attached_ids]
        ifaces_by_ns: dict[str, set[str]] = {}
        for ep in eps:
            ifaces_by_ns.setdefault(ep.d.netns, set()).add(ep.d.ifname)
        for ep in attached + rest:
            if not ep.net.driver.container_iface:
                continue
            cns = self.container(ep)
            if cns is None:
                continue
            ep.net.driver.plan_endpoint(self, ep, cns, ifaces_by_ns.get(ep.d.netns, set()))

    def repair_container(self, ep: EpView, c: LinkState, cns: NsState, after: str, *, set_mac: bool) -> None:
        """The container side of an existing endpoint interface: sysctls, MAC, MTU,
        addresses, link up, default routes."""
        e, owner = ep.d, ep.owner
        ops: list[PlanOp] = []
        sysctls: list[tuple[str, str]] = []
        if ep.ipv6 is not None and c.accept_dad is not None and c.accept_dad != 0:
            sysctls.append((accept_dad_path(e.ifname), "0"))
        if sysctls:
            ops.append(SetSysctl(owner=owner, ns=e.netns, after=after, settings=tuple(sysctls)))
        cs = SetLink(owner=owner, ns=e.netns, ifname=e.ifname, after=after,
                     mac=ep.mac if set_mac and (c.mac or "").lower() != ep.mac else None,
                     mtu=ep.net.d.mtu if c.mtu != ep.net.d.mtu else None)
        if (cs.mac, cs.mtu) != (None, None):
            ops.append(cs)
        self.ops.extend(ops)
        self.addrs(owner, e.netns, e.ifname, c, [a for a in (ep.ipv4, ep.ipv6) if a is not None], after)
        if not c.up:
            self.ops.append(SetLink(owner=owner, ns=e.netns, ifname=e.ifname, up=True, after=after))
        self.routes(ep, cns, after)

    def container_setup(self, ep: EpView, after: str) -> None:
        """A freshly made container interface: sysctls, addresses, up, default routes."""
        e, owner = ep.d, ep.owner
        # No arp_notify: the node announces the address by gratuitous ARP once the endpoint
        # is reported ready (Applier.announce); the kernel's, at link up, flooded every port
        # of the bridge inside the attach (4 ms of the 1,000th attach's link-up).
        sysctls: list[tuple[str, str]] = []
        if ep.ipv6 is not None:
            sysctls.append((accept_dad_path(e.ifname), "0"))
        else:
            # An IPv4-only endpoint gets no IPv6 link-local address (Docker disables IPv6 on
            # the interfaces of IPv4-only networks too): its duplicate address detection,
            # MLD reports and router solicitations were multicast frames the bridge floods to
            # every port, so bringing up the 1,000th container on a bridge cost ~2 ms more
            # than the 10th (docs/dataplane.md, "Growth"). Set before the link is up.
            sysctls.append((addr_gen_mode_path(e.ifname), ADDR_GEN_MODE_NONE))
        self.ops.append(SetSysctl(owner=owner, ns=e.netns, after=after, settings=tuple(sysctls)))
        for a in (ep.ipv4, ep.ipv6):
            if a is not None:
                self.ops.append(AddAddr(owner=owner, ns=e.netns, ifname=e.ifname, cidr=a, nodad=":" in a,
                                        after=after))
        self.ops.append(SetLink(owner=owner, ns=e.netns, ifname=e.ifname, up=True, after=after))
        for fam in (4, 6):
            family: Family = 4 if fam == 4 else 6
            gw = ep.gw(family)
            if gw is not None and ep.holds_default(family):
                self.routes_last.append(AddRoute(owner=owner, ns=e.netns, ifname=e.ifname, family=family,
                                                 gateway=gw, after=after))

    def routes(self, ep: EpView, cns: NsState, after: str) -> None:
        e = ep.d
        for fam in (4, 6):
            family: Family = 4 if fam == 4 else 6
            mine = [r for r in cns.routes if r.family == family and r.dst == "default" and r.table == MAIN_TABLE
                    and r.oif == e.ifname]
            gw = ep.gw(family)
            want = gw is not None and ep.holds_default(family)
            keep: RouteState | None = None
            if want:
                keep = next((r for r in mine if r.gateway == gw), None)
            for r in mine:
                if r is not keep:
                    self.ops.append(DelRoute(owner=ep.owner, ns=e.netns, ifname=e.ifname, family=family, dst=r.dst,
                                             gateway=r.gateway, table=r.table, metric=r.metric, after=after))
            if want and keep is None and gw is not None:
                self.routes_last.append(AddRoute(owner=ep.owner, ns=e.netns, ifname=e.ifname, family=family,
                                                 gateway=gw, after=after))

    # -- all ---------------------------------------------------------------------------
    def run(self) -> Plan:
        nets_d, eps_d = self.select()
        nets: dict[str, NetView] = {}
        seen_bridges: dict[str, str] = {}
        for nd in nets_d:
            n = self.validate_net(nd)
            if n is None:
                continue
            if n.bridge in seen_bridges:
                self.fail(net_owner(nd.id), E.CONFLICT, f"bridge name {n.bridge} collides with network "
                          f"{seen_bridges[n.bridge]}'s")
                continue
            seen_bridges[n.bridge] = nd.id
            nets[nd.id] = n
        eps = [ep for e in eps_d if (ep := self.validate_ep(e, nets)) is not None]
        eps = self.uniqueness(eps)
        self.assign_default_routes(eps)
        gone = self.teardown(nets_d, eps_d)
        self.host_sysctls(list(nets.values()))
        for driver in drivers.all_drivers():
            mine = [n for n in nets.values() if n.driver is driver]
            if mine:
                driver.plan_host(self, mine)
        for n in nets.values():
            if net_owner(n.d.id) not in self.failed:
                n.driver.plan_network(self, n)
        ready_eps: list[EpView] = []
        for ep in eps:
            err = self.reason(net_owner(ep.net.d.id))
            if err is None:
                ready_eps.append(ep)
            else:
                self.fail(ep.owner, err.code, f"network {ep.net.d.id} cannot be set up on this host: {err.message}")
        self.endpoints(ready_eps, gone)
        self.ops.extend(self.routes_last)
        return Plan(ops=self.ops, errors=self.errors, networks=[n.id for n in nets_d],
                    endpoints=[e.id for e in eps_d])


def removed_network_links(network_id: str) -> list[str]:
    """Every host interface any driver may have made for a network that is gone (its
    driver is no longer known): enslaved and hanging devices first, the bridge last."""
    names: list[str] = []
    for d in drivers.all_drivers():
        names.extend(n for n in d.teardown(network_id) if n not in names)
    return sorted(names, key=naming.is_our_bridge)  # stable: registry order otherwise


def table_targets(scope: Scope | None) -> set[str] | None:
    """The VXLAN devices whose FDB and neighbour entries ``plan(..., scope)`` reads
    (None: every one). Those of the networks in scope, not those of a network in play only
    for an endpoint being attached or detached: an attach into an overlay with N endpoints on
    other hosts read N entries twice (1-1.5 ms with 40 here, and growing), and the remote
    entries are the networks' own reconciles', the remote endpoints' deltas' and the full
    resync's. A device whose entries were not read keeps them (``OverlayDriver.vxlan``)."""
    if scope is None:
        return None
    return {naming.vxlan_name(n) for n in scope.networks if n}


def observation_targets(desired: NodeDesired, scope: Scope | None = None) -> tuple[set[str] | None, set[str]]:
    """What the observer must read for ``plan(desired, ..., scope)``.

    Returns ``(host interface names or None for the whole host namespace,
    container namespaces)``.
    """
    def in_ns(n: NetDesired) -> bool:
        try:
            return driver_of(n).container_iface
        except E.VNetError:
            return False

    ns_nets = {n.id for n in desired.networks if in_ns(n)}
    if scope is None:
        return None, {e.netns for e in desired.endpoints if e.network_id in ns_nets}
    ids = set(scope.endpoints)
    shared = {e.netns for e in desired.endpoints if e.id in ids}
    eps = [e for e in desired.endpoints if e.id in ids or e.netns in shared]
    nets = set(scope.networks) | {e.network_id for e in eps}
    names = {naming.bridge_name(n) for n in nets if n}
    names |= {naming.veth_name(e.id) for e in eps if e.id}
    names |= {naming.veth_name(i) for i in ids if i}
    by_id = {n.id: n for n in desired.networks}
    for nid in nets:
        nd = by_id.get(nid)
        if nd is None:  # removed: whatever it had
            if nid:
                names |= set(removed_network_links(nid))
            continue
        try:
            names |= driver_of(nd).observe(nd, desired)
        except E.VNetError:
            pass
        if nd.parent:
            names.add(nd.parent)
    return names, {e.netns for e in eps if e.network_id in ns_nets}
