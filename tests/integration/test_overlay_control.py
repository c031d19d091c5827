"""The overlay's control plane without a kernel: the node registry's WireGuard mesh
addresses and the desired state's remotes/peers, with fake nodes (registrations sent by
the test, namespace checks answered by the test) against real valkey and NATS.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client
from nats.aio.msg import Msg

from vnet import VNetManager
from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.endpoint import NetnsCheckReply, NodeRegister, NodeRegistered
from vnet.core import errors as E
from vnet.core.dataplane_model import Support
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

_dbs = itertools.cycle(range(1, 16))
OVERLAY = {"overlay": Support(available=True)}


def _key() -> str:
    return base64.b64encode(bytes([0]) + os.urandom(30) + bytes([0])).decode()


class Fake:
    def __init__(self, cfg: VNetConfig, m: VNetManager, nc: Client) -> None:
        self.cfg, self.m, self.nc = cfg, m, nc

    async def register(self, node: str, k: int, key: str | None = None, heartbeat_s: float = 10.0) -> NodeRegistered:
        req = NodeRegister(node=node, instance="i1", underlay=f"10.250.0.{k}", underlay_ifname="ul0",
                           drivers=OVERLAY, heartbeat_s=heartbeat_s, wg_public_key=key)
        rep, _ = await nats_adapter.request(self.nc, subjects.NODE_REGISTER, req, NodeRegistered,
                                            params={"node": node})
        return rep


@pytest.fixture
async def fake(config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]]) -> AsyncIterator[Fake]:
    db = next(_dbs)
    base = config.redis_url.rsplit("/", 1)[0]
    cfg = msgspec.structs.replace(config, redis_url=f"{base}/{db}", node_wg_mesh="10.255.0.0/29")
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for name in ("ipam", "network", "endpoint"):
        await start_service(name, cfg=cfg)
    nc = await nats_adapter.connect(cfg, "test-overlay-control")

    async def netns_ok(msg: Msg) -> None:  # every fake node has every namespace
        await msg.respond(msgspec.json.encode(NetnsCheckReply(netns="x", path="/run/netns/x", exists=True)))

    await nc.subscribe(subjects.NODE_NETNS_CHECK.wildcard(), cb=netns_ok)
    await nc.flush()
    m = VNetManager(cfg)
    await m.__aenter__()
    try:
        yield Fake(cfg, m, nc)
    finally:
        await m.close()
        await nc.drain()
        await r.flushdb()
        await r.aclose()


async def test_mesh_addresses_unique_and_stable(fake: Fake) -> None:
    keys = {f"n{i}": _key() for i in range(5)}
    got = {n: (await fake.register(n, i + 1, k)).wg_address for i, (n, k) in enumerate(keys.items())}
    mesh = ipaddress.ip_network("10.255.0.0/29")
    addrs = [ipaddress.ip_interface(a or "") for a in got.values()]
    assert len(set(addrs)) == len(addrs) == 5
    assert all(a.network == mesh and a.ip not in (mesh.network_address, mesh.broadcast_address) for a in addrs)
    # a heartbeat (or a restarted worker) keeps its address
    assert (await fake.register("n0", 1, keys["n0"])).wg_address == got["n0"]
    # a node without a key gets none (no encrypted overlays there)
    assert (await fake.register("plain", 9)).wg_address is None


async def test_mesh_exhaustion_names_the_setting(fake: Fake) -> None:
    for i in range(6):  # a /29 has six host addresses
        assert (await fake.register(f"n{i}", i + 1, _key())).wg_address
    with pytest.raises(E.VNetError) as ei:
        await fake.register("n6", 7, _key())
    assert ei.value.code == "limit_reached" and "node_wg_mesh" in ei.value.message


async def test_bad_public_key_is_refused(fake: Fake) -> None:
    with pytest.raises(E.VNetError) as ei:
        await fake.register("n0", 1, "not-a-key")
    assert ei.value.status == 400


async def test_desired_state_remotes_peers_and_gone_nodes(fake: Fake) -> None:
    m = fake.m
    ka, kb, kc = _key(), _key(), _key()
    await fake.register("a", 1, ka)
    await fake.register("b", 2, kb)
    # c: gone 3 s after its last heartbeat; it beats ten times as often until the test stops it,
    # so it is alive through the steps below however slowly a busy machine runs them
    await fake.register("c", 3, kc, heartbeat_s=1.0)

    async def c_beats() -> None:
        while True:
            await asyncio.sleep(0.1)
            await fake.register("c", 3, kc, heartbeat_s=1.0)

    beating = asyncio.create_task(c_beats())
    net = await m.create_network("ov", "10.140.0.0/24", None, "overlay", "none", {"encrypted": "true"})
    eps = {n: await m.create_endpoint(f"ctr-{n}", net.id, node=n, netns=f"ctr-{n}") for n in "abc"}
    d = (await m.node_desired("a")).desired
    (nd,) = d.networks
    assert nd.vni == int(net.options["vni"]) and nd.encrypted and nd.mtu == 1370
    assert sorted((r.host, r.mac, r.ipv4) for r in nd.remotes) == sorted(
        (n, eps[n].mac_address, eps[n].ip_address) for n in "bc")
    infos = {i.node: i for i in await m.nodes()}
    assert [(p.name, p.address, p.wg_public_key, p.wg_address) for p in d.peers] == [
        (n, f"10.250.0.{k}", key, (infos[n].wg_address or "").split("/")[0])
        for n, k, key in (("b", 2, kb), ("c", 3, kc))]
    assert d.underlay is None  # the node knows its own
    # c stops sending heartbeats: past its timeout it is neither a peer nor a remote's host
    assert not beating.done(), beating  # (a failed heartbeat would have ended it)
    beating.cancel()
    await asyncio.gather(beating, return_exceptions=True)
    for _ in range(600):  # 30 s, for a timeout of 3 s
        d = (await m.node_desired("a")).desired
        if [p.name for p in d.peers] == ["b"]:
            break
        await asyncio.sleep(0.05)
    assert [p.name for p in d.peers] == ["b"] and [r.host for r in d.networks[0].remotes] == ["b"]
    # and c comes back: again
    await fake.register("c", 3, kc, heartbeat_s=1.0)
    d = (await m.node_desired("a")).desired
    assert [p.name for p in d.peers] == ["b", "c"]
