"""``vnetctl up --cluster 3``: three nats-servers on loopback, VNET_EVENTS with three replicas.

The stack runs as usual (generated users, every service and the node with its own identity)
with every server's URL; one nats-server is SIGKILLed: the API keeps answering (clients and
services are on, or move to, a survivor), the supervisor restarts the server, and ``down``
leaves nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import msgspec
import pytest

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
from vnet.adapters import nats as nats_adapter
from vnet.contracts import permissions, subjects
from vnet.runtime import credentials
from vnet.runtime.config import VNetConfig
from vnet.runtime.stack import pid_alive

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]


async def _replicas(state_dir: Path, url: str) -> int:
    creds = credentials.load(state_dir)
    assert creds is not None
    user = permissions.service_user("endpoint")  # a service identity may read the stream's info
    cfg = msgspec.structs.replace(VNetConfig.load(env={}), nats_url=url, nats_user=user.name,
                                  nats_password=creds.nats[user.name])
    nc = await nats_adapter.connect(cfg, "test-stack-cluster")
    try:
        info = await nc.jetstream().stream_info(subjects.EVENTS_STREAM)
        return int(info.config.num_replicas or 1)
    finally:
        await nc.close()


def test_up_cluster_3_survives_a_killed_nats_server(tmp_root: Path, run_prefix: str) -> None:
    state_dir = tmp_root / "stack-cluster"
    left = Leftovers(state_dir, run_prefix)
    try:
        res = _ctl("up", "--detach", "--cluster", "3", "--state-dir", state_dir, "--stop-timeout", STOP_TIMEOUT,
                   timeout=WAIT_S * 2)
        st = left.remember()
        assert res.returncode == 0, res.stdout + res.stderr
        assert st is not None and st.status == "ready"
        urls = st.nats_url.split(",")
        assert len(urls) == 3, st.nats_url
        assert {"nats-server", "nats-server-1", "nats-server-2"} <= set(st.processes)
        _wait_status(state_dir, time.monotonic() + WAIT_S)
        assert asyncio.run(_replicas(state_dir, st.nats_url)) == 3

        victim = st.processes["nats-server"]
        os.kill(victim.pid, signal.SIGKILL)
        # the API answers through the survivors while the supervisor brings the server back
        deadline = time.monotonic() + WAIT_S
        made = None
        while time.monotonic() < deadline:
            made = _ctl("network", "create", f"{run_prefix}-cl", "--cidr", "10.79.0.0/24", state_dir=state_dir)
            if made.returncode == 0:
                break
            time.sleep(0.5)
        assert made is not None and made.returncode == 0, made.stdout + made.stderr
        while time.monotonic() < deadline:
            now = _stack(state_dir).processes["nats-server"]
            if now.pid != victim.pid and pid_alive(now.pid, now.start_time):
                break
            time.sleep(0.3)
        else:
            pytest.fail("the supervisor did not restart the killed nats-server")
        assert {r["name"] for r in _wait_status(state_dir, time.monotonic() + WAIT_S)} >= COMPONENTS

        last = _stack(state_dir)
        down = _ctl("down", "--state-dir", state_dir, timeout=WAIT_S)
        assert down.returncode == 0, down.stdout + down.stderr
        assert_nothing_left(state_dir, [st, last])
    finally:
        left.cleanup()


async def _instances(state_dir: Path, url: str) -> dict[str, int]:
    from vnet.client import VNetManager

    creds = credentials.load(state_dir)
    assert creds is not None
    user = permissions.admin_user()
    cfg = msgspec.structs.replace(VNetConfig.load(env={}), nats_url=url, nats_user=user.name,
                                  nats_password=creds.nats[user.name])
    async with VNetManager(cfg) as m:
        out: dict[str, int] = {}
        for s in await m.services(wait=0.5):
            out[s.name] = out.get(s.name, 0) + 1
        return out


def test_up_replicas_3_carries_on_when_an_instance_is_killed(tmp_root: Path, run_prefix: str) -> None:
    state_dir = tmp_root / "stack-replicas"
    left = Leftovers(state_dir, run_prefix)
    try:
        res = _ctl("up", "--detach", "--replicas", "3", "--state-dir", state_dir, "--stop-timeout", STOP_TIMEOUT,
                   timeout=WAIT_S * 2)
        st = left.remember()
        assert res.returncode == 0, res.stdout + res.stderr
        assert st is not None and st.status == "ready"
        for svc in ("ipam", "network", "endpoint", "policy"):
            assert {svc, f"{svc}-2", f"{svc}-3"} <= set(st.processes), sorted(st.processes)
        assert "metrics-2" not in st.processes  # one /metrics port: one metrics service
        deadline = time.monotonic() + WAIT_S
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = asyncio.run(_instances(state_dir, st.nats_url))
            if all(counts.get(s, 0) >= 3 for s in ("ipam", "network", "endpoint", "policy")):
                break
            time.sleep(0.5)
        assert all(counts.get(s, 0) >= 3 for s in ("ipam", "network", "endpoint", "policy")), counts

        # SIGKILL one network and one ipam instance: the others answer every request at once
        for name in ("network-2", "ipam"):
            os.kill(st.processes[name].pid, signal.SIGKILL)
        for i in range(6):
            made = _ctl("network", "create", f"{run_prefix}-rp{i}", "--cidr", f"10.81.{i}.0/24", state_dir=state_dir)
            assert made.returncode == 0, made.stdout + made.stderr
        while time.monotonic() < deadline:
            now = _stack(state_dir).processes
            if all(now[n].pid != st.processes[n].pid and pid_alive(now[n].pid, now[n].start_time)
                   for n in ("network-2", "ipam")):
                break
            time.sleep(0.3)
        else:
            pytest.fail("the supervisor did not restart the killed instances")
        last = _stack(state_dir)
        down = _ctl("down", "--state-dir", state_dir, timeout=WAIT_S)
        assert down.returncode == 0, down.stdout + down.stderr
        assert_nothing_left(state_dir, [st, last])
    finally:
        left.cleanup()
