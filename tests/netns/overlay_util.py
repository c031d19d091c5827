"""Shared helpers for the multi-host kernel tests: an underlay between host namespaces,
TCP/UDP probes through sockets made inside namespaces, pcap reading.

Everything lives in namespaces made by the ``netns`` fixture; addresses
(10.250.0.0/24 underlay, 10.251.0.0/24 WireGuard mesh, the overlay subnets) exist
only inside them.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Callable

from tests.netns.conftest import ip
from vnet.adapters.netlink.nsctx import Netns, NsWorker

UNDERLAY_IF = "ul0"


def underlay_addr(k: int) -> str:
    return f"10.250.0.{k}"


def build_underlay(netns: Callable[[str], str], name: str = "ul") -> str:
    """The underlay switch: a namespace with a bridge; hosts are plugged in by :func:`plug`."""
    ul = netns(name)
    ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0", ns=ul)  # no IGMP queries of its own
    no_ipv6(ul, "br0")
    ip("link", "set", "br0", "up", ns=ul)
    return ul


def no_ipv6(ns: str, ifname: str) -> None:
    """IPv6 off on an underlay interface (inside the test's namespace): no link-local
    ND/MLD chatter, so captures hold only what the data plane sends."""
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"],
                   check=True, capture_output=True)


def plug(ul: str, host: str, k: int) -> str:
    """Connect ``host`` to the underlay as 10.250.0.<k>/24 on its ``ul0``; returns the
    switch-side port name (where captures are taken)."""
    port = f"u{k}"
    ip("link", "add", port, "type", "veth", "peer", "name", UNDERLAY_IF, "netns", host, ns=ul)
    no_ipv6(ul, port)
    no_ipv6(host, UNDERLAY_IF)
    ip("link", "set", port, "master", "br0", "up", ns=ul)
    ip("addr", "add", f"{underlay_addr(k)}/24", "dev", UNDERLAY_IF, ns=host)
    ip("link", "set", UNDERLAY_IF, "up", ns=host)
    return port


class Flow:
    """One established TCP connection between two namespaces, to show that a flow survives
    what happens meanwhile (a worker stopped, killed, restarted)."""

    def __init__(self, cli: socket.socket, srv: socket.socket, conn: socket.socket) -> None:
        self.cli, self.srv, self.conn = cli, srv, conn

    def roundtrip(self, i: int) -> bool:
        msg = f"msg-{i}".encode()
        self.cli.sendall(msg)
        got = self.conn.recv(64)
        self.conn.sendall(got)
        return self.cli.recv(64) == msg

    def close(self) -> None:
        for s in (self.conn, self.cli, self.srv):
            s.close()


class Sockets:
    """Sockets created inside namespaces by a dedicated NsWorker thread (never this
    thread's namespace); sends/receives then run from the test thread."""

    def __init__(self) -> None:
        self.worker = NsWorker()

    def make(self, ns: str, kind: int) -> socket.socket:
        h = Netns.open(ns)
        try:
            return self.worker.run(h, lambda: socket.socket(socket.AF_INET, kind))
        finally:
            h.close()

    def flow(self, src: str, dst: str, dst_ip: str, port: int, timeout: float = 30) -> Flow:
        """Connect ``src`` to a listener in ``dst`` (blocking: call it from a thread). The
        timeout is generous: a connect that merely waits for a busy machine is no "no path"."""
        srv = self.make(dst, socket.SOCK_STREAM)
        cli = self.make(src, socket.SOCK_STREAM)
        try:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("0.0.0.0", port))
            srv.listen(1)
            srv.settimeout(timeout)
            cli.settimeout(timeout)
            cli.connect((dst_ip, port))
            conn, _ = srv.accept()
        except BaseException:
            srv.close()
            cli.close()
            raise
        conn.settimeout(timeout)
        return Flow(cli, srv, conn)

    def tcp(self, src: str, dst: str, dst_ip: str, port: int = 7001, payload: bytes = b"hello-tcp") -> bool:
        try:
            f = self.flow(src, dst, dst_ip, port, timeout=15)
        except OSError:
            return False
        try:
            f.cli.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = f.conn.recv(len(payload) - len(got))
                if not chunk:
                    break
                got += chunk
            f.conn.sendall(got)
            back = f.cli.recv(len(payload))
            return got == payload and back == payload[:len(back)] and len(back) > 0
        except OSError:
            return False
        finally:
            f.close()

    def udp(self, src: str, dst: str, dst_ip: str, port: int = 7002, payload: bytes = b"hello-udp",
            tries: int = 3) -> bool:
        srv = self.make(dst, socket.SOCK_DGRAM)
        cli = self.make(src, socket.SOCK_DGRAM)
        try:
            srv.bind(("0.0.0.0", port))
            srv.settimeout(3)
            cli.settimeout(3)
            for _ in range(tries):
                try:
                    cli.sendto(payload, (dst_ip, port))
                    data, addr = srv.recvfrom(2048)
                    srv.sendto(data, addr)
                    if cli.recv(2048) == payload:
                        return True
                except OSError:
                    continue
            return False
        finally:
            srv.close()
            cli.close()

    def send_udp(self, src: str, dst_ip: str, payload: bytes, port: int = 7003, count: int = 5) -> None:
        """Fire-and-forget datagrams (the capture tests' marker)."""
        cli = self.make(src, socket.SOCK_DGRAM)
        try:
            for _ in range(count):
                try:
                    cli.sendto(payload, (dst_ip, port))
                except OSError:
                    pass
        finally:
            cli.close()

    def close(self) -> None:
        self.worker.close()


def pcap_packets(data: bytes) -> list[bytes]:
    """Frames of a classic pcap file (Ethernet link type)."""
    if len(data) < 24:
        return []
    magic = struct.unpack_from("<I", data, 0)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    off = 24
    out: list[bytes] = []
    while off + 16 <= len(data):
        _s, _us, incl, _orig = struct.unpack_from(endian + "IIII", data, off)
        off += 16
        out.append(data[off:off + incl])
        off += incl
    return out


def classify_frame(frame: bytes) -> tuple[str, int, int]:
    """``("arp"|"udp"|"tcp"|"icmp"|"ip<n>"|"other", sport, dport)`` of an Ethernet frame."""
    if len(frame) < 14:
        return "other", 0, 0
    (etype,) = struct.unpack_from("!H", frame, 12)
    if etype == 0x0806:
        return "arp", 0, 0
    if etype == 0x86DD:
        return "ipv6", 0, 0
    if etype != 0x0800 or len(frame) < 34:
        return "other", 0, 0
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    if proto in (6, 17) and len(frame) >= 14 + ihl + 4:
        sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
        return ("udp" if proto == 17 else "tcp"), sport, dport
    if proto == 2:  # IGMP membership reports of the underlay interfaces themselves (not overlay traffic)
        return "igmp", 0, 0
    return ("icmp" if proto == 1 else f"ip{proto}"), 0, 0


def ipv4_src(frame: bytes) -> str:
    """The IPv4 source address of an Ethernet frame ("" when not IPv4)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return ""
    return socket.inet_ntoa(frame[26:30])
