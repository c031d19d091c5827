"""Attaching containers to one overlay network spread over three hosts, through the whole
control plane: client -> endpoint service -> IPAM -> event -> node worker -> kernel ->
status -> client (``create_endpoint(wait=True)``), with every other host learning the new
remote endpoint from the event.

Run as root (it is a script, not a pytest module)::

    .venv/bin/python tests/bench/bench_attach_multihost.py             # 100 containers, 3 hosts
    .venv/bin/python tests/bench/bench_attach_multihost.py --n 60 --parallel 8

Everything runs in this process (ipam, network, endpoint, policy services and one node
worker per host) against a private nats-server and valkey in a temporary directory;
hosts and containers are namespaces this script makes (names ``<prefix>-...``), joined by
an underlay switch namespace, removed at the end, on error and on Ctrl-C. Addresses
(10.250.0.0/24 underlay, 10.133.0.0/22 overlay) exist only inside them.

Measured: each attach's latency (request to ``ready``), sequential and with ``--parallel``
attaches in flight; the total; then the time until every host has the FDB entries of all
the others' containers (the fan-out), and one ping per host pair as a sanity check.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec

from vnet import VNetManager
from vnet.runtime import launcher, servers, service
from vnet.runtime.config import VNetConfig

PREFIX = f"{os.environ.get('VNET_RUN_PREFIX') or 'vb' + uuid.uuid4().hex[:5]}-m"
_made: list[str] = []


def sh(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True)


def netns(name: str) -> str:
    full = f"{PREFIX}-{name}"
    sh("ip", "netns", "add", full)
    _made.append(full)
    sh("ip", "-n", full, "link", "set", "lo", "up")
    return full


def cleanup() -> None:
    names = list(reversed(_made))
    _made.clear()
    for ns in names:
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _on_signal(signum: int, frame: object) -> None:
    cleanup()
    sys.exit(128 + signum)


def switch() -> str:
    ul = netns("ul")
    sh("ip", "-n", ul, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
    sh("ip", "-n", ul, "link", "set", "br0", "up")
    return ul


def plug(ul: str, k: int) -> str:
    h = netns(f"h{k}")
    sh("ip", "-n", ul, "link", "add", f"u{k}", "type", "veth", "peer", "name", "ul0", "netns", h)
    sh("ip", "-n", ul, "link", "set", f"u{k}", "master", "br0", "up")
    sh("ip", "-n", h, "addr", "add", f"10.250.0.{k}/24", "dev", "ul0")
    sh("ip", "-n", h, "link", "set", "ul0", "up")
    return h


def fdb_count(ns: str) -> int:
    out = subprocess.run(["bridge", "-j", "-n", ns, "fdb", "show"], check=True, capture_output=True, text=True).stdout
    return sum(1 for e in json.loads(out or "[]") if e.get("dst") and "permanent" in e.get("state", ""))


def ping(ns: str, addr: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", "-n", "-q", addr],
                          capture_output=True).returncode == 0


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def main(n: int, hosts: int, parallel: int) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    valkey = servers.start_valkey(work / "valkey")
    nats = servers.start_nats(work / "nats")
    rts: list[service.Runtime] = []
    try:
        cfg = VNetConfig.load(env={}, nats_url=nats.url, redis_url=valkey.url, metrics_http_port=0,
                              log_level="WARNING")

        async def start(name: str, params: dict[str, str] | None = None, c: VNetConfig = cfg) -> None:
            rts.append(await service.start(launcher.load_service(name), c, params=params))

        for name in ("ipam", "network", "endpoint", "policy"):
            await start(name)
        ul = await asyncio.to_thread(switch)
        nodes = [f"{PREFIX}-n{k}" for k in range(1, hosts + 1)]
        hns: list[str] = []
        for k, node in enumerate(nodes, 1):  # each host made just before its worker starts
            h = await asyncio.to_thread(plug, ul, k)
            hns.append(h)
            await start("node", {"node": node, "underlay": f"10.250.0.{k}", "underlay_ifname": "ul0",
                                 "resync_s": "30"}, msgspec.structs.replace(cfg, host_netns=h))
        async with VNetManager(cfg) as m:
            for _ in range(200):
                if set(nodes) <= {x.node for x in await m.nodes()}:
                    break
                await asyncio.sleep(0.05)
            net = await m.create_network("bench-ov", "10.133.0.0/22", None, "overlay", "none")
            cs = await asyncio.to_thread(lambda: [netns(f"c{i}") for i in range(n)])
            half = n // 2
            rows: list[tuple[str, list[float], float]] = []

            async def one(i: int, lat: list[float]) -> None:
                t = time.perf_counter()
                ep = await m.create_endpoint(cs[i], net.id, node=nodes[i % hosts], wait=True, wait_timeout=60)
                lat.append(time.perf_counter() - t)
                assert ep.status == "ready", ep

            seq: list[float] = []
            t0 = time.perf_counter()
            for i in range(half):
                await one(i, seq)
            rows.append(("sequential", seq, time.perf_counter() - t0))
            par: list[float] = []
            sem = asyncio.Semaphore(parallel)

            async def bounded(i: int) -> None:
                async with sem:
                    await one(i, par)

            t0 = time.perf_counter()
            await asyncio.gather(*(bounded(i) for i in range(half, n)))
            rows.append((f"{parallel} in flight", par, time.perf_counter() - t0))
            t_ready = time.perf_counter()
            per_host = [sum(1 for i in range(n) if i % hosts != k) for k in range(hosts)]
            while [await asyncio.to_thread(fdb_count, h) for h in hns] != per_host:
                if time.perf_counter() - t_ready > 30:
                    break
                await asyncio.sleep(0.02)
            fanout = time.perf_counter() - t_ready
            counts = [await asyncio.to_thread(fdb_count, h) for h in hns]
            eps = {e.container_id: e for e in await m.list_endpoints(network=net.id)}
            bad = []
            for a in range(hosts):
                for b in range(hosts):
                    if a != b:
                        dst = eps[cs[b]].ip_address
                        if not await asyncio.to_thread(ping, cs[a], dst):
                            bad.append((a + 1, b + 1))
        print(f"\n{n} containers on {hosts} hosts (overlay, None mode), control plane in one process, "
              f"{os.cpu_count()} cores\n")
        print(f"{'attaches':<14}{'n':>5}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}{'total s':>9}{'per s':>8}")
        for label, lat, total in rows:
            print(f"{label:<14}{len(lat):>5}{statistics.median(lat) * 1e3:>11.1f}{pct(lat, 0.9) * 1e3:>9.1f}"
                  f"{max(lat) * 1e3:>9.1f}{total:>9.2f}{len(lat) / total:>8.1f}")
        allat = rows[0][1] + rows[1][1]
        print(f"{'all':<14}{len(allat):>5}{statistics.median(allat) * 1e3:>11.1f}{pct(allat, 0.9) * 1e3:>9.1f}"
              f"{max(allat) * 1e3:>9.1f}{rows[0][2] + rows[1][2]:>9.2f}")
        print(f"\nremote FDB entries per host: {counts} (expected {per_host}); last attach ready -> every host "
              f"has them all: {fanout * 1e3:.0f} ms; host-pair pings failed: {bad or 'none'}")
    finally:
        for rt in reversed(rts):
            await rt.stop(drain_timeout=2.0)
        cleanup()
        nats.stop()
        valkey.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="containers (default 100)")
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=8, help="attaches in flight in the second half")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it makes network namespaces")
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    asyncio.run(main(args.n, args.hosts, args.parallel))
