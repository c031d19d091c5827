"""Read the actual data-plane state of a node: links, addresses, routes, sysctls.

Requests are built by the struct encoders of :mod:`.nsctx`; replies are decoded by
the small TLV walkers below,
which pick only the attributes the planner needs (name, kind, MAC, MTU, flags,
master, veth peer, two devconf values; address and prefix; route destination,
gateway, device). Decoding a whole link message with pyroute2's generic classes
costs ~0.4 ms here (stats, AF_SPEC tables, ...); these walkers take a few µs, which
keeps a resync of a host with hundreds of endpoints cheap.

Two ways to look at the host namespace:

* :meth:`Observer.host_full` dumps every link and address (start-up and periodic
  resync: the only way to find interfaces of ours that nothing desires);
* :meth:`Observer.host_links` fetches only the interfaces named (an event's targeted
  reconcile: O(1) in the number of endpoints on the host).

A container namespace is always read whole (it holds a handful of interfaces).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Container, Iterable
from typing import Literal

from pyroute2.netlink.rtnl import (
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNEIGH,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
)

from vnet.adapters.netlink import drivers as kernel_drivers
from vnet.adapters.netlink.nsctx import (
    NamespaceGone,
    NetlinkError,
    NsContext,
    ifaddrmsg,
    ifinfomsg,
    nla_str,
    nla_u32,
    read_sysctl,
    rtmsg,
)
from vnet.core import naming
from vnet.core.dataplane_model import LinkState, NodeActual, NsState, RouteState
from vnet.core.plan import FORWARD4, FORWARD6, proxy_arp_path, proxy_delay_path

IFF_UP = 0x1
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
AF_BRIDGE = 7
NDA_DST = 1
NDA_LLADDR = 2
NDA_IFINDEX = 8
NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NTF_SELF = 0x02
IFLA_AF_SPEC = 26
IFLA_LINK_NETNSID = 37
IFLA_EXT_MASK = 29
IFLA_INET_CONF = 1
IFLA_INET6_CONF = 2
IPV4_DEVCONF_ARP_NOTIFY = 22  # array index is id - 1
DEVCONF_ACCEPT_DAD = 27  # array index is the id
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_TABLE = 15
RTN_UNICAST = 1
RT_TABLE_LOCAL = 255

_NLH = 16
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_ATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")
_NDMSG = struct.Struct("=BxxxiHBB")


def ndmsg(family: int = 0, index: int = 0, state: int = 0, flags: int = 0, ntype: int = 0) -> bytes:
    return _NDMSG.pack(family, index, state, flags, ntype)


def parse_neigh(buf: bytes) -> tuple[int, int, int, int, str | None, str | None]:
    """``(family, ifindex, state, flags, dst or None, lladdr or None)`` of one RTM_NEWNEIGH."""
    family, index, state, flags, _t = _NDMSG.unpack_from(buf, _NLH)
    dst = mac = None
    for t, a, b in _attrs(buf, _NLH + _NDMSG.size, len(buf)):
        if t == NDA_DST and b - a in (4, 16):
            dst = str(ipaddress.ip_address(buf[a:b]))
        elif t == NDA_LLADDR and b - a == 6:
            mac = ":".join(f"{x:02x}" for x in buf[a:b])
    return family, index, state, flags, dst, mac


def _attrs(buf: bytes, pos: int, end: int) -> Iterable[tuple[int, int, int]]:
    """Yield ``(type, start, end)`` of each attribute payload in ``buf[pos:end]``."""
    while pos + 4 <= end:
        alen, atype = _ATTR.unpack_from(buf, pos)
        if alen < 4:
            return
        yield atype & 0x3FFF, pos + 4, pos + alen
        pos += (alen + 3) & ~3


def _cstr(buf: bytes, a: int, b: int) -> str:
    return buf[a:b].split(b"\0", 1)[0].decode(errors="replace")


class RawLink:
    __slots__ = ("accept_dad", "arp_notify", "index", "kind", "link", "mac", "master", "mtu", "name", "netnsid",
                 "sub_mode", "up", "vni", "vxlan_learning", "vxlan_link", "vxlan_local", "vxlan_port", "vxlan_proxy")

    def __init__(self) -> None:
        self.index = 0
        self.name = ""
        self.kind: str | None = None
        self.mac: str | None = None
        self.mtu = 0
        self.up = False
        self.master: int | None = None
        self.link: int | None = None
        self.netnsid: int | None = None
        self.arp_notify: int | None = None
        self.accept_dad: int | None = None
        self.vni: int | None = None
        self.vxlan_local: str | None = None
        self.vxlan_link: int | None = None
        self.vxlan_port: int | None = None
        self.vxlan_learning: bool | None = None
        self.vxlan_proxy: bool | None = None
        self.sub_mode: str | None = None


def parse_link(buf: bytes) -> RawLink:
    """Decode the fields we need from one RTM_NEWLINK message."""
    r = RawLink()
    _fam, _type, r.index, flags, _change = _IFINFO.unpack_from(buf, _NLH)
    r.up = bool(flags & IFF_UP)
    for t, a, b in _attrs(buf, _NLH + _IFINFO.size, len(buf)):
        if t == IFLA_IFNAME:
            r.name = _cstr(buf, a, b)
        elif t == IFLA_ADDRESS:
            if b - a == 6:
                r.mac = ":".join(f"{x:02x}" for x in buf[a:b])
        elif t == IFLA_MTU:
            (r.mtu,) = _U32.unpack_from(buf, a)
        elif t == IFLA_MASTER:
            (r.master,) = _U32.unpack_from(buf, a)
        elif t == IFLA_LINK:
            (r.link,) = _U32.unpack_from(buf, a)
        elif t == IFLA_LINK_NETNSID:
            (r.netnsid,) = _S32.unpack_from(buf, a)
        elif t == IFLA_LINKINFO:
            data: tuple[int, int] | None = None
            for t2, a2, b2 in _attrs(buf, a, b):
                if t2 == IFLA_INFO_KIND:
                    r.kind = _cstr(buf, a2, b2)
                elif t2 == IFLA_INFO_DATA:
                    data = (a2, b2)
            kernel = kernel_drivers.for_kind(r.kind) if data is not None and r.kind else None
            if kernel is not None and data is not None:  # the kind's own data: its driver decodes it
                for t2, a2, b2 in _attrs(buf, *data):
                    kernel.parse_attr(r, t2, buf, a2, b2)
        elif t == IFLA_AF_SPEC:
            for fam, a2, b2 in _attrs(buf, a, b):
                if fam == socket.AF_INET:
                    for t3, a3, b3 in _attrs(buf, a2, b2):
                        if t3 == IFLA_INET_CONF and b3 - a3 >= 4 * IPV4_DEVCONF_ARP_NOTIFY:
                            (r.arp_notify,) = _U32.unpack_from(buf, a3 + 4 * (IPV4_DEVCONF_ARP_NOTIFY - 1))
                elif fam == socket.AF_INET6:
                    for t3, a3, b3 in _attrs(buf, a2, b2):
                        if t3 == IFLA_INET6_CONF and b3 - a3 >= 4 * (DEVCONF_ACCEPT_DAD + 1):
                            (r.accept_dad,) = _S32.unpack_from(buf, a3 + 4 * DEVCONF_ACCEPT_DAD)
    return r


def parse_addr(buf: bytes) -> tuple[int, str] | None:
    """``(ifindex, "10.1.0.5/24")`` from one RTM_NEWADDR message."""
    family, prefixlen, _flags, _scope, index = _IFADDR.unpack_from(buf, _NLH)
    local = address = None
    for t, a, b in _attrs(buf, _NLH + _IFADDR.size, len(buf)):
        if t == IFA_LOCAL:
            local = buf[a:b]
        elif t == IFA_ADDRESS:
            address = buf[a:b]
    raw = local if (family == socket.AF_INET and local is not None) else address
    if raw is None:
        return None
    ip = ipaddress.ip_address(raw)
    return index, f"{ip}/{prefixlen}"


def parse_route(buf: bytes) -> tuple[RouteState, int | None] | None:
    """A unicast route (and its output ifindex) from one RTM_NEWROUTE message."""
    family, dst_len, _src_len, _tos, table, proto, _scope, rtype, _flags = _RTMSG.unpack_from(buf, _NLH)
    if rtype != RTN_UNICAST or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    dst = gateway = None
    oif: int | None = None
    metric = 0
    for t, a, b in _attrs(buf, _NLH + _RTMSG.size, len(buf)):
        if t == RTA_DST:
            dst = ipaddress.ip_address(buf[a:b])
        elif t == RTA_GATEWAY:
            gateway = str(ipaddress.ip_address(buf[a:b]))
        elif t == RTA_OIF:
            (oif,) = _U32.unpack_from(buf, a)
        elif t == RTA_TABLE:
            (table,) = _U32.unpack_from(buf, a)
        elif t == RTA_PRIORITY:
            (metric,) = _U32.unpack_from(buf, a)
    if table == RT_TABLE_LOCAL:
        return None
    fam: Literal[4, 6] = 4 if family == socket.AF_INET else 6
    dst_s = "default" if dst_len == 0 else f"{dst or ('0.0.0.0' if fam == 4 else '::')}/{dst_len}"
    return RouteState(family=fam, dst=dst_s, gateway=gateway, table=table, proto=proto, metric=metric), oif


def _link_msg(name: str | None = None, index: int = 0) -> bytes:
    body = ifinfomsg(index=index) + nla_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
    return body + nla_str(IFLA_IFNAME, name) if name is not None else body


def _states(raw: list[RawLink], addrs: dict[int, list[str]]) -> dict[str, LinkState]:
    names = {r.index: r.name for r in raw}
    out: dict[str, LinkState] = {}
    for r in raw:
        out[r.name] = LinkState(
            index=r.index, name=r.name, kind=r.kind, mac=r.mac, mtu=r.mtu, up=r.up,
            master=None if r.master is None else names.get(r.master, f"#{r.master}"),
            peer_index=r.link if (r.link is not None and r.link != r.index) else None,
            peer_netnsid=r.netnsid, addrs=tuple(addrs.get(r.index, ())),
            arp_notify=r.arp_notify, accept_dad=r.accept_dad, vni=r.vni, vxlan_local=r.vxlan_local,
            vxlan_link=None if r.vxlan_link is None else names.get(r.vxlan_link, f"#{r.vxlan_link}"),
            vxlan_port=r.vxlan_port, vxlan_learning=r.vxlan_learning, vxlan_proxy=r.vxlan_proxy,
            sub_mode=r.sub_mode)
    return out


class Observer:
    """Reads namespaces through an :class:`NsContext` (never writes)."""

    def __init__(self, ctx: NsContext, host_ref: str | None) -> None:
        self.ctx = ctx
        self.host_ref = host_ref
        self.requests = 0  # netlink requests made (reads)
        self._host_sysctls: dict[str, str] | None = None  # last read (scoped observations reuse it)

    # -- primitives --------------------------------------------------------------------
    def links(self, ref: str | None) -> list[RawLink]:
        self.requests += 1
        return [parse_link(b) for t, b in self.ctx.sock(ref).dump(RTM_GETLINK, _link_msg(), "dump links")
                if t == RTM_NEWLINK]

    def link(self, ref: str | None, name: str) -> RawLink | None:
        self.requests += 1
        try:
            got = self.ctx.sock(ref).get(RTM_GETLINK, _link_msg(name), f"get link {name}")
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return next((parse_link(b) for t, b in got if t == RTM_NEWLINK), None)

    def addrs(self, ref: str | None, index: int = 0) -> dict[int, list[str]]:
        """Addresses by ifindex (of one interface when ``index`` is given)."""
        self.requests += 1
        out: dict[int, list[str]] = {}
        for t, b in self.ctx.sock(ref).dump(RTM_GETADDR, ifaddrmsg(index=index), "dump addresses"):
            if t != RTM_NEWADDR:
                continue
            got = parse_addr(b)
            if got is not None and (index == 0 or got[0] == index):
                out.setdefault(got[0], []).append(got[1])
        return out

    def routes(self, ref: str | None, names: dict[int, str]) -> list[RouteState]:
        out: list[RouteState] = []
        sock = self.ctx.sock(ref)
        raw: list[tuple[int, bytes]] = []
        for family in (socket.AF_INET, socket.AF_INET6):  # a strict AF_UNSPEC dump returns IPv4 only
            self.requests += 1
            raw += sock.dump(RTM_GETROUTE, rtmsg(family), "dump routes")
        for t, b in raw:
            if t != RTM_NEWROUTE:
                continue
            got = parse_route(b)
            if got is None:
                continue
            r, oif = got
            if oif is not None:
                r = RouteState(family=r.family, dst=r.dst, gateway=r.gateway, oif=names.get(oif, f"#{oif}"),
                               table=r.table, proto=r.proto, metric=r.metric)
            out.append(r)
        return out

    def host_sysctls(self) -> dict[str, str]:
        def read() -> dict[str, str]:
            out: dict[str, str] = {}
            paths = [FORWARD4, FORWARD6]
            try:  # our bridges' proxy ARP (parent networks with a child on this host)
                names = os.listdir("/proc/sys/net/ipv4/conf")
            except OSError:
                names = []
            for name in names:
                if name.startswith(naming.BRIDGE_PREFIX):
                    paths += [proxy_arp_path(name), proxy_delay_path(name)]
            for path in paths:
                try:
                    out[path] = read_sysctl(path)
                except OSError:
                    pass
            return out

        self._host_sysctls = self.ctx.run_in(self.host_ref, read)
        return dict(self._host_sysctls)

    def cached_host_sysctls(self) -> dict[str, str]:
        """The host sysctls as last read (read now if never): a targeted reconcile
        does not pay a namespace switch for them; the periodic full one re-reads."""
        return dict(self._host_sysctls) if self._host_sysctls is not None else self.host_sysctls()

    def forget_host_sysctls(self) -> None:
        self._host_sysctls = None

    # -- namespaces --------------------------------------------------------------------
    def fdb(self, ref: str | None, index: int) -> dict[str, str]:
        """Static unicast FDB entries of a VXLAN device: ``{mac: remote VTEP}``."""
        self.requests += 1
        out: dict[str, str] = {}
        for t, b in self.ctx.sock(ref).dump(RTM_GETNEIGH, ndmsg(AF_BRIDGE, index), "dump fdb"):
            if t != RTM_NEWNEIGH:
                continue
            _fam, idx, state, flags, dst, mac = parse_neigh(b)
            if (idx == index and flags & NTF_SELF and state & NUD_PERMANENT and dst is not None and mac is not None
                    and mac != "00:00:00:00:00:00"):
                out[mac] = dst
        return out

    def neigh(self, ref: str | None, index: int) -> dict[str, str]:
        """Permanent neighbour entries of a device (IPv4 and IPv6): ``{ip: mac}``."""
        out: dict[str, str] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            self.requests += 1
            for t, b in self.ctx.sock(ref).dump(RTM_GETNEIGH, ndmsg(family) + nla_u32(NDA_IFINDEX, index),
                                                "dump neighbours"):
                if t != RTM_NEWNEIGH:
                    continue
                _fam, idx, state, _flags, dst, mac = parse_neigh(b)
                if idx == index and state & NUD_PERMANENT and dst is not None and mac is not None:
                    out[dst] = mac
        return out

    def _vxlan_tables(self, raw: Iterable[RawLink], tables: Container[str] | None = None
                      ) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
        """The FDB and neighbour entries of our VXLAN devices among ``raw`` (``tables``: of
        those named only; a device left out has no key in either, and the planner leaves its
        entries alone)."""
        fdb: dict[str, dict[str, str]] = {}
        neigh: dict[str, dict[str, str]] = {}
        for r in raw:
            if r.kind == "vxlan" and naming.is_our_vxlan(r.name) and (tables is None or r.name in tables):
                fdb[r.name] = self.fdb(self.host_ref, r.index)
                neigh[r.name] = self.neigh(self.host_ref, r.index)
        return fdb, neigh

    def host_full(self) -> NsState:
        raw = self.links(self.host_ref)
        fdb, neigh = self._vxlan_tables(raw)
        return NsState(links=_states(raw, self.addrs(self.host_ref)), sysctls=self.host_sysctls(), fdb=fdb,
                       neigh=neigh)

    def host_links(self, names: Iterable[str], tables: Container[str] | None = None) -> NsState:
        """Only the interfaces named (and what they point at as master); the FDB and
        neighbour entries of the VXLAN devices among them (``tables``: of those named only)."""
        raw: dict[str, RawLink] = {}
        for name in sorted(set(names)):
            r = self.link(self.host_ref, name)
            if r is not None:
                raw[r.name] = r
        by_index = {r.index: r for r in raw.values()}
        addrs: dict[int, list[str]] = {}
        for r in list(raw.values()):
            if r.kind != "veth" and r.kind != "vxlan":  # bridges, shims, parents, the WireGuard interface
                addrs.update(self.addrs(self.host_ref, r.index))
            for other in (r.master, r.vxlan_link):
                if other is not None and other not in by_index:
                    m = self._link_by_index(self.host_ref, other)
                    if m is not None:
                        by_index[m.index] = m
        fdb, neigh = self._vxlan_tables(raw.values(), tables)
        return NsState(links=_states(list(by_index.values()), addrs), sysctls=self.cached_host_sysctls(),
                       complete=False, fdb=fdb, neigh=neigh)

    def _link_by_index(self, ref: str | None, index: int) -> RawLink | None:
        self.requests += 1
        try:
            got = self.ctx.sock(ref).get(RTM_GETLINK, _link_msg(index=index), f"get link #{index}")
        except NetlinkError:
            return None
        return next((parse_link(b) for t, b in got if t == RTM_NEWLINK), None)

    def container(self, ref: str) -> NsState:
        try:
            if self.ctx.netns(ref).ident == self.ctx.netns(self.host_ref).ident:
                return NsState(error="it is this node's host namespace; a bridge endpoint needs a namespace of "
                               "its own (the host driver shares the host's)")
            raw = self.links(ref)
            names = {r.index: r.name for r in raw}
            return NsState(links=_states(raw, self.addrs(ref)), routes=self.routes(ref, names))
        except NamespaceGone:
            return NsState(exists=False)
        except OSError as exc:
            if not self.ctx.exists(ref):
                return NsState(exists=False)
            return NsState(error=str(exc))

    def node(self, container_refs: Iterable[str], host_names: Iterable[str] | None = None,
             tables: Container[str] | None = None) -> NodeActual:
        """The host namespace (whole, or only ``host_names``: then ``tables`` limits the
        VXLAN devices whose entries are read) and the containers named."""
        host = self.host_full() if host_names is None else self.host_links(host_names, tables)
        return NodeActual(host=host, containers={ref: self.container(ref) for ref in sorted(set(container_refs))})
