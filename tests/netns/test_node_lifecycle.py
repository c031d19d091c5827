"""A node's lifecycle on a real kernel (issue 18): several node workers on one machine
with default settings, teardown, fail static across a worker restart, a node that
cannot do encrypted overlays.

Hosts are namespaces on an underlay switch (``overlay_util``), each with a node worker
started with nothing but its node id and host namespace: the WireGuard interface name,
the state directory and the underlay are the defaults. The state directories live
below ``VNET_STATE_DIR`` (set to a prefixed temporary directory for the deployment as
a whole, as an operator would set it), so nothing is written to /var/lib. Whatever
wireguard-go a failing test leaves is killed by the ``lc`` fixture (and the ``netns``
fixture kills every process left inside the namespaces).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from tests.conftest import requires_root
from tests.netns.conftest import ip, links, ping_all
from tests.netns.overlay_util import Sockets, plug
from tests.netns.test_overlay_e2e import CONVERGE_S, Cluster, _eventually, cluster  # noqa: F401  (the fixture)
from vnet.adapters.wireguard import find_processes, socket_path
from vnet.contracts.endpoint import EndpointInfo
from vnet.core import errors as E
from vnet.core import naming
from vnet.core.nft import TABLE
from vnet.runtime.stack import child_env

pytestmark = [pytest.mark.netns, requires_root,
              pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg") is None,
                                 reason="needs wireguard-go and wireguard-tools (ops/scripts/bootstrap.sh)")]


class Lc:
    """The cluster of test_overlay_e2e plus hosts started with default settings."""

    def __init__(self, c: Cluster, state_root: Path) -> None:
        self.c = c
        self.state_root = state_root  # $VNET_STATE_DIR

    def node(self, k: int) -> str:
        return f"{self.c.prefix}-d{k}"

    async def host(self, k: int) -> str:
        """Host namespace ``k`` on the underlay (10.250.0.k), no worker yet."""
        node = self.node(k)

        def make() -> str:
            h = self.c.netns(f"dh{k}")
            self.c.ports[node] = plug(self.c.ul, h, k)
            return h

        self.c.hosts[node] = await asyncio.to_thread(make)
        return node

    async def start(self, node: str, **cfg_over: object) -> None:
        """A node worker with default settings: its node id and host namespace, nothing else."""
        cfg = msgspec.structs.replace(self.c.cfg, host_netns=self.c.hosts[node], **cfg_over)
        self.c.runtimes[node] = await self.c.start_service("node", params={"node": node}, cfg=cfg)

    def state(self, node: str) -> Path:
        return self.state_root / "nodes" / node

    def wg(self, node: str) -> str:
        return naming.wg_name(node)


@pytest.fixture
async def lc(cluster: Cluster, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
             tmp_path_factory: pytest.TempPathFactory, run_prefix: str) -> AsyncIterator[Lc]:
    root = Path(tmp_path_factory.mktemp(f"{run_prefix}-lcstate"))
    monkeypatch.setenv("VNET_STATE_DIR", str(root))
    lc = Lc(cluster, root)
    try:
        yield lc
    finally:
        for rt in cluster.runtimes.values():
            await rt.stop(drain_timeout=2.0)
        for node, h in cluster.hosts.items():  # a failed test's tunnels (the fixture of a passing one finds none)
            await asyncio.to_thread(_kill_wg, lc.wg(node), f"/run/netns/{h}")
        shutil.rmtree(root, ignore_errors=True)


def _kill_wg(ifname: str, ns_path: str) -> None:
    for pid in find_processes(ifname, ns_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    Path(socket_path(ifname)).unlink(missing_ok=True)


def wg_pids_anywhere(ifname: str) -> list[int]:
    """Every process on the machine whose command line ends in ``ifname`` and is a
    wireguard-go or its guard (whatever namespace it is in, even a deleted one)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        argv = [a for a in argv if a]
        if argv and argv[-1].decode(errors="replace") == ifname and any(
                a.endswith((b"wireguard-go", b"wgguard.py")) for a in argv):
            out.append(int(entry))
    return out


def nft_tables(ns: str) -> list[str]:
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "tables"], capture_output=True, text=True)
    return [t["table"]["name"] for t in json.loads(r.stdout or "{}").get("nftables", []) if "table" in t]


def nothing_left(lc: Lc, node: str) -> list[str]:
    """What of node ``node`` is still there (empty: nothing)."""
    h = lc.c.hosts[node]
    ifname = lc.wg(node)
    left = [f"process {p}" for p in wg_pids_anywhere(ifname)]
    if os.path.exists(socket_path(ifname)):
        left.append(f"socket {socket_path(ifname)}")
    left += [f"interface {n}" for n in links(h) if n == ifname or naming.is_ours(n)]
    left += [f"nft table {t}" for t in nft_tables(h) if t == TABLE]
    left += [f"state file {f.name}" for f in (lc.state(node) / "subifs.json", lc.state(node) / "nft-applied.json")
             if f.exists()]
    return left


async def attach_one(lc: Lc, node: str, net: str, tag: str) -> EndpointInfo:
    (c,) = await lc.c.containers(node, 1, tag)
    (e,) = await lc.c.attach(node, [c], net)
    return e


def node_cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name(args[0])), *args[1:]]


async def test_three_default_nodes_carry_an_encrypted_overlay_and_teardown_leaves_nothing(lc: Lc) -> None:
    c = lc.c
    nodes = [await lc.host(k) for k in (1, 2, 3)]
    for n in nodes:
        await lc.start(n)
    await c.wait_nodes(nodes)
    infos = {n.node: n for n in await c.m.nodes()}
    for n in nodes:
        cap = infos[n].capabilities["encrypted_overlay"]
        assert cap.available, cap
        assert infos[n].wg_public_key and infos[n].wg_address
        # the defaults: a state directory of its own (key 0600 there), an interface name of its own
        key = lc.state(n) / f"wg-{lc.wg(n)}.key"
        assert key.exists() and key.stat().st_mode & 0o777 == 0o600
    assert len({lc.wg(n) for n in nodes}) == 3

    net = await c.m.create_network("lcenc", "10.133.0.0/24", None, "overlay", "none", {"encrypted": "true"})
    eps = [await attach_one(lc, n, net.id, f"lc{k}c") for k, n in enumerate(nodes, 1)]
    for n in nodes:  # each wireguard-go in its own host namespace, its own socket
        pids = find_processes(lc.wg(n), f"/run/netns/{c.hosts[n]}")
        assert len(pids) == 2, pids  # wireguard-go and its guard
        assert await asyncio.to_thread(os.path.exists, socket_path(lc.wg(n)))
        assert links(c.hosts[n])[naming.vxlan_name(net.id)]["linkinfo"]["info_data"]["link"] == lc.wg(n)
    pairs = [(a.container_id, b.ip_address) for a in eps for b in eps if a is not b]
    t = await _eventually(lambda: not ping_all(pairs[:2]), CONVERGE_S)  # the first handshakes
    assert await asyncio.to_thread(ping_all, pairs) == []
    print(f"\nthree default nodes: encrypted overlay reachable between all 6 ordered pairs {t:.2f} s after the "
          "last attach")

    # Teardown, three ways: over NATS from Python, with vnetctl, and locally with the worker stopped.
    env = child_env(c.cfg)
    rep = await c.m.node_teardown(nodes[0])
    assert rep.ok, rep.errors
    assert f"wireguard-go {lc.wg(nodes[0])}" in rep.removed and "nftables tables" in rep.removed, rep.removed
    assert await asyncio.to_thread(nothing_left, lc, nodes[0]) == []
    print(f"teardown over NATS: {len(rep.removed)} removed in {rep.duration_s:.2f} s: {rep.removed}")
    health = await c.m.health("node", node=nodes[0])
    assert any("torn down" in str(v) for v in msgspec.to_builtins(health).values() if v), health
    with pytest.raises(E.VNetError):
        await c.m.node_resync(nodes[0], timeout=10)

    r = await asyncio.to_thread(subprocess.run, node_cli("vnetctl", "node", "teardown", nodes[1], "--json"),
                                env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads(r.stdout)
    assert doc["ok"] and f"wireguard-go {lc.wg(nodes[1])}" in doc["removed"], doc
    assert await asyncio.to_thread(nothing_left, lc, nodes[1]) == []

    # The third: its worker stops (fail static: wireguard-go and the interfaces stay) ...
    await c.runtimes[nodes[2]].stop(drain_timeout=2.0)
    assert find_processes(lc.wg(nodes[2]), f"/run/netns/{c.hosts[nodes[2]]}")
    assert naming.vxlan_name(net.id) in links(c.hosts[nodes[2]])
    # ... and the operator tears it down on the node itself.
    r = await asyncio.to_thread(subprocess.run, node_cli("vnet-node", "--teardown", "--node-id", nodes[2],
                                                         "--host-netns", c.hosts[nodes[2]]),
                                env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"removed wireguard-go {lc.wg(nodes[2])}" in r.stdout and "0 error(s)" in r.stdout, r.stdout
    print(f"vnet-node --teardown:\n{r.stdout}")
    for n in nodes:
        assert await asyncio.to_thread(nothing_left, lc, n) == [], n
        assert (lc.state(n) / f"wg-{lc.wg(n)}.key").exists()  # the identity stays
    for e in eps:  # the containers lost their interface with the veth's host end
        assert set(links(e.container_id)) == {"lo"}
    # A second teardown finds nothing and says so without an error.
    r = await asyncio.to_thread(subprocess.run, node_cli("vnet-node", "--teardown", "--node-id", nodes[2],
                                                         "--host-netns", c.hosts[nodes[2]]),
                                env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "0 removed, 0 error(s)" in r.stdout, r.stdout + r.stderr


async def test_a_restarted_worker_adopts_the_running_wireguard_go(lc: Lc) -> None:
    c = lc.c
    n1, n2 = [await lc.host(k) for k in (1, 2)]
    for n in (n1, n2):
        await lc.start(n)
    await c.wait_nodes([n1, n2])
    net = await c.m.create_network("lcre", "10.134.0.0/24", None, "overlay", "none", {"encrypted": "true"})
    a = await attach_one(lc, n1, net.id, "lra")
    b = await attach_one(lc, n2, net.id, "lrb")
    await _eventually(lambda: not ping_all([(a.container_id, b.ip_address)]), CONVERGE_S)
    h2 = f"/run/netns/{c.hosts[n2]}"
    before = find_processes(lc.wg(n2), h2)
    assert len(before) == 2

    socks = Sockets()
    try:
        flow = await asyncio.to_thread(socks.flow, a.container_id, b.container_id, b.ip_address, 7500)
        assert await asyncio.to_thread(flow.roundtrip, 0)
        # A plain stop of the worker: wireguard-go keeps running (fail static), the flow goes on.
        await c.runtimes[n2].stop(drain_timeout=2.0)
        for i in range(1, 4):
            assert await asyncio.to_thread(flow.roundtrip, i)
            await asyncio.sleep(0.3)
        assert find_processes(lc.wg(n2), h2) == before
        # A new worker with the same (default) settings adopts it: same processes, zero writes.
        t0 = time.monotonic()
        await lc.start(n2)

        async def resynced() -> bool:
            try:
                s = await c.m.node_stats(n2)
            except E.VNetError:
                return False
            return s.full_resyncs >= 1 and s.desired_fetched

        while not await resynced():
            assert time.monotonic() - t0 < 90
            await asyncio.sleep(0.2)
        stats = await c.m.node_stats(n2)
        assert stats.last_full_errors == 0 and not stats.failed, (stats.last_errors, stats.failed)
        assert stats.writes == 0 and stats.last_full_writes == 0, stats  # WireGuard included (wg set, restart)
        assert find_processes(lc.wg(n2), h2) == before
        assert await asyncio.to_thread(flow.roundtrip, 99)
        assert (await c.m.get_endpoint(b.id)).status == "ready"
        print(f"\nrestarted worker adopted wireguard-go (pids {before}); first full resync "
              f"{time.monotonic() - t0:.2f} s after the start, {stats.writes} kernel writes; flow intact")
        flow.close()
    finally:
        socks.close()
    for n in (n1, n2):
        rep = await c.m.node_teardown(n)
        assert rep.ok, rep.errors
        assert await asyncio.to_thread(nothing_left, lc, n) == []


async def test_wireguard_go_goes_with_its_host_namespace(lc: Lc) -> None:
    c = lc.c
    n1, n2 = [await lc.host(k) for k in (1, 2)]
    for n in (n1, n2):
        await lc.start(n)
    await c.wait_nodes([n1, n2])
    net = await c.m.create_network("lcns", "10.136.0.0/24", None, "overlay", "none", {"encrypted": "true"})
    await attach_one(lc, n1, net.id, "lna")
    await attach_one(lc, n2, net.id, "lnb")
    ifname = lc.wg(n2)
    assert wg_pids_anywhere(ifname)
    # The worker stops (fail static), then the host namespace is deleted: wireguard-go goes too.
    await c.runtimes[n2].stop(drain_timeout=2.0)
    await asyncio.to_thread(ip, "netns", "delete", c.hosts[n2], ns=None)
    t = await _eventually(lambda: not wg_pids_anywhere(ifname) and not os.path.exists(socket_path(ifname)), 30)
    print(f"\nhost namespace deleted -> wireguard-go and its socket gone in {t:.2f} s")


async def test_a_node_without_wireguard_refuses_encrypted_endpoints_with_a_code(lc: Lc) -> None:
    c = lc.c
    n1 = await lc.host(1)
    # No key directory: node_state_dir below a regular file (mkdir fails even for root).
    blocker = lc.state_root / "not-a-directory"
    blocker.write_text("")
    await lc.start(n1, node_state_dir=str(blocker / "state"))
    await c.wait_nodes([n1])
    (info,) = [n for n in await c.m.nodes() if n.node == n1]
    cap = info.capabilities["encrypted_overlay"]
    assert not cap.available and "node_state_dir" in cap.reason, cap
    assert info.wg_public_key is None
    r = await asyncio.to_thread(subprocess.run, node_cli("vnetctl", "endpoint", "nodes", "-v"), env=child_env(c.cfg),
                                capture_output=True, text=True, timeout=60)
    assert f"{n1} encrypted_overlay: unavailable: cannot keep the WireGuard key" in " ".join(r.stdout.split()), r.stdout
    enc = await c.m.create_network("lcno", "10.137.0.0/24", None, "overlay", "none", {"encrypted": "true"})
    plain = await c.m.create_network("lcpl", "10.138.0.0/24", None, "overlay", "none")
    (ce,) = await c.containers(n1, 1, "lnoe")
    (cp,) = await c.containers(n1, 1, "lnop")
    e = await c.m.create_endpoint(ce, enc.id, node=n1, wait=True, wait_timeout=30)
    assert e.status == "failed" and e.status_code == E.ENCRYPTION_UNAVAILABLE.code, e
    assert "node_state_dir" in e.reason and "encrypted" in e.reason, e.reason
    p = await c.m.create_endpoint(cp, plain.id, node=n1, wait=True, wait_timeout=30)
    assert p.status == "ready", p  # the node is otherwise fine
    # nothing of the encrypted network was built (never in clear), no wireguard-go started
    assert naming.vxlan_name(enc.id) not in links(c.hosts[n1]) and naming.bridge_name(enc.id) not in links(
        c.hosts[n1])
    assert set(links(ce)) == {"lo"}
    assert not wg_pids_anywhere(lc.wg(n1))
    # a full resync keeps it so
    stats = await c.m.node_resync(n1)
    assert stats.failed.get(e.id, "").startswith(f"node {n1} cannot run encrypted overlays"), stats.failed
    assert naming.vxlan_name(enc.id) not in links(c.hosts[n1])


def test_teardown_goes_on_past_errors_and_reports_them_all(run_prefix: str, tmp_path: Path) -> None:
    """A host namespace that is not there: every step is tried, each failure reported, exit
    1 — and nothing is created (not the namespace, not a state file)."""
    ns = f"{run_prefix}-gone"
    env = dict(os.environ, VNET_STATE_DIR=str(tmp_path))
    r = subprocess.run(node_cli("vnet-node", "--teardown", "--node-id", f"{run_prefix}-g", "--host-netns", ns),
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 3, r.stderr  # interfaces, the WireGuard interface, nftables
    assert all(ns in e for e in errors), errors
    assert "0 removed, 3 error(s)" in r.stdout, r.stdout
    assert not os.path.exists(f"/run/netns/{ns}")
    assert not (tmp_path / "nodes").exists() or not any((tmp_path / "nodes").rglob("*.json"))
