"""The IPAM service's contract against real valkey and NATS: pool lifecycle, idempotency,
conflicts and errors, events, IPv6 pools, excluding a child's subnet, and ``vnetctl ipam``."""

# ruff: noqa: F811 (a test's argument rds is ipam_env's fixture, imported for pytest)

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.integration.ipam_env import (
    _register_network,
    rds,  # noqa: F401  (the fixture)
)
from vnet.adapters import ipam_store
from vnet.client import VNetManager
from vnet.contracts import subjects
from vnet.contracts.ipam import PoolEvent
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig

# --- the service's contract: idempotency, conflicts, errors, events --------------------------

async def test_pool_lifecycle_and_errors(config: VNetConfig, start_service: Any, run_prefix: str) -> None:
    await start_service("ipam")
    nid = f"{run_prefix}-life"
    async with VNetManager(config) as m:
        js = (await m._client()).jetstream()
        sub = await js.subscribe(f"vnet.evt.ipam.*.{nid}_4")
        p = await m.create_pool(nid, "10.80.0.0/24", "10.80.0.1", reserved=["10.80.0.10"],
                                excluded=["10.80.0.128/26"])
        assert (p.capacity, p.used, p.free, p.cursor, p.window) == (256 - 4 - 64, 0, 188, None, 256)
        # identical re-create: same pool; different settings: 409 naming both
        assert (await m.create_pool(nid, "10.80.0.0/24", "10.80.0.1", reserved=["10.80.0.10"],
                                    excluded=["10.80.0.128/26"])).created_at == p.created_at
        with pytest.raises(E.Conflict) as ei:
            await m.create_pool(nid, "10.80.0.0/25", "10.80.0.1")
        assert ei.value.code == "pool_exists"
        assert "10.80.0.0/24" in ei.value.message and "10.80.0.0/25" in ei.value.message
        with pytest.raises(E.InvalidRequest) as ei:
            await m.create_pool(nid, "10.80.0.1/24")
        assert ei.value.code == "invalid_cidr" and "did you mean 10.80.0.0/24" in ei.value.message

        # serial allocation, idempotent per owner and per request_id
        a = await m.request_address(nid, "ep-a", request_id="req-1")
        assert (a.address, a.prefix_len, a.gateway, a.family) == ("10.80.0.2", 24, "10.80.0.1", 4)
        assert (await m.request_address(nid, "ep-a", request_id="req-1")).address == "10.80.0.2"
        assert (await m.request_address(nid, "ep-a")).address == "10.80.0.2"
        with pytest.raises(E.Conflict) as ei:
            await m.request_address(nid, "ep-other", request_id="req-1")
        assert "req-1" in ei.value.message and "ep-a" in ei.value.message
        b = await m.request_address(nid, "ep-b")
        assert b.address == "10.80.0.3"
        assert await m.release_address(nid, "ep-a") == ["10.80.0.2"]
        assert await m.release_address(nid, "ep-a") == []  # idempotent
        with pytest.raises(E.Conflict) as ei:
            await m.request_address(nid, "ep-a", request_id="req-1")  # replay after release
        assert "released since" in ei.value.message
        assert (await m.request_address(nid, "ep-c")).address == "10.80.0.4"  # .2 is not reused yet
        (info,) = await m.pool(nid)
        assert info.cursor == "10.80.0.4" and info.used == 2

        # static requests
        assert (await m.request_address(nid, "ep-s", address="10.80.0.50")).address == "10.80.0.50"
        with pytest.raises(E.Conflict) as ei:
            await m.request_address(nid, "ep-t", address="10.80.0.50")
        assert ei.value.code == "address_in_use" and ei.value.status == 409
        assert "ep-s" in ei.value.message and ei.value.details["holder"] == "ep-s"
        for bad, words in [("10.80.0.1", "the gateway"), ("10.80.0.0", "network address"),
                           ("10.80.0.255", "broadcast"), ("10.80.0.10", "reserved"),
                           ("10.80.0.130", "excluded subnet 10.80.0.128/26"), ("10.81.0.5", "outside")]:
            with pytest.raises(E.InvalidRequest) as ei:
                await m.request_address(nid, "ep-t", address=bad)
            assert ei.value.code == "address_not_assignable" and words in ei.value.message, ei.value

        # unknown pool, unknown family, bad input
        with pytest.raises(E.NotFound) as ei:
            await m.request_address(f"{nid}-nope", "ep-a")
        assert ei.value.code == "pool_not_found"
        with pytest.raises(E.NotFound):
            await m.request_address(nid, "ep-a", family=6)
        with pytest.raises(E.InvalidRequest) as ei:
            await m.call(subjects.IPAM_ADDR_REQUEST, b'{"network_id":"x","owner":"y","colour":1}', PoolEvent)
        assert ei.value.code == "unknown_field"

        # delete: refused while in use (names the count), forced works and says how many were dropped
        with pytest.raises(E.Conflict) as ei:
            await m.delete_pool(nid)
        assert ei.value.code == "pool_in_use" and "3 allocated addresses" in ei.value.message
        rep = await m.delete_pool(nid, force=True)
        assert [x.cidr for x in rep.pools] == ["10.80.0.0/24"] and rep.released == 3
        assert (await m.delete_pool(nid)).pools == []  # idempotent
        with pytest.raises(E.NotFound):
            await m.pool(nid)

        kinds = []
        for _ in range(2):
            msg = await sub.next_msg(timeout=5)
            kinds.append(msg.subject.split(".")[3])
            await msg.ack()
        assert kinds == ["pool_created", "pool_deleted"]
        await sub.unsubscribe()


async def test_ipv6_pool(config: VNetConfig, start_service: Any, run_prefix: str) -> None:
    await start_service("ipam")
    nid = f"{run_prefix}-v6"
    async with VNetManager(config) as m:
        await m.create_pool(nid, "10.90.0.0/24", "10.90.0.1")
        p6 = await m.create_pool(nid, "fd00:90::/64", "fd00:90::1")
        assert p6.family == 6 and p6.window == 2 ** 24 and p6.capacity == 2 ** 24 - 2
        a4 = await m.request_address(nid, "ep")
        a6 = await m.request_address(nid, "ep", family=6)
        assert (a4.address, a6.address, a6.prefix_len) == ("10.90.0.2", "fd00:90::2", 64)
        s6 = await m.request_address(nid, "ep2", address="fd00:90::ff:ffff")  # family follows the address
        assert s6.family == 6
        with pytest.raises(E.InvalidRequest) as ei:
            await m.request_address(nid, "ep3", address="fd00:90::1:0:0:1")
        assert "managed window" in ei.value.message
        assert sorted(await m.release_address(nid, "ep")) == ["10.90.0.2", "fd00:90::2"]
        pools = await m.pool(nid)
        assert [(p.family, p.used) for p in pools] == [(4, 0), (6, 1)]
        rep = await m.delete_pool(nid, force=True)
        assert sorted(p.family for p in rep.pools) == [4, 6]


# --- vnetctl ipam ----------------------------------------------------------------------------

async def _vnetctl(config: VNetConfig, *args: str) -> tuple[int, str]:
    """Run ``vnetctl ipam ARGS``: (exit code, stdout + stderr; stdout alone with --json)."""
    import os
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "vnetctl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNET_") or k == "VNET_RUN_PREFIX"}
    env["COLUMNS"] = "200"
    proc = await asyncio.create_subprocess_exec(exe, "--nats", config.nats_url, "ipam", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode() if "--json" in args else out.decode() + err.decode()


async def test_vnetctl_ipam(config: VNetConfig, start_service: Any, run_prefix: str, rds: aioredis.Redis) -> None:
    import json

    await start_service("ipam")
    nid = f"{run_prefix}-cli"
    await _register_network(rds, nid)
    await rds.sadd(ipam_store.ENDPOINTS_INDEX, f"{run_prefix}-cli-ep")
    rc, out = await _vnetctl(config, "pool-create", nid, "10.99.0.0/24", "--gateway", "10.99.0.1",
                             "--reserved", "10.99.0.2")
    assert rc == 0, out
    rc, out = await _vnetctl(config, "request", nid, f"{run_prefix}-cli-ep", "--json")
    assert rc == 0 and json.loads(out)["address"] == "10.99.0.3", out
    rc, out = await _vnetctl(config, "request", nid, "stray", "--address", "10.99.0.3")
    assert rc == 1 and "already allocated to" in out and "address_in_use" in out, out
    rc, out = await _vnetctl(config, "request", nid, "stray", "--address", "10.99.0.9")
    assert rc == 0 and "10.99.0.9/24" in out, out
    rc, out = await _vnetctl(config, "pools", nid)
    assert rc == 0 and "10.99.0.0/24" in out and "252" in out and "250" in out, out  # capacity, free
    rc, out = await _vnetctl(config, "pools", "--json")
    assert rc == 0 and nid in [p["network_id"] for p in json.loads(out)["items"]], out
    rc, out = await _vnetctl(config, "check", nid, "--grace", "3600")
    assert rc == 1 and "leaks" in out and "stray" in out and "waits (grace)" in out, out
    rc, out = await _vnetctl(config, "check", nid, "--json", "--grace", "0")
    rep = json.loads(out)
    assert rc == 1 and [lk["owner"] for lk in rep["leaks"]] == ["stray"] and rep["leaks"][0]["collectable"]
    rc, out = await _vnetctl(config, "gc", "--grace", "0", "--network", nid)
    assert rc == 0 and "released 1 allocations" in out and "stray" in out, out
    rc, out = await _vnetctl(config, "check", nid)
    assert rc == 0 and "clean" in out, out
    rc, out = await _vnetctl(config, "pool-delete", nid)
    assert rc == 1 and "pool_in_use" in out and "1 allocated address" in out, out
    rc, out = await _vnetctl(config, "release", nid, f"{run_prefix}-cli-ep")
    assert rc == 0 and "released 10.99.0.3" in out, out
    rc, out = await _vnetctl(config, "pool-delete", nid, "--json")
    assert rc == 0 and json.loads(out)["pools"][0]["cidr"] == "10.99.0.0/24", out


async def test_pool_exclude_child_subnets(config: VNetConfig, start_service: Any, run_prefix: str) -> None:
    """A parent's pool gives up a child's subnet (and gets it back when the child goes)."""
    await start_service("ipam")
    nid = f"{run_prefix}-parent"
    async with VNetManager(config) as m:
        p = await m.create_pool(nid, "10.100.0.0/22", "10.100.0.1")
        assert p.capacity == 1024 - 3
        holder = await m.request_address(nid, "ep-in-child", address="10.100.1.7")
        with pytest.raises(E.Conflict) as ei:
            await m.exclude_from_pool(nid, add=["10.100.1.0/24"])
        assert ei.value.code == "address_in_use"
        assert "10.100.1.0/24" in ei.value.message and "10.100.1.7 to ep-in-child" in ei.value.message
        await m.release_address(nid, holder.owner)
        p = await m.exclude_from_pool(nid, add=["10.100.1.0/24"])
        assert p.capacity == 1024 - 3 - 256 and p.excluded == ["10.100.1.0/24"]
        assert (await m.exclude_from_pool(nid, add=["10.100.1.0/24"])).capacity == p.capacity  # idempotent
        with pytest.raises(E.InvalidRequest) as ei:
            await m.request_address(nid, "x", address="10.100.1.9")
        assert "excluded subnet 10.100.1.0/24" in ei.value.message
        # dynamic allocation skips the child: fill the first block, the next one lands after it
        for i in range(254):
            await m.request_address(nid, f"f{i}")
        assert (await m.request_address(nid, "jump")).address == "10.100.2.0"
        rep = await m.ipam_check(network_id=nid)
        assert rep.inconsistencies == [], rep.inconsistencies
        p = await m.exclude_from_pool(nid, remove=["10.100.1.0/24"])
        assert p.excluded == [] and p.capacity == 1024 - 3
        assert (await m.request_address(nid, "back", address="10.100.1.9")).address == "10.100.1.9"
        assert (await m.ipam_check(network_id=nid)).inconsistencies == []
        with pytest.raises(E.InvalidRequest):
            await m.exclude_from_pool(nid, add=["10.101.0.0/24"])  # not inside the pool
        await m.delete_pool(nid, force=True)
