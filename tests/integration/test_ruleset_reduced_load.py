"""A node's ruleset fetch reads the endpoints of the networks in play on that node only
(docs/scale.md, issue 15), and answers exactly what the compile over every endpoint answers.

Real nats-server and Valkey, the real services; nodes are stand-ins that answer namespace
checks (tests.conftest.fake_node). A spy on ``vnet.endpoint.list`` records every listing the
policy service asks for and what each answered.

Layout: N1 (Full) on A and B; N3 connected to N1, on D; a child network of N1 (K), on B;
N2 unrelated, on C and B. A holds a published port; a label rule and a CIDR rule are in force.
A's ruleset needs A's endpoints and those of N1, N3 and K; never N2's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg

from tests.conftest import fake_node, services
from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.endpoint import EndpointList, EndpointPage, PortMapping
from vnet.contracts.policy import policy_endpoint, policy_network
from vnet.core.policy import AllowRule, Policy, Selector
from vnet.runtime.config import VNetConfig
from vnet.svc.policy.service import compiled_ruleset

WEB = {"app": "web"}


class Spy:
    """Every ``endpoint.list`` request on the bus and the pages answered to it."""

    def __init__(self) -> None:
        self.asked: dict[str, EndpointList] = {}  # reply inbox -> the request
        self.answers: dict[str, list[EndpointPage]] = {}

    def clear(self) -> None:
        self.asked.clear()
        self.answers.clear()

    async def on_request(self, msg: Msg) -> None:
        self.asked[msg.reply] = msgspec.json.decode(msg.data, type=EndpointList)

    async def on_inbox(self, msg: Msg) -> None:
        if msg.subject in self.asked:
            self.answers.setdefault(msg.subject, []).append(msgspec.json.decode(msg.data, type=EndpointPage))

    def filters(self) -> list[tuple[str | None, str | None]]:
        return sorted(((r.node, r.network) for r in self.asked.values()), key=str)

    def endpoints_read(self) -> set[str]:
        return {e.id for pages in self.answers.values() for p in pages for e in p.endpoints}


async def test_a_nodes_ruleset_reads_only_its_networks_in_play_and_equals_the_full_compile(
        config: VNetConfig, run_prefix: str, start_service: Callable[..., Awaitable[Any]]) -> None:
    a, b, c, d = (f"{run_prefix}-rl{x}" for x in "abcd")
    async with services(config, start_service) as m, contextlib.AsyncExitStack() as stack:
        for n in (a, b, c, d):
            await stack.enter_async_context(fake_node(m, n))
        await m.put_rule(AllowRule(id="web", from_=[Selector(labels=WEB)], to=[Selector(labels=WEB)]))
        await m.put_rule(AllowRule(id="out", from_=[Selector(cidr="10.77.0.0/16")],
                                   to=[Selector(cidr="192.0.2.0/24")]))
        n1 = await m.create_network(f"{run_prefix}-rl-n1", "10.77.1.0/24", isolation="full")
        n2 = await m.create_network(f"{run_prefix}-rl-n2", "10.77.2.0/24", isolation="full")
        n3 = await m.create_network(f"{run_prefix}-rl-n3", "10.77.3.0/24", isolation="mesh_only")
        await m.connect_networks(n1.id, n3.id)
        k = await m.create_child_network(n1.id, f"{run_prefix}-rl-k", "10.77.1.128/25")

        async def ep(tag: str, net: str, node: str, **kw: Any) -> str:
            got = await m.create_endpoint(f"{run_prefix}-{tag}", net, node=node, labels=WEB, **kw)
            return str(got.id)

        mine = {await ep("a1", n1.id, a, ports=[PortMapping(host_port=8080, container_port=80)]),
                await ep("a2", n1.id, a)}
        related = {await ep("b1", n1.id, b), await ep("d1", n3.id, d), await ep("bk", k.id, b)}
        unrelated = {await ep("c1", n2.id, c), await ep("b2", n2.id, b)}

        spy = Spy()
        nc = await nats_adapter.connect(m.config, "test-ruleset-spy")
        try:
            await nc.subscribe(subjects.ENDPOINT_LIST.template, cb=spy.on_request)
            await nc.subscribe("_INBOX.>", cb=spy.on_inbox)
            await nc.flush()

            for structured in (True, False):
                spy.clear()
                got = await m.node_ruleset(a, structured=structured)
                await asyncio.sleep(0.2)  # the spy's copies of the last reply
                await nc.flush()
                # the node's own listing and one per network in play: N1, its child K, N3
                assert spy.filters() == sorted([(a, None), (None, n1.id), (None, k.id), (None, n3.id)], key=str)
                assert spy.endpoints_read() == mine | related, spy.endpoints_read()
                assert not spy.endpoints_read() & unrelated

                # the same reply as the compile over every network and endpoint of the cluster
                nets = await m.all_networks()
                eps = await m.list_endpoints()
                assert {e.id for e in eps} == mine | related | unrelated
                full = Policy([policy_network(n) for n in nets], [policy_endpoint(e) for e in eps],
                              await m.list_rules())
                want = compiled_ruleset(full, eps, a, structured=structured)
                assert got == want
                if structured:
                    assert got.ruleset is not None and got.endpoints == 2
                    members = {x for s in got.ruleset.sets if s.selectors for x in s.elements}
                    assert len(members) == 5  # N1's, N3's and K's selected endpoints, not N2's
                    assert got.ruleset.published4

            # C holds N2 only: nothing of N1, N3 or K is read for it
            spy.clear()
            got = await m.node_ruleset(c, structured=True)
            await asyncio.sleep(0.2)
            assert spy.filters() == sorted([(c, None), (None, n2.id)], key=str)
            assert spy.endpoints_read() == unrelated

            # explain (no node) still reads the whole cluster, unfiltered
            spy.clear()
            v = await m.explain(sorted(mine)[0], sorted(related)[0], protocol="tcp", port=80)
            assert v.allowed and v.by == "rule"
            await asyncio.sleep(0.2)
            assert spy.filters() == [(None, None)]
        finally:
            await nc.drain()
