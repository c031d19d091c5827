"""IPAM benchmark (a script, not a test): ``.venv/bin/python tests/bench/bench_ipam.py``.

Starts its own valkey-server and nats-server (``vnet.runtime.servers``) in a temporary
directory and removes everything when done. Prints:

1. allocation cost against pool fill (a /16 at 0 %, 50 %, 90 %, 99 %, and 99 % with the
   free addresses all *behind* the cursor so the search wraps): Redis server time per
   allocation script call, and the client round trip (p50/p99), one request at a time;
2. throughput through the IPAM service (replicas as separate processes) with 64
   requests in flight: allocations/s, p50, p99;
3. the CNI reference ``host-local`` plugin (Debian ``containernetworking-plugins``) with
   an empty pool and with 5,000 addresses used, when it is installed;
4. Redis memory per allocation and per empty pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from vnet.adapters import ipam_store as st
from vnet.adapters.ipam_store import IpamStore
from vnet.adapters.redis import load_scripts
from vnet.client import VNetManager
from vnet.core import ipam as core
from vnet.runtime import servers
from vnet.runtime.config import VNetConfig


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


async def evalsha_usec(r: aioredis.Redis) -> tuple[int, int]:
    info: Any = await r.info("commandstats")
    s = info.get("cmdstat_evalsha", {})
    return int(s.get("calls", 0)), int(s.get("usec", 0))


# --- 1. cost against fill -------------------------------------------------------------------

async def fill_static(r: aioredis.Redis, store: IpamStore, nid: str, offsets: list[int]) -> None:
    gen, _ = await store.layout(nid, 4)
    keys = st.pool_keys(nid, 4)
    for i in range(0, len(offsets), 2000):
        pipe = r.pipeline(transaction=False)
        for off in offsets[i:i + 2000]:
            pipe.evalsha(st.ALLOC.sha, len(keys), *keys, gen, f"fill{off}", off, 60)
        await pipe.execute()


async def fill_dynamic(r: aioredis.Redis, store: IpamStore, nid: str, n: int) -> None:
    gen, _ = await store.layout(nid, 4)
    keys = st.pool_keys(nid, 4)
    for i in range(0, n, 2000):
        pipe = r.pipeline(transaction=False)
        for k in range(i, min(n, i + 2000)):
            pipe.evalsha(st.ALLOC.sha, len(keys), *keys, gen, f"dyn{k}", -1, 60)
        await pipe.execute()


async def cost_vs_fill(r: aioredis.Redis, samples: int) -> list[list[str]]:
    store = IpamStore(r)
    rows: list[list[str]] = []
    rng = random.Random(7)
    base: float | None = None
    for label, fill, wrap in [("0%", 0.0, False), ("50%", 0.5, False), ("90%", 0.9, False), ("99%", 0.99, False),
                              ("99%, free only behind the cursor", 0.99, True)]:
        nid = f"bench-fill-{label.split('%')[0]}{'-wrap' if wrap else ''}"
        layout = core.build_layout(nid, "10.0.0.0/16", "10.0.0.1")
        await store.create_pool(layout)
        assignable = [o for o in range(layout.window) if not layout.is_blocked(o)]
        n_fill = int(layout.capacity * fill)
        if wrap:
            # Everything allocated serially (the cursor ends near the top), then the first
            # (capacity - n_fill) released: every free address lies behind the cursor.
            await fill_dynamic(r, store, nid, layout.capacity)
            for k in range(layout.capacity - n_fill):
                await store.release(nid, 4, f"dyn{k}")
        else:
            await fill_static(r, store, nid, rng.sample(assignable, n_fill))
            # put the cursor somewhere in the middle, like a pool that has been in use
            await r.hset(st.pool_key(nid, 4, "meta"), "cursor", layout.window // 2)
        n = min(samples, layout.capacity - n_fill - 1)
        lat: list[float] = []
        calls0, usec0 = await evalsha_usec(r)
        for k in range(n):
            t0 = time.perf_counter()
            await store.allocate(nid, 4, f"m{k}")
            lat.append(time.perf_counter() - t0)
        calls1, usec1 = await evalsha_usec(r)
        server = (usec1 - usec0) / max(1, calls1 - calls0)
        meta = await store.pool(nid, 4)
        assert meta is not None
        p50 = pct(lat, 50) * 1e6
        base = base or p50
        rows.append([label, f"{meta.used:,}/{layout.capacity:,}", str(n), f"{server:.1f}", f"{p50:.0f}",
                     f"{pct(lat, 99) * 1e6:.0f}", f"{p50 / base:.2f}"])
        await store.delete_pool(nid, 4, force=True)
    return rows


# --- 2. throughput through the service ------------------------------------------------------

def start_replicas(env: dict[str, str], n: int, workdir: Path) -> tuple[list[subprocess.Popen[bytes]], list[Any]]:
    exe = str(Path(sys.executable).parent / "vnet-service")
    procs, logs = [], []
    for i in range(n):
        log = open(workdir / f"ipam-{n}-{i}.log", "wb")  # noqa: SIM115 - closed in stop_replicas
        logs.append(log)
        procs.append(subprocess.Popen([exe, "ipam"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs, logs


def stop_replicas(procs: list[subprocess.Popen[bytes]], logs: list[Any]) -> None:
    for pr in procs:
        pr.terminate()
    for pr in procs:
        try:
            pr.wait(10)
        except subprocess.TimeoutExpired:
            pr.kill()
            pr.wait()
    for lg in logs:
        lg.close()


async def service_throughput(cfg: VNetConfig, replicas: int, total: int, inflight: int,
                             workdir: Path) -> list[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VNET_")},
           "VNET_NATS_URL": cfg.nats_url, "VNET_REDIS_URL": cfg.redis_url, "VNET_LOG_LEVEL": "WARNING",
           "VNET_METRICS_REPORT_INTERVAL_S": "5"}
    procs, logs = start_replicas(env, replicas, workdir)
    nid = f"bench-svc-{replicas}"
    try:
        async with VNetManager(cfg) as m:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if len([s for s in await m.services() if s.name == "ipam"]) >= replicas:
                        break
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ipam replicas did not start; see {workdir}")
                await asyncio.sleep(0.2)
            await m.create_pool(nid, "10.128.0.0/16", "10.128.0.1")
            for i in range(500):  # warm up
                await m.request_address(nid, f"w{i}")
            sem = asyncio.Semaphore(inflight)
            lat: list[float] = []

            async def one(i: int) -> None:
                async with sem:
                    t0 = time.perf_counter()
                    await m.request_address(nid, f"o{i}")
                    lat.append(time.perf_counter() - t0)

            t = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(total)))
            dt = time.perf_counter() - t
            (p,) = await m.pool(nid)
            assert p.used == total + 500, p
            await m.delete_pool(nid, force=True)
    finally:
        stop_replicas(procs, logs)
    return [str(replicas), str(inflight), f"{total:,}", f"{total / dt:,.0f}", f"{pct(lat, 50) * 1e3:.2f}",
            f"{pct(lat, 99) * 1e3:.2f}"]


# --- 3. host-local ------------------------------------------------------------------------------

def host_local_binary() -> str | None:
    for d in (os.environ.get("CNI_PATH", ""), "/usr/lib/cni", "/opt/cni/bin"):
        for part in d.split(":"):
            if part and Path(part, "host-local").exists():
                return str(Path(part, "host-local"))
    return None


def host_local_add(exe: str, data_dir: Path, cid: str) -> float:
    conf = {"cniVersion": "0.4.0", "name": "benchnet", "type": "bridge",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.0.0.0/16", "gateway": "10.0.0.1"}]],
                     "dataDir": str(data_dir)}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_NETNS": "/var/run/netns/vnet-bench-none",
           "CNI_IFNAME": "eth0", "CNI_PATH": str(Path(exe).parent), "PATH": os.environ.get("PATH", "")}
    t0 = time.perf_counter()
    res = subprocess.run([exe], input=json.dumps(conf).encode(), env=env, capture_output=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"host-local ADD failed: {res.stdout.decode()} {res.stderr.decode()}")
    return dt


def host_local_rows(exe: str, workdir: Path, samples: int, used: int) -> list[list[str]]:
    rows = []
    base = None
    for n_used in (0, used):
        d = workdir / f"host-local-{n_used}"
        net = d / "benchnet"
        net.mkdir(parents=True)
        for k in range(n_used):  # the files host-local itself writes: one per address
            off = 2 + k
            ip = f"10.0.{off >> 8}.{off & 255}"
            (net / ip).write_text(f"pre{k}\r\neth0")
        if n_used:
            off = 1 + n_used
            (net / "last_reserved_ip.0").write_text(f"10.0.{off >> 8}.{off & 255}")
        lat = [host_local_add(exe, d, f"bench{n_used}-{k}") for k in range(samples)]
        p50 = pct(lat, 50) * 1e3
        base = base or p50
        rows.append([f"{n_used:,}", str(samples), f"{p50:.2f}", f"{pct(lat, 99) * 1e3:.2f}", f"{p50 / base:.2f}"])
    return rows


# --- 4. memory --------------------------------------------------------------------------------

async def memory_rows(r: aioredis.Redis) -> list[list[str]]:
    store = IpamStore(r)

    async def used() -> int:
        info: Any = await r.info("memory")
        return int(info["used_memory"])

    rows = []
    m0 = await used()
    for i in range(1000):
        await store.create_pool(core.build_layout(f"mem-net-{i}", f"10.{i // 256}.{i % 256}.0/24",
                                                  f"10.{i // 256}.{i % 256}.1"))
    m1 = await used()
    rows.append(["1,000 empty /24 pools (+ index)", f"{m1 - m0:,}", f"{(m1 - m0) / 1000:,.0f} per pool"])
    await store.create_pool(core.build_layout("mem-alloc", "10.200.0.0/16", "10.200.0.1"))
    m2 = await used()
    await fill_dynamic(r, store, "mem-alloc", 10_000)
    m3 = await used()
    rows.append(["10,000 allocations in one /16", f"{m3 - m2:,}", f"{(m3 - m2) / 10_000:,.0f} per allocation"])
    for i in range(1000):
        await store.delete_pool(f"mem-net-{i}", 4, force=True)
    await store.delete_pool("mem-alloc", 4, force=True)
    return rows


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    valkey = servers.start_valkey(workdir / "valkey")
    nats = servers.start_nats(workdir / "nats")
    try:
        cfg = VNetConfig.load(env={}, nats_url=nats.url, redis_url=valkey.url)
        r = aioredis.Redis.from_url(valkey.url)
        await load_scripts(r, *st.SCRIPTS)
        print(f"valkey {valkey.url}, nats {nats.url}, {os.cpu_count()} CPUs")
        rows = await cost_vs_fill(r, args.samples)
        table("1. allocation cost vs pool fill (a /16, 65,533 assignable; one request at a time)",
              ["fill", "used after", "n", "server us/alloc", "rtt p50 us", "rtt p99 us", "p50 / empty"], rows)
        svc_rows = []
        for replicas in args.replicas:
            svc_rows.append(await service_throughput(cfg, replicas, args.total, args.inflight, workdir))
        table("2. through the IPAM service (replicas are processes; one client process)",
              ["replicas", "in flight", "requests", "alloc/s", "p50 ms", "p99 ms"], svc_rows)
        exe = host_local_binary()
        if exe:
            table(f"3. CNI host-local ADD ({exe}), same /16",
                  ["used", "n", "p50 ms", "p99 ms", "p50 / empty"],
                  host_local_rows(exe, workdir, args.host_local_samples, 5000))
        else:
            print("\n3. CNI host-local: not installed (apt-get install containernetworking-plugins); skipped")
        table("4. Redis memory (used_memory delta)", ["what", "bytes", "per item"], await memory_rows(r))
        await r.aclose()
    finally:
        nats.stop()
        valkey.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=500, help="allocations timed per fill level")
    p.add_argument("--total", type=int, default=20_000, help="requests through the service")
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--host-local-samples", type=int, default=50)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vnet-bench-ipam-"))
    try:
        asyncio.run(main_async(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
