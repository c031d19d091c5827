"""macvlan isolation through the whole control plane: client -> services -> events -> node
worker -> the tables in the container namespaces -> packets.

The services and one node worker run in this process against a host namespace made by the
``netns`` fixture, with a parent interface ``up0`` whose other end is in a "LAN" namespace
(10.89.200.1/16, outside every network: external). The full resync is pushed to 60 s, so
only the event path can act. Every observed probe is compared with ``VNetManager.explain``
and with a written-out expectation.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import control_plane, requires_root
from tests.netns.test_macvlan_isolation import MvAgent
from vnet import VNetManager
from vnet.contracts.endpoint import EndpointInfo
from vnet.core import mvpolicy as mvp
from vnet.core.policy import AllowRule, PortSpec, Selector
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

pytestmark = [pytest.mark.netns, requires_root]

LAN = "10.89.200.1"
ENFORCE_S = 20.0  # "it takes effect" with room for a busy machine; the figure seen is printed


async def sh(*cmd: str) -> str:
    """A command of this test (ip/nft inside its own namespaces), off the event loop."""
    r = await asyncio.to_thread(subprocess.run, list(cmd), check=True, capture_output=True, text=True)
    return r.stdout


@dataclass
class Env:
    m: VNetManager
    host: str
    lan: str
    node_rt: Runtime
    netns: Callable[[str], str]


@pytest.fixture
async def env(config: VNetConfig, netns: Callable[[str], str], start_service: Callable[..., Awaitable[Runtime]],
              run_prefix: str) -> AsyncIterator[Env]:
    async with control_plane(config, start_service, netns, host="mh", node=f"{run_prefix}-mv",
                             resync_s=60) as cp:
        lan = netns("mlan")
        await sh("ip", "-n", cp.host, "link", "add", "up0", "type", "veth", "peer", "name", "lan0", "netns", lan)
        await sh("ip", "-n", lan, "addr", "add", f"{LAN}/16", "dev", "lan0")
        await sh("ip", "-n", lan, "link", "set", "lan0", "up")
        yield Env(cp.m, cp.host, lan, cp.node_rt, netns)


@pytest.fixture
def agents() -> Iterator[list[MvAgent]]:
    made: list[MvAgent] = []
    yield made
    for a in made:
        a.close()


def probe(a: MvAgent, dst: str, proto: str, t: float = 0.5) -> bool:
    port = 80 if proto == "tcp" else None
    return bool(a.send(op=proto, dst=dst, port=port, t=t).result(timeout=t + 30))


async def until(cond: Callable[[], bool], limit: float = ENFORCE_S) -> float:
    t0 = time.perf_counter()
    while not await asyncio.to_thread(cond):
        assert time.perf_counter() - t0 < limit, f"not within {limit}s"
        await asyncio.sleep(0.02)
    return time.perf_counter() - t0


async def test_macvlan_modes_rules_and_detach_by_events(env: Env, agents: list[MvAgent]) -> None:
    m = env.m
    opts = {"parent": "up0"}
    na = await m.create_network("mva", "10.89.1.0/24", None, "macvlan", "peer_only", opts)
    nb = await m.create_network("mvb", "10.89.2.0/24", None, "macvlan", "peer_only", opts)
    await m.connect_networks(na.id, nb.id)
    names = await asyncio.to_thread(lambda: [env.netns(n) for n in ("ma1", "ma2", "mb1")])
    eps: list[EndpointInfo] = list(await asyncio.gather(
        *(m.create_endpoint(c, net, wait=True, wait_timeout=30) for c, net in zip(names, (na.id, na.id, nb.id),
                                                                                  strict=True))))
    assert [e.status for e in eps] == ["ready"] * 3, eps
    for c in names:  # both networks and the LAN host on-link: switched inside the parent
        await sh("ip", "-n", c, "route", "replace", "10.89.0.0/16", "dev", "eth0")
    ags = await asyncio.to_thread(lambda: [MvAgent(c) for c in names])
    agents += ags
    a1, a2, b1 = ags
    ea1, ea2, eb1 = eps
    lan = await asyncio.to_thread(MvAgent, env.lan)
    agents.append(lan)
    for c, e in zip(names, eps, strict=True):  # the two tables of each endpoint are in its container
        out = await sh("ip", "netns", "exec", c, "nft", "list", "tables")
        t = mvp.table_name(e.id)
        assert {f"table inet {t}", f"table netdev {t}"} <= set(out.split("\n")), out

    async def check(cases: list[tuple[str, MvAgent, str, str, str, str, bool]]) -> None:
        got = await asyncio.gather(*(asyncio.to_thread(lambda c=c: probe(c[1], c[3], c[4]) or
                                                       probe(c[1], c[3], c[4], 2.0)) for c in cases))
        verdicts = await asyncio.gather(*(m.explain(c[2], c[5], protocol=c[4], port=80 if c[4] == "tcp" else None)
                                          for c in cases))
        for c, seen, v in zip(cases, got, verdicts, strict=True):
            assert seen == c[6], f"{c[0]}: observed {seen}, expected {c[6]}"
            assert v.allowed == seen, f"{c[0]}: explain says {v.allowed} ({v.reasons}), observed {seen}"

    def cases(across: bool, lan_ok: bool) -> list[tuple[str, MvAgent, str, str, str, str, bool]]:
        out: list[tuple[str, MvAgent, str, str, str, str, bool]] = []
        for proto in ("tcp", "icmp"):
            out += [(f"a1>a2 {proto}", a1, ea1.id, str(ea2.ip_address), proto, ea2.id, True),
                    (f"a1>b1 {proto}", a1, ea1.id, str(eb1.ip_address), proto, eb1.id, across),
                    (f"b1>a2 {proto}", b1, eb1.id, str(ea2.ip_address), proto, ea2.id, across),
                    (f"a1>lan {proto}", a1, ea1.id, LAN, proto, LAN, lan_ok),
                    (f"lan>b1 {proto}", lan, LAN, str(eb1.ip_address), proto, eb1.id, lan_ok)]
        return out

    # PeerOnly both: the peer in the same network only
    await check(cases(False, False))
    # both made MeshOnly (network.updated events): across the connection opens, the LAN stays shut
    await m.update_network(na.id, isolation="mesh_only")
    await m.update_network(nb.id, isolation="mesh_only")
    took = await until(lambda: probe(a1, str(eb1.ip_address), "icmp"))
    print(f"mode change reached the macvlan tables in {took * 1000:.0f} ms")
    await check(cases(True, False))
    # an allow rule a1 -> the LAN host tcp/80 (a policy event): only that flow
    await m.put_rule(AllowRule(id="mv-lan", from_=[Selector(endpoint=ea1.id)], to=[Selector(cidr=f"{LAN}/32")],
                               ports=[PortSpec(protocol="tcp", port=80)]))
    took = await until(lambda: probe(a1, LAN, "tcp"))
    print(f"rule reached the macvlan tables in {took * 1000:.0f} ms")
    assert not await asyncio.to_thread(probe, a1, LAN, "icmp", 1.0)
    assert not await asyncio.to_thread(probe, a2, LAN, "tcp", 1.0)
    # disconnected (event): across shuts again
    await m.disconnect_networks(na.id, nb.id)
    await until(lambda: not probe(a1, str(eb1.ip_address), "icmp", 0.3))
    await check(cases(False, False)[:3])
    # the worker's full resync: converged -> no macvlan write; a table deleted in a container
    # (drift) -> that pair restored by the next one, and denied again
    worker = env.node_rt.state["worker"]
    agent = worker.policy
    await worker.request_resync()
    await asyncio.to_thread(agent.wait_macvlan)
    await worker.request_resync()
    assert agent.mv_last is not None and (agent.mv_last.writes, agent.mv_last.errors) == (0, {}), agent.mv_last
    t = mvp.table_name(eb1.id)
    await sh("ip", "netns", "exec", names[2], "nft", "delete", "table", "inet", t)
    assert await asyncio.to_thread(probe, b1, LAN, "icmp", 1.0)  # MeshOnly to the LAN host: open without it
    await worker.request_resync()
    assert agent.mv_last is not None and (agent.mv_last.writes, agent.mv_last.wholes) == (1, 1), agent.mv_last
    assert not await asyncio.to_thread(probe, b1, LAN, "icmp", 1.0)
    # a detached endpoint's tables leave its container (it still exists)
    await m.delete_endpoint(ea2.id, wait=True, wait_timeout=30)
    out = await sh("ip", "netns", "exec", names[1], "nft", "list", "tables")
    assert mvp.table_name(ea2.id) not in out, out
    stats = worker.stats()
    assert stats.policy is not None and "macvlan" not in stats.policy.last_error, stats.policy.last_error
