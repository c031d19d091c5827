"""Simulated node workers (vnet.svc.node.simulate): the real control loop, a recording data plane.

No root, no namespace: endpoints created with ``wait=True`` on simulated nodes come back
``ready`` through the real path (event -> worker -> applier -> status report -> endpoint
service); a delete leaves the recording applier; a full resync of a converged node writes
nothing; the launcher's ``vnet-node --simulate N`` registers N nodes from one process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from tests.conftest import fresh_db_config
from vnet.client import VNetManager
from vnet.runtime.config import VNetConfig
from vnet.svc.node.simulate import RecordingApplier, SimulatedFleet, node_names

SERVICES = ("ipam", "network", "endpoint", "policy")


async def _wait_nodes(m: VNetManager, names: set[str], timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if names <= {n.node for n in await m.nodes()}:
            return
        await asyncio.sleep(0.1)
    missing = names - {n.node for n in await m.nodes()}
    raise AssertionError(f"simulated nodes not registered: {sorted(missing)[:10]}")


def test_recording_applier_scoped_and_full() -> None:
    from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired, Scope

    a = RecordingApplier("n")
    net = NetDesired(id="net1", gateway4="10.1.0.1/24")
    ep = EpDesired(id="ep1", network_id="net1", netns="c1", mac="02:00:00:00:00:01", ipv4="10.1.0.2/24",
                   gw4="10.1.0.1")
    r = a.reconcile(NodeDesired(networks=[net], endpoints=[ep]), Scope(endpoints=frozenset({"ep1"})))
    assert r.endpoints["ep1"].state == "ready" and r.writes == 2  # the network comes with its endpoint
    assert a.endpoints == {"ep1"} and a.networks == {"net1"}
    assert a.reconcile(NodeDesired(networks=[net], endpoints=[ep])).writes == 0  # converged: no writes
    r = a.reconcile(NodeDesired(), None)  # a full reconcile against nothing tears everything down
    assert r.writes == 2 and not a.endpoints and not a.networks
    assert node_names("sim", 1) == ["sim"] and node_names("sim", 3) == ["sim-0000", "sim-0001", "sim-0002"]


async def test_simulated_fleet_realises_endpoints(config: VNetConfig, run_prefix: str,
                                                  start_service: Callable[..., Awaitable[Any]]) -> None:
    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for name in SERVICES:
        await start_service(name, cfg=cfg)
    names = node_names(f"{run_prefix}-sim", 5)
    fleet = SimulatedFleet(cfg, names)
    await fleet.start()
    m = VNetManager(cfg)
    await m.__aenter__()
    try:
        await _wait_nodes(m, set(names))
        net = await m.create_network(f"{run_prefix}-simnet", "10.77.0.0/24", driver="bridge")
        made = await asyncio.gather(*(m.create_endpoint(f"{run_prefix}-c{i}", net.id, node=names[i % 5], wait=True,
                                                        wait_timeout=30.0) for i in range(10)))
        assert [e.status for e in made] == ["ready"] * 10, [(e.status, e.reason) for e in made]
        assert len({e.ip_address for e in made}) == 10
        by_node = {w.node: w for w in fleet.workers()}
        for e in made:
            assert e.id in by_node[e.node].applier.endpoints
        # each node holds only its own endpoints: the desired state is per node
        for w in fleet.workers():
            assert w.applier.endpoints == {e.id for e in made if e.node == w.node}
        gone = made[0]
        await m.delete_endpoint(gone.id)
        w0 = by_node[gone.node]
        for _ in range(600):
            if gone.id not in w0.applier.endpoints:
                break
            await asyncio.sleep(0.05)
        assert gone.id not in w0.applier.endpoints
        stats = await w0.request_resync()
        assert stats.last_full_writes == 0 and stats.endpoints == 1
    finally:
        await m.close()
        await fleet.stop()
        await r.flushdb()
        await r.aclose()


async def test_launcher_simulate_flag(config: VNetConfig, run_prefix: str,
                                      start_service: Callable[..., Awaitable[Any]]) -> None:
    cfg = fresh_db_config(config)
    for name in ("ipam", "network", "endpoint"):
        await start_service(name, cfg=cfg)
    base = f"{run_prefix}-simflag"
    env = {**os.environ, **cfg.to_env()}
    proc = subprocess.Popen([sys.executable, "-m", "vnet.runtime.launcher", "node", "--simulate", "3",  # noqa: ASYNC220
                             "--node-id", base], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    m = VNetManager(cfg)
    await m.__aenter__()
    try:
        await _wait_nodes(m, set(node_names(base, 3)))
    finally:
        await m.close()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 0, err[-2000:]
