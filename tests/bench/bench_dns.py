"""Names per second: the node's resolver against aardvark-dns (podman's), same names,
same client, same run.

Run as root from the repository root (a script, not a pytest module)::

    .venv/bin/python -m tests.bench.bench_dns              # 50 containers, 4,000 queries per row
    .venv/bin/python -m tests.bench.bench_dns --n 200 --queries 10000

The whole control plane runs in this process (ipam, network, endpoint, policy services
and one node worker with ``dns=on``) against a private nats-server and valkey; the host
and the containers are namespaces this script makes (``<prefix>-...``), removed at the
end, on error and on Ctrl-C. One ``peer_only`` network (10.89.20.0/24) holds the
containers; the VNet resolver answers on its gateway 10.89.20.1, aardvark-dns on
10.89.20.254 (an extra address on the same bridge, its config listing the same names).
The client runs in one container: asyncio UDP, a random name per query, 1 and 16 in
flight. Addresses exist only inside the namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from tests.bench.one_node import one_node
from tests.bench.scratch_ns import Scratch, sh
from vnet.core import naming

PREFIX = f"{os.environ.get('VNET_RUN_PREFIX') or 'vb' + uuid.uuid4().hex[:5]}-d"
NS = Scratch(PREFIX)
AARDVARK = next((p for p in ("/usr/lib/podman/aardvark-dns", "/usr/libexec/podman/aardvark-dns")
                 if os.path.exists(p)), shutil.which("aardvark-dns"))

CLIENT = r"""
import asyncio, json, random, socket, sys, time
from dnslib import DNSRecord
server, inflight, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
names = sys.argv[4].split(",")

async def main():
    loop = asyncio.get_running_loop()
    lat, bad = [], 0
    left = [total]
    async def worker():
        nonlocal bad
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
        await loop.sock_connect(s, (server, 53))
        while left[0] > 0:
            left[0] -= 1
            q = DNSRecord.question(random.choice(names)).pack()
            t0 = time.perf_counter()
            await loop.sock_sendall(s, q)
            try:
                r = await asyncio.wait_for(loop.sock_recv(s, 4096), 2)
                lat.append(time.perf_counter() - t0)
                if DNSRecord.parse(r).header.rcode != 0 or not DNSRecord.parse(r).rr:
                    bad += 1
            except TimeoutError:
                bad += 1
        s.close()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    wall = time.perf_counter() - t0
    lat.sort()
    print(json.dumps({"qps": len(lat) / wall, "p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)],
                      "bad": bad}))
asyncio.run(main())
"""


DNSPERF = shutil.which("dnsperf")


def perf(ns: str, server: str, inflight: int, seconds: float, names: list[str], work: Path) -> dict[str, float]:
    """dnsperf (C; apt `dnsperf`) from inside ``ns``: the server, not the client, is the limit."""
    qfile = work / "queries.txt"
    qfile.write_text("".join(f"{n} A\n" for n in random.sample(names * 20, len(names) * 20)))
    out = subprocess.run(["ip", "netns", "exec", ns, str(DNSPERF), "-s", server, "-d", str(qfile),
                          "-q", str(inflight), "-l", str(seconds), "-t", "2"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    res: dict[str, float] = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Queries per second:"):
            res["qps"] = float(line.split(":")[1])
        elif line.startswith("Queries lost:"):
            res["lost"] = float(line.split(":")[1].split()[0])
        elif line.startswith("Average Latency (s):"):
            res["avg"] = float(line.split(":")[1].split()[0])
    return res


def load(ns: str, server: str, inflight: int, total: int, names: list[str]) -> dict[str, float]:
    import json
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, server, str(inflight), str(total),
                          ",".join(names)], check=True, capture_output=True, text=True, timeout=600).stdout
    res: dict[str, float] = json.loads(out)
    return res


async def main(n: int, queries: int, seconds: float) -> None:
    if AARDVARK is None:
        raise SystemExit("aardvark-dns is not installed (apt-get install aardvark-dns)")
    async with one_node(PREFIX, NS, lambda work: {"dns": "on", "dns_upstream": ""}) as st:
        work, m, host = st.work, st.m, st.host
        net = await m.create_network(f"{PREFIX}-net", "10.89.20.0/24", "10.89.20.1", "bridge", "peer_only")
        conts = [NS.make(f"c{i}") for i in range(n)]
        eps = []
        for c in conts:
            eps.append(await m.create_endpoint(c, net.id, wait=True, wait_timeout=60))
        assert all(e.status == "ready" for e in eps), [e.status for e in eps]
        names = [e.container_id for e in eps]
        # aardvark-dns on the same bridge, with the same names
        sh("ip", "-n", host, "addr", "add", "10.89.20.254/24", "dev", naming.bridge_name(net.id))
        conf = work / "aardvark"
        conf.mkdir()
        (conf / "bench").write_text("10.89.20.254\n" + "".join(
            f"{e.id} {e.ip_address}  {e.container_id}\n" for e in eps))
        NS.procs.append(await asyncio.to_thread(
            subprocess.Popen, ["ip", "netns", "exec", host, AARDVARK, "--config", str(conf), "-p", "53", "run"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        await asyncio.sleep(0.5)
        rows = []
        perfs: list[tuple[str, int, dict[str, float]]] = []
        servers_ = (("VNet resolver", "10.89.20.1"), ("aardvark-dns", "10.89.20.254"))
        for label, server in servers_:
            await asyncio.to_thread(load, conts[0], server, 4, 200, names)  # warm-up
            one = await asyncio.to_thread(load, conts[0], server, 1, queries // 4, names)
            many = await asyncio.to_thread(load, conts[0], server, 16, queries, names)
            rows.append((label, one, many))
        if DNSPERF is not None:
            for inflight in (16, 100):
                for label, server in servers_:  # interleaved, so both see the same machine
                    perfs.append((label, inflight, await asyncio.to_thread(
                        perf, conts[0], server, inflight, seconds, names, work)))
        print(f"\nDNS: {n} names in one peer_only network, client in a container, one run\n")
        print("| server | median, 1 in flight | p99, 1 in flight | queries/s, 16 in flight | "
              "median, 16 in flight | failed |")
        print("|---|---|---|---|---|---|")
        base = rows[1][2]["qps"]
        for label, one, many in rows:
            print(f"| {label} | {one['p50'] * 1e3:.2f} ms | {one['p99'] * 1e3:.2f} ms | {many['qps']:,.0f} "
                  f"({many['qps'] / base:.2f}x) | {many['p50'] * 1e3:.2f} ms | {int(one['bad'] + many['bad'])} |")
        if perfs:
            print(f"\ndnsperf (C client), {seconds:g} s per row, random order of the {n} names\n")
            print("| server | in flight | queries/s | ratio | average latency | lost |")
            print("|---|---|---|---|---|---|")
            for label, inflight, r in perfs:
                peer = next(x[2] for x in perfs if x[1] == inflight and x[0] == "aardvark-dns")
                print(f"| {label} | {inflight} | {r.get('qps', 0):,.0f} | {r.get('qps', 0) / peer['qps']:.2f}x | "
                      f"{r.get('avg', 0) * 1e3:.2f} ms | {int(r.get('lost', 0))} |")
        else:
            print("\n(dnsperf is not installed: apt-get install dnsperf for the server-bound rows)")
        for e in eps:
            await m.delete_endpoint(e.id, wait=True)
        await m.delete_network(net.id)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50, help="containers (names)")
    p.add_argument("--queries", type=int, default=4000, help="queries per row at 16 in flight")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per dnsperf row")
    a = p.parse_args()
    asyncio.run(main(a.n, a.queries, a.seconds))
