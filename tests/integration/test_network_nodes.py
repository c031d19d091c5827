"""Which nodes hold a network's endpoints, as the endpoint service reads it for every event
it addresses (vnet.svc.endpoint.events): a count per node and network, kept by the same
scripts that record and delete endpoints, so it is read in one step whatever the size of
the network (reading every endpoint per event made attaches slow down as networks grew).
The commit script answers it too, and a create in a network related to no other is
addressed with that answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import fake_node, services
from vnet.adapters import endpoint_store as es
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime


async def test_nodes_of_a_network_follow_creates_and_deletes(config: VNetConfig,
                                                             start_service: Callable[..., Awaitable[Runtime]]) -> None:
    async with services(config, start_service, node="nn1") as m, fake_node(m, "nn2"):
        r = aioredis.Redis.from_url(m.config.redis_url)
        st = es.EndpointStore(r)
        try:
            a = await m.create_network("nna", "10.206.1.0/24")
            b = await m.create_network("nnb", "10.206.2.0/24")
            assert await st.nodes_of_networks([a.id, b.id]) == set()
            a1 = [await m.create_endpoint(f"a1-{i}", a.id, node="nn1") for i in range(3)]
            a2 = await m.create_endpoint("a2", a.id, node="nn2")
            b2 = await m.create_endpoint("b2", b.id, node="nn2")
            assert await st.nodes_of_networks([a.id]) == {"nn1", "nn2"}
            assert await st.nodes_of_networks([b.id]) == {"nn2"}
            await m.delete_endpoint(a2.id)
            assert await st.nodes_of_networks([a.id]) == {"nn1"}
            assert await st.nodes_of_networks([a.id, b.id]) == {"nn1", "nn2"}
            for e in a1[:2]:  # a node stays while it holds one endpoint of the network
                await m.delete_endpoint(e.id)
            assert await st.nodes_of_networks([a.id]) == {"nn1"}
            await m.delete_endpoint(a1[2].id)
            await m.delete_endpoint(b2.id)
            with pytest.raises(E.NotFound):  # a repeated delete changes no count
                await m.delete_endpoint(b2.id)
            assert await st.delete(b2) is None
            assert await st.nodes_of_networks([a.id, b.id]) == set()
            assert not await r.exists(es.net_nodes_key(a.id), es.net_nodes_key(b.id))
        finally:
            await r.aclose()


async def test_commit_answers_the_nodes_of_its_network(config: VNetConfig,
                                                       start_service: Callable[..., Awaitable[Runtime]]) -> None:
    """The commit script answers the nodes holding an endpoint of the network as it left them
    (its own node included): the endpoint service addresses the created event with that, and
    reads nothing more for it. It is what ``nodes_of_networks`` reads right after."""
    from vnet.contracts.endpoint import EndpointInfo

    async with services(config, start_service, node="nc1") as m:
        r = aioredis.Redis.from_url(m.config.redis_url)
        st = es.EndpointStore(r)
        try:
            net = await m.create_network("nnc", "10.206.3.0/24")
            seen = []
            for i, node in enumerate(("nc1", "nc2", "nc1", "nc3")):
                info = EndpointInfo(id=f"ncep{i}", container_id=f"nc-c{i}", network_id=net.id,
                                    ip_address=f"10.206.3.{10 + i}", mac_address=f"02:00:00:00:0c:{i:02x}",
                                    interface_name="", created_at="2026-12-04T00:00:00Z", node=node, netns=f"nc-c{i}")
                res = await st.commit(info, auto_ifname=True, request_id=None)
                assert res.status == "ok" and res.value == "eth0", res
                seen.append(res.hosts)
                assert res.hosts == await st.nodes_of_networks([net.id])
            assert seen == [{"nc1"}, {"nc1", "nc2"}, {"nc1", "nc2"}, {"nc1", "nc2", "nc3"}]
            dup = await st.commit(msgspec.structs.replace(info, id="ncdup"), auto_ifname=True, request_id=None)
            assert dup.status == "dup_ctr" and dup.hosts is None
        finally:
            await r.aclose()


async def test_created_event_reaches_the_other_node_of_an_unrelated_network(
        config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]]) -> None:
    """A bridge network related to no other, on two nodes, a rule selecting its endpoints: the
    created event of the second endpoint is addressed to both nodes, the other one with the
    hosts the commit script answered (the path that reads nothing more); an endpoint of a
    network on one node alone reaches that node only."""
    from vnet.adapters import nats as nats_adapter
    from vnet.contracts import subjects
    from vnet.core.policy import AllowRule, Selector

    async with services(config, start_service, node="na1") as m, fake_node(m, "na2"):
        nc = await nats_adapter.connect(m.config, "test-node-copies")
        got: list[str] = []

        async def seen(msg: Any) -> None:
            got.append(msg.subject)

        await nc.subscribe(subjects.EVT_ENDPOINT_TO_NODE.wildcard(), cb=seen)
        await nc.flush()
        try:
            await m.put_rule(AllowRule(id="web", from_=[Selector(labels={"app": "web"})],
                                       to=[Selector(labels={"app": "web"})]))
            net = await m.create_network("nnu", "10.206.4.0/24")
            alone = await m.create_network("nnv", "10.206.5.0/24")
            first = await m.create_endpoint("u1", net.id, node="na1", labels={"app": "web"})
            second = await m.create_endpoint("u2", net.id, node="na2", labels={"app": "web"})
            solo = await m.create_endpoint("v1", alone.id, node="na1", labels={"app": "web"})
            want = {f"vnet.node.na1.evt.endpoint.created.{first.id}",
                    f"vnet.node.na1.evt.endpoint.created.{second.id}",
                    f"vnet.node.na2.evt.endpoint.created.{second.id}",
                    f"vnet.node.na1.evt.endpoint.created.{solo.id}"}
            for _ in range(100):
                if want <= set(got):
                    break
                await asyncio.sleep(0.05)
            await nc.flush()
            created = {s for s in got if ".evt.endpoint.created." in s}
            assert created == want, sorted(created)
        finally:
            await nc.drain()
