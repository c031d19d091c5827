"""What a node follows when its rules select by label, and what its resolver is fed (docs/scale.md,
issue 15): both proportional to the networks in play on the node, not to the cluster.

A node whose allow rules select endpoints by label used to follow every node's endpoint events
(a cluster-wide ``-all`` consumer), and every node's resolver subscribed to every endpoint
event. Now the endpoint service addresses an event to the nodes in play for the endpoint's
network (holding an endpoint of it or of a related network) when a rule selects it, or when
they run a resolver; nothing of an unrelated network reaches a node.

Real nats-server and Valkey, real services, simulated node workers (the real NodeWorker with a
recording data plane; here with their policy agent on, ``VNETSIM_POLICY=1``, and a recording
enforcer). Layout: bridge network N1 on A and B, N2 on C (unrelated to N1), N3 on D connected
to N1; every endpoint labelled ``app=web`` and one rule ``app=web -> app=web``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest
import redis.asyncio as aioredis
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from tests.conftest import fresh_db_config
from tests.integration.test_event_addressing import DEADLINE_S, _until
from vnet.client import VNetManager
from vnet.contracts import subjects
from vnet.core.policy import AllowRule, Selector
from vnet.runtime.config import VNetConfig
from vnet.runtime.node_wiring import NodeAdapters
from vnet.svc.node.dns import NodeDns
from vnet.svc.node.simulate import SimulatedFleet, SimulatedNodeWorker, node_names

SERVICES = ("ipam", "network", "endpoint", "policy")
WEB = {"app": "web"}


def _record(workers: Iterable[SimulatedNodeWorker], seen: dict[str, list[str]]) -> None:
    """Every endpoint event a worker's intake is handed (whichever subscription hands it over)."""
    for w in workers:
        orig = w._endpoint_event

        async def record(msg: Msg, *args: Any, _w: Any = w, _orig: Any = orig, **kw: Any) -> None:
            seen[_w.node].append(msg.subject)
            await _orig(msg, *args, **kw)

        w._endpoint_event = record  # type: ignore[method-assign]


def _set_members(w: SimulatedNodeWorker) -> set[str]:
    rs = w.policy.target if w.policy is not None else None
    return {x for s in (rs.sets if rs is not None else []) if s.selectors for x in s.elements}


async def _stack(config: VNetConfig, start_service: Callable[..., Awaitable[Any]]) -> tuple[VNetConfig, Any]:
    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for name in SERVICES:
        await start_service(name, cfg=cfg)
    return cfg, r


async def test_a_node_with_label_rules_receives_only_events_of_networks_in_play_and_its_sets_hold_only_those(
        config: VNetConfig, run_prefix: str, start_service: Callable[..., Awaitable[Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VNETSIM_POLICY", "1")
    cfg, r = await _stack(config, start_service)
    names = node_names(f"{run_prefix}-lbl", 4)
    a, b, c, d = names
    seen: dict[str, list[str]] = {n: [] for n in names}
    fleet = SimulatedFleet(cfg, names)
    await fleet.start()
    workers = {w.node: w for w in fleet.workers()}
    _record(workers.values(), seen)
    m = VNetManager(cfg)
    await m.__aenter__()
    try:
        await _until(lambda: all(w.registered for w in workers.values()), "every node registered")
        assert all(w.policy is not None for w in workers.values())
        sel = [Selector(labels=WEB)]
        await m.put_rule(AllowRule(id=f"{run_prefix}-web", from_=sel, to=sel))
        n1 = await m.create_network(f"{run_prefix}-lbl-n1", "10.79.1.0/24", driver="bridge")
        n2 = await m.create_network(f"{run_prefix}-lbl-n2", "10.79.2.0/24", driver="bridge")
        n3 = await m.create_network(f"{run_prefix}-lbl-n3", "10.79.3.0/24", driver="bridge")
        await m.connect_networks(n1.id, n3.id)

        async def ep(tag: str, net: str, node: str) -> Any:
            got = await m.create_endpoint(f"{run_prefix}-{tag}", net, node=node, wait=True, wait_timeout=30.0,
                                          labels=WEB)
            assert got.status == "ready", (got.status, got.reason)
            return got

        ea = await ep("ea", n1.id, a)  # A first: what follows is addressed to it, or not at all
        eb = await ep("eb", n1.id, b)
        ec = await ep("ec", n2.id, c)
        ed = await ep("ed", n3.id, d)

        def got(node: str, ident: str, event: str = "created") -> bool:
            return f"vnet.node.{node}.evt.endpoint.{event}.{ident}" in seen[node]

        await _until(lambda: got(a, eb.id) and got(a, ed.id), "B's and D's endpoints at A")
        # a label update of C's endpoint (selected before and after): C's concern only
        await m.update_endpoint(ec.id, set_labels={"tier": "x"})
        # B's endpoint leaves the rule's selection: A's set loses it
        await m.update_endpoint(eb.id, labels={"app": "other"})
        await _until(lambda: got(a, eb.id, "updated"), "the update of B's endpoint at A")
        # the sentinel: once A has it, anything misaddressed to A before is there too (stream order)
        es = await ep("es", n1.id, b)
        await _until(lambda: got(a, es.id), "the sentinel at A")
        await _until(lambda: got(c, ec.id, "updated"), "C's own update")

        ids = {n: {s.rsplit(".", 1)[-1] for s in seen[n]} for n in names}
        assert ec.id not in ids[a] and ec.id not in ids[b] and ec.id not in ids[d], seen
        assert ids[c] == {ec.id}, seen[c]  # nothing of N1 or N3: C is in play for N2 only
        assert {eb.id, ed.id, es.id} <= ids[a], seen[a]
        # N3 is connected to N1: what changed in N1 once D held an endpoint in N3 reached D
        assert got(d, eb.id, "updated") and got(d, es.id), seen[d]
        for n in names:  # only copies addressed to the node, on its one endpoint subscription
            assert all(s.startswith(f"vnet.node.{n}.evt.endpoint.") for s in seen[n]), seen[n]
            with pytest.raises(NotFoundError):
                await workers[n].rt.js.consumer_info(subjects.EVENTS_STREAM, f"vnet-node-{n}-all")

        # A's address sets: N1's and N3's selected endpoints, never C's (unrelated), and not B's
        # first endpoint since its label changed: from the events, and from a fetch alike
        wa = workers[a]
        await _until(lambda: _set_members(wa) == {ea.ip_address, ed.ip_address, es.ip_address},
                     "A's sets from the events")
        await wa._policy_sync("test")
        assert _set_members(wa) == {ea.ip_address, ed.ip_address, es.ip_address}
        assert ec.ip_address not in _set_members(wa)
    finally:
        await m.close()
        await fleet.stop()
        await r.flushdb()
        await r.aclose()


class _NoSockets:
    """The resolver's server without sockets: what the table answers is what this test asks."""

    def clear_cache(self) -> None:
        pass

    async def listen(self, addresses: Iterable[str]) -> list[str]:
        return []

    async def unlisten(self, addresses: Iterable[str]) -> None:
        pass

    def listening(self) -> list[str]:
        return []

    async def close(self) -> None:
        pass


async def test_a_resolver_is_fed_only_related_networks_and_resolves_a_related_name_at_once(
        config: VNetConfig, run_prefix: str, start_service: Callable[..., Awaitable[Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(NodeAdapters, "dns_server", lambda self, answer, **kw: _NoSockets())
    cfg, r = await _stack(config, start_service)
    names = node_names(f"{run_prefix}-dns", 3)
    a, b, c = names
    fleet = SimulatedFleet(cfg, names)
    await fleet.start()
    workers = {w.node: w for w in fleet.workers()}
    m = VNetManager(cfg)
    await m.__aenter__()
    resolver: NodeDns | None = None
    fed: list[str] = []
    try:
        await _until(lambda: all(w.registered for w in workers.values()), "every node registered")
        wa = workers[a]
        wa.rt.params.update(dns="on", dns_upstream="")  # A runs a resolver (as vnet-node --dns)
        await wa.register()  # the endpoint service learns it with A's registration
        n1 = await m.create_network(f"{run_prefix}-dns-n1", "10.79.11.0/24", driver="bridge", isolation="mesh_only")
        n2 = await m.create_network(f"{run_prefix}-dns-n2", "10.79.12.0/24", driver="bridge", isolation="mesh_only")
        n3 = await m.create_network(f"{run_prefix}-dns-n3", "10.79.13.0/24", driver="bridge", isolation="mesh_only")
        await m.connect_networks(n1.id, n3.id)

        async def ep(tag: str, net: str, node: str) -> Any:
            got = await m.create_endpoint(f"{run_prefix}-{tag}", net, node=node, wait=True, wait_timeout=30.0)
            assert got.status == "ready", (got.status, got.reason)
            return got

        ea = await ep("ea", n1.id, a)
        resolver = NodeDns(wa.rt)
        for handler in ("_on_event", "_on_endpoint_event"):  # whichever a subscription calls
            if not hasattr(resolver, handler):
                continue
            orig = getattr(resolver, handler)

            async def record(msg: Msg, _orig: Any = orig) -> None:
                if ".endpoint." in msg.subject:
                    fed.append(msg.subject)
                await _orig(msg)

            setattr(resolver, handler, record)
        wa.rt.state["dns"] = resolver
        await resolver.start()
        await _until(lambda: resolver is not None and resolver.table is not None, "A's first table")

        async def answer(name: str) -> str:
            assert resolver is not None
            return (await resolver._answer(ea.ip_address, name, "A")).rcode

        eb = await ep("eb", n1.id, b)  # same network, other node
        ec = await ep("ec", n2.id, c)  # unrelated network on another node
        t0 = time.perf_counter()
        ed = await ep("ed", n3.id, c)  # related network (connected to N1), node C
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while await answer(ed.container_id) != "NOERROR":
            assert loop.time() < deadline, "D's name never resolved on A"
            await asyncio.sleep(0.05)
        took = time.perf_counter() - t0
        print(f"a related endpoint's name resolved on another node's resolver {took * 1000:.0f} ms after its create")
        assert await answer(eb.container_id) == "NOERROR"
        # the sentinel: once A's resolver has it, anything misaddressed before is there too
        es = await ep("es", n1.id, b)
        await _until(lambda: f"vnet.node.{a}.evt.endpoint.created.{es.id}" in fed, "the sentinel at A's resolver")
        fed_ids = {s.rsplit(".", 1)[-1] for s in fed}
        assert {eb.id, ed.id, es.id} <= fed_ids, fed
        assert ec.id not in fed_ids, fed  # C's unrelated network never reaches A's resolver
        assert all(s.startswith(f"vnet.node.{a}.evt.endpoint.") for s in fed), fed
        assert resolver.in_play == {n1.id, n3.id}
        # no path: the name does not exist for A (in the fabric's domain: NXDOMAIN; the bare name is
        # not one of A's, and A's network may not forward: REFUSED); it never resolves
        assert await answer(f"{ec.container_id}.{n2.name}.vnet") == "NXDOMAIN"
        assert await answer(ec.container_id) == "REFUSED"
        # a delete of a related endpoint: gone from A's table without a resync
        await m.delete_endpoint(ed.id)
        deadline = loop.time() + DEADLINE_S
        while await answer(f"{ed.container_id}.{n3.name}.vnet") != "NXDOMAIN":
            assert loop.time() < deadline, "D's name stayed on A after its delete"
            await asyncio.sleep(0.05)
    finally:
        if resolver is not None:
            with contextlib.suppress(Exception):
                await resolver.stop()
        await m.close()
        await fleet.stop()
        await r.flushdb()
        await r.aclose()
