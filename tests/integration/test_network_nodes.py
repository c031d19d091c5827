"""Which nodes hold a network's endpoints, as the endpoint service reads it for every event
it addresses (vnet.svc.endpoint.events): a count per node and network, kept by the same
scripts that record and delete endpoints, so it is read in one step whatever the size of
the network (reading every endpoint per event made attaches slow down as networks grew)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

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
