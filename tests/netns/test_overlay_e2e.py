"""Overlay networks across hosts through the whole control plane: network service (VNI),
endpoint service (remote endpoints, peers, WireGuard public keys and mesh addresses),
node workers (one per host namespace) and real kernels.

Hosts are namespaces joined by an underlay switch namespace (``overlay_util``); every
container is a namespace too. Addresses (10.250.0.0/24 underlay, 10.255.0.0/16 mesh,
10.131.0.0/24 and 10.132.0.0/24 overlays) exist only inside them. wireguard-go runs only
inside the host namespaces and is stopped at teardown (the ``netns`` fixture also kills
anything left inside them).

Sizes: three hosts with three containers each (nine namespaces) are enough to show
every host pair in both directions with more than one container per host (so FDB
entries per remote are checked, not just one per host), while keeping the test under
~20 s on two shared cores; the per-host entry counts scale linearly (docs/dataplane.md).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import requires_root
from tests.netns.conftest import links, ping_all
from tests.netns.overlay_util import UNDERLAY_IF, Sockets, build_underlay, plug, underlay_addr
from vnet import VNetManager
from vnet.contracts.endpoint import EndpointInfo
from vnet.core import naming
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

pytestmark = [pytest.mark.netns, requires_root]

_dbs = itertools.cycle(range(1, 16))
RESYNC_S = 1.0  # full resync period of the node workers
# Node timeout = 3 heartbeats = 6 s (HEARTBEAT_MISSES). Shorter, and a worker whose event loop
# a busy machine stalls for a second would be declared gone in the middle of a test.
HEARTBEAT_S = 2.0
NODE_TIMEOUT_S = 3 * HEARTBEAT_S
# Bounds on convergence (join, leave, first handshake). The quiet-machine figures are printed
# (a fraction of a second, see docs/dataplane.md); these only say "it happens", with room for
# a machine busy with other work.
CONVERGE_S = 30.0


@dataclass
class Cluster:
    cfg: VNetConfig
    m: VNetManager
    r: aioredis.Redis
    ul: str
    state: Path
    netns: Callable[[str], str]
    start_service: Callable[..., Awaitable[Runtime]]
    prefix: str
    hosts: dict[str, str] = field(default_factory=dict)  # node -> host namespace
    ports: dict[str, str] = field(default_factory=dict)  # node -> switch port (captures)
    runtimes: dict[str, Runtime] = field(default_factory=dict)

    async def add_host(self, k: int, resync_s: float = RESYNC_S, heartbeat_s: float = HEARTBEAT_S) -> str:
        node = f"{self.prefix}-n{k}"

        def make() -> str:
            h = self.netns(f"oh{k}")
            self.ports[node] = plug(self.ul, h, k)
            return h

        h = await asyncio.to_thread(make)
        self.hosts[node] = h
        # These hosts leave for good when their worker stops: deregister at once.
        cfg = msgspec.structs.replace(self.cfg, host_netns=h, node_state_dir=str(self.state / f"n{k}"),
                                      node_deregister_on_stop=True)
        self.runtimes[node] = await self.start_service(
            "node", params={"node": node, "underlay": underlay_addr(k), "underlay_ifname": UNDERLAY_IF,
                            "resync_s": str(resync_s), "heartbeat_s": str(heartbeat_s),
                            "wg_ifname": f"{self.prefix}w{k}"[-15:]}, cfg=cfg)
        return node

    async def wait_nodes(self, nodes: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            have = {n.node for n in await self.m.nodes()}
            if set(nodes) <= have:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"nodes {nodes} did not register")

    async def containers(self, node: str, n: int, tag: str) -> list[str]:
        return await asyncio.to_thread(lambda: [self.netns(f"{tag}{i}") for i in range(n)])

    async def attach(self, node: str, cs: list[str], network: str) -> list[EndpointInfo]:
        eps = await asyncio.gather(*(self.m.create_endpoint(c, network, node=node, wait=True, wait_timeout=30)
                                     for c in cs))
        bad = [e for e in eps if e.status != "ready"]
        assert not bad, bad
        return list(eps)

    def stop_wireguard(self) -> None:
        for rt in self.runtimes.values():
            w = rt.state.get("worker")
            if w is not None and w.rec is not None:
                w.rec.stop_wireguard()


@pytest.fixture
async def cluster(config: VNetConfig, netns: Callable[[str], str], start_service: Callable[..., Awaitable[Runtime]],
                  run_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    # `netns` before `start_service`: the services stop before the namespaces are deleted.
    db = next(_dbs)
    base = config.redis_url.rsplit("/", 1)[0]
    cfg = msgspec.structs.replace(config, redis_url=f"{base}/{db}")
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for name in ("ipam", "network", "endpoint", "policy"):  # policy: the workers apply rulesets
        await start_service(name, cfg=cfg)
    ul = await asyncio.to_thread(build_underlay, netns, "oul")
    state = Path(tmp_path_factory.mktemp(f"{run_prefix}-ove2e"))
    m = VNetManager(cfg)
    await m.__aenter__()
    c = Cluster(cfg, m, r, ul, state, netns, start_service, run_prefix)
    try:
        yield c
    finally:
        for rt in c.runtimes.values():  # workers first (fail static: they leave the tunnels up) ...
            await rt.stop(drain_timeout=2.0)
        c.stop_wireguard()  # ... then the tunnels go
        await asyncio.to_thread(_remove_wg_sockets, run_prefix)
        await m.close()
        await r.flushdb()
        await r.aclose()
        shutil.rmtree(state, ignore_errors=True)


def _remove_wg_sockets(prefix: str) -> None:
    """wireguard-go leaves its control socket behind when killed: remove ours."""
    for k in range(1, 9):
        Path(f"/var/run/wireguard/{(prefix + 'w' + str(k))[-15:]}.sock").unlink(missing_ok=True)


def _fdb(ns: str) -> dict[str, str]:
    """Static (remote) FDB entries on the VXLAN devices of ``ns``: MAC -> remote VTEP."""
    out = subprocess.run(["bridge", "-j", "-n", ns, "fdb", "show"], check=True, capture_output=True, text=True).stdout
    return {e["mac"]: e["dst"] for e in json.loads(out or "[]") if e.get("dst") and "permanent" in e.get("state", "")}


def _neigh(ns: str) -> set[str]:
    """Permanent neighbour entries on our VXLAN devices (their IPv4 addresses)."""
    out = subprocess.run(["ip", "-j", "-n", ns, "neigh", "show", "nud", "permanent"], check=True,
                         capture_output=True, text=True).stdout
    return {e["dst"] for e in json.loads(out or "[]") if e.get("dev", "").startswith("vnx-")}


async def _eventually(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Seconds until ``cond()`` held (AssertionError after ``timeout``)."""
    t0 = time.monotonic()
    while not await asyncio.to_thread(cond):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(step)
    return time.monotonic() - t0


async def test_three_hosts_one_overlay_then_a_fourth_joins_and_leaves(cluster: Cluster) -> None:
    c = cluster
    nodes = [await c.add_host(k) for k in (1, 2, 3)]
    await c.wait_nodes(nodes)
    net = await c.m.create_network("ov3", "10.131.0.0/24", None, "overlay", "none")
    vni = int(net.options["vni"])
    assert 1 <= vni < 1 << 24 and net.options.get("encrypted", "false") == "false"
    eps: dict[str, list[EndpointInfo]] = {}
    for k, node in enumerate(nodes, 1):
        eps[node] = await c.attach(node, await c.containers(node, 3, f"o{k}c"), net.id)

    # Each node's desired state: the other hosts' endpoints as remotes, the other hosts as peers.
    for node in nodes:
        d = (await c.m.node_desired(node)).desired
        (nd,) = d.networks
        assert nd.vni == vni and nd.mtu == 1450
        others = [e for o in nodes if o != node for e in eps[o]]
        assert sorted(r.mac for r in nd.remotes) == sorted(e.mac_address for e in others)
        assert [p.name for p in d.peers] == sorted(o for o in nodes if o != node)
        # The kernel: a VXLAN device with that VNI on the underlay, one FDB entry per remote.
        host = c.hosts[node]
        vx = links(host)[naming.vxlan_name(net.id)]["linkinfo"]["info_data"]
        assert vx["id"] == vni and vx["link"] == UNDERLAY_IF
        fdb = await asyncio.to_thread(_fdb, host)
        assert {e.mac_address: c.hosts[e.node] for e in others}.keys() == fdb.keys()
        assert {fdb[e.mac_address] for e in others} == {underlay_addr(nodes.index(o) + 1) for o in nodes if o != node}

    # Every container reaches every container on the other hosts (ICMP: all 54 ordered pairs) ...
    pairs = [(a.container_id, b.ip_address) for x, y in itertools.permutations(nodes, 2)
             for a in eps[x] for b in eps[y]]
    assert len(pairs) == 54
    assert await asyncio.to_thread(ping_all, pairs) == []
    # ... and TCP/UDP on a sample covering each ordered host pair.
    socks = Sockets()
    try:
        for i, (x, y) in enumerate(itertools.permutations(nodes, 2)):
            a, b = eps[x][i % 3], eps[y][(i + 1) % 3]
            assert await asyncio.to_thread(socks.tcp, a.container_id, b.container_id, b.ip_address,
                                           7100 + i), (x, y)
            assert await asyncio.to_thread(socks.udp, a.container_id, b.container_id, b.ip_address, 7200 + i)
    finally:
        socks.close()

    # A fourth host joins with two new containers: reachable from every other host.
    n4 = await c.add_host(4)
    cs4 = await c.containers(n4, 2, "o4c")
    t0 = time.monotonic()
    await c.wait_nodes([n4])
    eps[n4] = await c.attach(n4, cs4, net.id)
    probe = [(eps[o][0].container_id, e.ip_address) for o in nodes for e in eps[n4]]
    probe += [(eps[n4][0].container_id, eps[o][1].ip_address) for o in nodes]
    await _eventually(lambda: not ping_all(probe), CONVERGE_S)
    join_s = time.monotonic() - t0
    assert await asyncio.to_thread(ping_all, probe) == []
    macs4 = {e.mac_address for e in eps[n4]}
    ips4 = {e.ip_address for e in eps[n4]}
    for node in nodes:
        assert macs4 <= (await asyncio.to_thread(_fdb, c.hosts[node])).keys()
        assert ips4 <= await asyncio.to_thread(_neigh, c.hosts[node])

    # It leaves: its worker stops and deregisters (vnet.evt.node.left.<node>: every other worker
    # re-fetches at once); its FDB and neighbour entries disappear from every other host.
    await c.runtimes[n4].stop(drain_timeout=2.0)

    def gone() -> bool:
        return all(not (macs4 & _fdb(c.hosts[n]).keys()) and not (ips4 & _neigh(c.hosts[n])) for n in nodes)

    leave_s = await _eventually(gone, CONVERGE_S)
    assert n4 not in {n.node for n in await c.m.nodes()}
    for node in nodes:
        assert n4 not in [p.name for p in (await c.m.node_desired(node)).desired.peers]
    # The others still reach each other.
    assert await asyncio.to_thread(ping_all, pairs[::9]) == []
    print(f"\njoin -> reachable from all hosts: {join_s:.2f} s; leave -> entries gone everywhere: {leave_s:.2f} s "
          f"(node timeout {NODE_TIMEOUT_S:.1f} s + resync {RESYNC_S:.1f} s)")


@pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg") is None
                    or shutil.which("tcpdump") is None,
                    reason="needs wireguard-go, wireguard-tools and tcpdump (ops/scripts/bootstrap.sh)")
async def test_other_hosts_learn_attaches_and_detaches_as_deltas(cluster: Cluster) -> None:
    """With the full resync at 60 s only the events can do it: every host gets the FDB and
    neighbour entries of the others' endpoints as they attach and loses them as they
    detach, written as deltas (``remote_deltas``, no reconcile of the network). What the
    deltas built is what a reconcile from scratch renders: a full resync afterwards writes
    nothing. The attaching host reads no remote entries either (``table_targets``), and
    leaves them as they are (the same resync checks it)."""
    c = cluster
    nodes = [await c.add_host(k, resync_s=60.0) for k in (1, 2, 3)]
    await c.wait_nodes(nodes)
    net = await c.m.create_network("ovd", "10.132.0.0/24", None, "overlay", "none")
    eps: dict[str, list[EndpointInfo]] = {}
    for k, node in enumerate(nodes, 1):  # the network arrives on each host (a fetch, not a delta)
        eps[node] = await c.attach(node, await c.containers(node, 1, f"d{k}a"), net.id)
    before = {n: (await c.m.node_stats(n)).remote_deltas for n in nodes}
    for k, node in enumerate(nodes, 1):
        eps[node] += await c.attach(node, await c.containers(node, 2, f"d{k}b"), net.id)

    def entries_match() -> bool:
        for node in nodes:
            others = [e for o in nodes if o != node for e in eps[o]]
            want_fdb = {e.mac_address: underlay_addr(nodes.index(e.node) + 1) for e in others}
            if _fdb(c.hosts[node]) != want_fdb or _neigh(c.hosts[node]) != {e.ip_address for e in others}:
                return False
        return True

    took = await _eventually(entries_match, 10.0)
    print(f"\nsix attaches on three hosts: every host's remote entries right {took * 1e3:.0f} ms after the last ready")
    after = {n: (await c.m.node_stats(n)).remote_deltas for n in nodes}
    assert all(after[n] > before[n] for n in nodes), (before, after)
    for node in nodes:
        st = await c.m.node_resync(node)
        assert st.last_full_writes == 0 and st.last_full_errors == 0, (node, st)

    gone = {node: eps[node].pop() for node in nodes}
    for e in gone.values():
        rep = await c.m.delete_endpoint(e.id, wait=True, wait_timeout=30)
        assert rep.node_confirmed, rep
    await _eventually(entries_match, 10.0)
    assert all(not ({e.mac_address for e in gone.values()} & _fdb(c.hosts[n]).keys()) for n in nodes)
    last = {n: (await c.m.node_stats(n)).remote_deltas for n in nodes}
    assert all(last[n] > after[n] for n in nodes), (after, last)
    for node in nodes:
        st = await c.m.node_resync(node)
        assert st.last_full_writes == 0 and st.last_full_errors == 0, (node, st)


async def test_encrypted_overlay_two_hosts_through_the_control_plane(cluster: Cluster) -> None:
    from tests.netns.test_overlay_encrypted import MARKER, Capture, assert_only_wireguard

    c = cluster
    nodes = [await c.add_host(k) for k in (1, 2)]
    await c.wait_nodes(nodes)
    infos = {n.node: n for n in await c.m.nodes()}
    for k, node in enumerate(nodes, 1):
        # the key pair was made on the node: private key 0600 in its state dir, only the public key published
        key = c.state / f"n{k}" / f"wg-{(c.prefix + 'w' + str(k))[-15:]}.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        info = infos[node]
        assert info.wg_public_key and len(info.wg_public_key) == 44
        assert key.read_text().strip() != info.wg_public_key
        assert key.read_text().strip() not in msgspec.json.encode(info).decode()
        assert info.wg_address and info.wg_address.startswith("10.255.") and info.wg_address.endswith("/16")
    assert infos[nodes[0]].wg_address != infos[nodes[1]].wg_address

    net = await c.m.create_network("ovenc", "10.132.0.0/24", None, "overlay", "none", {"encrypted": "true"})
    eps = {node: await c.attach(node, await c.containers(node, 1, f"e{k}c"), net.id)
           for k, node in enumerate(nodes, 1)}
    a, b = eps[nodes[0]][0], eps[nodes[1]][0]
    d = (await c.m.node_desired(nodes[0])).desired
    assert d.networks[0].encrypted and d.networks[0].mtu == 1370
    (peer,) = d.peers
    assert peer.wg_public_key == infos[nodes[1]].wg_public_key
    assert peer.wg_address == (infos[nodes[1]].wg_address or "").split("/")[0]
    vx = links(c.hosts[nodes[0]])[naming.vxlan_name(net.id)]["linkinfo"]["info_data"]
    assert vx["link"] == f"{c.prefix}w1"[-15:]  # the VXLAN device rides the WireGuard interface

    pairs = [(a.container_id, b.ip_address), (b.container_id, a.ip_address)]
    await _eventually(lambda: not ping_all(pairs[:1]), CONVERGE_S)  # the first handshake
    assert await asyncio.to_thread(ping_all, pairs) == []

    socks = Sockets()
    try:
        cap = await asyncio.to_thread(Capture, c.ul, c.ports[nodes[0]],
                                      c.state / f"{os.environ['VNET_RUN_PREFIX']}-cp.pcap")
        await asyncio.to_thread(socks.send_udp, a.container_id, b.ip_address, MARKER * 8)
        assert await asyncio.to_thread(socks.tcp, a.container_id, b.container_id, b.ip_address, 7311, MARKER * 4)
        assert await asyncio.to_thread(ping_all, pairs[1:]) == []
        frames = await asyncio.to_thread(cap.stop)
    finally:
        socks.close()
    assert frames, cap.err
    assert not any(MARKER in f for f in frames), "plaintext marker on the underlay"
    assert_only_wireguard(frames, need_some=True)
