"""The encrypted overlay on a real kernel: VXLAN over a wireguard-go mesh between two
host namespaces.

Each host's reconciler generates its key pair into a prefixed temporary directory
(0600); only the public keys go into the other host's desired state. wireguard-go runs
inside each host namespace (started by the reconciler through ``nsenter``, stopped at
the end; the ``netns`` fixture kills anything left in the namespaces). Captures are
taken with tcpdump on the underlay switch's port of host 1, inside the underlay
namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from tests.conftest import requires_root
from tests.netns.conftest import links, ping_all
from tests.netns.overlay_util import (
    UNDERLAY_IF,
    Sockets,
    build_underlay,
    classify_frame,
    ipv4_src,
    pcap_packets,
    plug,
    underlay_addr,
)
from vnet.core import naming
from vnet.core.dataplane_model import (
    EpDesired,
    NetDesired,
    NodeDesired,
    PeerHost,
    ReconcileResult,
    RemoteEndpoint,
    Underlay,
)
from vnet.core.model import DriverType
from vnet.svc.node.reconcile import Reconciler

pytestmark = [pytest.mark.netns, requires_root,
              pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg") is None
                                 or shutil.which("tcpdump") is None,
                                 reason="needs wireguard-go, wireguard-tools and tcpdump (ops/scripts/bootstrap.sh)")]

NET_ID = "ov-enc"
VXLAN = naming.vxlan_name(NET_ID)
MARKER = b"VNET-PLAINTEXT-MARKER-7f3a9c"
WG_PORT = 51820


def wg_addr(k: int) -> str:
    return f"10.251.0.{k}"


def ep_for(k: int, i: int, ns: str) -> EpDesired:
    return EpDesired(id=f"h{k}-e{i}", network_id=NET_ID, netns=ns, mac=naming.local_mac(bytes([2, 0x78, 0, 0, k, i])),
                     ipv4=f"10.78.0.{k * 20 + i + 10}/24", gw4="10.78.0.1")


def ip_of(e: EpDesired) -> str:
    assert e.ipv4 is not None
    return e.ipv4.split("/")[0]


class EncHost:
    def __init__(self, k: int, ns: str, rec: Reconciler, wg_if: str, eps: list[EpDesired]) -> None:
        self.k, self.ns, self.rec, self.wg_if, self.eps = k, ns, rec, wg_if, eps
        self.pub = rec.wg_public_key(wg_if)

    def underlay(self) -> Underlay:
        return Underlay(address=underlay_addr(self.k), ifname=UNDERLAY_IF, wg_address=f"{wg_addr(self.k)}/24",
                        wg_ifname=self.wg_if, wg_port=WG_PORT)


def desired_for(h: EncHost, hosts: list[EncHost]) -> NodeDesired:
    others = [o for o in hosts if o is not h]
    net = NetDesired(id=NET_ID, driver=DriverType.OVERLAY, vni=4343, encrypted=True, gateway4="10.78.0.1/24",
                     mtu=1370, remotes=tuple(RemoteEndpoint(mac=e.mac, ipv4=e.ipv4, host=f"h{o.k}")
                                             for o in others for e in o.eps))
    return NodeDesired(networks=[net], endpoints=list(h.eps), underlay=h.underlay(),
                       peers=[PeerHost(name=f"h{o.k}", address=underlay_addr(o.k), wg_public_key=o.pub,
                                       wg_address=wg_addr(o.k), wg_port=WG_PORT) for o in others])


def ok(r: ReconcileResult) -> None:
    assert r.errors == [], r.errors
    assert all(s.state == "ready" for s in r.endpoints.values()), r.endpoints


def assert_only_wireguard(frames: list[bytes], *, need_some: bool) -> None:
    """Every IP frame on the underlay is WireGuard UDP; besides that only the underlay
    hosts' own ARP and IGMP (from their 10.250.0.x addresses) — nothing of the overlay."""
    other = []
    wg = 0
    for f in frames:
        kind, sport, dport = classify_frame(f)
        if kind == "udp" and WG_PORT in (sport, dport):
            wg += 1
        elif kind == "arp" or (kind == "igmp" and ipv4_src(f).startswith("10.250.0.")):
            continue
        else:
            other.append((kind, sport, dport, ipv4_src(f)))
    assert other == [], other
    assert wg > 0 or not need_some


class Capture:
    """tcpdump on an interface of the underlay namespace, to a prefixed file."""

    def __init__(self, ns: str, ifname: str, path: Path) -> None:
        self.path = path
        self.err = ""
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "--immediate-mode", "-i", ifname, "-n",
                                      "-U", "-s", "0", "-w", str(path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (path.exists() and path.stat().st_size >= 24):
            time.sleep(0.02)
        time.sleep(0.1)

    def stop(self) -> list[bytes]:
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        frames = pcap_packets(self.path.read_bytes())
        assert "captured" in err, err
        self.err = err
        return frames


@pytest.fixture
def pair(netns: Callable[[str], str], run_prefix: str, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[list[EncHost], str, dict[int, str], Path]]:
    ul = build_underlay(netns)
    state = Path(tmp_path_factory.mktemp(f"{run_prefix}-wg"))
    hosts: list[EncHost] = []
    ports: dict[int, str] = {}
    try:
        for k in (1, 2):
            hns = netns(f"h{k}")
            ports[k] = plug(ul, hns, k)
            rec = Reconciler(hns, state_dir=state / f"h{k}")
            eps = [ep_for(k, i, netns(f"h{k}c{i}")) for i in range(2)]
            hosts.append(EncHost(k, hns, rec, f"{run_prefix}w{k}"[:15], eps))
        yield hosts, ul, ports, state
    finally:
        for h in hosts:
            h.rec.stop_wireguard()
            h.rec.close()
        shutil.rmtree(state, ignore_errors=True)


def test_encrypted_overlay_reachable_nothing_in_clear_and_fails_closed(
        pair: tuple[list[EncHost], str, dict[int, str], Path]) -> None:
    hosts, ul, ports, state = pair
    h1, h2 = hosts
    # keys: generated on the node, private key 0600 in the node's state dir, only public keys exchanged
    for h in hosts:
        key = h.rec.wireguard.key_path(h.wg_if)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_text().strip() != h.pub and len(h.pub) == 44
    for h in hosts:
        ok(h.rec.reconcile(desired_for(h, hosts)))
    for h in hosts:  # wireguard-go runs inside the host namespace, the VXLAN device is bound to its interface
        pids = subprocess.run(["ip", "netns", "pids", h.ns], capture_output=True, text=True).stdout.split()
        assert str(h.rec.wireguard.pids()[h.wg_if]) in pids
        data = links(h.ns)[VXLAN]["linkinfo"]["info_data"]
        assert data["link"] == h.wg_if and data["local"] == wg_addr(h.k)
    pairs = [(a.netns, ip_of(b)) for a in h1.eps for b in h2.eps] + [(b.netns, ip_of(a)) for a in h1.eps
                                                                      for b in h2.eps]
    deadline = time.monotonic() + 30  # the first handshake (a busy machine may take a while)
    while ping_all(pairs[:1]) and time.monotonic() < deadline:
        pass
    assert ping_all(pairs) == []
    # converged: no kernel write, no wg write
    for h in hosts:
        assert h.rec.reconcile(desired_for(h, hosts)).writes == 0

    socks = Sockets()
    try:
        assert socks.tcp(h1.eps[0].netns, h2.eps[0].netns, ip_of(h2.eps[0]), payload=MARKER)
        assert socks.udp(h2.eps[1].netns, h1.eps[1].netns, ip_of(h1.eps[1]), payload=MARKER)

        # a capture on the underlay during marker traffic: only WireGuard UDP, no marker
        cap = Capture(ul, ports[1], state / f"{os.environ['VNET_RUN_PREFIX']}-enc.pcap")
        socks.send_udp(h1.eps[0].netns, ip_of(h2.eps[0]), MARKER * 8)
        assert socks.tcp(h1.eps[1].netns, h2.eps[1].netns, ip_of(h2.eps[1]), port=7011, payload=MARKER * 4)
        assert ping_all([(h1.eps[0].netns, ip_of(h2.eps[1]))]) == []
        frames = cap.stop()
        assert frames, cap.err
        assert not any(MARKER in f for f in frames), "plaintext marker on the underlay"
        assert_only_wireguard(frames, need_some=True)

        # tunnel down (wireguard-go of host 1 killed): the kernel removes the VXLAN device
        # bound to it; nothing of the network crosses in clear
        h1.rec.wireguard.stop(h1.wg_if)
        deadline = time.monotonic() + 30
        while VXLAN in links(h1.ns) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert VXLAN not in links(h1.ns)
        cap = Capture(ul, ports[1], state / f"{os.environ['VNET_RUN_PREFIX']}-down.pcap")
        socks.send_udp(h1.eps[0].netns, ip_of(h2.eps[0]), MARKER * 8)
        assert ping_all([(h1.eps[0].netns, ip_of(h2.eps[0]))]) != []
        frames = cap.stop()
        assert not any(MARKER in f for f in frames)
        assert_only_wireguard(frames, need_some=False)
        assert not any(classify_frame(f)[0] == "udp" and 4789 in classify_frame(f)[1:] for f in frames)

        # the next reconcile restarts the tunnel and the network comes back
        ok(h1.rec.reconcile(desired_for(h1, hosts)))
        deadline = time.monotonic() + 30
        while ping_all(pairs[:1]) and time.monotonic() < deadline:
            pass
        assert ping_all(pairs) == []
    finally:
        socks.close()
    # teardown removes the VXLAN devices; the tunnel itself is stopped by its owner
    for h in hosts:
        ok(h.rec.reconcile(NodeDesired(underlay=h.underlay())))
        assert VXLAN not in links(h.ns)


CHILD = """
import sys, time, msgspec
from vnet.core.dataplane_model import NodeDesired
from vnet.svc.node.reconcile import Reconciler
host, state, raw = sys.argv[1], sys.argv[2], sys.stdin.buffer.read()
rec = Reconciler(host, state_dir=state)
r = rec.reconcile(msgspec.json.decode(raw, type=NodeDesired))
print("ready" if not r.errors else f"errors {r.errors}", flush=True)
time.sleep(600)
"""


def test_sigkilled_worker_fails_static_and_a_new_one_changes_nothing(
        pair: tuple[list[EncHost], str, dict[int, str], Path]) -> None:
    hosts, _ul, _ports, state = pair
    h1, h2 = hosts
    ok(h2.rec.reconcile(desired_for(h2, hosts)))
    # host 1's worker is a separate process (it made host 1's key pair already, in the same state dir)
    h1.rec.close()
    child = subprocess.Popen([sys.executable, "-c", CHILD, h1.ns, str(state / "h1")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=False)
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(msgspec_json(desired_for(h1, hosts)))
        child.stdin.close()
        assert child.stdout.readline().strip() == b"ready"
        pairs = [(h1.eps[0].netns, ip_of(h2.eps[0])), (h2.eps[1].netns, ip_of(h1.eps[1]))]
        deadline = time.monotonic() + 30
        while ping_all(pairs[:1]) and time.monotonic() < deadline:
            pass
        socks = Sockets()
        try:
            # an established flow, then SIGKILL the worker in the middle of it
            srv = socks.make(h2.eps[0].netns, socket.SOCK_STREAM)
            cli = socks.make(h1.eps[0].netns, socket.SOCK_STREAM)
            srv.bind(("0.0.0.0", 7100))
            srv.listen(1)
            cli.settimeout(30)
            cli.connect((ip_of(h2.eps[0]), 7100))
            conn, _ = srv.accept()
            conn.settimeout(30)
            cli.sendall(b"before")
            assert conn.recv(6) == b"before"
            child.kill()
            child.wait(30)
            cli.sendall(b"after!")  # fail static: the kernel and wireguard-go keep going
            assert conn.recv(6) == b"after!"
            conn.close()
            cli.close()
            srv.close()
            assert ping_all(pairs) == []
        finally:
            socks.close()
        # a new worker reconciles the same desired state: zero changes (kernel and WireGuard)
        with Reconciler(h1.ns, state_dir=state / "h1") as rec:
            r = rec.reconcile(desired_for(h1, hosts))
            assert r.errors == [] and r.writes == 0, r
            assert rec.wg_public_key(h1.wg_if) == h1.pub
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        for pid in subprocess.run(["ip", "netns", "pids", h1.ns], capture_output=True, text=True).stdout.split():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "wireguard-go":
                    os.kill(int(pid), signal.SIGKILL)


def msgspec_json(d: NodeDesired) -> bytes:
    return msgspec.json.encode(d)
