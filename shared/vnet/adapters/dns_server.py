"""The DNS wire and sockets around :mod:`vnet.core.dns` (dnslib for the format, asyncio
for the serving).

::

    srv = DnsServer(answer=lambda src, qname, qtype: table.lookup(src, qname, qtype, upstream=up),
                    upstreams=["192.0.2.53"], host_netns="vt1-h1", ttl=5)
    await srv.listen(["10.1.0.1", "10.2.0.1"])   # UDP and TCP port 53 on each, inside the host namespace
    await srv.listen(["10.3.0.1"])                # adds; addresses already served are kept (never a gap)
    await srv.unlisten(["10.2.0.1"])
    await srv.close()

Sockets are created inside the host namespace by a namespace-bound thread (the
``nsctx`` worker) and then served from this event loop: a socket keeps the namespace
it was created in. ``IP_FREEBIND`` lets a socket bind a gateway address before the
node worker has put it on its bridge, so the resolver never waits for the data plane.
Forwarded queries leave from the host namespace too (a fresh socket per query: a
random source port each, no shared state to poison).

Bad input never raises out of here: a packet that does not parse as a DNS query is
answered FORMERR when its header can be read and dropped otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dnslib import AAAA, PTR, QTYPE, RCODE, RR, SRV, A, DNSError, DNSHeader, DNSRecord
from dnslib.dns import DNSBuffer
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from vnet.adapters.netlink.nsctx import Netns, NsWorker
from vnet.core.dns import Answer
from vnet.telemetry import tracing

log = logging.getLogger(__name__)

IP_FREEBIND = 15
IPV6_FREEBIND = 78
_QTYPES = {QTYPE.A: "A", QTYPE.AAAA: "AAAA", QTYPE.PTR: "PTR", QTYPE.SRV: "SRV", QTYPE.ANY: "ANY"}
AnswerFn = Callable[[str, str, str], Answer | Awaitable[Answer]]
# (rcode, seconds, trace id of the query's span when one was recorded)
ObserveFn = Callable[[str, float, str | None], None]


def _listen_socket(addr: str, port: int, kind: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            s.listen(128)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


@dataclass
class DnsCounters:
    queries: dict[str, int] = field(default_factory=dict)  # by rcode
    forwarded: int = 0
    cache_hits: int = 0
    forward_failures: int = 0
    malformed: int = 0


class _UdpPump:
    """One thread that serves every UDP socket: answer-cache hits are sent from here, the
    rest go to the event loop (``DnsServer.handle``) and are sent from there.

    Why a thread: almost every query is a cache hit, and asyncio's datagram path costs
    more than the answer (22 k q/s against aardvark-dns's 29 k with dnsperf as the
    client; with this pump the hit path is recvfrom, a dict lookup and sendto, and the
    event loop of the node worker is not woken at all). Sockets are non-blocking and
    drained until EAGAIN after each wake-up, a bounded batch per socket per round.
    """

    BATCH = 64

    def __init__(self, server: DnsServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ)
        self._cmds: list[tuple[str, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._hits: dict[str, int] = {}
        self._flushed = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="dns-udp", daemon=True)
        self.thread.start()

    def _command(self, op: str, sock: socket.socket) -> None:
        with self._lock:
            self._cmds.append((op, sock))
        self._wake_w.send(b"x")

    def add(self, sock: socket.socket) -> None:
        self._command("add", sock)

    def remove(self, sock: socket.socket) -> None:
        """Stop serving ``sock`` and close it (in the pump's thread: never under a select)."""
        self._command("remove", sock)

    def stop(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]  # sockets, registered by us
        self.sel.close()
        self._wake_w.close()

    def _run(self) -> None:
        cache = self.server._cache
        rcodes = DnsServer._cache_rcode
        while not self._stop:
            for key, _ in self.sel.select(0.2):
                # only sockets are registered (ours and the wake-up one); fileobj is typed as any file-like
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if sock is self._wake_r:
                    self._apply_commands()
                    continue
                for _ in range(self.BATCH):
                    try:
                        data, addr = sock.recvfrom(4096)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # e.g. ICMP unreachable of an earlier reply: nothing to read
                        break
                    hit = cache.get((str(addr[0]), data[2:])) if len(data) >= 12 else None
                    if hit is None:
                        self.loop.call_soon_threadsafe(self.server._udp_query, sock, data, addr)
                        continue
                    try:
                        sock.sendto(data[:2] + hit, addr)
                    except OSError:
                        continue
                    rc = rcodes.get(hit[1] & 0x0F, "NOERROR")
                    self._hits[rc] = self._hits.get(rc, 0) + 1
            if self._hits and time.monotonic() - self._flushed > 0.1:
                hits, self._hits = self._hits, {}
                self._flushed = time.monotonic()
                self.loop.call_soon_threadsafe(self.server._account_hits, hits)
        if self._hits:
            self.loop.call_soon_threadsafe(self.server._account_hits, self._hits)

    def _apply_commands(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            cmds, self._cmds = self._cmds, []
        for op, sock in cmds:
            if op == "add":
                self.sel.register(sock, selectors.EVENT_READ)
            else:
                try:
                    self.sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
                sock.close()


def _truncated(query: bytes, reply: bytes) -> bytes:
    try:
        q = DNSRecord.parse(query)
        r = q.reply()
        r.header.tc = 1
        return bytes(r.pack())
    except DNSError:
        return reply[:512]


class DnsServer:
    def __init__(self, answer: AnswerFn, *, upstreams: Iterable[str] = (), host_netns: str | None = None,
                 ttl: int = 5, forward_timeout: float = 2.0, port: int = 53,
                 observe: ObserveFn | None = None, trace_ratio: float = 0.0) -> None:
        self.answer = answer
        self.upstreams = list(upstreams)
        self.host_netns = host_netns
        self.ttl = ttl
        self.forward_timeout = forward_timeout
        self.port = port
        self.observe = observe
        # a span per query costs as much as answering it: only 1 in 1/trace_ratio gets one
        self.trace_ratio = trace_ratio
        self.counters = DnsCounters()
        self._ns: Netns | None = None
        self._worker: NsWorker | None = None
        self._listeners: dict[str, tuple[socket.socket, asyncio.Server]] = {}
        self._pump: _UdpPump | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # (querier, query without its id) -> reply without its id; cleared whenever the
        # table may have changed (clear_cache), so a hit is never older than the table
        self._cache: dict[tuple[str, bytes], bytes] = {}
        self.cache_limit = 65536

    # -- the answer cache ----------------------------------------------------------------
    def cached(self, data: bytes, src: str) -> bytes | None:
        """The reply to a query answered before for this querier, under this table (or None)."""
        hit = self._cache.get((src, data[2:]))
        if hit is None or len(data) < 12:
            return None
        self.counters.cache_hits += 1
        rcode = self._cache_rcode.get(hit[1] & 0x0F, "NOERROR")
        self.counters.queries[rcode] = self.counters.queries.get(rcode, 0) + 1
        if self.observe is not None:
            self.observe(rcode, 0.0, None)
        return data[:2] + hit

    _cache_rcode = {0: "NOERROR", 3: "NXDOMAIN", 5: "REFUSED"}

    def clear_cache(self) -> None:
        self._cache.clear()

    def _remember(self, data: bytes, src: str, reply: bytes) -> None:
        if len(self._cache) >= self.cache_limit:
            self._cache.clear()
        self._cache[(src, data[2:])] = reply[2:]

    # -- sockets -------------------------------------------------------------------------
    def _in_host(self, fn: Callable[[], Any]) -> Any:
        if self._worker is None:
            self._worker = NsWorker()
            self._ns = Netns.open(self.host_netns)
        assert self._ns is not None
        return self._worker.run(self._ns, fn)

    async def listen(self, addresses: Iterable[str]) -> list[str]:
        """Serve these addresses too (UDP and TCP); the errors of those that failed, each named."""
        loop = asyncio.get_running_loop()
        errors = []
        for addr in addresses:
            if addr in self._listeners:
                continue
            def make(a: str = addr) -> tuple[socket.socket, socket.socket]:
                udp = _listen_socket(a, self.port, socket.SOCK_DGRAM)
                try:
                    return udp, _listen_socket(a, self.port, socket.SOCK_STREAM)
                except BaseException:
                    udp.close()
                    raise

            try:
                udp, tcp = await asyncio.to_thread(self._in_host, make)
            except OSError as exc:
                errors.append(f"{addr}:{self.port}: {exc.strerror or exc}")
                continue
            if self._pump is None:
                self._pump = _UdpPump(self, loop)
            self._pump.add(udp)
            server = await asyncio.start_server(self._tcp_client, sock=tcp)
            self._listeners[addr] = (udp, server)
        return errors

    async def unlisten(self, addresses: Iterable[str]) -> None:
        for addr in addresses:
            pair = self._listeners.pop(addr, None)
            if pair is not None:
                if self._pump is not None:
                    self._pump.remove(pair[0])
                pair[1].close()

    def listening(self) -> list[str]:
        return sorted(self._listeners)

    async def close(self) -> None:
        await self.unlisten(list(self._listeners))
        if self._pump is not None:
            await asyncio.to_thread(self._pump.stop)
            self._pump = None
        for t in list(self._tasks):
            t.cancel()
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._ns is not None:
            self._ns.close()
            self._ns = None

    def _udp_query(self, sock: socket.socket, data: bytes, addr: Any) -> None:
        self._spawn(self._udp_answer(sock, data, addr))

    async def _udp_answer(self, sock: socket.socket, data: bytes, addr: Any) -> None:
        reply = await self.handle(data, str(addr[0]))
        if reply is None or sock.fileno() < 0:
            return
        if len(reply) > 512:  # classic UDP limit without EDNS: truncate, the client retries on TCP
            reply = _truncated(data, reply)
        try:
            sock.sendto(reply, addr)
        except OSError:  # a full send buffer or a closed socket: the client retries
            pass

    def _account_hits(self, hits: dict[str, int]) -> None:
        """Cache hits the UDP pump answered (counted here, on the loop, with the rest)."""
        self.counters.cache_hits += sum(hits.values())
        for rcode, n in hits.items():
            self.counters.queries[rcode] = self.counters.queries.get(rcode, 0) + n
            if self.observe is not None:
                for _ in range(n):
                    self.observe(rcode, 0.0, None)

    def _spawn(self, coro: Awaitable[None]) -> None:
        t: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), 10)
                data = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", head)[0]), 10)
                reply = await self.handle(data, str(peer[0]))
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    # -- answers -------------------------------------------------------------------------
    async def handle(self, data: bytes, src: str) -> bytes | None:
        """The reply to one query from ``src`` (None: drop it)."""
        hit = self.cached(data, src)
        if hit is not None:
            return hit
        if self.trace_ratio and random.random() < self.trace_ratio:
            with tracing.tracer().start_as_current_span("dns.query", kind=SpanKind.SERVER,
                                                        attributes={"dns.querier": src}) as span:
                return await self._handle(data, src, span)
        return await self._handle(data, src, None)

    async def _handle(self, data: bytes, src: str, span: Span | None) -> bytes | None:
        t0 = time.perf_counter()
        rcode = "FORMERR"
        try:
            try:
                q = DNSRecord.parse(data)
            except (DNSError, struct.error, IndexError, ValueError, UnicodeError):
                self.counters.malformed += 1
                return _formerr(data)
            if q.header.qr or len(q.questions) != 1:
                self.counters.malformed += 1
                return _formerr(data)
            question = q.questions[0]
            qname = str(question.qname)
            qtype = _QTYPES.get(question.qtype, "OTHER")
            if span is not None:
                span.set_attribute("dns.question.name", qname)
                span.set_attribute("dns.question.type", qtype)
            ans = self.answer(src, qname, qtype if qtype != "OTHER" else "ANY")
            if not isinstance(ans, Answer):
                ans = await ans
            if ans.rcode == "FORWARD":
                fwd = await self._forward(data)
                rcode = "FORWARDED" if fwd is not None else "SERVFAIL"
                return fwd if fwd is not None else _reply(q, RCODE.SERVFAIL)
            rcode = ans.rcode
            r = q.reply()
            r.header.ra = 1
            if ans.rcode == "NXDOMAIN":
                r.header.rcode = RCODE.NXDOMAIN
            elif ans.rcode == "REFUSED":
                r.header.rcode = RCODE.REFUSED
            elif qtype != "OTHER":
                for a in ans.addresses:
                    rd = AAAA(a) if ":" in a else A(a)
                    r.add_answer(RR(question.qname, QTYPE.AAAA if ":" in a else QTYPE.A, rdata=rd, ttl=self.ttl))
                for n in ans.names:
                    r.add_answer(RR(question.qname, QTYPE.PTR, rdata=PTR(n + "."), ttl=self.ttl))
                for port, target, addrs in ans.srv:  # targets' addresses: the additional section
                    r.add_answer(RR(question.qname, QTYPE.SRV, rdata=SRV(0, 0, port, target + "."), ttl=self.ttl))
                    for a in addrs:
                        r.add_ar(RR(target + ".", QTYPE.AAAA if ":" in a else QTYPE.A,
                                    rdata=AAAA(a) if ":" in a else A(a), ttl=self.ttl))
            out = bytes(r.pack())
            if ans.cacheable:
                self._remember(data, src, out)
            return out
        except Exception:  # one bad query never takes the resolver down
            log.exception("dns: answering a query from %s failed", src)
            rcode = "SERVFAIL"
            try:
                return _reply(DNSRecord.parse(data), RCODE.SERVFAIL)
            except Exception:
                return None
        finally:
            self.counters.queries[rcode] = self.counters.queries.get(rcode, 0) + 1
            trace_id = None
            if span is not None:
                span.set_attribute("dns.response.rcode", rcode)
                if rcode in ("SERVFAIL", "FORMERR"):
                    span.set_status(Status(StatusCode.ERROR, rcode))
                trace_id = tracing.trace_id_hex(span) if span.is_recording() else None
            if self.observe is not None:
                self.observe(rcode, time.perf_counter() - t0, trace_id)

    async def _forward(self, data: bytes) -> bytes | None:
        """Ask the upstreams in turn (UDP from the host namespace); the first answer wins."""
        loop = asyncio.get_running_loop()
        for up in self.upstreams:
            fam = socket.AF_INET6 if ":" in up else socket.AF_INET
            def make(f: int = fam) -> socket.socket:
                return socket.socket(f, socket.SOCK_DGRAM)

            try:
                s = await asyncio.to_thread(self._in_host, make)
            except OSError:
                continue
            try:
                s.setblocking(False)
                await loop.sock_sendto(s, data, (up, 53))
                reply, _ = await asyncio.wait_for(loop.sock_recvfrom(s, 65535), self.forward_timeout)
                if reply[:2] == data[:2]:
                    self.counters.forwarded += 1
                    return reply
            except (OSError, TimeoutError):
                continue
            finally:
                s.close()
        self.counters.forward_failures += 1
        return None


def _reply(q: DNSRecord, rcode: int) -> bytes:
    r = q.reply()
    r.header.rcode = rcode
    return bytes(r.pack())


def _formerr(data: bytes) -> bytes | None:
    """FORMERR with the query's id when 12 header bytes are there; otherwise nothing."""
    if len(data) < 12:
        return None
    try:
        h = DNSHeader.parse(DNSBuffer(data))
    except Exception:
        return None
    out = DNSRecord(DNSHeader(id=h.id, qr=1, ra=1, rcode=RCODE.FORMERR))
    return bytes(out.pack())
