"""Secure by default (issue 10): the attacks of the issue played against real services on the
secured servers (forged status, a fake node speaking for another, host routes or a
deregistration for another node, a node writing policy or networks): each must fail; and bad
input on this path answers 400, not 500.
"""

# ruff: noqa: F811 (an argument named secured is security_env's fixture, imported for pytest)

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.integration.security_env import (
    WAIT_S,
    Conn,
    Secured,
    connect_as,
    secured,  # noqa: F401  (the fixture)
)
from vnet.adapters import nats as nats_adapter
from vnet.contracts import codec, permissions, subjects
from vnet.contracts.endpoint import EndpointStatusEvent, NodeDeregister, NodeRegister, NodeRegistered
from vnet.core import errors as E
from vnet.core.dataplane_model import Support
from vnet.runtime import credentials

# --- attacks against the real services -------------------------------------------------------------

@pytest.fixture
async def services(secured: Secured) -> AsyncIterator[Secured]:
    from vnet.runtime import launcher
    from vnet.runtime import service as svc_runtime

    r = aioredis.Redis.from_url(secured.valkey.url, username=credentials.service_redis_user("ipam"),
                                password=secured.creds.redis[credentials.service_redis_user("ipam")])
    started = []
    try:
        for name in ("ipam", "network", "endpoint", "policy"):
            started.append(await svc_runtime.start(launcher.load_service(name),
                                                   secured.cfg(permissions.service_user(name))))
        yield secured
    finally:
        for rt in reversed(started):
            await rt.stop(drain_timeout=2.0)
        keys = [k async for k in r.scan_iter("vnet:*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


async def _register(c: Conn, node: str, body_node: str | None = None) -> NodeRegistered:
    req = NodeRegister(node=body_node or node, instance=f"i-{node}", heartbeat_s=60.0,
                       drivers={"bridge": Support(available=True)})
    rep, _ = await nats_adapter.request(c.nc, subjects.NODE_REGISTER, req, NodeRegistered, params={"node": node},
                                        timeout=WAIT_S)
    return rep


async def _status(c: Conn, node: str, ep: str, body_node: str, status: str, reason: str, version: int) -> None:
    ev = EndpointStatusEvent(endpoint_id=ep, node=body_node, status=status,  # type: ignore[arg-type]
                             reason=reason, version=version)
    subj = subjects.EVT_ENDPOINT_STATUS.format(node=node, id=ep)
    ack = await c.nc.request(subj, codec.encode(ev), timeout=WAIT_S,
                             headers={"Nats-Msg-Id": f"{node}.{ep}.{version}.{reason}"})
    assert b"error" not in ack.data, ack.data  # stored in VNET_EVENTS


async def _poll(what: str, check: Any) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S}s")
        await asyncio.sleep(0.1)


async def test_forged_status_and_fake_nodes_are_rejected(services: Secured, run_prefix: str) -> None:
    """Node n1 owns the endpoint; n2 (a registered node too) and a client try to change its
    status and to speak for n1. None of it takes effect; n1's own report does."""
    from vnet.client import VNetManager

    s = services
    n1 = await connect_as(s, permissions.node_user("n1"))
    n2 = await connect_as(s, permissions.node_user("n2"))
    client = await connect_as(s, permissions.client_user())
    m = VNetManager(s.cfg(permissions.admin_user()))
    try:
        assert (await _register(n1, "n1")).node == "n1"
        assert (await _register(n2, "n2")).node == "n2"
        net = await m.create_network(f"{run_prefix}-sec", "10.231.0.0/24")
        ep = await m.create_endpoint(f"{run_prefix}-c1", net.id, node="n1", netns=f"{run_prefix}-c1")
        v0 = time.time_ns() // 1000
        await _status(n1, "n1", ep.id, "n1", "ready", "", v0)

        async def ready() -> bool:
            return (await m.get_endpoint(ep.id)).status == "ready"

        await _poll("n1's ready report applied", ready)

        # Forgeries carry a far-future version: had one been applied, n1's later report
        # (a smaller version) would be stale and the record would keep the forger's text.
        future = v0 + 10**12
        # n2 on n1's subject: the bus refuses it.
        await n2.nc.publish(subjects.EVT_ENDPOINT_STATUS.format(node="n1", id=ep.id), codec.encode(
            EndpointStatusEvent(endpoint_id=ep.id, node="n1", status="failed", reason="forged-1", version=future)))
        # n2 on its own subject claiming to be n1: the endpoint service drops it.
        await _status(n2, "n2", ep.id, "n1", "failed", "forged-2", future + 1)
        # n2 as itself: the endpoint does not live on n2.
        await _status(n2, "n2", ep.id, "n2", "failed", "forged-3", future + 2)
        # A client may publish no event at all.
        await client.nc.publish(subjects.EVT_ENDPOINT_STATUS.format(node="n1", id=ep.id), codec.encode(
            EndpointStatusEvent(endpoint_id=ep.id, node="n1", status="failed", reason="forged-4", version=future)))
        # n1's own next report comes after all of them in the stream, and must be applied.
        await _status(n1, "n1", ep.id, "n1", "failed", "marker-from-n1", v0 + 1)

        async def marker() -> Any:
            info = await m.get_endpoint(ep.id)
            return info if info.reason == "marker-from-n1" else None

        info = await _poll("n1's marker report applied (so the forgeries before it were handled)", marker)
        assert info.status == "failed" and "forged" not in info.reason
        assert await n2.violations() == {("pub", subjects.EVT_ENDPOINT_STATUS.format(node="n1", id=ep.id).lower())}
        assert await client.violations() == {
            ("pub", subjects.EVT_ENDPOINT_STATUS.format(node="n1", id=ep.id).lower())}

        # A fake node: n2 registering as n1 on its own subject is refused; on n1's, the bus refuses.
        with pytest.raises(E.VNetError) as ei:
            await _register(n2, "n2", body_node="n1")
        assert ei.value.code == "invalid_request" and "own subject" in ei.value.message
        await n2.nc.publish(subjects.NODE_REGISTER.format(node="n1"), b"{}")
        await client.nc.publish(subjects.NODE_REGISTER.format(node="n3"), b"{}")
        assert ("pub", "vnet.node.n1.register") in await n2.violations()
        assert ("pub", "vnet.node.n3.register") in await client.violations()
        assert {n.node for n in await m.nodes()} == {"n1", "n2"}
        # Host routes: n2 may report only its own (the network service checks the body).
        from vnet.contracts.network import HostRoutesReply, HostRoutesReport

        rep, _ = await nats_adapter.request(n2.nc, subjects.NETWORK_HOSTROUTES_REPORT,
                                            HostRoutesReport(node="n2", prefixes=["10.233.0.0/24"], interval_s=60.0),
                                            HostRoutesReply, params={"node": "n2"}, timeout=WAIT_S)
        assert rep.accepted == 1
        with pytest.raises(E.VNetError) as ei:
            await nats_adapter.request(n2.nc, subjects.NETWORK_HOSTROUTES_REPORT,
                                       HostRoutesReport(node="n1", prefixes=["10.234.0.0/24"], interval_s=60.0),
                                       HostRoutesReply, params={"node": "n2"}, timeout=WAIT_S)
        assert ei.value.code == "invalid_request"
        await n2.nc.publish(subjects.NETWORK_HOSTROUTES_REPORT.format(node="n1"), b"{}")
        assert ("pub", "vnet.network.hostroutes.report.n1") in await n2.violations()
        # n2 deregistering n1 is ignored; its own deregistration (after it, same subscription) is not.
        await n2.nc.publish(subjects.NODE_DEREGISTER.format(node="n2"),
                            codec.encode(NodeDeregister(node="n1", instance="i-n1")))
        await n2.nc.publish(subjects.NODE_DEREGISTER.format(node="n2"),
                            codec.encode(NodeDeregister(node="n2", instance="i-n2")))

        async def n2_gone() -> bool:
            return "n2" not in {n.node for n in await m.nodes()}

        await _poll("n2's own deregistration", n2_gone)
        assert "n1" in {n.node for n in await m.nodes()}

        # A node cannot write policy, create or delete networks or endpoints.
        for subj in (subjects.POLICY_RULE_PUT, subjects.POLICY_RULE_DELETE, subjects.NETWORK_DELETE,
                     subjects.ENDPOINT_DELETE):
            await n1.nc.publish(subj.template, b"{}")
        got = await n1.violations()
        assert {x for _, x in got} >= {s.template for s in (subjects.POLICY_RULE_PUT, subjects.POLICY_RULE_DELETE,
                                                            subjects.NETWORK_DELETE, subjects.ENDPOINT_DELETE)}
        await m.delete_endpoint(ep.id)
        await m.delete_network(net.id)
    finally:
        await m.close()
        for c in (n1, n2, client):
            await c.nc.close()


# --- bad input on this path --------------------------------------------------------------------------

async def test_bad_input_answers_400_not_500(services: Secured, run_prefix: str) -> None:
    """A NUL byte in a namespace name, an IPv6 zone id in a CIDR, gateway or address."""
    from vnet.client import VNetManager

    n1 = await connect_as(services, permissions.node_user("n1"))
    m = VNetManager(services.cfg(permissions.admin_user()))
    try:
        await _register(n1, "n1")
        for kw in ({"cidr": "fd00::%eth0/64"}, {"cidr": "10.232.0.0/24", "cidr_v6": "fd00:232::%lo/64"}):
            with pytest.raises(E.VNetError) as ei:
                await m.create_network(f"{run_prefix}-bad", **kw)  # type: ignore[arg-type]
            assert (ei.value.status, ei.value.code) == (400, "invalid_cidr"), ei.value
        net = await m.create_network(f"{run_prefix}-bad6", "10.232.0.0/24", ipv6=True, cidr_v6="fd00:232::/64")
        for kw2 in ({"netns": "web\x00x"}, {"netns": "/run/netns/a\x00b"}, {"netns": "a\nb"}):
            with pytest.raises(E.VNetError) as ei:
                await m.create_endpoint(f"{run_prefix}-bad-c", net.id, node="n1", **kw2)
            assert (ei.value.status, ei.value.code) == (400, "invalid_netns"), ei.value
        with pytest.raises(E.VNetError) as ei:
            await m.create_endpoint(f"{run_prefix}-bad-c", net.id, node="n1", netns=f"{run_prefix}-bad-c",
                                    ipv6="fd00:232::5%eth0")
        assert ei.value.status == 400, ei.value
        await m.delete_network(net.id)
    finally:
        await m.close()
        await n1.nc.close()
