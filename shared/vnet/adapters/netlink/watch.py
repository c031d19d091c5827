"""Kernel change notifications of one network namespace: links, addresses, nftables.

::

    w = NetlinkWatch("vt1-h1", on_changes)     # None: the namespace this process runs in
    w.open()                                    # blocking: two sockets made inside the namespace
    w.attach(loop)                              # on_changes(list[Change]) runs on the loop
    ...
    w.close()

Two netlink sockets are made INSIDE the namespace (a netlink socket stays bound to the
namespace it was created in; :class:`~vnet.adapters.netlink.nsctx.NsWorker` enters it
for the ``socket()`` call only, no fork, and ``SIOCGSKNS`` checks where it landed):

* ``NETLINK_ROUTE`` bound to ``RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR``:
  :class:`LinkChange` (a link changed or was deleted: its name, admin state, master) and
  :class:`AddrChange` (an address added or removed);
* ``NETLINK_NETFILTER`` joined to ``NFNLGRP_NFTABLES``: every object message of one
  committed nftables transaction, closed by ``NFT_MSG_NEWGEN``, becomes one
  :class:`NftCommit` with the tables it touched and the committing process as the
  kernel names it (``NFTA_GEN_PROC_PID`` / ``NFTA_GEN_PROC_NAME``) — the kernel always
  tells for nftables.

Who sent an rtnetlink change: the message's ``nlmsg_pid`` is the sender's netlink port
id where the kernel fills it in (address changes do; link changes arrive with 0 on the
kernels we run, so for them the sender is unknown and said so). :func:`port_owner` maps
a port id to a pid through the namespace's ``/proc/net/netlink`` (socket inode) and the
owners of that inode under ``/proc/*/fd``; :func:`describe` reads a pid's command line.
A process that exited before the lookup leaves its port id (and for nftables its pid and
name) only.

A receive buffer overflow (``ENOBUFS``: notifications were lost) is reported as
:class:`Overflow`, so the caller can check everything instead of trusting a partial
picture. Parsing is a few struct unpacks per message; nothing here writes to the kernel.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vnet.adapters.netlink.nsctx import Netns, NsWorker, check_socket_netns

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
IFLA_IFNAME, IFLA_MASTER = 3, 10
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3
IFF_UP = 0x1
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID, NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 1, 2, 3
NFPROTO_NAMES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
# NFT_MSG_* -> (verb, object); attribute 1 of every object message is its table's name.
NFT_MSGS: dict[int, tuple[str, str]] = {
    0: ("add", "table"), 2: ("delete", "table"), 3: ("add", "chain"), 5: ("delete", "chain"),
    6: ("add", "rule"), 8: ("delete", "rule"), 9: ("add", "set"), 11: ("delete", "set"),
    12: ("add", "element"), 14: ("delete", "element"), 18: ("add", "object"), 20: ("delete", "object"),
    22: ("add", "flowtable"), 24: ("delete", "flowtable"), 26: ("delete", "table"), 27: ("delete", "chain"),
    28: ("delete", "rule"), 29: ("delete", "set"), 30: ("delete", "element"), 31: ("delete", "object"),
    32: ("delete", "flowtable"),
}
RCVBUF = 8 << 20  # a whole-ruleset write of thousands of elements is one notification each
DRAIN_MAX = 256
_HDR = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")


@dataclass(frozen=True)
class LinkChange:
    """``RTM_NEWLINK`` (``deleted`` False) or ``RTM_DELLINK`` of one interface."""

    name: str
    index: int
    deleted: bool
    up: bool
    master: int  # 0: none
    port: int  # the sender's netlink port id; 0: the kernel did not say


@dataclass(frozen=True)
class AddrChange:
    """``RTM_NEWADDR`` / ``RTM_DELADDR``; ``label`` is the interface name for IPv4 (empty for IPv6)."""

    index: int
    label: str
    address: str  # CIDR
    deleted: bool
    port: int


@dataclass(frozen=True)
class NftCommit:
    """One committed nftables transaction (``NFT_MSG_NEWGEN`` and the messages before it)."""

    tables: frozenset[tuple[str, str]]  # (family, table) touched
    changes: dict[str, int]  # "delete table inet vnet" -> count
    port: int  # nlmsg_pid of the messages (the committing socket's port id)
    pid: int  # NFTA_GEN_PROC_PID: the committing thread (the kernel's word)
    comm: str  # NFTA_GEN_PROC_NAME
    generation: int


@dataclass(frozen=True)
class Overflow:
    """Notifications were lost (receive buffer full): the picture is incomplete."""

    source: str  # "rtnetlink" | "nftables"


Change = LinkChange | AddrChange | NftCommit | Overflow


def _attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = start
    while pos + 4 <= end:
        alen, atype = _NLA.unpack_from(data, pos)
        if alen < 4:
            break
        out[atype & 0x3FFF] = data[pos + 4:pos + alen]
        pos += (alen + 3) & ~3
    return out


def _link_attrs(data: bytes, start: int, end: int) -> tuple[bytes, int]:
    """A link notification's name and master, and nothing else: it carries ~40 attributes
    (statistics, per-family settings) and every attach makes several; slicing them all into a
    dict was a quarter of the node worker's event-loop time on an attach."""
    name, master, pos = b"", 0, start
    while pos + 4 <= end:
        alen, atype = _NLA.unpack_from(data, pos)
        if alen < 4:
            break
        t = atype & 0x3FFF
        if t == IFLA_IFNAME:
            name = data[pos + 4:pos + alen]
        elif t == IFLA_MASTER and alen >= 8:
            master = _U32.unpack_from(data, pos + 4)[0]
        pos += (alen + 3) & ~3
    return name, master


def _cstr(b: bytes | None) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace") if b else ""


def parse_rtnl(data: bytes) -> list[Change]:
    """Link and address notifications in one datagram."""
    out: list[Change] = []
    off = 0
    while off + 16 <= len(data):
        length, mtype, _flags, _seq, port = _HDR.unpack_from(data, off)
        if length < 16:
            break
        end = off + length
        if mtype in (RTM_NEWLINK, RTM_DELLINK) and length >= 16 + _IFINFO.size:
            fam, _typ, index, flags, _change = _IFINFO.unpack_from(data, off + 16)
            # AF_BRIDGE: a bridge's notice about one of its ports (its STP state, the port
            # leaving: an RTM_DELLINK of a link that still exists). The link's own notice
            # (AF_UNSPEC) says the same of the link itself: master, up, deleted.
            if fam != socket.AF_BRIDGE:
                name, master = _link_attrs(data, off + 16 + _IFINFO.size, end)
                out.append(LinkChange(name=_cstr(name), index=index, deleted=mtype == RTM_DELLINK,
                                      up=bool(flags & IFF_UP), master=master, port=port))
        elif mtype in (RTM_NEWADDR, RTM_DELADDR) and length >= 16 + _IFADDR.size:
            fam, plen, _fl, _scope, index = _IFADDR.unpack_from(data, off + 16)
            a = _attrs(data, off + 16 + _IFADDR.size, end)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            addr = ""
            if raw is not None:
                try:
                    af = socket.AF_INET if fam == socket.AF_INET else socket.AF_INET6
                    addr = f"{socket.inet_ntop(af, raw)}/{plen}"
                except (OSError, ValueError):
                    addr = ""
            out.append(AddrChange(index=index, label=_cstr(a.get(IFA_LABEL)), address=addr,
                                  deleted=mtype == RTM_DELADDR, port=port))
        off += (length + 3) & ~3
    return out


@dataclass
class NftParser:
    """Collects the object messages of a transaction until its ``NEWGEN``."""

    _tables: set[tuple[str, str]] = field(default_factory=set)
    _changes: dict[str, int] = field(default_factory=dict)
    _port: int = 0

    def feed(self, data: bytes) -> list[Change]:
        out: list[Change] = []
        off = 0
        while off + 20 <= len(data):
            length, mtype, _flags, _seq, port = _HDR.unpack_from(data, off)
            if length < 20:
                break
            end = off + length
            if mtype >> 8 == NFNL_SUBSYS_NFTABLES:
                msg = mtype & 0xFF
                fam = NFPROTO_NAMES.get(data[off + 16], str(data[off + 16]))
                a = _attrs(data, off + 20, end)
                if msg == NFT_MSG_NEWGEN:
                    pid = struct.unpack(">I", a[NFTA_GEN_PROC_PID][:4])[0] if NFTA_GEN_PROC_PID in a else 0
                    gen = struct.unpack(">I", a[NFTA_GEN_ID][:4])[0] if NFTA_GEN_ID in a else 0
                    out.append(NftCommit(tables=frozenset(self._tables), changes=dict(self._changes),
                                         port=self._port or port, pid=pid, comm=_cstr(a.get(NFTA_GEN_PROC_NAME)),
                                         generation=gen))
                    self._tables, self._changes, self._port = set(), {}, 0
                elif msg in NFT_MSGS:
                    table = _cstr(a.get(1))
                    verb, what = NFT_MSGS[msg]
                    self._tables.add((fam, table))
                    key = f"{verb} {what} {fam} {table}"
                    self._changes[key] = self._changes.get(key, 0) + 1
                    self._port = self._port or port
            off += (length + 3) & ~3
        return out


class NetlinkWatch:
    """Link, address and nftables notifications of namespace ``ref`` (see the module docstring)."""

    def __init__(self, ref: str | None, on_changes: Callable[[list[Change]], None]) -> None:
        self.ref = ref
        self.on_changes = on_changes
        self.ns: Netns | None = None
        self.worker: NsWorker | None = None  # kept for port-id lookups inside the namespace
        self.rtnl: socket.socket | None = None
        self.nft: socket.socket | None = None
        self._nft_parser = NftParser()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf = bytearray(1 << 18)
        self.messages = 0
        self.overflows = 0
        self._held = False

    def open(self) -> None:
        """Make both sockets inside the namespace (blocking)."""
        self.ns = Netns.open(self.ref)
        self.worker = NsWorker()
        try:
            self.rtnl, self.nft = self.worker.run(self.ns, _make_sockets)
            for s in (self.rtnl, self.nft):
                check_socket_netns(s, self.ns)
                s.setblocking(False)
        except BaseException:
            self.close()
            raise

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read on ``loop``: ``on_changes`` is called there with every batch."""
        assert self.rtnl is not None and self.nft is not None, "open() first"
        self._loop = loop
        self._readers(True)

    def _readers(self, on: bool) -> None:
        assert self._loop is not None
        for sock, source in ((self.rtnl, "rtnetlink"), (self.nft, "nftables")):
            if sock is None:
                continue
            if on:
                self._loop.add_reader(sock.fileno(), self._drain, sock, source)
            else:
                self._loop.remove_reader(sock.fileno())

    def hold(self) -> None:
        """Stop reading until :meth:`release`: notifications wait in the sockets (8 MiB each;
        a loss is still an :class:`Overflow`) and come in the kernel's order afterwards.
        For a caller whose own kernel writes cause them and who is waited for meanwhile."""
        if self._loop is not None and not self._held:
            self._held = True
            self._readers(False)

    def release(self) -> None:
        """Read again, first whatever arrived while held (the sockets are readable at once)."""
        if self._loop is not None and self._held:
            self._held = False
            self._readers(True)

    def _drain(self, sock: socket.socket, source: str) -> None:
        changes: list[Change] = []
        # At most DRAIN_MAX datagrams per call: a storm (thousands of elements written) must not
        # hold the event loop; the reader is called again while the socket has more.
        for _ in range(DRAIN_MAX):
            try:
                n = sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # lost some: say so, keep reading
                    self.overflows += 1
                    changes.append(Overflow(source=source))
                    if source == "nftables":
                        self._nft_parser = NftParser()  # a half transaction would be misattributed
                    continue
                log.warning("netlink watch %s: %s: %s", self.ref, source, exc)
                break
            if n == 0:
                break
            self.messages += 1
            data = bytes(self._buf[:n])
            changes += parse_rtnl(data) if source == "rtnetlink" else self._nft_parser.feed(data)
        if changes:
            try:
                self.on_changes(changes)
            except Exception:  # a bug in the consumer must not stop the reader
                log.exception("netlink watch %s: handling %d change(s) failed", self.ref, len(changes))

    def close(self) -> None:
        if self._loop is not None:
            for s in (self.rtnl, self.nft):
                if s is not None:
                    try:
                        self._loop.remove_reader(s.fileno())
                    except (ValueError, RuntimeError):  # loop closed already
                        pass
            self._loop = None
        for s in (self.rtnl, self.nft):
            if s is not None:
                s.close()
        self.rtnl = self.nft = None
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self.ns is not None:
            self.ns.close()
            self.ns = None

    # -- attribution (blocking: run in a thread) ----------------------------------------------
    def port_owner(self, protocol: int, port: int) -> int | None:
        """The pid holding the netlink socket with ``port`` (``protocol``: 0 route, 12 netfilter)
        in this namespace, while it exists; None when it is gone or unknown."""
        if port <= 0 or self.worker is None or self.ns is None:
            return None
        try:
            inode = self.worker.run(self.ns, lambda: _netlink_inode(protocol, port))
        except OSError:
            return None
        return _inode_owner(inode) if inode else None


def _make_sockets() -> tuple[socket.socket, socket.socket]:
    """Inside the namespace: the two subscribed sockets."""
    rtnl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    nft = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        for s in (rtnl, nft):
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:  # not privileged: as large as rmem_max allows
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        rtnl.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        nft.bind((0, 0))
        nft.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    except BaseException:
        rtnl.close()
        nft.close()
        raise
    return rtnl, nft


def _netlink_inode(protocol: int, port: int) -> int:
    """In the namespace's thread: the inode of the netlink socket (protocol, port), 0 if none.

    ``/proc/thread-self/net/netlink`` is the table of the CALLING THREAD's namespace."""
    with open("/proc/thread-self/net/netlink") as f:
        next(f, None)  # header: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
        for line in f:
            cols = line.split()
            if len(cols) >= 10 and int(cols[1]) == protocol and int(cols[2]) & 0xFFFFFFFF == port & 0xFFFFFFFF:
                return int(cols[9])
    return 0


def _inode_owner(inode: int) -> int | None:
    target = f"socket:[{inode}]"
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{d}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{d}/fd/{fd}") == target:
                    return int(d)
            except OSError:
                continue
    return None


@dataclass(frozen=True)
class Process:
    pid: int  # the process (thread group) id
    comm: str
    cmdline: str  # empty when the process is gone


def describe(pid: int, comm: str = "") -> Process:
    """A pid (or a thread id, as ``NFTA_GEN_PROC_PID`` gives) as its process and command line."""
    tgid = pid
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    tgid = int(line.split()[1])
                    break
    except (OSError, ValueError):
        return Process(pid=pid, comm=comm, cmdline="")
    try:
        with open(f"/proc/{tgid}/cmdline", "rb") as fb:
            cmdline = fb.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmdline = ""
    if not comm:
        try:
            with open(f"/proc/{tgid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            pass
    return Process(pid=tgid, comm=comm, cmdline=cmdline[:500])


def is_own_thread(pid: int) -> bool:
    """Whether ``pid`` (a thread id) is a thread of this process: our own nftables commits."""
    return pid > 0 and os.path.exists(f"/proc/self/task/{pid}")


def names_of(changes: Sequence[Change]) -> set[str]:
    """The interface names a batch of changes mentions (links and IPv4 address labels)."""
    out: set[str] = set()
    for c in changes:
        if isinstance(c, LinkChange) and c.name:
            out.add(c.name)
        elif isinstance(c, AddrChange) and c.label:
            out.add(c.label)
    return out
