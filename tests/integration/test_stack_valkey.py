"""``vnetctl up --replicated-valkey``: a Valkey primary, one replica and three Sentinels on
loopback, with the stack's generated ACL users (plus the replication and Sentinel users).

A network and endpoints are made through the API; the primary is SIGKILLed. The Sentinels
promote the replica, every service follows it (``redis_sentinels``), and within a generous
deadline the API answers and creates succeed again; nothing acknowledged before the kill is
lost (the replica had it: the test waits for it to hold every key before the kill, which is
what an idle stack looks like), no address is handed out twice, the supervisor brings the
killed server back as a replica of the new primary, and ``down`` leaves nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.integration.test_stack import (
    COMPONENTS,
    STOP_TIMEOUT,
    WAIT_S,
    Leftovers,
    _ctl,
    _stack,
    _wait_status,
    assert_nothing_left,
)
from vnet.client import VNetManager
from vnet.contracts import permissions
from vnet.runtime import cluster, credentials
from vnet.runtime.config import VNetConfig
from vnet.runtime.stack import pid_alive
from vnet.runtime.stackfile import StackFile

DATA = ("valkey-server", "valkey-server-1")
SENTINELS = ("valkey-sentinel", "valkey-sentinel-1", "valkey-sentinel-2")


def _container(name: str, made: list[str]) -> str:
    """A container's network namespace (the node attaches endpoints to it); removed by the test."""
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    made.append(name)
    return name


def _port(st: StackFile, name: str) -> int:
    argv = st.processes[name].argv
    return int(argv[argv.index("--port") + 1])


def _admin(state_dir: Path, st: StackFile) -> VNetConfig:
    creds = credentials.load(state_dir)
    assert creds is not None
    user = permissions.admin_user()
    return msgspec.structs.replace(VNetConfig.load(env={}), nats_url=st.nats_url, nats_user=user.name,
                                   nats_password=creds.nats[user.name], request_timeout_s=5.0)


async def _dbsize(state_dir: Path, port: int) -> int:
    """Keys on one data server, read as a service user (DBSIZE is not @dangerous)."""
    creds = credentials.load(state_dir)
    assert creds is not None
    user = credentials.service_redis_user("ipam")
    r = aioredis.Redis(port=port, username=user, password=creds.redis[user], socket_timeout=5)
    try:
        return int(await r.dbsize())
    finally:
        await r.aclose()


async def _in_sync(state_dir: Path, primary: int, replica: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        if await _dbsize(state_dir, primary) == await _dbsize(state_dir, replica) > 0:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the replica did not catch up with the primary")


async def _create_until_answered(m: VNetManager, container: str, net: str, node: str, deadline: float,
                                  made: list[str]) -> str:
    """One endpoint create, retried with its request_id until answered; its address."""
    rid = f"r-{uuid.uuid4().hex}"
    _container(container, made)
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            ep = await m.create_endpoint(container, net, node=node, request_id=rid)
            return str(ep.ip_address)
        except Exception as exc:  # 503 while the services find the new primary; timeouts
            last = exc
            await asyncio.sleep(0.3)
    raise AssertionError(f"{container} was not created after the failover: {last}")


async def _sentinel_refuses_clients(port: int) -> None:
    """A client without the peer password may discover, not reconfigure (point the services
    at a server of its own and catch their passwords)."""
    from redis.exceptions import ResponseError

    r = aioredis.Redis(port=port, socket_timeout=5)
    try:
        for cmd in (("SENTINEL", "REMOVE", cluster.SENTINEL_SERVICE),
                    ("SENTINEL", "SET", cluster.SENTINEL_SERVICE, "quorum", "1"),
                    ("SENTINEL", "MONITOR", "other", "127.0.0.1", "1", "1"),
                    ("SENTINEL", "FAILOVER", cluster.SENTINEL_SERVICE)):
            with pytest.raises(ResponseError, match="permission"):
                await r.execute_command(*cmd)
    finally:
        await r.aclose()


async def _scenario(state_dir: Path, st: StackFile, prefix: str, made: list[str]) -> float:
    """Before the kill: a network and 8 endpoints. After: the API answers again; the time it took."""
    p_port, r_port = _port(st, DATA[0]), _port(st, DATA[1])
    s_ports = [_port(st, n) for n in SENTINELS]
    assert await cluster.sentinel_primary(s_ports) == ("127.0.0.1", p_port)
    await _sentinel_refuses_clients(s_ports[0])
    deadline = time.monotonic() + WAIT_S * 2
    async with VNetManager(_admin(state_dir, st)) as m:
        net = f"{prefix}-rv"
        await m.create_network(net, "10.82.0.0/24")
        acked: dict[str, str] = {}
        for i in range(8):
            c = _container(f"{prefix}-c{i}", made)
            acked[c] = str((await m.create_endpoint(c, net, node=st.node_id)).ip_address)
        await _in_sync(state_dir, p_port, r_port, deadline)

        t_kill = time.monotonic()
        os.kill(st.processes[DATA[0]].pid, signal.SIGKILL)
        after = {f"{prefix}-a0": await _create_until_answered(m, f"{prefix}-a0", net, st.node_id, deadline, made)}
        answered = time.monotonic() - t_kill
        for i in range(1, 5):
            after[f"{prefix}-a{i}"] = await _create_until_answered(m, f"{prefix}-a{i}", net, st.node_id, deadline,
                                                                 made)
        await m.create_network(f"{prefix}-rv2", "10.82.1.0/24")

        # the Sentinels promoted the replica; the services answer from it
        assert await cluster.sentinel_primary(s_ports) == ("127.0.0.1", r_port)
        listed = {e.container_id: str(e.ip_address) for e in await m.list_endpoints(network=net)}
        lost = {c: ip for c, ip in acked.items() if listed.get(c) != ip}
        assert not lost, f"acknowledged before the kill, gone or changed after it: {lost}"
        assert all(listed.get(c) == ip for c, ip in after.items()), (after, listed)
        ips = [*acked.values(), *after.values()]
        assert len(set(ips)) == len(ips), f"an address was handed out twice: {sorted(ips)}"
        assert {n.name for n in (await m.list_networks(limit=1000)).networks} >= {net, f"{prefix}-rv2"}
    return answered


def test_replication_users_are_the_compose_files() -> None:
    """The stack's replication and Sentinel users are docker-compose.cluster.yml's (names and
    rules): one scheme, checked by tests/contract/test_compose_cluster.py there."""
    from tests.contract.compose_model import argv, interpolate, valkey_users
    from tests.contract.test_compose_cluster import merged

    compose = valkey_users([interpolate(c, {}) for c in argv(merged()["services"]["valkey"]["command"])])
    conf = cluster.replication_conf(replica_password="rp", sentinel_password="sp", primary_port=1)
    ours = valkey_users([t for line in conf.splitlines() if line.startswith("user ")
                         for t in ["--user", *line.split()[1:]]])
    assert {u: v["rules"] for u, v in ours.items()} == {u: compose[u]["rules"] for u in ours}
    assert set(ours) == {cluster.REPLICA_USER, cluster.SENTINEL_USER}
    assert f"masteruser {cluster.REPLICA_USER}\nmasterauth rp\n" in conf
    sent = cluster.sentinel_conf(port=2, primary_port=1, auth_user=cluster.SENTINEL_USER, auth_pass="sp")
    assert f"sentinel auth-user vnet {cluster.SENTINEL_USER}\nsentinel auth-pass vnet sp\n" in sent


@pytest.mark.stack
@pytest.mark.timeout(420)
def test_up_replicated_valkey_survives_a_killed_primary(tmp_root: Path, run_prefix: str) -> None:
    state_dir = tmp_root / "stack-valkey"
    left = Leftovers(state_dir, run_prefix)
    made: list[str] = []  # container namespaces
    try:
        res = _ctl("up", "--detach", "--replicated-valkey", "--state-dir", state_dir, "--stop-timeout", STOP_TIMEOUT,
                   timeout=WAIT_S * 2)
        st = left.remember()
        assert res.returncode == 0, res.stdout + res.stderr
        assert st is not None and st.status == "ready"
        assert set(DATA) | set(SENTINELS) <= set(st.processes), sorted(st.processes)
        assert "Sentinels 127.0.0.1:" in res.stdout, res.stdout  # the summary shows the group
        _wait_status(state_dir, time.monotonic() + WAIT_S)

        victim = st.processes[DATA[0]]
        answered = asyncio.run(_scenario(state_dir, st, run_prefix, made))
        print(f"\nValkey primary SIGKILLed: the API answered a create again {answered:.1f}s after the kill")

        # the supervisor restarts the killed server once the Sentinels named the new primary:
        # as its replica (it would otherwise accept writes the failover then throws away)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            now = _stack(state_dir).processes[DATA[0]]
            if now.pid != victim.pid and pid_alive(now.pid, now.start_time):
                break
            time.sleep(0.3)
        else:
            pytest.fail("the supervisor did not restart the killed valkey-server")
        log = (state_dir / "logs" / f"{DATA[0]}.log").read_text(errors="replace")
        assert f"--replicaof 127.0.0.1 {_port(st, DATA[1])}" in log.rsplit("vnet supervisor: starting", 1)[-1]
        assert {r["name"] for r in _wait_status(state_dir, time.monotonic() + WAIT_S)} >= COMPONENTS

        last = _stack(state_dir)
        down = _ctl("down", "--state-dir", state_dir, timeout=WAIT_S)
        assert down.returncode == 0, down.stdout + down.stderr
        assert_nothing_left(state_dir, [st, last])
    finally:
        left.cleanup()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
