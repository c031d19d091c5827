"""The node's PolicyAgent without a kernel: attaches noted while a whole-ruleset fetch is on
its way survive its (older) reply; what cannot be computed on the node asks for a fetch."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from vnet.adapters import policy_agent
from vnet.adapters.nftables import SyncResult
from vnet.adapters.policy_agent import PolicyAgent
from vnet.contracts.policy import RulesetReply
from vnet.core import naming
from vnet.core.model import IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyEndpoint, PolicyNetwork, Selector

NETS = [PolicyNetwork(id="a", mode=IsolationMode.FULL, cidrs=("10.8.1.0/24",)),
        PolicyNetwork(id="b", mode=IsolationMode.NONE, cidrs=("10.8.2.0/24",))]
RULES = [AllowRule(id="r", from_=[Selector(network="a")], to=[Selector(network="a")])]


def ep(i: int, net: str = "a", node: str = "h") -> PolicyEndpoint:
    return PolicyEndpoint(id=f"e{i}", network=net, ips=(f"10.8.{1 if net == 'a' else 2}.{10 + i}",),
                          mac=f"02:00:00:00:08:{i:02x}", node=node)


def reply(eps: list[PolicyEndpoint]) -> RulesetReply:
    rs = Policy(NETS, eps, RULES).compile("h")
    return RulesetReply(node="h", version=rs.version(), script="", endpoints=len(rs.ports), rules=1, ruleset=rs)


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> PolicyAgent:
    a = PolicyAgent(None, node="h", host_netns="unused", mechanism="subprocess")
    monkeypatch.setattr(a, "_apply_target", lambda check: SyncResult(wrote=False, reason="unchanged", duration=0.0))
    return a


async def test_an_attach_during_a_fetch_survives_the_older_reply(agent: PolicyAgent,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    base = [ep(0)]

    async def first(*a: Any, **kw: Any) -> tuple[RulesetReply, None]:
        return reply(base), None

    monkeypatch.setattr(policy_agent.nats_adapter, "request", first)
    await agent.sync()
    assert agent.target is not None and [p.endpoint for p in agent.target.ports] == ["e0"]

    async def slow(*a: Any, **kw: Any) -> tuple[RulesetReply, None]:
        # an attach and a detach are noted while this reply (computed before them) travels
        assert agent.note_added(ep(1), local=True, bridge=naming.bridge_name("a"))
        assert agent.note_added(ep(5, node="other"), local=False)
        await asyncio.sleep(0)
        return reply(base), None

    monkeypatch.setattr(policy_agent.nats_adapter, "request", slow)
    await agent.sync()
    want = Policy(NETS, [ep(0), ep(1), ep(5, node="other")], RULES).compile("h")
    assert agent.target is not None and agent.target.version() == want.version()
    assert agent._ops == []  # nothing kept once no fetch is on its way


def test_what_the_node_cannot_compute_asks_for_a_fetch(agent: PolicyAgent) -> None:
    assert not agent.note_added(ep(1), local=True, bridge=naming.bridge_name("a"))  # nothing fetched yet
    agent.target = Policy(NETS, [ep(0)], RULES).compile("h")
    # a network not in play on this host yet: bridges and pairs change, the engine decides
    assert not agent.note_added(ep(2, net="b"), local=True, bridge=naming.bridge_name("b"))
    # the last endpoint of a network leaving: its bridge may leave play
    assert not agent.note_removed(ep(0), local=True)
    assert agent.note_added(ep(3), local=True, bridge=naming.bridge_name("a"))
    assert agent.note_removed(ep(3), local=True)
