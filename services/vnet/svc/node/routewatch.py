"""Host routes by netlink events: a changed route is reported at once, not at the next report.

The node worker reports its host's routes and interface addresses to the network service
(``vnet.network.hostroutes.report.<node>``): carving skips them, and a new route that is
not VNet's and overlaps a network raises ``vnet.evt.network.route_overlap.<network>``.
The periodic report (every 60 s) is the safety net; :class:`RouteWatch` makes it prompt:
a ``NETLINK_ROUTE`` socket made inside the host namespace joins the IPv4/IPv6 route and
address groups, and any change there (after a short quiet period, so a burst is one
report) re-reads the host and reports.

What is "not VNet's" (``foreign``): a route or address on an interface whose name is not
one of ours (:func:`vnet.core.naming.is_ours`: bridges, VXLAN, WireGuard, shims, veths),
and routes with no interface at all (blackhole, unreachable, prohibit). Our own bridges'
connected routes are the networks themselves, never an overlap.

Read only: nothing here writes to the kernel.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

from vnet.adapters.netlink.nsctx import Netns, NsWorker, check_socket_netns
from vnet.core import addr, naming

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE = 20, 21, 24, 25
_WATCHED = {RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE}
# Route types that occupy a prefix: unicast, blackhole, unreachable, prohibit (not local/broadcast).
ROUTE_TYPES = (1, 6, 7, 8)
QUIET_S = 0.05  # a burst of changes (an interface with its routes) is one report
_HDR = struct.Struct("=IHHII")


def read_host_routes(netns: str | None) -> tuple[list[str], list[str]]:
    """``(prefixes, foreign)`` of ``netns`` (a name under /run/netns or a path; None: this
    namespace): every route and interface address prefix, and those not on VNet's own
    interfaces. Blocking, read only; never creates a missing namespace.

    Not ``IPRoute(netns=...)``: pyroute2 forks a helper process for that, and the child
    inherits the parent's Python signal handlers and atexit state; when pyroute2 stops it
    with SIGTERM, a handler of the parent runs in the child (a benchmark's cleanup deleted
    every namespace it had made, a test's would do the same). The dump runs on a thread
    that entered the namespace instead (``nsctx.NsWorker``), with a plain ``IPRoute()``
    whose socket is therefore made there.
    """
    if netns is None:
        return _dump_routes()
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"host namespace {path} does not exist")
    ns = Netns.open(netns)
    worker = NsWorker()
    try:
        return worker.run(ns, _dump_routes)
    finally:
        worker.close()
        ns.close()


def _dump_routes() -> tuple[list[str], list[str]]:
    from pyroute2 import IPRoute

    every: set[str] = set()
    foreign: set[str] = set()
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") or "" for link in ipr.get_links()}
        for r in ipr.get_routes():
            if r["type"] not in ROUTE_TYPES or not r["dst_len"]:
                continue
            dst = r.get("dst")
            if not dst:
                continue
            prefix = f"{dst}/{r['dst_len']}"
            every.add(prefix)
            oif = r.get("oif")
            if oif is None or not naming.is_ours(names.get(oif, "")):
                foreign.add(prefix)
        for a in ipr.get_addr():
            address = a.get("address")
            if not address:
                continue
            prefix = f"{address}/{a['prefixlen']}"
            every.add(prefix)
            if not naming.is_ours(names.get(a["index"], "")):
                foreign.add(prefix)
    return [str(n) for n in addr.host_prefixes(every)], [str(n) for n in addr.host_prefixes(foreign)]


def _make_socket() -> socket.socket:
    """Inside the namespace: a route socket subscribed to route and address changes."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        s.bind((0, RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
    except BaseException:
        s.close()
        raise
    return s


_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RT_SCOPE_LINK = 253
_RT_TABLE_LOCAL = 255
_RTA_DST = 1
_AF_INET6 = 10


def _counts(mtype: int, body: bytes) -> bool:
    """Whether one route/address message can change what the host reports.

    Not the link-scope addresses and routes every interface gets when it comes up (an
    attach brings a host-side veth up: an fe80:: address and route on it), nor the local
    table or route types the report skips: without this each attach re-read and reported
    every route of the host, a cost that grew with the number of interfaces.
    """
    if mtype in (RTM_NEWADDR, RTM_DELADDR):
        if len(body) < _IFADDR.size:
            return True
        scope: int = _IFADDR.unpack_from(body)[3]
        return scope < _RT_SCOPE_LINK
    if len(body) < _RTMSG.size:
        return True
    family, dst_len, _src, _tos, table, _proto, _scope, rtype, _flags = _RTMSG.unpack_from(body)
    if table == _RT_TABLE_LOCAL or rtype not in ROUTE_TYPES or not dst_len:
        return False
    if family == _AF_INET6:  # fe80::/10 routes are per-link, never a network's prefix
        off = _RTMSG.size
        while off + 4 <= len(body):
            alen, atype = struct.unpack_from("=HH", body, off)
            if alen < 4:
                break
            if atype == _RTA_DST and alen >= 6 and body[off + 4] == 0xFE and body[off + 5] & 0xC0 == 0x80:
                return False
            off += (alen + 3) & ~3
    return True


def route_changes(data: bytes) -> int:
    """How many route/address change messages that matter (:func:`_counts`) one netlink datagram holds."""
    n, off = 0, 0
    while off + _HDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size:
            break
        if mtype in _WATCHED:
            n += _counts(mtype, data[off + _HDR.size:off + length])
        off += (length + 3) & ~3
    return n


class RouteWatch:
    """Calls ``report()`` (on the loop) soon after the host's routes or addresses change."""

    def __init__(self, ref: str | None, report: Callable[[], Awaitable[object]]) -> None:
        self.ref = ref
        self.report = report
        self.ns: Netns | None = None
        self.sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._buf = bytearray(1 << 16)
        self.changes = 0  # route/address change messages seen
        self.reports = 0  # reports sent because of them

    def open(self) -> None:
        """Make the socket inside the namespace (blocking)."""
        self.ns = Netns.open(self.ref)
        worker = NsWorker()
        try:
            self.sock = worker.run(self.ns, _make_socket)
            check_socket_netns(self.sock, self.ns)
            self.sock.setblocking(False)
        except BaseException:
            self.close()
            raise
        finally:
            worker.close()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.sock is not None, "open() first"
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._drain)

    def _drain(self) -> None:
        assert self.sock is not None and self._loop is not None
        seen = 0
        while True:
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: some were lost; a report re-reads everything anyway
                seen += 1
                log.info("route watch %s: %s", self.ref, exc)
                continue
            if n == 0:
                break
            seen += route_changes(bytes(self._buf[:n]))
        if not seen:
            return
        self.changes += seen
        if self._pending is None:
            self._pending = self._loop.call_later(QUIET_S, self._fire)

    def _fire(self) -> None:
        self._pending = None
        if self._task is not None and not self._task.done():
            self._again = True  # one more report after the running one: it may have read too early
            return
        assert self._loop is not None
        self._task = self._loop.create_task(self._run(), name="route-watch-report")

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await self.report()
                self.reports += 1
            except Exception as exc:  # the periodic report is the safety net
                log.info("route watch %s: report after a route change failed: %s", self.ref, exc)
            if not self._again:
                return

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._loop is not None and self.sock is not None:
            try:
                self._loop.remove_reader(self.sock.fileno())
            except (ValueError, RuntimeError):
                pass
        self._loop = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.ns is not None:
            self.ns.close()
            self.ns = None
