"""Execute plan operations against the kernel, idempotently, counting every write.

Each :class:`~vnet.core.plan.PlanOp` becomes one netlink request (a sysctl op: one
write per value) on the socket of its namespace, inside its own OpenTelemetry span.

* ensure-style ops accept "already exists" (``EEXIST``); delete-style ops accept
  "no such device/address/route" — so re-running a plan, or racing a second worker,
  converges instead of failing;
* once an op of an owner fails, the owner's remaining ops are skipped (they would
  fail, or half-make it) and the owner is reported failed; an endpoint whose network
  failed is skipped the same way; every other owner proceeds — teardown of many
  interfaces continues past errors and reports them all;
* :attr:`Applier.writes` counts state-changing netlink requests sent and sysctl
  values written (reads are not writes): a resync of a converged host leaves it at 0;
* a run of host-interface deletions (teardown of many endpoints) is done as one
  kernel unregister (see :meth:`Applier._delete_batch`): 40x faster than one by one.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import socket
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
)

from vnet.adapters.netlink import announce
from vnet.adapters.netlink import drivers as kernel_drivers
from vnet.adapters.netlink.drivers import KernelDriver
from vnet.adapters.netlink.nsctx import (
    NamespaceGone,
    NetlinkError,
    NsContext,
    ifaddrmsg,
    ifinfomsg,
    nla,
    nla_mac,
    nla_str,
    nla_u32,
    rtmsg,
    write_sysctl,
)
from vnet.adapters.netlink.observe import (
    AF_BRIDGE,
    IFF_UP,
    IFLA_AF_SPEC,
    IFLA_EXT_MASK,
    IFLA_IFNAME,
    IFLA_INET_CONF,
    IPV4_DEVCONF_ARP_NOTIFY,
    NDA_DST,
    NDA_LLADDR,
    NTF_SELF,
    NUD_PERMANENT,
    RTEXT_FILTER_SKIP_STATS,
    ndmsg,
    parse_link,
)
from vnet.core import errors as E
from vnet.core.dataplane_model import EpDesired, NodeActual, NsRef, ReconcileError
from vnet.core.plan import (
    MAIN_TABLE,
    ROUTE_PROTO,
    AddAddr,
    AddFdb,
    AddNeigh,
    AddRoute,
    CreateSubIf,
    CreateVeth,
    DelAddr,
    DeleteLink,
    DelFdb,
    DelNeigh,
    DelRoute,
    EnsureBridge,
    EnsureVxlan,
    Plan,
    PlanOp,
    SetLink,
    SetSysctl,
)
from vnet.core.planning.ops import ADDR_GEN_MODE_NONE

IFA_F_NODAD = 0x02
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFLA_GROUP = 27
IFLA_NET_NS_FD = 28
IFLA_LINK = 5
IFLA_INET6_ADDR_GEN_MODE = 8  # in IFLA_AF_SPEC/AF_INET6: a u8, in6_addr_gen_mode
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
IFA_FLAGS = 8
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_NOWHERE = 255
RTN_UNICAST = 1
CREATE = NLM_F_CREATE | NLM_F_EXCL
UPSERT = NLM_F_CREATE | NLM_F_REPLACE

_ACCEPT_ON_CREATE = {errno.EEXIST}
_ACCEPT_ON_DELETE = {errno.ENODEV, errno.ENOENT, errno.EADDRNOTAVAIL, errno.ESRCH}


def closed(op: PlanOp) -> bool:
    """Whether ``op`` leaves what it makes unable to pass a packet: a veth whose container side
    is still down (no carrier on either side), a sub-interface made down in its container, an
    address or a sysctl inside a container (on an interface still down), a deleted link.
    Anything else (a link set up, a bridge, a route, a neighbour, anything else in the host's
    namespace such as forwarding) may open a path, so :meth:`Applier.apply` passes its gate
    first."""
    if isinstance(op, (CreateVeth, DeleteLink)):
        return True
    if isinstance(op, CreateSubIf):
        return op.peer_ns is not None
    if isinstance(op, (AddAddr, SetSysctl)):
        return op.ns is not None
    return False


class Once:
    """``fn`` at most once, however often it is called (a gate passed by whoever comes first:
    the applier before an op that opens, or the end of the apply or reconcile)."""

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self.fn = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


def describe(op: PlanOp) -> str:
    """One line for logs, errors and span names' attributes."""
    where = "host" if op.ns is None else op.ns
    if isinstance(op, EnsureBridge):
        return f"ensure bridge {op.name}"
    if isinstance(op, CreateVeth):
        return f"create veth {op.name} on {op.bridge} with peer {op.peer_ifname} in {op.peer_ns}"
    if isinstance(op, SetLink):
        parts = [f"{k}={v}" for k, v in (("up", op.up), ("master", op.master), ("mtu", op.mtu), ("mac", op.mac))
                 if v is not None]
        return f"set link {op.ifname} in {where} " + " ".join(parts)
    if isinstance(op, AddAddr):
        return f"add address {op.cidr} to {op.ifname} in {where}"
    if isinstance(op, DelAddr):
        return f"delete address {op.cidr} from {op.ifname} in {where}"
    if isinstance(op, AddRoute):
        return f"add IPv{op.family} route {op.dst} via {op.gateway} dev {op.ifname} in {where}"
    if isinstance(op, DelRoute):
        return f"delete IPv{op.family} route {op.dst} via {op.gateway} dev {op.ifname} in {where}"
    if isinstance(op, SetSysctl):
        return "sysctl " + " ".join(f"{k}={v}" for k, v in op.settings) + f" in {where}"
    if isinstance(op, EnsureVxlan):
        return f"ensure vxlan {op.name} vni {op.vni} local {op.local} dev {op.dev} on {op.bridge}"
    if isinstance(op, AddFdb):
        return f"add fdb {op.mac} dst {op.dst} on {op.ifname}"
    if isinstance(op, DelFdb):
        return f"delete fdb {op.mac} dst {op.dst} on {op.ifname}"
    if isinstance(op, AddNeigh):
        return f"add neighbour {op.ip} lladdr {op.mac} on {op.ifname}"
    if isinstance(op, DelNeigh):
        return f"delete neighbour {op.ip} on {op.ifname}"
    if isinstance(op, CreateSubIf):
        into = "the host" if op.peer_ns is None else op.peer_ns
        return f"create {op.kind} {op.ifname} (mode {op.mode}) on {op.parent} in {into}"
    return f"delete link {op.ifname} in {where}"


class ApplyOutcome:
    def __init__(self) -> None:
        self.applied = 0
        self.skipped = 0
        self.errors: list[ReconcileError] = []
        self.failed: dict[str, ReconcileError] = {}


class Applier:
    """Runs plans through the namespace-bound sockets of an :class:`NsContext`."""

    def __init__(self, ctx: NsContext, host_ref: str | None, tracer: trace.Tracer | None = None,
                 node: str = "") -> None:
        self.ctx = ctx
        self.host_ref = host_ref
        self.node = node or (host_ref or "this node")
        self.tracer = tracer or trace.get_tracer("vnet")
        self.writes = 0
        self._index: dict[tuple[NsRef, str], int] = {}

    # -- plumbing ----------------------------------------------------------------------
    def _ref(self, ns: NsRef) -> str | None:
        return self.host_ref if ns is None else ns

    def _write(self, ns: NsRef, msg_type: int, flags: int, body: bytes, *,
               echo: bool = False) -> list[tuple[int, bytes]]:
        sock = self.ctx.sock(self._ref(ns))
        self.writes += 1
        return sock.request(msg_type, flags, body, echo=echo)

    def index(self, ns: NsRef, name: str) -> int:
        key = (ns, name)
        idx = self._index.get(key)
        if idx is not None:
            return idx
        body = ifinfomsg() + nla_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS) + nla_str(IFLA_IFNAME, name)
        try:
            got = self.ctx.sock(self._ref(ns)).get(RTM_GETLINK, body)
        except NetlinkError as exc:
            raise NetlinkError(exc.errno or errno.ENODEV, f"interface {name} not found") from None
        for t, b in got:
            if t == RTM_NEWLINK:
                idx = parse_link(b).index
                self._index[key] = idx
                return idx
        raise NetlinkError(errno.ENODEV, f"interface {name} not found")

    def _forget(self, ns: NsRef, name: str) -> None:
        self._index.pop((ns, name), None)

    def seed(self, actual: NodeActual) -> None:
        """Learn interface indexes from an observation (saves lookups)."""
        self._index.clear()
        for link in actual.host.links.values():
            self._index[(None, link.name)] = link.index
        for ref, st in actual.containers.items():
            for link in st.links.values():
                self._index[(ref, link.name)] = link.index

    # -- ops ---------------------------------------------------------------------------
    def ensure_bridge(self, op: EnsureBridge) -> None:
        body = (ifinfomsg(flags=IFF_UP, change=IFF_UP) + nla_str(IFLA_IFNAME, op.name)
                + nla_mac(IFLA_ADDRESS, op.mac) + nla_u32(IFLA_MTU, op.mtu)
                + nla(IFLA_LINKINFO, nla_str(IFLA_INFO_KIND, "bridge")))
        self._forget(None, op.name)
        self._create(None, RTM_NEWLINK, body)

    def create_veth(self, op: CreateVeth) -> None:
        master = self.index(None, op.bridge)
        peer_fd = self.ctx.netns(op.peer_ns).fd
        peer = (ifinfomsg() + nla_str(IFLA_IFNAME, op.peer_ifname) + nla_mac(IFLA_ADDRESS, op.peer_mac)
                + nla_u32(IFLA_MTU, op.mtu) + nla_u32(IFLA_NET_NS_FD, peer_fd))
        info = nla_str(IFLA_INFO_KIND, "veth") + nla(IFLA_INFO_DATA, nla(VETH_INFO_PEER, peer))
        body = (ifinfomsg() + nla_str(IFLA_IFNAME, op.name) + nla_u32(IFLA_MTU, op.mtu)
                + nla_u32(IFLA_MASTER, master) + nla(IFLA_LINKINFO, info))
        self._forget(None, op.name)
        self._forget(op.peer_ns, op.peer_ifname)
        # Echoed, the new link gives its index and its peer's (IFLA_LINK, in the peer's
        # namespace): the two lookups the next requests of an attach would make (2 of its
        # ~10 netlink round trips). Not echoed (it was there already): looked up as before.
        for t, b in self._create(None, RTM_NEWLINK, body, echo=True):
            if t == RTM_NEWLINK:
                link = parse_link(b)
                if link.name == op.name:
                    self._index[(None, op.name)] = link.index
                    if link.link and link.netnsid is not None:
                        self._index[(op.peer_ns, op.peer_ifname)] = link.link
        # A bridge port needs no IPv6 link-local address. Made up with one, the host side
        # sent duplicate address detection and MLD reports the bridge floods to every port
        # and put routes in the host's IPv6 table, which the kernel walks whole on every link
        # event (~1 ms of kernel work per attach at 1,000 ports, docs/dataplane.md). The
        # kernel refuses the mode in the create message, so it goes in between, before up.
        index = self.index(None, op.name)
        try:
            self._write(None, RTM_NEWLINK, 0, ifinfomsg(index=index) + nla(
                IFLA_AF_SPEC, nla(socket.AF_INET6, nla(IFLA_INET6_ADDR_GEN_MODE, bytes([int(ADDR_GEN_MODE_NONE)])))))
        except NetlinkError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):  # no IPv6: no link-local address
                raise
        self._write(None, RTM_NEWLINK, 0, ifinfomsg(index=index, flags=IFF_UP, change=IFF_UP))

    def set_link(self, op: SetLink) -> None:
        index = self.index(op.ns, op.ifname)
        body = (ifinfomsg(index=index, flags=IFF_UP if op.up else 0, change=IFF_UP) if op.up is not None
                else ifinfomsg(index=index))
        if op.mtu is not None:
            body += nla_u32(IFLA_MTU, op.mtu)
        if op.master is not None:
            body += nla_u32(IFLA_MASTER, self.index(op.ns, op.master))
        if op.mac is not None:
            body += nla_mac(IFLA_ADDRESS, op.mac)
        self._write(op.ns, RTM_NEWLINK, 0, body)

    def _addr_msg(self, ns: NsRef, ifname: str, cidr: str, nodad: bool) -> bytes:
        itf = ipaddress.ip_interface(cidr)
        family = socket.AF_INET if itf.version == 4 else socket.AF_INET6
        flags = IFA_F_NODAD if nodad else 0
        raw = itf.ip.packed
        body = (ifaddrmsg(family, itf.network.prefixlen, flags, 0, self.index(ns, ifname))
                + nla(IFA_LOCAL, raw) + nla(IFA_ADDRESS, raw))
        if itf.version == 4 and itf.network.prefixlen < 31:
            body += nla(IFA_BROADCAST, itf.network.broadcast_address.packed)
        if flags:
            body += nla_u32(IFA_FLAGS, flags)
        return body

    def add_addr(self, op: AddAddr) -> None:
        self._create(op.ns, RTM_NEWADDR, self._addr_msg(op.ns, op.ifname, op.cidr, op.nodad))

    def del_addr(self, op: DelAddr) -> None:
        try:
            body = self._addr_msg(op.ns, op.ifname, op.cidr, False)
        except NetlinkError as exc:
            if exc.errno in _ACCEPT_ON_DELETE:
                return
            raise
        self._delete(op.ns, RTM_DELADDR, body)

    def _route_msg(self, ns: NsRef, family: int, ifname: str | None, gateway: str | None, table: int,
                   scope: int, proto: int, metric: int = 0) -> bytes:
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        body = rtmsg(fam, 0, table, proto, scope, RTN_UNICAST)
        if gateway is not None:
            body += nla(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
        if ifname is not None:
            body += nla_u32(RTA_OIF, self.index(ns, ifname))
        if metric:
            body += nla_u32(RTA_PRIORITY, metric)
        return body

    def add_route(self, op: AddRoute) -> None:
        if op.dst != "default":
            raise ValueError(f"only default routes are planned, not {op.dst}")
        body = self._route_msg(op.ns, op.family, op.ifname, op.gateway, MAIN_TABLE, RT_SCOPE_UNIVERSE, ROUTE_PROTO)
        self._create(op.ns, RTM_NEWROUTE, body)

    def del_route(self, op: DelRoute) -> None:
        if op.dst != "default":
            raise ValueError(f"only default routes are planned, not {op.dst}")
        try:  # proto 0 and scope "nowhere" match whoever made the route
            body = self._route_msg(op.ns, op.family, op.ifname, op.gateway, op.table, RT_SCOPE_NOWHERE, 0,
                                   op.metric)
        except NetlinkError as exc:
            if exc.errno in _ACCEPT_ON_DELETE:
                return
            raise
        self._delete(op.ns, RTM_DELROUTE, body)

    def set_sysctl(self, op: SetSysctl) -> None:
        # An interface's arp_notify is an IPv4 devconf value the link message sets
        # (IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF): one request on the namespace's socket from
        # this thread, where writing /proc/sys means handing the write to the namespace's
        # thread and back (on an attach: ~0.01 ms against 0.3-1 ms, growing with load).
        # So is its IPv6 address generation mode (IFLA_AF_SPEC/AF_INET6/IFLA_INET6_ADDR_GEN_MODE).
        rest: list[tuple[str, str]] = []
        for path, value in op.settings:
            ifname, what = _devconf(path)
            if ifname is None or not value.isdigit():
                rest.append((path, value))
                continue
            if what == "arp_notify":
                af = nla(socket.AF_INET, nla(IFLA_INET_CONF, nla_u32(IPV4_DEVCONF_ARP_NOTIFY, int(value))))
            else:
                af = nla(socket.AF_INET6, nla(IFLA_INET6_ADDR_GEN_MODE, bytes([int(value)])))
            try:
                self._write(op.ns, RTM_NEWLINK, 0, ifinfomsg(index=self.index(op.ns, ifname)) + nla(IFLA_AF_SPEC, af))
            except NetlinkError as exc:
                if what == "addr_gen_mode" and exc.errno in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                    continue  # a kernel without IPv6 makes no link-local address anyway
                raise
        if not rest:
            return
        settings = tuple(rest)

        def job() -> int:
            done = 0
            try:
                for path, value in settings:
                    done += 1
                    write_sysctl(path, value)
            finally:
                self.writes += done
            return done

        self.ctx.run_in(self._ref(op.ns), job)

    def ensure_vxlan(self, op: EnsureVxlan) -> None:
        data = _kernel("vxlan").info_data(op, lambda name: self.index(None, name))
        body = (ifinfomsg(flags=IFF_UP, change=IFF_UP) + nla_str(IFLA_IFNAME, op.name) + nla_u32(IFLA_MTU, op.mtu)
                + nla_u32(IFLA_MASTER, self.index(None, op.bridge))
                + nla(IFLA_LINKINFO, nla_str(IFLA_INFO_KIND, "vxlan") + nla(IFLA_INFO_DATA, data)))
        self._forget(None, op.name)
        self._create(None, RTM_NEWLINK, body)

    def _fdb_msg(self, ns: NsRef, ifname: str, mac: str, dst: str, state: int) -> bytes:
        return (ndmsg(AF_BRIDGE, self.index(ns, ifname), state, NTF_SELF) + nla_mac(NDA_LLADDR, mac)
                + nla(NDA_DST, ipaddress.ip_address(dst).packed))

    def add_fdb(self, op: AddFdb) -> None:
        self._write(op.ns, RTM_NEWNEIGH, UPSERT, self._fdb_msg(op.ns, op.ifname, op.mac, op.dst, NUD_PERMANENT))

    def del_fdb(self, op: DelFdb) -> None:
        try:
            body = self._fdb_msg(op.ns, op.ifname, op.mac, op.dst, 0)
        except NetlinkError as exc:
            if exc.errno in _ACCEPT_ON_DELETE:
                return
            raise
        self._delete(op.ns, RTM_DELNEIGH, body)

    def _neigh_msg(self, ns: NsRef, ifname: str, ip: str, state: int) -> bytes:
        addr = ipaddress.ip_address(ip)
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        return ndmsg(family, self.index(ns, ifname), state) + nla(NDA_DST, addr.packed)

    def add_neigh(self, op: AddNeigh) -> None:
        body = self._neigh_msg(op.ns, op.ifname, op.ip, NUD_PERMANENT) + nla_mac(NDA_LLADDR, op.mac)
        self._write(op.ns, RTM_NEWNEIGH, UPSERT, body)

    def del_neigh(self, op: DelNeigh) -> None:
        try:
            body = self._neigh_msg(op.ns, op.ifname, op.ip, 0)
        except NetlinkError as exc:
            if exc.errno in _ACCEPT_ON_DELETE:
                return
            raise
        self._delete(op.ns, RTM_DELNEIGH, body)

    def create_subif(self, op: CreateSubIf) -> None:
        """A macvlan/ipvlan of a host interface, made straight inside the container
        namespace (``IFLA_NET_NS_FD``; ``IFLA_LINK`` is resolved in the host's)."""
        parent = self.index(None, op.parent)
        data = _kernel(op.kind).info_data(op, lambda name: self.index(None, name))
        body = (ifinfomsg(flags=IFF_UP if op.peer_ns is None else 0, change=IFF_UP if op.peer_ns is None else 0)
                + nla_str(IFLA_IFNAME, op.ifname) + nla_u32(IFLA_MTU, op.mtu) + nla_u32(IFLA_LINK, parent))
        if op.mac is not None:
            body += nla_mac(IFLA_ADDRESS, op.mac)
        if op.peer_ns is not None:
            body += nla_u32(IFLA_NET_NS_FD, self.ctx.netns(op.peer_ns).fd)
        body += nla(IFLA_LINKINFO, nla_str(IFLA_INFO_KIND, op.kind) + nla(IFLA_INFO_DATA, data))
        self._forget(op.peer_ns, op.ifname)
        self._create(None, RTM_NEWLINK, body)

    def delete_link(self, op: DeleteLink) -> None:
        self._forget(op.ns, op.ifname)
        self._delete(op.ns, RTM_DELLINK, ifinfomsg() + nla_str(IFLA_IFNAME, op.ifname))

    def _create(self, ns: NsRef, msg_type: int, body: bytes, *, echo: bool = False) -> list[tuple[int, bytes]]:
        """The kernel's echo of what it made (``echo``); nothing when it was there already."""
        try:
            return self._write(ns, msg_type, CREATE, body, echo=echo)
        except NetlinkError as exc:
            if exc.errno not in _ACCEPT_ON_CREATE:
                raise
            return []

    def _delete(self, ns: NsRef, msg_type: int, body: bytes) -> None:
        try:
            self._write(ns, msg_type, 0, body)
        except NetlinkError as exc:
            if exc.errno not in _ACCEPT_ON_DELETE:
                raise

    # -- the plan ----------------------------------------------------------------------
    def _dispatch(self) -> dict[type[Any], Callable[[Any], None]]:
        return {EnsureBridge: self.ensure_bridge, CreateVeth: self.create_veth, SetLink: self.set_link,
                AddAddr: self.add_addr, DelAddr: self.del_addr, AddRoute: self.add_route,
                DelRoute: self.del_route, SetSysctl: self.set_sysctl, DeleteLink: self.delete_link,
                EnsureVxlan: self.ensure_vxlan, AddFdb: self.add_fdb, DelFdb: self.del_fdb, AddNeigh: self.add_neigh,
                DelNeigh: self.del_neigh, CreateSubIf: self.create_subif}

    def announce(self, endpoints: list[EpDesired]) -> list[str]:
        """Gratuitous ARP for endpoints just reported ready (:mod:`.announce`); the errors."""
        return announce.announce(self.ctx, endpoints, self.tracer)

    def apply(self, plan: Plan, actual: NodeActual | None = None,
              gate: Callable[[], None] | None = None) -> ApplyOutcome:
        """Run every op in order; failures are collected, never raised.

        ``gate`` (once, blocking) is called before the first op that could let a packet
        through (:func:`closed`), or at the end: the worker passes the wait for the attach's
        policy delta, which is written in another thread while the interfaces are created
        (they stay down until then: the binding is in before the link is up)."""
        if actual is not None:
            self.seed(actual)
        out = ApplyOutcome()
        run = self._dispatch()
        ops = plan.ops
        opened = Once(gate)
        i = 0
        try:
            while i < len(ops):
                if not closed(ops[i]):
                    opened()
                i = self._step(ops, i, out, run)
        finally:
            opened()
        return out

    def _step(self, ops: list[PlanOp], i: int, out: ApplyOutcome, run: dict[type[Any], Callable[[Any], None]]) -> int:
        """Run ``ops[i]`` (or the batch of host deletions starting there); the next index."""
        op = ops[i]
        if self._skip(op, out):
            return i + 1
        if isinstance(op, DeleteLink) and op.ns is None:
            j = i
            batch: list[DeleteLink] = []
            while j < len(ops) and isinstance(ops[j], DeleteLink) and ops[j].ns is None:
                nxt = ops[j]
                assert isinstance(nxt, DeleteLink)
                if not self._skip(nxt, out):
                    batch.append(nxt)
                j += 1
            if len(batch) >= 2:
                self._delete_batch(batch, out)
                return j
        self._record(op, self._run_one(op, run[type(op)]), out)
        return i + 1

    def _skip(self, op: PlanOp, out: ApplyOutcome) -> bool:
        """Skip ops of failed owners, and of owners whose prerequisite failed."""
        if op.owner in out.failed:
            out.skipped += 1
            return True
        if op.after is not None and op.after in out.failed:
            cause = out.failed[op.after]
            err = ReconcileError(owner=op.owner, code=E.UNPROCESSABLE.code, op=op.op_name(),
                                 message=f"{op.after.split(':', 1)[-1]} failed: {cause.message}")
            out.failed[op.owner] = err
            out.errors.append(err)
            out.skipped += 1
            return True
        return False

    @staticmethod
    def _record(op: PlanOp, err: ReconcileError | None, out: ApplyOutcome) -> None:
        if err is None:
            out.applied += 1
        else:
            out.failed[op.owner] = err
            out.errors.append(err)

    def _delete_batch(self, ops: list[DeleteLink], out: ApplyOutcome) -> None:
        """Delete many host interfaces with ONE unregister in the kernel.

        Deleting a veth costs ~16-30 ms here, nearly all of it RCU grace periods the
        kernel waits for once per request; ``RTM_DELLINK`` by *group* unregisters every
        member in one go (100 veths: ~40 ms instead of ~1.8 s). Each doomed interface is
        first put in a group number drawn at random for this batch (one write each,
        counted), then the group is deleted (one more write). Interfaces already gone
        are fine; if the group delete fails, each is deleted on its own.
        """
        group = random.getrandbits(30) | (1 << 30)  # never 0, the default group
        marked: list[DeleteLink] = []

        def mark(o: DeleteLink) -> None:
            self._forget(None, o.ifname)
            try:
                self._write(None, RTM_NEWLINK, 0, ifinfomsg() + nla_str(IFLA_IFNAME, o.ifname)
                            + nla_u32(IFLA_GROUP, group))
            except NetlinkError as exc:
                if exc.errno not in _ACCEPT_ON_DELETE:
                    raise
                return  # already gone
            marked.append(o)

        for op in ops:
            self._record(op, self._run_one(op, mark, batch_group=group), out)
        if not marked:
            return
        err: ReconcileError | None = None
        with self.tracer.start_as_current_span("kernel delete_group", attributes={
                "vnet.netns": self.host_ref or "host", "vnet.group": group, "vnet.links": len(marked)}) as span:
            try:
                self._write(None, RTM_DELLINK, 0, ifinfomsg() + nla_u32(IFLA_GROUP, group))
            except (NetlinkError, OSError) as exc:
                code, message, num = classify(marked[0], exc)
                span.set_status(Status(StatusCode.ERROR, message))
                err = ReconcileError(owner=marked[0].owner, code=code, op="delete_group", message=message,
                                     errno=num)
        if err is not None:  # one by one, then
            for op in marked:
                e2 = self._run_one(op, self.delete_link)
                if e2 is not None:
                    out.applied -= 1
                    self._record(op, e2, out)

    def _run_one(self, op: PlanOp, fn: Callable[[Any], None], batch_group: int | None = None) -> ReconcileError | None:
        name = op.op_name()
        attrs: dict[str, Any] = {"vnet.owner": op.owner, "vnet.netns": op.ns or (self.host_ref or "host")}
        if batch_group is not None:
            attrs["vnet.group"] = batch_group
        ifname = getattr(op, "ifname", None) or getattr(op, "name", None)
        if ifname:
            attrs["vnet.ifname"] = ifname
        with self.tracer.start_as_current_span(f"kernel {name}", attributes=attrs) as span:
            before = self.writes
            try:
                fn(op)
            except (NetlinkError, NamespaceGone, OSError, ValueError, RuntimeError) as exc:
                code, message, num = classify(op, exc, self.node)
                span.set_status(Status(StatusCode.ERROR, message))
                span.set_attribute("error.type", code)
                if num:
                    span.set_attribute("vnet.errno", num)
                return ReconcileError(owner=op.owner, code=code, op=name, message=message, errno=num)
            finally:
                span.set_attribute("vnet.writes", self.writes - before)
        return None


def _devconf(path: str) -> tuple[str | None, str]:
    """``(ifname, name)`` of a ``net/ipv4/conf/<ifname>/arp_notify`` or
    ``net/ipv6/conf/<ifname>/addr_gen_mode`` sysctl path (not ``all``/``default``), which a
    link message sets; ``(None, "")`` for any other."""
    parts = path.split("/")
    if len(parts) != 5 or parts[0] != "net" or parts[2] != "conf" or parts[3] in ("all", "default"):
        return None, ""
    if (parts[1], parts[4]) in (("ipv4", "arp_notify"), ("ipv6", "addr_gen_mode")):
        return parts[3], parts[4]
    return None, ""


def _kernel(kind: str) -> KernelDriver:
    """The kernel driver that brings link kind ``kind`` (its ``IFLA_INFO_DATA``)."""
    driver = kernel_drivers.for_kind(kind)
    if driver is None:
        raise ValueError(f"no kernel driver makes links of kind {kind}")
    return driver


def classify(op: PlanOp, exc: BaseException, node: str = "") -> tuple[str, str, int]:
    """``(code, message, errno)`` for a failed op, worded for a person."""
    what = describe(op)
    num = exc.errno if isinstance(exc, OSError) and exc.errno else 0
    if isinstance(exc, NamespaceGone):
        return E.NOT_FOUND.code, f"{what}: {exc.strerror}", num
    kind = op.kind if isinstance(op, CreateSubIf) else "vxlan" if isinstance(op, EnsureVxlan) else None
    feature = kernel_drivers.kernel_feature(kind) if kind is not None else None
    if kind is not None and feature is not None and num == errno.EOPNOTSUPP:
        detail = exc.kernel_message if isinstance(exc, NetlinkError) else ""
        return (E.DRIVER_UNAVAILABLE.code,
                f"the {kind} driver is unavailable on node {node or 'this node'}: its kernel lacks "
                f"{feature} ({os.strerror(num)}{': ' + detail if detail else ''})", num)
    if num == errno.EXFULL and isinstance(op, CreateVeth):
        return (E.LIMIT_REACHED.code, f"{what}: bridge {op.bridge} is full (a Linux bridge holds at most 1023 "
                "ports)", num)
    if isinstance(exc, NetlinkError):
        return "kernel", f"{what}: {exc.strerror}", num
    if isinstance(exc, OSError):
        return "kernel", f"{what}: {exc.strerror or exc}", num
    return E.INTERNAL.code, f"{what}: {exc}", num
