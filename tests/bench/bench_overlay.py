"""TCP throughput and connect rate between containers: bridge-local vs overlay vs
encrypted overlay (VXLAN over wireguard-go).

Run as root (a script, not a pytest module)::

    .venv/bin/python tests/bench/bench_overlay.py            # 3 s per measurement
    .venv/bin/python tests/bench/bench_overlay.py --seconds 2

Two host namespaces on an underlay switch (a bridge in a third namespace), built and
wired by VNet's reconcilers exactly as the kernel tests do; every namespace carries the
run prefix and is removed at the end (wireguard-go processes inside are killed first).
Nothing touches the root namespace. Traffic: one TCP stream (64 KiB writes) and a
connect/accept/close loop, from Python sockets made inside the container namespaces
(the same client code for every path, so the ratios compare the data planes).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make `tests` importable

from tests.netns.overlay_util import UNDERLAY_IF, Sockets, build_underlay, plug, underlay_addr
from vnet.core import naming
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired, PeerHost, RemoteEndpoint, Scope, Underlay
from vnet.core.model import DriverType
from vnet.svc.node.reconcile import Reconciler

PREFIX = f"{os.environ.get('VNET_RUN_PREFIX') or 'vb' + uuid.uuid4().hex[:5]}-o"
_made: list[str] = []
_recs: list[Reconciler] = []


def netns(name: str) -> str:
    full = f"{PREFIX}-{name}"
    subprocess.run(["ip", "netns", "add", full], check=True, capture_output=True)
    _made.append(full)
    subprocess.run(["ip", "-n", full, "link", "set", "lo", "up"], check=True, capture_output=True)
    return full


def cleanup() -> None:
    for rec in _recs:
        rec.stop_wireguard()
        rec.close()
    _recs.clear()
    for ns in reversed(_made):
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    _made.clear()


def _on_signal(signum: int, frame: object) -> None:
    cleanup()
    sys.exit(128 + signum)


def ep(net: str, host: int, i: int, ns: str, subnet: str) -> EpDesired:
    return EpDesired(id=f"{net}-h{host}-{i}", network_id=net, netns=ns,
                     mac=naming.local_mac(bytes([2, 0x60, len(net), 0, host, i])),
                     ipv4=f"{subnet}.{host * 10 + i}/24", gw4=f"{subnet}.1")


def ip_of(e: EpDesired) -> str:
    assert e.ipv4 is not None
    return e.ipv4.split("/")[0]


def throughput(socks: Sockets, src: str, dst: str, dst_ip: str, seconds: float, port: int) -> float:
    """Gbit/s of one TCP stream src -> dst."""
    srv = socks.make(dst, socket.SOCK_STREAM)
    cli = socks.make(src, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    got = [0]

    def sink() -> None:
        conn, _ = srv.accept()
        with conn:
            while True:
                b = conn.recv(1 << 18)
                if not b:
                    return
                got[0] += len(b)

    t = threading.Thread(target=sink)
    t.start()
    cli.connect((dst_ip, port))
    chunk = b"x" * (1 << 16)
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        cli.sendall(chunk)
    cli.shutdown(socket.SHUT_WR)
    t.join(30)
    dt = time.perf_counter() - t0
    cli.close()
    srv.close()
    return got[0] * 8 / dt / 1e9


def connect_rate(socks: Sockets, src: str, dst: str, dst_ip: str, seconds: float, port: int) -> float:
    """TCP connections per second (connect, accept, close), one at a time."""
    srv = socks.make(dst, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(512)
    stop = threading.Event()

    def acceptor() -> None:
        srv.settimeout(0.5)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.close()
            except OSError:
                continue

    t = threading.Thread(target=acceptor)
    t.start()
    clients = [socks.make(src, socket.SOCK_STREAM) for _ in range(4000)]  # made up front: setns is not measured
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    for c in clients:
        if time.perf_counter() >= end:
            break
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST on close: no TIME_WAIT pile
        c.connect((dst_ip, port))
        c.close()
        n += 1
    dt = time.perf_counter() - t0
    for c in clients:
        c.close()
    stop.set()
    t.join(5)
    srv.close()
    return n / dt


def attach_many(n: int) -> None:
    """Attach ``n`` containers spread over three hosts, one at a time, as the node workers
    would on the events: the owning host's scoped endpoint reconcile, then every other
    host's scoped network reconcile (its new remote entries). Prints the totals."""
    ul = build_underlay(netns, "aul")
    hosts = {k: netns(f"a{k}") for k in (1, 2, 3)}
    for k, h in hosts.items():
        plug(ul, h, k)
    recs = {k: Reconciler(h) for k, h in hosts.items()}
    _recs.extend(recs.values())
    eps: dict[int, list[EpDesired]] = {k: [] for k in hosts}
    names = [f"ac{i}" for i in range(n)]
    subprocess.run(["ip", "-batch", "-"], input="".join(f"netns add {PREFIX}-{x}\n" for x in names), text=True,
                   check=True, capture_output=True)
    _made.extend(f"{PREFIX}-{x}" for x in names)

    def desired(k: int) -> NodeDesired:
        remotes = tuple(RemoteEndpoint(mac=e.mac, ipv4=e.ipv4, host=f"h{o}") for o in hosts if o != k for e in eps[o])
        return NodeDesired(networks=[NetDesired(id="at", driver=DriverType.OVERLAY, vni=603, gateway4="10.63.0.1/16",
                                                mtu=1450, remotes=remotes)],
                           endpoints=list(eps[k]), underlay=Underlay(address=underlay_addr(k), ifname=UNDERLAY_IF),
                           peers=[PeerHost(name=f"h{o}", address=underlay_addr(o)) for o in hosts if o != k])

    for k in hosts:
        recs[k].reconcile(desired(k))
    owner_s: list[float] = []
    others_s: list[float] = []
    t_all = time.perf_counter()
    for i in range(n):
        k = 1 + i % 3
        e = EpDesired(id=f"at-{i}", network_id="at", netns=f"{PREFIX}-ac{i}",
                      mac=naming.local_mac(bytes([2, 0x63, 0, 0, i >> 8, i & 0xFF])),
                      ipv4=f"10.63.{i // 200}.{i % 200 + 10}/16", gw4="10.63.0.1")
        eps[k].append(e)
        t = time.perf_counter()
        r = recs[k].reconcile(desired(k), Scope(endpoints=frozenset({e.id})))
        owner_s.append(time.perf_counter() - t)
        if r.errors:
            sys.exit(f"attach failed: {r.errors}")
        t = time.perf_counter()
        for o in hosts:
            if o != k:
                r = recs[o].reconcile(desired(o), Scope(networks=frozenset({"at"})))
                if r.errors:
                    sys.exit(f"remote update failed: {r.errors}")
        others_s.append(time.perf_counter() - t)
    total = time.perf_counter() - t_all
    resync = [recs[k].reconcile(desired(k)).writes for k in hosts]
    owner_s.sort()
    others_s.sort()
    print(f"\nattach {n} containers over 3 hosts (one at a time): total {total:.2f} s, "
          f"{total / n * 1e3:.1f} ms per container")
    print(f"  owning host, scoped endpoint reconcile: median {owner_s[n // 2] * 1e3:.2f} ms")
    print(f"  the two other hosts, scoped network reconcile (new remote entries): median "
          f"{others_s[n // 2] * 1e3:.2f} ms (they grow with the network: the FDB/neighbour tables are read)")
    print(f"  full resync afterwards, writes per host: {resync}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--attach", type=int, default=100, help="containers for the attach run (0: skip)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (it creates network namespaces)")
    if shutil.which("wireguard-go") is None or shutil.which("wg") is None:
        sys.exit("needs wireguard-go and wireguard-tools")
    atexit.register(cleanup)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    state = tempfile.mkdtemp(prefix=f"{PREFIX}-")
    try:
        ul = build_underlay(netns)
        hosts = {k: netns(f"h{k}") for k in (1, 2)}
        for k, h in hosts.items():
            plug(ul, h, k)
        recs = {k: Reconciler(h, state_dir=f"{state}/h{k}") for k, h in hosts.items()}
        _recs.extend(recs.values())
        wg_if = {k: f"{PREFIX}w{k}"[:15] for k in hosts}
        pubs = {k: recs[k].wg_public_key(wg_if[k]) for k in hosts}
        bl = [ep("bl", 1, i, netns(f"bl{i}"), "10.60.0") for i in (1, 2)]
        ov = [ep("ov", k, 1, netns(f"ov{k}"), "10.61.0") for k in (1, 2)]
        oe = [ep("oe", k, 1, netns(f"oe{k}"), "10.62.0") for k in (1, 2)]
        for k in hosts:
            other = 2 if k == 1 else 1
            nets = [NetDesired(id="ov", driver=DriverType.OVERLAY, vni=601, gateway4="10.61.0.1/24", mtu=1450,
                               remotes=(RemoteEndpoint(mac=ov[other - 1].mac, ipv4=ov[other - 1].ipv4,
                                                       host=f"h{other}"),)),
                    NetDesired(id="oe", driver=DriverType.OVERLAY, vni=602, encrypted=True, gateway4="10.62.0.1/24",
                               mtu=1370, remotes=(RemoteEndpoint(mac=oe[other - 1].mac, ipv4=oe[other - 1].ipv4,
                                                                 host=f"h{other}"),))]
            eps = [ov[k - 1], oe[k - 1]]
            if k == 1:
                nets.append(NetDesired(id="bl", gateway4="10.60.0.1/24"))
                eps += bl
            d = NodeDesired(networks=nets, endpoints=eps,
                            underlay=Underlay(address=underlay_addr(k), ifname=UNDERLAY_IF,
                                              wg_address=f"10.251.0.{k}/24", wg_ifname=wg_if[k]),
                            peers=[PeerHost(name=f"h{other}", address=underlay_addr(other), wg_public_key=pubs[other],
                                            wg_address=f"10.251.0.{other}")])
            r = recs[k].reconcile(d)
            if r.errors:
                sys.exit(f"reconcile failed: {r.errors}")
        socks = Sockets()
        paths = [("bridge (same host)", bl[0], bl[1]), ("overlay (2 hosts)", ov[0], ov[1]),
                 ("encrypted overlay (2 hosts)", oe[0], oe[1])]
        for _, a, b in paths:  # warm up ARP and the WireGuard handshake
            for _ in range(50):
                if socks.tcp(a.netns, b.netns, ip_of(b), port=5999):
                    break
                time.sleep(0.1)
        rows = []
        for i, (name, a, b) in enumerate(paths):
            gbps = throughput(socks, a.netns, b.netns, ip_of(b), args.seconds, 6000 + i)
            cps = connect_rate(socks, a.netns, b.netns, ip_of(b), args.seconds, 6100 + i)
            rows.append((name, gbps, cps))
        socks.close()
        base_g, base_c = rows[0][1], rows[0][2]
        print(f"\n{'path':32} {'TCP Gbit/s':>11} {'ratio':>6} {'connects/s':>11} {'ratio':>6}")
        for name, g, c in rows:
            print(f"{name:32} {g:11.2f} {g / base_g:6.2f} {c:11.0f} {c / base_c:6.2f}")
        print(f"\n({args.seconds:.0f} s each, one stream / one connection at a time, Python sockets, "
              f"load {os.getloadavg()[0]:.1f})")
        if args.attach:
            attach_many(args.attach)
    finally:
        cleanup()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
