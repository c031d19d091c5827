"""Concurrent network creates, across replicas of the network service and in one: no two
networks overlap, and a repeated request id creates once. (Real valkey, NATS and IPAM;
``network_env`` gives each test its own Redis database.)
"""

# ruff: noqa: F811 (a test's argument env or env_factory is network_env's fixture, imported for pytest)

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client

from tests.integration.network_env import Env, env, env_factory  # noqa: F401  (the fixtures)
from vnet.contracts import headers as H
from vnet.contracts import subjects
from vnet.contracts.ipam import PoolsReply
from vnet.core import addr
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork
from vnet.runtime.config import VNetConfig

# --- 2. concurrency ------------------------------------------------------------------------

def _replica_proc(cfg: VNetConfig) -> subprocess.Popen[bytes]:
    env = {**os.environ, **cfg.to_env()}
    return subprocess.Popen([sys.executable, "-c", "from vnet.runtime.launcher import service_main; service_main()",
                             "network"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


async def _raw(nc: Client, subject: str, body: dict[str, Any]) -> tuple[dict[str, Any], str | None, str]:
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=10)
    h = msg.headers or {}
    return json.loads(msg.data), h.get(H.ERROR_CODE), h.get(H.INSTANCE, "")


async def test_concurrent_overlapping_creates_across_two_replicas(env: Env) -> None:
    # A second replica in its own process: same queue group, its own Redis connection.
    proc = _replica_proc(env.cfg)
    try:
        for _ in range(300):
            h = await env.m.services()
            if len([s for s in h if s.name == "network"]) >= 2:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("second replica did not come up: " + (proc.stderr.read().decode()[-2000:]
                                                                       if proc.stderr else ""))
        instances: set[str] = set()
        for rnd in range(24):
            a = {"name": f"a{rnd}", "cidr": f"10.{rnd}.0.0/16"}
            b = {"name": f"b{rnd}", "cidr": f"10.{rnd}.{rnd}.0/24"}
            ra, rb = await asyncio.gather(_raw(env.nc, "vnet.network.create", a),
                                          _raw(env.nc, "vnet.network.create", b))
            instances |= {ra[2], rb[2]}
            wins = [r for r in (ra, rb) if r[1] is None]
            losses = [r for r in (ra, rb) if r[1] is not None]
            assert len(wins) == 1 and len(losses) == 1, (ra, rb)
            winner, loser = wins[0][0], losses[0][0]
            assert loser["code"] == "subnet_overlap" and losses[0][1] == "409"
            assert winner["id"] in loser["message"] and repr(winner["name"]) in loser["message"]
            assert winner["cidr"] in loser["message"]
            assert loser["details"]["conflict_id"] == winner["id"]
        assert len(instances - {""}) == 2, "both replicas should have served requests"
        assert len(await env.ids_in_index()) == 24
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_many_concurrent_random_creates_leave_no_overlap(env_factory: Callable[..., Awaitable[Env]]) -> None:
    # 120 creates, 48 at a time: on a busy machine one can wait in line past the default 5 s,
    # and a create the client gave up on would still land unseen by the checks below
    env = await env_factory(replicas=2, default_subnet="10.64.0.0/16", default_prefix_len=24,
                            request_timeout_s=120.0)
    rnd = random.Random(1234)
    reqs: list[tuple[str, str | None]] = []
    for i in range(120):
        if i % 2 == 1:
            reqs.append((f"auto{i}", None))  # carved, racing with the explicit ones
        else:
            p = rnd.randint(18, 26)
            base = int(ipaddress.ip_address("10.64.0.0")) + rnd.randrange(0, 1 << 16)
            reqs.append((f"rand{i}", str(ipaddress.ip_network((base >> (32 - p) << (32 - p), p)))))
    sem = asyncio.Semaphore(48)

    async def one(name: str, cidr: str | None) -> VirtualNetwork | E.VNetError:
        async with sem:
            try:
                return await env.m.create_network(name, cidr)
            except E.VNetError as err:
                return err

    results = await asyncio.gather(*(one(n, c) for n, c in reqs))
    ok = [r for r in results if isinstance(r, VirtualNetwork)]
    failed = [r for r in results if isinstance(r, E.VNetError)]
    assert all(f.code == "subnet_overlap" for f in failed), [f.message for f in failed]
    autos = [r for r, (n, _) in zip(results, reqs, strict=True) if n.startswith("auto")]
    assert all(isinstance(a, VirtualNetwork) for a in autos), autos
    nets = await env.m.all_networks()
    assert sorted(n.id for n in nets) == sorted(n.id for n in ok)
    parsed = [addr.parse_prefix(n.cidr) for n in nets]
    for i, a in enumerate(parsed):
        for b in parsed[i + 1:]:
            assert not a.overlaps(b), (a, b)
    # Every refusal named a network that exists and really overlaps.
    by_id = {n.id: n for n in nets}
    for f, (_, cidr) in [(r, q) for r, q in zip(results, reqs, strict=True) if isinstance(r, E.VNetError)]:
        assert f.code == "subnet_overlap"
        winner = by_id[f.details["conflict_id"]]
        assert cidr is not None and addr.parse_prefix(cidr).overlaps(addr.parse_prefix(winner.cidr))
    pools = (await env.m.call(subjects.IPAM_POOL_LIST, {}, PoolsReply)).pools
    assert sorted(p.network_id for p in pools) == sorted(by_id)


async def test_idempotent_create(env: Env) -> None:
    a, b = await asyncio.gather(env.m.create_network("idem", request_id="req-1"),
                                env.m.create_network("idem", request_id="req-1"))
    assert a.id == b.id
    c = await env.m.create_network("idem", request_id="req-1")
    assert c.id == a.id
    assert len(await env.ids_in_index()) == 1
    assert len((await env.m.call(subjects.IPAM_POOL_LIST, {}, PoolsReply)).pools) == 1
    d1 = await env.m.delete_network("idem", request_id="del-1")
    d2 = await env.m.delete_network("idem", request_id="del-1")
    assert d1.network.id == d2.network.id == a.id
