"""Drift by event (issues 11 and 16): the node worker hears the kernel change under it and
repairs at once, and says who made the change.

The worker runs with a 60 s full-resync period and the test checks that no full resync ran
while it measured, so only the notification path can repair in time. Each drift is made by
a process this test starts (``ip netns exec <host> nft ...``, ``ip -n <host> link ...``); the
repair is timed from just before that process starts until the kernel is back, as an
independent ``nft``/``ip`` reading sees it. A pair that must be denied (two endpoints of a
Full network) is probed in a loop while our table is gone: the time it was reachable is
printed and bounded. The bound is the issue's 1 s (``DRIFT_BOUND_S``, 10-30x what we measure;
``VNET_DRIFT_BOUND_S`` raises it on a much busier machine); the figures go to
docs/reliability.md. Everything lives in namespaces of this test.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import control_plane, fresh_db_config, requires_root
from tests.netns.conftest import addrs, links, ping_all
from tests.netns.isolation_lab import Agent
from tests.netns.test_overlay_e2e import Cluster, cluster  # noqa: F401  (the fixture)
from vnet import VNetManager
from vnet.contracts.endpoint import EndpointInfo
from vnet.contracts.node import DriftReply
from vnet.core import naming
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

pytestmark = [pytest.mark.netns, requires_root]

RESYNC_S = 60.0  # no full resync inside the test: only notifications can meet the bound
# The bound, 10-30x the figures measured here; a machine far busier than ours may
# raise it (VNET_DRIFT_BOUND_S) rather than retry: the figures are printed either way.
DRIFT_BOUND_S = float(os.environ.get("VNET_DRIFT_BOUND_S", "1.0"))
T = 0.15  # one probe's timeout (a denied probe takes this long)


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for a in made:
        a.close()


def tcp(a: Agent, dst: EndpointInfo, t: float = T) -> bool:
    return bool(a.send(op="tcp", dst=dst.ip_address, port=80, t=t).result(timeout=t + 30))


def table_present(host: str, family: str = "inet") -> bool:
    r = subprocess.run(["ip", "netns", "exec", host, "nft", "list", "table", family, "vnet"], capture_output=True)
    return r.returncode == 0


async def until(what: str, cond: Callable[[], bool], t0: float, bound: float = 30.0) -> float:
    """Seconds from ``t0`` until ``cond()`` (run in a thread) holds; fails after ``bound``."""
    while True:
        if await asyncio.to_thread(cond):
            return time.perf_counter() - t0
        assert time.perf_counter() - t0 < bound, f"{what}: not within {bound} s (the resync is {RESYNC_S} s)"
        await asyncio.sleep(0.01)


class Prober:
    """Probes a pair in ``n`` staggered loops (threads; the agent runs each probe in its own),
    so a new connection is tried every ~T/n; remembers when probes got through."""

    def __init__(self, a: Agent, dst: EndpointInfo, n: int = 3) -> None:
        self.a, self.dst = a, dst
        self.through: list[float] = []  # perf_counter at the end of each probe that connected
        self.probes = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i * T / n,), daemon=True) for i in range(n)]

    def _run(self, delay: float) -> None:
        time.sleep(delay)
        while not self._stop.is_set():
            ok = tcp(self.a, self.dst)
            self.probes += 1
            if ok:
                self.through.append(time.perf_counter())

    def __enter__(self) -> Prober:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def vnetctl(nats_url: str, *args: str) -> str:
    """``vnetctl --nats URL ARGS`` in this process (click's runner); its standard output."""
    from click.testing import CliRunner

    from vnet.cli import main as cli_main

    cli_main.register()
    r = CliRunner().invoke(cli_main.cli, ["--nats", nats_url, *args], catch_exceptions=False)
    assert r.exit_code == 0, (args, r.output)
    return r.stdout


async def drift_record(m: object, node: str, kind: str, since: float, timeout: float = 10.0) -> DriftReply:
    t0 = time.monotonic()
    while True:
        rep: DriftReply = await m.node_drift(node)  # type: ignore[attr-defined]
        if any(r.kind == kind and r.at >= since for r in rep.records):
            return rep
        assert time.monotonic() - t0 < timeout, f"no {kind} record: {rep}"
        await asyncio.sleep(0.05)


async def test_drift_is_repaired_by_event_and_attributed(
        config: VNetConfig, netns: Callable[[str], str], start_service: Callable[..., Awaitable[Runtime]],
        run_prefix: str, agents: list[Agent]) -> None:
    node = f"{run_prefix}-drift"
    async with control_plane(config, start_service, netns, host="drh", node=node, resync_s=RESYNC_S) as cp:
        m, host = cp.m, cp.host
        w = cp.node_rt.state["worker"]
        for _ in range(1200):
            if w.fetched and w.counters.full_resyncs and w.drift is not None and w.drift.watch is not None:
                break
            await asyncio.sleep(0.05)
        assert w.drift is not None and w.drift.watch is not None, w.drift and w.drift.reason
        full = await m.create_network("drfull", "10.151.0.0/24", None, "bridge", "full")
        peer = await m.create_network("drpeer", "10.152.0.0/24", None, "bridge", "peer_only")
        cs = await asyncio.to_thread(lambda: [netns(n) for n in ("drd1", "drd2", "drp1", "drp2")])
        ags = await asyncio.to_thread(lambda: [Agent(c) for c in cs])
        agents += ags
        d1, d2, p1, p2 = [await m.create_endpoint(c, net.id, node=node, wait=True, wait_timeout=30)
                          for c, net in zip(cs, (full, full, peer, peer), strict=True)]
        assert {e.status for e in (d1, d2, p1, p2)} == {"ready"}, (d1, d2, p1, p2)
        await until("peers reachable", lambda: tcp(ags[2], p2, 1.0), time.perf_counter())
        assert not await asyncio.to_thread(tcp, ags[0], d2, 1.0), "a Full network's peers must be denied"
        # Our own writes (two networks, four endpoints, their rules) are no drift, and cost no
        # repair reconcile (the notifications were heard: the watch is not idle).
        assert (await m.node_drift(node)).total == 0
        assert w.drift.notifications > 0 and w.drift.reconciles == 0, vars(w.drift)
        print(f"setup (2 networks, 4 endpoints): {w.drift.notifications} notifications, "
              f"{w.drift.handling_s * 1e6 / w.drift.notifications:.0f} us each on the event loop")
        base = w.counters.full_resyncs
        figures: dict[str, float] = {}

        # 1. Our table deleted by another process: restored, the denied pair reachable at most that long.
        with Prober(ags[0], d2) as prober:
            await asyncio.sleep(0.5)  # probes running before the change
            since = time.time()
            t0 = time.perf_counter()
            proc = await asyncio.to_thread(subprocess.Popen, ["ip", "netns", "exec", host, "nft", "delete", "table",
                                                               "inet", "vnet"])
            assert await asyncio.to_thread(proc.wait, 30) == 0
            figures["table deleted -> restored"] = await until("table restored", lambda: table_present(host), t0)
            await asyncio.sleep(1.0)  # probes after the repair: denied again
        open_s = (prober.through[-1] - t0) if prober.through else 0.0
        figures["denied pair reachable for"] = max(0.0, open_s)
        # no probe got through after the table was back (one that started just before may end
        # up to a probe timeout later; "back" is when a poll saw it, at or after the fact)
        assert open_s <= figures["table deleted -> restored"] + T, (open_s, figures)
        rep = await drift_record(m, node, "nft_table", since)
        rec = next(r for r in rep.records if r.kind == "nft_table")
        assert rec.sender.source == "nftables" and rec.sender.pid == proc.pid, rec
        assert rec.sender.comm == "nft" and rec.repaired, rec  # writes: 0 when an event's write came first
        assert "delete table inet vnet" in rec.detail, rec
        figures["table: worker's own repair time"] = rec.repaired_s
        assert not await asyncio.to_thread(tcp, ags[0], d2, 1.0), "denied again after the repair"
        assert prober.probes >= 5, prober.probes

        # 2. A veth deleted: re-created, its container reachable again.
        veth = naming.veth_name(p2.id)
        since = time.time()
        t0 = time.perf_counter()
        proc = await asyncio.to_thread(subprocess.Popen, ["ip", "-n", host, "link", "del", veth])
        assert await asyncio.to_thread(proc.wait, 30) == 0
        figures["veth deleted -> re-created"] = await until(
            "veth back", lambda: links(host).get(veth, {}).get("operstate") in ("UP", "UNKNOWN", "LOWERLAYERDOWN")
            and veth in links(host), t0)
        figures["veth deleted -> peer reachable"] = await until("peer reachable again",
                                                                lambda: tcp(ags[2], p2, 0.5), t0)
        rep = await drift_record(m, node, "link_deleted", since)
        rec = next(r for r in rep.records if r.kind == "link_deleted")
        assert (rec.target, rec.owner, rec.repaired) == (veth, p2.id, True), rec
        assert rec.sender.source == "unknown" and rec.writes >= 1, rec  # the kernel does not name link senders
        figures["veth: worker's own repair time"] = rec.repaired_s

        # 3. A bridge set down: up again.
        br = naming.bridge_name(peer.id)
        since = time.time()
        t0 = time.perf_counter()
        proc = await asyncio.to_thread(subprocess.Popen, ["ip", "-n", host, "link", "set", br, "down"])
        assert await asyncio.to_thread(proc.wait, 30) == 0
        figures["bridge down -> up"] = await until("bridge up", lambda: "UP" in links(host)[br]["flags"], t0)
        figures["bridge down -> peer reachable"] = await until("peer reachable again",
                                                               lambda: tcp(ags[2], p2, 0.5), t0)
        rep = await drift_record(m, node, "link_down", since)
        rec = next(r for r in rep.records if r.kind == "link_down")
        assert (rec.target, rec.owner) == (br, peer.id), rec
        figures["bridge: worker's own repair time"] = rec.repaired_s

        # 3b. A veth taken off its bridge: put back on it.
        veth1 = naming.veth_name(p1.id)
        since = time.time()
        t0 = time.perf_counter()
        proc = await asyncio.to_thread(subprocess.Popen, ["ip", "-n", host, "link", "set", veth1, "nomaster"])
        assert await asyncio.to_thread(proc.wait, 30) == 0
        figures["veth off its bridge -> back on"] = await until(
            "veth back on its bridge", lambda: links(host)[veth1].get("master") == br, t0)
        rep = await drift_record(m, node, "link_master", since)
        rec = next(r for r in rep.records if r.kind == "link_master")
        assert (rec.target, rec.owner, rec.repaired) == (veth1, p1.id, True), rec

        # 4. The gateway address taken off a bridge: put back. Address changes carry the sender's
        # netlink port id; `ip` autobinds its socket, so the kernel gives it the process's pid.
        gw = "10.152.0.1/24"
        since = time.time()
        t0 = time.perf_counter()
        proc = await asyncio.to_thread(subprocess.Popen, ["ip", "-n", host, "addr", "del", gw, "dev", br])
        assert await asyncio.to_thread(proc.wait, 30) == 0
        figures["gateway address removed -> back"] = await until(
            "gateway back", lambda: (br, gw) in addrs(host), t0)
        rep = await drift_record(m, node, "address_removed", since)
        rec = next(r for r in rep.records if r.kind == "address_removed")
        assert (rec.target, rec.owner, rec.sender.source) == (br, peer.id, "netlink port"), rec
        assert rec.sender.port == proc.pid and rec.sender.pid in (0, proc.pid), rec
        print(f"address removal by pid {proc.pid}: recorded as port {rec.sender.port}, pid {rec.sender.pid or '?'} "
              f"({rec.sender.cmdline or 'exited before the lookup'})")

        for k, v in figures.items():
            print(f"{k}: {v * 1000:.0f} ms")
        assert w.counters.full_resyncs == base, "a full resync ran: the bound was not met by events alone"
        rep = await m.node_drift(node)
        assert rep.watching and rep.total == 5 and [r.kind for r in rep.records] == [
            "address_removed", "link_master", "link_down", "link_deleted", "nft_table"], rep
        counts = {(c.labels["kind"]): c.value for c in cp.node_rt.metrics.snapshot().counters
                  if c.name == "vnet_node_drift_repairs"}
        assert counts == {"nft_table": 1, "link_deleted": 1, "link_down": 1, "link_master": 1,
                          "address_removed": 1}, counts

        # The same through vnetctl: a table in a pipe, the records under --json.
        table_pid = next(r.sender.pid for r in rep.records if r.kind == "nft_table")
        out = await asyncio.to_thread(vnetctl, cp.cfg.nats_url, "node", "drift", node)
        print(out)
        # the command line when the worker read it before nft exited, else the kernel's process name
        assert (f"pid {table_pid} (nft delete table inet vnet)" in out or f"pid {table_pid} (nft)" in out), out
        assert "link_deleted" in out, out
        doc = json.loads(await asyncio.to_thread(vnetctl, cp.cfg.nats_url, "node", "drift", node, "--limit", "1",
                                                 "--json"))
        assert doc["total"] == 5 and [r["kind"] for r in doc["records"]] == ["address_removed"], doc
        # Control: the same deletion with the watch stopped leaves the pair open (so the probes
        # above could have seen it) until a full resync restores the table.
        await w.drift.stop()
        proc = await asyncio.to_thread(subprocess.Popen, ["ip", "netns", "exec", host, "nft", "delete", "table",
                                                           "inet", "vnet"])
        assert await asyncio.to_thread(proc.wait, 30) == 0
        t0 = time.perf_counter()
        await until("open without the watch", lambda: tcp(ags[0], d2), t0, bound=10.0)
        await asyncio.sleep(1.5)
        assert not table_present(host), "nothing but the watch restores the table before the resync"
        assert await asyncio.to_thread(tcp, ags[0], d2, 1.0), "still open"
        await m.node_resync(node)
        assert table_present(host) and not await asyncio.to_thread(tcp, ags[0], d2, 1.0)
        rec = (await m.node_drift(node, limit=1)).records[0]  # the resync's repair is listed too
        assert (rec.kind, rec.sender.source, rec.detail) == (
            "nft_table", "unknown", "table missing, found by the periodic resync"), rec

        for k in ("table deleted -> restored", "denied pair reachable for", "veth deleted -> re-created",
                  "bridge down -> up", "veth off its bridge -> back on", "gateway address removed -> back"):
            assert figures[k] <= DRIFT_BOUND_S, f"{k}: {figures[k]:.3f} s > {DRIFT_BOUND_S} s ({figures})"


async def test_restarted_worker_writes_nothing_and_keeps_watching(
        config: VNetConfig, netns: Callable[[str], str], start_service: Callable[..., Awaitable[Runtime]],
        run_prefix: str, agents: list[Agent], tmp_path: Path) -> None:
    """A worker restarted on a host whose kernel already matches adopts it (0 netlink writes,
    0 ruleset applies, no drift recorded for what the previous worker made), and follows the
    kernel from its first moment: a table deleted afterwards is restored and attributed."""
    node = f"{run_prefix}-drr"
    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for name in ("ipam", "network", "endpoint", "policy"):
        await start_service(name, cfg=cfg)
    host = netns("drr")
    # the state dir keeps what the worker applied, so its successor can adopt it (production sets one)
    ncfg = msgspec.structs.replace(cfg, host_netns=host, node_state_dir=str(tmp_path / "node"))
    params = {"node": node, "resync_s": str(RESYNC_S)}
    rt1 = await start_service("node", params=params, cfg=ncfg)
    m = VNetManager(cfg)
    await m.__aenter__()
    try:
        for _ in range(1200):
            if any(n.node == node for n in await m.nodes()):
                break
            await asyncio.sleep(0.05)
        net = await m.create_network("drrnet", "10.153.0.0/24", None, "bridge", "peer_only")
        cs = await asyncio.to_thread(lambda: [netns(n) for n in ("drra", "drrb")])
        ags = await asyncio.to_thread(lambda: [Agent(c) for c in cs])
        agents += ags
        a, b = [await m.create_endpoint(c, net.id, node=node, wait=True, wait_timeout=30) for c in cs]
        assert (a.status, b.status) == ("ready", "ready"), (a, b)
        await until("peers reachable", lambda: tcp(ags[0], b, 1.0), time.perf_counter())
        w1 = rt1.state["worker"]
        await until("ruleset in force", lambda: bool(w1.policy and w1.policy.version), time.perf_counter())
        await rt1.stop(drain_timeout=2.0)

        rt2 = await start_service("node", params=params, cfg=ncfg)
        w2 = rt2.state["worker"]

        def resynced() -> bool:
            return bool(w2.fetched and w2.counters.full_resyncs >= 1 and w2.policy and w2.policy.syncs >= 1)

        await until("restarted worker's first resync", resynced, time.perf_counter())
        s = await m.node_stats(node)
        assert s.writes == 0 and s.last_full_writes == 0 and s.last_full_errors == 0, s
        assert s.policy is not None and s.policy.applies == 0, s.policy
        rep = await m.node_drift(node)
        assert rep.watching and rep.total == 0, rep
        assert await asyncio.to_thread(tcp, ags[0], b, 1.0)

        since = time.time()
        t0 = time.perf_counter()
        proc = await asyncio.to_thread(subprocess.Popen, ["ip", "netns", "exec", host, "nft", "delete", "table",
                                                           "bridge", "vnet"])
        assert await asyncio.to_thread(proc.wait, 30) == 0
        took = await until("bridge table restored", lambda: table_present(host, "bridge"), t0)
        rep = await drift_record(m, node, "nft_table", since)
        rec = rep.records[0]
        assert (rec.sender.pid, rec.target) == (proc.pid, "bridge vnet"), rec
        print(f"restarted worker: 0 writes, 0 applies; bridge table deleted -> restored in {took * 1000:.0f} ms")
        assert took <= DRIFT_BOUND_S, took
        assert w2.counters.full_resyncs == 1, "only the start-up resync ran"
    finally:
        await m.close()
        await r.flushdb()
        await r.aclose()


async def test_overlay_vxlan_device_deleted_is_recreated(cluster: Cluster) -> None:  # noqa: F811
    """An overlay host's VXLAN device deleted by another process: re-created (with its bridge
    port) by the event path, and the remote endpoint reachable again."""
    c = cluster
    n1 = await c.add_host(1, resync_s=RESYNC_S)
    n2 = await c.add_host(2, resync_s=RESYNC_S)
    await c.wait_nodes([n1, n2])
    net = await c.m.create_network("drvx", "10.154.0.0/24", None, "overlay", "none")
    (e1,) = await c.attach(n1, await c.containers(n1, 1, "dvx1"), net.id)
    (e2,) = await c.attach(n2, await c.containers(n2, 1, "dvx2"), net.id)
    await until("reachable across hosts", lambda: not ping_all([(e1.container_id, e2.ip_address)]),
                time.perf_counter())
    w = c.runtimes[n1].state["worker"]
    base = w.counters.full_resyncs
    vx = naming.vxlan_name(net.id)
    since = time.time()
    t0 = time.perf_counter()
    proc = await asyncio.to_thread(subprocess.Popen, ["ip", "-n", c.hosts[n1], "link", "del", vx])
    assert await asyncio.to_thread(proc.wait, 30) == 0
    took = await until("vxlan back", lambda: links(c.hosts[n1]).get(vx, {}).get("master")
                       == naming.bridge_name(net.id), t0)
    back = await until("reachable again", lambda: not ping_all([(e1.container_id, e2.ip_address)]), t0)
    rep = await drift_record(c.m, n1, "link_deleted", since)
    rec = rep.records[0]
    assert (rec.target, rec.owner, rec.repaired) == (vx, net.id, True), rec
    print(f"vxlan device deleted -> re-created {took * 1000:.0f} ms, reachable again {back * 1000:.0f} ms "
          f"(worker: {rec.repaired_s * 1000:.0f} ms, {rec.writes} writes)")
    assert w.counters.full_resyncs == base, "a full resync ran: the bound was not met by events alone"
    assert took <= DRIFT_BOUND_S, took
