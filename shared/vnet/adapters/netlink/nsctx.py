"""Namespace-bound netlink sockets, opened without forking.

A netlink socket stays bound to the network namespace it was created in, whatever
thread later uses it. So to talk to a namespace we

1. open the namespace file (``/run/netns/<name>`` or a path such as
   ``/proc/<pid>/ns/net``) once and keep the descriptor;
2. in ONE dedicated thread (:class:`NsWorker`), ``setns(2)`` into it, create a plain
   ``AF_NETLINK`` socket, ``setns`` back home (and check that we are home); inside a
   reconcile pass (:meth:`NsContext.one_pass`) the pass's own thread does the same, which
   spares an attach two thread wake-ups (0.17 -> 0.05 ms, :meth:`NsContext._open_here`);
3. check with ``ioctl(SIOCGSKNS)`` that the socket really lives in the namespace
   asked for (an alarm rather than a hope: a socket in the wrong namespace would
   change the wrong host);
4. cache the socket per namespace (bounded LRU), keyed by the namespace's inode,
   so a namespace deleted and re-created under the same name gets a fresh socket,
   and close it when the namespace disappears.

Sysctls of a namespace (``/proc/sys/net/...``) are per *thread*: the worker thread
writes them while it is inside the namespace.

Why not ``pyroute2.IPRoute``/``AsyncIPRoute`` objects: in pyroute2 0.9 they keep
their socket and event loop in thread-locals, so an object created inside a
namespace and used from another thread silently opens a NEW socket in that other
thread's namespace (we watched it create a bridge in the wrong namespace), the sync
wrapper runs a private event loop per object (~0.6 ms per request here), and
``IPRoute(netns=...)``/``NetNS`` fork a helper (~5 ms). We keep pyroute2 for what it
does well — the RTNL message classes that encode and decode requests — and own the
socket: one ``send`` and one ``recv`` per request, no loop, no fork, no thread-local.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import os
import queue
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, nlmsg

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
SIOCGSKNS = 0x894C
SOL_NETLINK = 270
NETLINK_ROUTE = 0
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
NLM_F_ECHO = 0x08
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_MULTI = 2
NLM_F_ACK_TLVS = 0x200
NLM_F_CAPPED = 0x100
NLMSGERR_ATTR_MSG = 1
_HDR = struct.Struct("=IHHII")
_RECV_BYTES = 1 << 16  # the kernel fills a dump reply up to 32 KiB; one message never exceeds that
_tls = threading.local()


def _recv_buffer() -> tuple[bytearray, memoryview]:
    """One receive buffer per thread, shared by every socket (not 64 KiB per namespace)."""
    buf: tuple[bytearray, memoryview] | None = getattr(_tls, "buf", None)
    if buf is None:
        b = bytearray(_RECV_BYTES)
        buf = (b, memoryview(b))
        _tls.buf = buf
    return buf

_libc = ctypes.CDLL(None, use_errno=True)


class NetlinkError(OSError):
    """A kernel refusal: ``.errno`` plus the kernel's extended-ack message if any."""

    def __init__(self, code: int, message: str = "", *, what: str = "") -> None:
        text = os.strerror(code)
        if message:
            text = f"{text}: {message}"
        if what:
            text = f"{what}: {text}"
        super().__init__(code, text)
        self.kernel_message = message


class NamespaceGone(OSError):
    """The namespace named does not exist (any more)."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _unshare_netns() -> None:
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


_NEW_NETNS = -1


def _ns_ino(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def ns_path(ref: str | None) -> str:
    """``None`` -> this process's namespace; ``name`` -> ``/run/netns/name``; a path stays."""
    if ref is None:
        return "/proc/self/ns/net"
    return ref if ref.startswith("/") else f"/run/netns/{ref}"


@dataclass
class Netns:
    """An open handle on one network namespace."""

    ref: str | None
    path: str
    fd: int
    ident: tuple[int, int]  # (st_dev, st_ino) of the namespace

    @classmethod
    def open(cls, ref: str | None) -> Netns:
        path = ns_path(ref)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NamespaceGone(errno_mod.ENOENT, f"network namespace {path} does not exist") from None
        st = os.fstat(fd)
        return cls(ref, path, fd, (st.st_dev, st.st_ino))

    def still_there(self) -> bool:
        """True while ``path`` still names the namespace this handle was opened on."""
        if self.ref is None:
            return True
        try:
            return _ns_ino(self.path) == self.ident
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NsWorker:
    """One thread that enters a namespace for a job and always comes back home.

    Jobs are short (create a socket, read or write a few sysctls). After each job
    the thread re-enters its home namespace and checks it is there; if that ever
    fails the worker refuses all further work rather than run in the wrong place.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[int, Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._broken: str | None = None
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._loop, args=(ready,), name="vnet-netns", daemon=True)
        self._thread.start()
        ready.result()

    def _loop(self, ready: Future[None]) -> None:
        try:
            home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            home = os.fstat(home_fd)
            home_id = (home.st_dev, home.st_ino)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            while True:
                item = self._jobs.get()
                if item is None:
                    return
                ns_fd, fn, fut = item
                if self._broken is not None:
                    fut.set_exception(RuntimeError(self._broken))
                    continue
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    if ns_fd == _NEW_NETNS:
                        _unshare_netns()
                    else:
                        _setns(ns_fd)
                except BaseException as exc:
                    fut.set_exception(exc)
                    continue
                try:
                    result = fn()
                except BaseException as exc:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
                finally:
                    try:
                        _setns(home_fd)
                        if _ns_ino("/proc/thread-self/ns/net") != home_id:
                            raise OSError("namespace check after setns back failed")
                    except OSError as exc:  # never run another job in the wrong namespace
                        self._broken = f"netns worker could not return to its home namespace: {exc}"
        finally:
            os.close(home_fd)

    def run(self, ns: Netns, fn: Callable[[], T]) -> T:
        """Run ``fn`` inside ``ns`` on the worker thread; return its result."""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        fut: Future[T] = Future()
        self._jobs.put((ns.fd, fn, fut))
        return fut.result()

    def run_in_new(self, fn: Callable[[], T]) -> tuple[Netns, T]:
        """Run ``fn`` inside a NEW anonymous namespace; return a handle on it and the result.

        The namespace has no name anywhere: it lives exactly as long as the returned
        handle (and any socket ``fn`` made in it) stays open, so it cannot be leaked
        by a crash — the scratch space for probes.
        """
        if self._broken is not None:
            raise RuntimeError(self._broken)

        def job() -> tuple[Netns, T]:
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(fd)
            ns = Netns(None, f"anonymous netns {st.st_ino}", fd, (st.st_dev, st.st_ino))
            try:
                return ns, fn()
            except BaseException:
                ns.close()
                raise

        fut: Future[tuple[Netns, T]] = Future()
        self._jobs.put((_NEW_NETNS, job, fut))
        return fut.result()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)


class NlSocket:
    """A synchronous rtnetlink socket bound to one namespace.

    :meth:`request` sends one message and waits for its ACK (raising
    :class:`NetlinkError` with the kernel's extended-ack text); :meth:`dump` and
    :meth:`get` return raw message bytes ``(type, bytes)`` for the caller to decode.
    A message is either the body bytes after the netlink header (see the encoders
    below) or a pyroute2 message object.

    One request at a time, whatever the thread: a request holds the socket from its send to
    its last reply. Two threads on one socket (a namespace read ahead of its attach beside
    the reconcile, tried in acfaca2) each skipped the other's replies as stale, and one
    waited for its own until the timeout.
    """

    def __init__(self, sock: socket.socket, label: str) -> None:
        self.sock = sock
        self.label = label
        self._seq = 0
        self._lock = threading.Lock()
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)  # dumps honour filters (addresses by ifindex)
        sock.settimeout(30.0)
        sock.bind((0, 0))
        self.pid = sock.getsockname()[0]

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _send(self, msg_type: int, flags: int, msg: bytes | nlmsg) -> int:
        seq = self._next_seq()
        if isinstance(msg, bytes):
            self.sock.send(_HDR.pack(_HDR.size + len(msg), msg_type, flags, seq, self.pid) + msg)
            return seq
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = seq
        msg["header"]["pid"] = self.pid
        msg.reset()
        msg.encode()
        self.sock.send(msg.data)
        return seq

    def _replies(self, seq: int, what: str) -> Iterator[tuple[int, bytes]]:
        """Yield ``(type, message bytes)`` for ``seq`` until DONE/ACK; raise on error."""
        while True:
            buf, mv = _recv_buffer()
            n = self.sock.recv_into(buf)
            view = bytes(mv[:n])
            off = 0
            while off + 16 <= n:
                length, mtype, flags, mseq, _pid = _HDR.unpack_from(view, off)
                if length < 16:
                    raise NetlinkError(errno_mod.EIO, "malformed netlink message", what=what)
                if mseq != seq:  # a late reply to an earlier request that timed out: skip
                    off += (length + 3) & ~3
                    continue
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", view, off + 16)
                    if code == 0:
                        return
                    raise NetlinkError(-code, ext_ack_message(view, off, length, flags), what=what)
                if mtype == NLMSG_DONE:
                    (code,) = struct.unpack_from("=i", view, off + 16) if length >= 20 else (0,)
                    if code < 0:
                        raise NetlinkError(-code, ext_ack_message(view, off, length, flags), what=what)
                    return
                yield mtype, view[off:off + length]
                off += (length + 3) & ~3

    def request(self, msg_type: int, flags: int, msg: bytes | nlmsg, what: str = "", *,
                echo: bool = False) -> list[tuple[int, bytes]]:
        """Send a state-changing request and wait for the kernel's ACK. ``echo``
        (``NLM_F_ECHO``): the kernel also returns what it made (a new link's message, its
        index in it) before the ACK, sparing a lookup after it; returned."""
        with self._lock:
            seq = self._send(msg_type, flags | NLM_F_REQUEST | NLM_F_ACK | (NLM_F_ECHO if echo else 0), msg)
            return list(self._replies(seq, what))

    def dump(self, msg_type: int, msg: bytes | nlmsg, what: str = "") -> list[tuple[int, bytes]]:
        with self._lock:
            seq = self._send(msg_type, NLM_F_REQUEST | NLM_F_DUMP, msg)
            return list(self._replies(seq, what))

    def get(self, msg_type: int, msg: bytes | nlmsg, what: str = "") -> list[tuple[int, bytes]]:
        with self._lock:
            seq = self._send(msg_type, NLM_F_REQUEST | NLM_F_ACK, msg)
            return list(self._replies(seq, what))

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- encoders
# The hot requests (veth, address, route, link set/get/delete, dumps) are built with
# struct: pyroute2's generic encoder takes ~180 µs for a veth request and ~45 µs for an
# address here, a third of an attach; these take a few µs. pyroute2 message objects
# are still accepted (the probe uses them for its assorted link kinds).

_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NLA = struct.Struct("=HH")


def nla(atype: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = _NLA.size + len(payload)
    return _NLA.pack(length, atype) + payload + b"\0" * (-length % 4)


def nla_str(atype: int, value: str) -> bytes:
    return nla(atype, value.encode() + b"\0")


def nla_u32(atype: int, value: int) -> bytes:
    return nla(atype, struct.pack("=I", value))


def nla_mac(atype: int, mac: str) -> bytes:
    return nla(atype, bytes.fromhex(mac.replace(":", "")))


def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0, family: int = 0) -> bytes:
    return _IFINFOMSG.pack(family, 0, index, flags, change)


def ifaddrmsg(family: int = 0, prefixlen: int = 0, flags: int = 0, scope: int = 0, index: int = 0) -> bytes:
    return _IFADDRMSG.pack(family, prefixlen, flags, scope, index)


def rtmsg(family: int = 0, dst_len: int = 0, table: int = 0, proto: int = 0, scope: int = 0, rtype: int = 0) -> bytes:
    return _RTMSG.pack(family, dst_len, 0, 0, table, proto, scope, rtype, 0)


def ext_ack_message(view: bytes, off: int, length: int, flags: int) -> str:
    if not flags & NLM_F_ACK_TLVS:
        return ""
    # error header: nlmsghdr(16) + error(4) + the original header (capped) or whole request
    (orig_len,) = struct.unpack_from("=I", view, off + 20)
    pos = off + 20 + (16 if flags & NLM_F_CAPPED else orig_len)
    pos = (pos + 3) & ~3
    end = off + length
    while pos + 4 <= end:
        alen, atype = struct.unpack_from("=HH", view, pos)
        if alen < 4:
            break
        if atype & 0x3FFF == NLMSGERR_ATTR_MSG:
            return view[pos + 4:pos + alen].split(b"\0", 1)[0].decode(errors="replace")
        pos += (alen + 3) & ~3
    return ""


@dataclass
class _Entry:
    ns: Netns
    sock: NlSocket


@dataclass
class NsContext:
    """Namespace handles and their netlink sockets, cached (bounded LRU).

    ``sock(ref)`` returns the socket for a namespace (``None`` = this process's
    namespace as it was when the context was made). Every socket is checked to live
    in the namespace asked for. Entries whose namespace vanished or was replaced are
    dropped on access and by :meth:`prune`.

    A named namespace's path is checked to still name it (a ``stat``) at every access,
    or, inside :meth:`one_pass` on the calling thread, at its first access of the pass.
    """

    max_entries: int = 1024
    worker: NsWorker = field(default_factory=NsWorker)
    _entries: OrderedDict[str | None, _Entry] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pass: threading.local = field(default_factory=threading.local)
    sockets_opened: int = 0
    _home_fds: list[int] = field(default_factory=list)  # threads' own namespaces (_open_here)
    _home_ident: tuple[int, int] | None = None

    @contextmanager
    def one_pass(self) -> Iterator[None]:
        """Within, on this thread, each namespace's name is checked once (its first access),
        not at every request. An attach's reconcile reached its container's namespace ~15
        times, and each ``stat`` of ``/run/netns/<name>`` gave the GIL up to the worker's
        other threads: ~0.3 ms of the attach in ``cProfile`` (docs/dataplane.md, "The last
        runs on main (5 Dec 02:50-03:17 UTC)"). A namespace deleted and made again under
        the same name within the pass is written in its old instance until the pass ends
        (the next reconcile finds the new one); a check at every access had that window
        between the check and the request too. Nested passes are one pass."""
        if getattr(self._pass, "checked", None) is not None:
            yield
            return
        self._pass.checked = set()
        try:
            yield
        finally:
            self._pass.checked = None

    def netns(self, ref: str | None) -> Netns:
        return self._entry(ref).ns

    def sock(self, ref: str | None) -> NlSocket:
        return self._entry(ref).sock

    def exists(self, ref: str | None) -> bool:
        if ref is None:
            return True
        try:
            self._entry(ref)
        except NamespaceGone:
            return False
        return True

    def _entry(self, ref: str | None) -> _Entry:
        checked: set[str | None] | None = getattr(self._pass, "checked", None)
        with self._lock:
            e = self._entries.get(ref)
            if e is not None:
                if checked is not None and ref in checked:
                    return e
                if e.ns.still_there():
                    self._entries.move_to_end(ref)
                    if checked is not None:
                        checked.add(ref)
                    return e
                self._drop(ref)
            ns = Netns.open(ref)
            try:
                sock = self._open_socket(ns)
            except BaseException:
                ns.close()
                raise
            e = _Entry(ns, sock)
            self._entries[ref] = e
            if checked is not None:
                checked.add(ref)
            while len(self._entries) > self.max_entries:
                old = next(iter(self._entries))
                self._drop(old)
            return e

    def _open_socket(self, ns: Netns) -> NlSocket:
        raw = self._open_here(ns) if getattr(self._pass, "checked", None) is not None else None
        if raw is None:
            raw = self.worker.run(ns, _new_socket)
        try:
            check_socket_netns(raw, ns)
            sock = NlSocket(raw, ns.path)
        except BaseException:
            raw.close()
            raise
        self.sockets_opened += 1
        return sock

    def _open_here(self, ns: Netns) -> socket.socket | None:
        """Inside a pass, the calling thread makes the socket itself: ``setns`` into ``ns``,
        ``socket``, ``setns`` back, checked, as the worker thread does; ``None`` (the worker
        makes it) when this thread ever failed to come back or does not start home.

        A reconcile's first request to a new container namespace handed the socket's making
        to the worker thread and waited for it: 0.17 ms median of an attach's 1.6 ms
        reconcile run alone (200 attaches, 5 Dec), most of it the two thread wake-ups; made
        here, 0.05 ms. The pass's thread is the node's kernel thread, whose
        namespace nothing else reads: the sockets it uses are made for a namespace, sysctls
        and libnftables go through worker threads. Should it fail to come back, it refuses
        to try again and every later socket is the worker's."""
        here = self._pass
        if getattr(here, "broken", False):
            return None
        home: tuple[int, tuple[int, int]] | None = getattr(here, "home", None)
        if home is None:
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._process_ns():
                os.close(fd)  # a thread moved by someone else: not ours to move
                here.broken = True
                return None
            home = (fd, (st.st_dev, st.st_ino))
            here.home = home
            self._home_fds.append(fd)  # (under the context's lock: the caller, _entry, holds it)
        fd, ident = home
        _setns(ns.fd)
        try:
            return _new_socket()
        finally:
            try:
                _setns(fd)
                if _ns_ino("/proc/thread-self/ns/net") != ident:
                    raise OSError(errno_mod.EIO, "namespace check after setns back failed")
            except OSError as exc:
                here.broken = True
                raise RuntimeError(f"thread {threading.current_thread().name} could not return to its "
                                   f"namespace after opening a socket in {ns.path}: {exc}") from exc

    def _process_ns(self) -> tuple[int, int]:
        if self._home_ident is None:
            self._home_ident = _ns_ino("/proc/self/ns/net")
        return self._home_ident

    def run_in(self, ref: str | None, fn: Callable[[], T]) -> T:
        """Run ``fn`` with the worker thread inside namespace ``ref`` (sysctls)."""
        return self.worker.run(self.netns(ref), fn)

    def forget(self, ref: str | None) -> None:
        with self._lock:
            self._drop(ref)

    def _drop(self, ref: str | None) -> None:
        e = self._entries.pop(ref, None)
        if e is not None:
            e.sock.close()
            e.ns.close()

    def retain(self, refs: set[str | None]) -> int:
        """Close the sockets of namespaces not in ``refs``; returns how many."""
        with self._lock:
            drop = [r for r in self._entries if r not in refs]
            for r in drop:
                self._drop(r)
            return len(drop)

    def prune(self) -> int:
        """Close the sockets of namespaces that disappeared; returns how many."""
        with self._lock:
            gone = [r for r, e in self._entries.items() if not e.ns.still_there()]
            for r in gone:
                self._drop(r)
            return len(gone)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._lock:
            for r in list(self._entries):
                self._drop(r)
            fds, self._home_fds = self._home_fds, []
        for fd in fds:  # a thread that opens again after this gets the worker's sockets
            os.close(fd)
        self._pass = threading.local()
        self.worker.close()


def _new_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)


def check_socket_netns(sock: socket.socket, ns: Netns) -> None:
    """Raise unless ``sock`` lives in namespace ``ns`` (``ioctl(SIOCGSKNS)``)."""
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS, 0)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if (st.st_dev, st.st_ino) != ns.ident:
        raise RuntimeError(f"netlink socket opened for {ns.path} lives in another namespace; refusing to use it")


def read_sysctl(path: str) -> str:
    """Read ``/proc/sys/<path>`` in the calling thread's namespace."""
    with open(f"/proc/sys/{path}") as f:
        return f.read().strip()


def write_sysctl(path: str, value: str) -> None:
    """Write ``/proc/sys/<path>`` in the calling thread's namespace."""
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(value)
