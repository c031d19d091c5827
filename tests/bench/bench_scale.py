"""The control plane's cost curve with simulated nodes: 10, 100, 1,000 hosts.

Run it as a script (pytest does not collect it)::

    .venv/bin/python tests/bench/bench_scale.py                      # 10,100,1000 nodes x 50 endpoints
    .venv/bin/python tests/bench/bench_scale.py --nodes 10,100 --eps 20 --inflight 32

No root, no namespace. Every row starts from nothing in its own temporary directory: a
nats-server (JetStream, monitoring on) and a valkey-server, the five services each in its own
process (``vnet-service <name>``, so each one's RSS is its own), and ONE process running all the
simulated node workers (``vnet-node --simulate N``: the real NodeWorker with a recording data
plane, vnet.svc.node.simulate). Then ``N x eps`` endpoint creates, ``--inflight`` at a time, each
``wait=True`` (the reply comes once the node worker has realised the endpoint and reported it
``ready``), spread round-robin over the nodes, in bridge networks of ``--nodes-per-net`` nodes.

Printed, one line per row: creates per second, median and p99 create latency, the RSS of every
service, of the simulated-node process and of nats-server, Redis ``used_memory``, NATS messages
sent by the server per create (the event fan-out: one create's events reach every subscriber
of its subjects) and the idle message rate (heartbeats, resyncs, pull requests with nothing
to deliver); then the growth ratios of the last row over the first.

``--label-rule``: the case where a node's rules select endpoints by label. Every endpoint gets
``app=bench`` and one allow rule ``{from: [{labels: {app: bench}}], to: [{labels: {app: bench}}]}``
exists before the nodes start; the simulated nodes run their policy agent (``VNETSIM_POLICY=1``:
the real agent, fetching its ruleset and taking set deltas from events, with a recording
enforcer instead of nftables), so what such a node follows is what the bench measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo importable as ``tests``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import redis.asyncio as aioredis

from vnet.adapters.endpoint_store import node_key
from vnet.client import VNetManager
from vnet.contracts import subjects
from vnet.core.policy import AllowRule, Selector
from vnet.runtime import servers
from vnet.runtime.config import VNetConfig

SLOW_S = 1.0
PROBE_SLOW_S = 0.3  # --timeline also lists the creates slower than this, by start and node

SERVICES = ("ipam", "network", "endpoint", "policy", "metrics")


@dataclass
class Row:
    nodes: int
    eps: int
    creates: int = 0
    failed: int = 0
    secs: float = 0.0
    lat: list[float] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=dict)
    redis_mb: float = 0.0
    msgs_per_create: float = 0.0
    node_evts_per_create: float = 0.0
    idle_msgs_s: float = 0.0
    start_s: float = 0.0
    node_list: str = ""
    nodes_up: int = 0
    slow: list[tuple[float, float, str]] = field(default_factory=list)  # (start s, latency s, node) of slow ones
    probes: list[tuple[float, str, float]] = field(default_factory=list)  # (s, what, ms) of slow probes
    ends: list[float] = field(default_factory=list)  # when each create was answered (s from the load's start)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds of each process during the load

    @property
    def rate(self) -> float:
        return self.creates / self.secs if self.secs else 0.0

    def pct(self, q: float) -> float:
        s = sorted(self.lat)
        return s[min(len(s) - 1, round(q * (len(s) - 1)))] * 1e3 if s else 0.0


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def count_node_copies(nc: Any, seen: list[int]) -> Any:
    """Count the endpoint events addressed to node workers (``vnet.node.<node>.evt.endpoint.>``,
    core NATS) in ``seen[0]``: every copy reaches its node and this subscription alike."""
    async def on_copy(_msg: Any) -> None:
        seen[0] += 1

    sub = await nc.subscribe(subjects.EVT_TO_NODE.wildcard().removesuffix(".>") + ".endpoint.>", cb=on_copy,
                             pending_msgs_limit=0, pending_bytes_limit=0)
    await nc.flush()
    return sub


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def varz(monitor: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as r:
        data: dict[str, int] = json.load(r)
    return data


class Stack:
    """Servers, services and the simulated nodes of one row; everything goes in :meth:`stop`."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = env or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.servers: list[servers.ServerProc] = []
        self.monitor = servers.free_port()
        self.config: VNetConfig | None = None

    def start_servers(self) -> VNetConfig:
        n = servers.start_nats(self.root / "nats", monitor_port=self.monitor)
        v = servers.start_valkey(self.root / "valkey")
        self.servers = [n, v]
        self.config = VNetConfig.load(env={}, nats_url=n.url, redis_url=v.url, metrics_http_port=0)
        return self.config

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        assert self.config is not None
        env = {**os.environ, **self.config.to_env(), **self.env}
        env.pop("VNET_CONFIG", None)
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process's end)
        p = subprocess.Popen([sys.executable, "-m", "vnet.runtime.launcher", *argv], env=env, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=servers._die_with_parent)
        self.procs[name] = p
        return p

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s in self.servers:
            s.stop()


async def _wait(pred: object, what: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            if await pred():  # type: ignore[operator]
                return
        except Exception:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


LABELS = {"app": "bench"}


async def run_row(nodes: int, eps: int, inflight: int, nodes_per_net: int, idle_s: float, keep: bool,
                  per_proc: int, label_rule: bool = False, resync_s: float | None = None,
                  timeline: float = 0.0) -> Row:
    root = Path(tempfile.mkdtemp(prefix="vnet-bench-scale-"))
    env = {"VNETSIM_POLICY": "1"} if label_rule else {}
    if resync_s is not None:
        env["VNET_NODE_RESYNC_INTERVAL_S"] = str(resync_s)
    st = Stack(root, env)
    row = Row(nodes=nodes, eps=eps)
    try:
        cfg = st.start_servers()
        for name in SERVICES:
            st.spawn(name, [name])
        m = VNetManager(cfg)
        await m.__aenter__()
        try:
            async def services_up() -> bool:
                for name in SERVICES:
                    await m.health(name)
                return True

            await _wait(services_up, "the services", 60)
            if label_rule:  # before the nodes: their first ruleset already selects by label
                sel = [Selector(labels=dict(LABELS))]
                await m.put_rule(AllowRule(id="bench-app", from_=sel, to=sel))
            t0 = time.perf_counter()
            # One Python process runs up to --per-proc simulated nodes (one event loop: past a few
            # hundred nodes their idle work alone saturates it and its JetStream calls time out).
            procs = (nodes + per_proc - 1) // per_proc
            for k in range(procs):
                n_k = min(per_proc, nodes - k * per_proc)
                argv = ["node", "--simulate", str(n_k), "--node-id", "sim"]
                if nodes > 1:
                    argv += ["--simulate-first", str(k * per_proc)]
                    if n_k == 1:  # one node of a numbered fleet keeps its number
                        argv = ["node", "--simulate", "1", "--node-id", f"sim-{k * per_proc:04d}"]
                st.spawn(f"nodes{k}", argv)

            rr = aioredis.Redis.from_url(cfg.redis_url)

            async def all_registered() -> bool:
                # Counted in Redis: node.list answers every node in one reply (no paging) and that
                # reply outgrows a NATS message somewhere below 1,000 simulated nodes.
                live = await rr.mget([node_key(n) for n in names])
                return sum(v is not None for v in live) >= nodes

            names = [f"sim-{i:04d}" for i in range(nodes)] if nodes > 1 else ["sim"]
            def fleets_up() -> int:
                """Fleet processes done starting (a node that never started is logged, not fatal)."""
                return sum("simulated node(s) up" in (st.root / f"nodes{k}.log").read_text(errors="replace")
                           for k in range(procs))

            async def started() -> bool:
                return await all_registered() or fleets_up() == procs

            try:
                await _wait(started, f"{nodes} simulated nodes to start", 120 + nodes * 0.6)
                await asyncio.sleep(2)  # the last registrations in flight
                live = await rr.mget([node_key(n) for n in names])
            finally:
                await rr.aclose()
            up = [n for n, v in zip(names, live, strict=True) if v is not None]
            row.nodes_up = len(up)
            if len(up) < nodes:
                print(f"  {nodes - len(up)} simulated node(s) did not start: the creates go to the {len(up)} up",
                      file=sys.stderr)
            row.start_s = time.perf_counter() - t0
            try:
                listed = len(await m.nodes())
                row.node_list = f"{listed} nodes"
            except Exception as exc:
                row.node_list = f"failed: {str(exc)[:100]}"
            n_nets = (nodes + nodes_per_net - 1) // nodes_per_net
            # /20 per network (4,094 addresses): nodes_per_net x eps must fit
            nets = [await m.create_network(f"bench{i}", f"10.{64 + i // 16}.{(i % 16) * 16}.0/20", driver="bridge")
                    for i in range(n_nets)]
            # idle cost: what the bus carries with the nodes up and nothing changing
            v0, ti = varz(st.monitor), time.perf_counter()
            await asyncio.sleep(idle_s)
            v1 = varz(st.monitor)
            row.idle_msgs_s = (v1["out_msgs"] - v0["out_msgs"]) / (time.perf_counter() - ti)
            idx = {n: i for i, n in enumerate(names)}
            jobs = [(f"c{i}", up[i % len(up)], nets[idx[up[i % len(up)]] // nodes_per_net].id)
                    for i in range(len(up) * eps)]
            it = iter(jobs)

            async def worker() -> None:
                for cid, node, net in it:
                    t = time.perf_counter()
                    try:
                        info = await m.create_endpoint(cid, net, node=node, wait=True, wait_timeout=60.0,
                                                       labels=LABELS if label_rule else None)
                    except Exception as exc:
                        row.failed += 1
                        if row.failed <= 5:
                            print(f"  create {cid} on {node} failed: {exc}", file=sys.stderr)
                        continue
                    if info.status != "ready":
                        row.failed += 1
                        if row.failed <= 5:
                            print(f"  create {cid} on {node}: {info.status} {info.reason}", file=sys.stderr)
                        continue
                    row.lat.append(time.perf_counter() - t)
                    row.ends.append(time.perf_counter() - t0)
                    if row.lat[-1] >= SLOW_S:
                        row.slow.append((t - t0, row.lat[-1], node))
                    row.creates += 1

            import nats

            bus = await nats.connect(cfg.nats_url, name="bench-scale-copies")
            copies = [0]
            await count_node_copies(bus, copies)
            v0 = varz(st.monitor)

            def cpu_now() -> dict[str, float]:
                pids = {name: p.pid for name, p in st.procs.items()}
                pids["nats"], pids["valkey"] = st.servers[0].proc.pid, st.servers[1].proc.pid
                now = {name: cpu_s(pid) for name, pid in pids.items()}
                now["bench"] = sum(os.times()[:2])
                return now

            async def probe() -> None:
                # every 100 ms: Redis, and each service's health op (its own event loop), timed
                pr = aioredis.Redis.from_url(cfg.redis_url)
                try:
                    while True:
                        for what in ("redis", *SERVICES, "node"):
                            t = time.perf_counter()
                            try:
                                if what == "redis":
                                    await pr.ping()
                                elif what == "node":
                                    await m.health("node", node=up[0])
                                else:
                                    await m.health(what)
                            except Exception:
                                pass
                            took = time.perf_counter() - t
                            if took >= PROBE_SLOW_S:
                                row.probes.append((t - t0, what, took * 1e3))
                        await asyncio.sleep(0.1)
                finally:
                    await pr.aclose()

            c0 = cpu_now()
            t0 = time.perf_counter()
            prober = asyncio.ensure_future(probe()) if timeline else None
            await asyncio.gather(*(worker() for _ in range(inflight)))
            row.secs = time.perf_counter() - t0
            if prober is not None:
                prober.cancel()
                await asyncio.gather(prober, return_exceptions=True)
            c1 = cpu_now()
            row.cpu_s = {k: c1[k] - c0.get(k, 0.0) for k in c1}
            v1 = varz(st.monitor)
            # the idle traffic during the load is not the creates' fan-out, nor are the copies
            # this bench's own counting subscription was sent
            row.msgs_per_create = max(0.0, (v1["out_msgs"] - v0["out_msgs"] - row.idle_msgs_s * row.secs
                                            - copies[0]) / max(1, row.creates + row.failed))
            await asyncio.sleep(2)
            # endpoint events addressed to node workers, per create: what every node's work adds
            # up to; the fan-out still on its way after 2 s is not in
            row.node_evts_per_create = copies[0] / max(1, row.creates + row.failed)
            await bus.close()
            for name in SERVICES:
                row.rss_mb[name] = rss_mb(st.procs[name].pid)
            row.rss_mb["nodes"] = sum(rss_mb(p.pid) for n, p in st.procs.items() if n.startswith("nodes"))
            row.rss_mb["nats"] = rss_mb(st.servers[0].proc.pid)
            r = aioredis.Redis.from_url(cfg.redis_url)
            try:
                row.redis_mb = int((await r.info("memory"))["used_memory"]) / 2**20
            finally:
                await r.aclose()
        finally:
            await m.close()
    finally:
        st.stop()
        if keep:
            print(f"  logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return row


COLS = ("ipam", "network", "endpoint", "policy", "metrics", "nodes", "nats")


def table(rows: list[Row], timeline: float = 0.0) -> str:
    head = (f"{'nodes':>6} {'eps/node':>8} {'creates':>8} {'fail':>5} {'create/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
            + " ".join(f"{c + ' MB':>11}" for c in COLS) + f" {'redis MB':>9} {'msgs/create':>11}"
            + f" {'node evts/create':>16} {'idle msg/s':>10}"
            + f" {'start s':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r.nodes:>6} {r.eps:>8} {r.creates:>8} {r.failed:>5} {r.rate:>9.1f} {r.pct(0.5):>8.1f} "
                   f"{r.pct(0.99):>8.1f} " + " ".join(f"{r.rss_mb.get(c, 0):>11.1f}" for c in COLS)
                   + f" {r.redis_mb:>9.1f} {r.msgs_per_create:>11.1f} {r.node_evts_per_create:>16.1f}"
                   + f" {r.idle_msgs_s:>10.1f} {r.start_s:>8.1f}")
    out.append("")
    out.extend(f"{r.nodes} nodes: {r.nodes_up} started; node.list: {r.node_list}" for r in rows)
    out.append("")
    out.append("share of a core during the load (CPU s / load s):")
    for r in rows:
        fleet = sum(v for k, v in r.cpu_s.items() if k.startswith("nodes"))
        shares = {k: v for k, v in r.cpu_s.items() if not k.startswith("nodes")} | {"fleet": fleet}
        out.append(f"  {r.nodes} nodes: " + ", ".join(f"{k} {v / r.secs:.0%}" for k, v in
                                                    sorted(shares.items(), key=lambda kv: -kv[1]) if r.secs)
                   + f"; all {sum(shares.values()) / r.secs:.0%}" if r.secs else "")
    if timeline:
        for r in rows:
            out.append("")
            out.append(f"timeline, {r.nodes} nodes (windows of {timeline:g} s: answered, p50, p99, max ms):")
            buckets: dict[int, list[float]] = {}
            for end, lat in zip(r.ends, r.lat, strict=True):
                buckets.setdefault(int(end // timeline), []).append(lat * 1e3)
            for k in sorted(buckets):
                w = sorted(buckets[k])
                out.append(f"  {k * timeline:6.0f}s {len(w):6d} {w[len(w) // 2]:8.0f} "
                           f"{w[min(len(w) - 1, round(0.99 * (len(w) - 1)))]:8.0f} {w[-1]:8.0f}")
            out.append(f"probes slower than {PROBE_SLOW_S:g} s: start s, what, ms")
            out.extend(f"  {t:8.2f} {what:>9} {ms:6.0f}" for t, what, ms in r.probes)
            out.append(f"creates slower than {SLOW_S:g} s ({len(r.slow)}): start s, latency ms, node")
            out.extend(f"  {t:8.2f} {lat * 1e3:6.0f} {node}" for t, lat, node in sorted(r.slow)[:300])
    if len(rows) > 1:
        a, b = rows[0], rows[-1]

        def ratio(x: float, y: float) -> str:
            return f"{y / x:.2f}x" if x else "-"

        out.append("")
        out.append(f"growth {a.nodes} -> {b.nodes} nodes ({b.nodes / a.nodes:.0f}x nodes, "
                   f"{b.nodes * b.eps / (a.nodes * a.eps):.0f}x endpoints):")
        out.append(f"  create/s {ratio(a.rate, b.rate)}, p50 {ratio(a.pct(0.5), b.pct(0.5))}, "
                   f"p99 {ratio(a.pct(0.99), b.pct(0.99))} (target p99 <= 2x)")
        out.append("  RSS " + ", ".join(f"{c} {ratio(a.rss_mb.get(c, 0), b.rss_mb.get(c, 0))}" for c in COLS)
                   + f", redis {ratio(a.redis_mb, b.redis_mb)}")
        out.append(f"  NATS msgs per create {ratio(a.msgs_per_create, b.msgs_per_create)}, endpoint events "
                   f"delivered to nodes per create {ratio(a.node_evts_per_create, b.node_evts_per_create)}, "
                   f"idle msgs/s {ratio(a.idle_msgs_s, b.idle_msgs_s)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="10,100,1000", help="comma-separated node counts (default 10,100,1000)")
    p.add_argument("--eps", type=int, default=50, help="endpoints per node (default 50)")
    p.add_argument("--inflight", type=int, default=64, help="creates in flight (default 64)")
    p.add_argument("--nodes-per-net", type=int, default=20, help="nodes sharing one bridge network (default 20)")
    p.add_argument("--idle", type=float, default=12.0, help="seconds of idle traffic measured (default 12)")
    p.add_argument("--keep", action="store_true", help="keep each row's logs")
    p.add_argument("--per-proc", type=int, default=250, help="simulated nodes per process (default 250)")
    p.add_argument("--resync", type=float, default=None,
                   help="the nodes' full resync period in s (default: the config's, 10 s; a node uses the longer "
                   "of this and the cluster's period, live nodes / 20 s); each resync of a node with its policy "
                   "agent fetches its whole ruleset")
    p.add_argument("--timeline", type=float, default=0.0,
                   help="also print each row's latency per window of this many seconds (where the tail happens)")
    p.add_argument("--label-rule", action="store_true",
                   help="an allow rule selecting by label, every endpoint labelled, nodes with their policy agent")
    args = p.parse_args(argv)
    # SIGTERM runs the cleanup (each row's finally) instead of leaving the children to their
    # parent-death signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.nodes_per_net * args.eps > 4000:
        p.error("--nodes-per-net x --eps must fit a /20 (4,000 endpoints)")
    rows: list[Row] = []
    for n in (int(x) for x in args.nodes.split(",")):
        print(f"-- {n} nodes x {args.eps} endpoints ...", file=sys.stderr, flush=True)
        row = asyncio.run(run_row(n, args.eps, args.inflight, args.nodes_per_net, args.idle, args.keep,
                                  args.per_proc, args.label_rule, args.resync, args.timeline))
        rows.append(row)
        print(table(rows), file=sys.stderr, flush=True)
    print(table(rows, args.timeline))
    return 0 if all(r.creates for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
