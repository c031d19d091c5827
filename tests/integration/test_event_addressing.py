"""Node-addressed endpoint events (docs/scale.md, issue 15): a node receives only its own.

The endpoint service publishes every endpoint event on ``vnet.evt.endpoint.<event>.<id>``
(services, DNS, watchers) and a copy on ``vnet.node.<node>.evt.endpoint.<event>.<id>`` (core
NATS, not stored) for each node that must act on it: the endpoint's node and, for an overlay,
the nodes holding an endpoint of it or of an overlay related to it. A node worker listens on
its own copies only. Real nats-server and Valkey, real services, simulated node workers (the real
NodeWorker with a recording data plane); what each worker's handler was handed is recorded.

Layout (six nodes): a bridge network on A and B; overlay O1 on C and D; overlay O2 on E,
connected to O1; F holds nothing until the end. An event of a bridge endpoint reaches only
its node; one of O1 reaches C, D and E (E routes to O1), never A, B or F; a label update
only the endpoint's node. The last step creates an endpoint on F and waits for F to see it:
one endpoint service publishes every copy on one connection, and NATS delivers one
connection's messages in order, so anything misaddressed to F would be there before.
Then D leaves: only the nodes still sharing an overlay with it (E) get a copy of node.left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.msg import Msg

from tests.conftest import fresh_db_config
from vnet.client import VNetManager
from vnet.contracts import subjects
from vnet.runtime.config import VNetConfig
from vnet.svc.node.simulate import SimulatedFleet, SimulatedNodeWorker, node_names

SERVICES = ("ipam", "network", "endpoint", "policy")
DEADLINE_S = 60.0


async def _until(pred: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_each_node_receives_only_the_endpoint_events_addressed_to_it(
        config: VNetConfig, run_prefix: str, start_service: Callable[..., Awaitable[Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for name in SERVICES:
        await start_service(name, cfg=cfg)
    names = node_names(f"{run_prefix}-addr", 6)
    a, b, c, d, e, f = names
    seen: dict[str, list[tuple[str, str]]] = {n: [] for n in names}  # node -> (subject, endpoint id)
    node_seen: dict[str, list[str]] = {n: [] for n in names}  # node -> membership event subjects
    orig_node = SimulatedNodeWorker._on_node_event

    async def record_node(self: SimulatedNodeWorker, msg: Msg) -> None:  # the feed binds it at start
        node_seen[self.node].append(msg.subject)
        await orig_node(self, msg)

    monkeypatch.setattr(SimulatedNodeWorker, "_on_node_event", record_node)
    fleet = SimulatedFleet(cfg, names)
    await fleet.start()
    for w in fleet.workers():
        orig = w._endpoint_event

        async def record(msg: Msg, _w: Any = w, _orig: Any = orig) -> None:
            seen[_w.node].append((msg.subject, msg.subject.rsplit(".", 1)[-1]))
            await _orig(msg)

        w._endpoint_event = record  # type: ignore[method-assign]
    broadcast: list[str] = []
    nc = await nats.connect(cfg.nats_url, name="test-event-addressing")

    async def on_created(msg: Msg) -> None:
        broadcast.append(msg.subject.rsplit(".", 1)[-1])

    sub = await nc.subscribe("vnet.evt.endpoint.created.*", cb=on_created)
    copies: list[str] = []

    async def on_copy(msg: Msg) -> None:
        copies.append(msg.subject)

    sub2 = await nc.subscribe("vnet.node.*.evt.node.>", cb=on_copy)
    m = VNetManager(cfg)
    await m.__aenter__()
    try:
        await _until(lambda: all(w.registered for w in fleet.workers()), "every node registered")
        # every worker listens on its own node's subjects, nothing else, and has no consumer of
        # the stream for them (a durable consumer per node made nats-server scan the stream)
        durables = [c.name for c in await nc.jetstream().consumers_info(subjects.EVENTS_STREAM)]
        for w in fleet.workers():
            assert w.feed is not None
            assert w.feed.subjects == [f"vnet.node.{w.node}.evt.endpoint.>", f"vnet.node.{w.node}.evt.node.>"]
            assert not {f"vnet-node-{w.node}-ep", f"vnet-node-{w.node}-node"} & set(durables), durables

        br = await m.create_network(f"{run_prefix}-addr-br", "10.78.0.0/24", driver="bridge")
        o1 = await m.create_network(f"{run_prefix}-addr-o1", "10.78.1.0/24", driver="overlay")
        o2 = await m.create_network(f"{run_prefix}-addr-o2", "10.78.2.0/24", driver="overlay")
        await m.connect_networks(o1.id, o2.id)

        async def ep(tag: str, net: str, node: str) -> str:
            got = await m.create_endpoint(f"{run_prefix}-{tag}", net, node=node, wait=True, wait_timeout=30.0)
            assert got.status == "ready", (got.status, got.reason)
            return got.id

        ea = await ep("ea", br.id, a)
        eb = await ep("eb", br.id, b)
        ee = await ep("ee", o2.id, e)
        ed = await ep("ed", o1.id, d)
        ec = await ep("ec", o1.id, c)

        def got(node: str, ident: str, event: str = "created") -> bool:
            return (f"vnet.node.{node}.evt.endpoint.{event}.{ident}", ident) in seen[node]

        await _until(lambda: got(c, ec) and got(d, ec) and got(e, ec), "the O1 create at C, D and E")
        await m.update_endpoint(ea, set_labels={"tier": "web"})
        await m.delete_endpoint(ec)
        await _until(lambda: got(a, ea, "updated"), "the label update at A")
        await _until(lambda: got(c, ec, "deleted") and got(d, ec, "deleted") and got(e, ec, "deleted"),
                     "the O1 delete at C, D and E")
        # the sentinel: once F has it, nothing published before is still on its way to F
        ef = await ep("ef", br.id, f)
        await _until(lambda: got(f, ef), "the sentinel at F")
        # (every other node has been handed everything up to its own last event too)
        await _until(lambda: got(d, ed) and got(e, ee), "D and E's own creates")

        ids = {n: {i for _, i in seen[n]} for n in names}
        assert ids[a] == {ea}, seen[a]  # its own create and label update only
        assert ids[b] == {eb}, seen[b]  # nothing of A's, though they share a (bridge) network
        # C held nothing in O1 when D's endpoint was made (its full fetch brings that one)
        assert ids[c] == {ec}, seen[c]
        assert ids[d] == {ed, ec}, seen[d]  # its own, and C's in the same overlay
        assert ids[e] == {ee, ed, ec}, seen[e]  # E routes to O1 (connected): O1's endpoints come to it
        assert ids[f] == {ef}, seen[f]
        assert not ids[a] & (ids[b] | {ec, ed, ee}) and not ids[b] & {ea, ec, ed, ee, ef}
        # every handler call was a copy addressed to that node
        for n in names:
            assert all(s.startswith(f"vnet.node.{n}.evt.endpoint.") for s, _ in seen[n]), seen[n]
        # the label update of A's endpoint went to A alone
        upd = [n for n in names if any(".updated." in s for s, _ in seen[n])]
        assert upd == [a], upd
        # the domain subject still carries every create (DNS, metrics, the policy service, watchers)
        await _until(lambda: {ea, eb, ec, ed, ee, ef} <= set(broadcast), "every create on vnet.evt.endpoint")

        # Membership: D leaves (a graceful stop's deregistration). Its peers are the nodes sharing
        # an overlay with it: E (O2, connected to O1); C no longer holds anything in O1.
        wd = next(w for w in fleet.workers() if w.node == d)
        await wd._deregister()
        left = f"vnet.node.{e}.evt.node.left.{d}"
        await _until(lambda: left in node_seen[e], "D's departure at E")
        await nc.flush()
        assert sorted({s.split(".")[2] for s in copies if f".node.left.{d}" in s}) == [e], copies
        assert all(s.startswith(f"vnet.node.{n}.evt.node.") for n in names for s in node_seen[n]), node_seen
        assert not any(f".left.{d}" in s for n in (a, b, c, f) for s in node_seen[n]), node_seen
    finally:
        await sub.unsubscribe()
        await sub2.unsubscribe()
        await nc.close()
        await m.close()
        await fleet.stop()
        await r.flushdb()
        await r.aclose()
