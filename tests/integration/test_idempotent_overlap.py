"""A repeat of a mutation with the same request_id that overlaps the first gets the first's
answer, and the change happens once — for every mutation that records its reply
(network update / delete / connect / disconnect / mesh ops, rule put / delete, endpoint
update / delete), against the real services, NATS and valkey.

Before: these recorded the request_id only after the change, so copies sent together (a
client that timed out and retried while the first still ran) each ran the change and
answered what they saw: 404 (already deleted), 409 (mesh name taken), ``changed: false``, a
second revision. Now the request id is claimed before the change
(:mod:`vnet.runtime.idempotency`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import services
from vnet import VNetManager
from vnet.adapters import idempotency
from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.network import NetworkReply, NetworkUpdate
from vnet.core import errors as E
from vnet.core.policy import AllowRule, Selector
from vnet.runtime import idempotency as idem_runtime
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

NODE = "io1"
COPIES = 4  # the same request sent this many times at once


@pytest.fixture
async def m(config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]]) -> AsyncIterator[VNetManager]:
    async with services(config, start_service, node=NODE) as mgr:
        yield mgr


class Events:
    """Counts of the events published while the test runs, by subject."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    async def cb(self, msg: Any) -> None:
        self.seen[msg.subject] += 1

    async def settle(self) -> None:
        await asyncio.sleep(0.5)  # an event the copies would publish twice arrives by now

    def count(self, subject: str) -> int:
        return self.seen[subject]


@pytest.fixture
async def events(m: VNetManager) -> AsyncIterator[Events]:
    nc = await nats_adapter.connect(m.config, "test-idem-events")
    ev = Events()
    await nc.subscribe("vnet.evt.>", cb=ev.cb)
    try:
        yield ev
    finally:
        await nc.drain()


async def together(call: Callable[[], Awaitable[Any]]) -> Any:
    """Send ``COPIES`` copies at once; every answer must be the same reply."""
    got = await asyncio.gather(*(call() for _ in range(COPIES)), return_exceptions=True)
    errors = [g for g in got if isinstance(g, BaseException)]
    assert errors == [], errors
    assert all(g == got[0] for g in got), got
    return got[0]


async def test_network_mutations_overlapping_repeats(m: VNetManager, events: Events) -> None:
    a = await m.create_network("ia", "10.207.1.0/24", isolation="mesh_only")
    b = await m.create_network("ib", "10.207.2.0/24", isolation="mesh_only")
    c = await m.create_network("ic", "10.207.3.0/24", isolation="mesh_only")

    upd = await together(lambda: m.update_network(a.id, set_labels={"tier": "web"}, isolation="peer_only",
                                                  request_id="io-upd"))
    assert upd.labels == {"tier": "web"} and upd.isolation_mode.value == "peer_only"
    await m.update_network(a.id, isolation="mesh_only")  # back, for the topology below

    con = await together(lambda: m.connect_networks(a.id, b.id, request_id="io-con"))
    assert con.changed
    dis = await together(lambda: m.disconnect_networks(a.id, b.id, request_id="io-dis"))
    assert dis.changed

    made = await together(lambda: m.create_mesh("io-mesh", [a.id, b.id], request_id="io-mc"))
    assert made.members == sorted([a.id, b.id])
    added = await together(lambda: m.add_to_mesh("io-mesh", c.id, request_id="io-ma"))
    assert added.changed and c.id in added.mesh.members
    removed = await together(lambda: m.remove_from_mesh("io-mesh", c.id, request_id="io-mr"))
    assert removed.changed and c.id not in removed.mesh.members
    gone = await together(lambda: m.delete_mesh("io-mesh", request_id="io-md"))
    assert gone.name == "io-mesh"

    deleted = await together(lambda: m.delete_network(c.id, request_id="io-del"))
    assert deleted.network.id == c.id
    assert c.id not in [n.id for n in await m.all_networks()]

    await events.settle()
    once = {
        f"vnet.evt.network.connected.{a.id}": 1, f"vnet.evt.network.disconnected.{a.id}": 1,
        "vnet.evt.network.mesh_created.io-mesh": 1, "vnet.evt.network.mesh_member_added.io-mesh": 1,
        "vnet.evt.network.mesh_member_removed.io-mesh": 1, "vnet.evt.network.mesh_deleted.io-mesh": 1,
        f"vnet.evt.network.deleted.{c.id}": 1,
        # the overlapping update once, then the plain one that set the mode back
        f"vnet.evt.network.updated.{a.id}": 2,
    }
    assert {s: events.count(s) for s in once} == once


async def test_rule_mutations_overlapping_repeats(m: VNetManager, events: Events) -> None:
    net = await m.create_network("ir", "10.207.4.0/24", isolation="full")
    await m.create_endpoint("r1", net.id, labels={"app": "db"}, node=NODE)
    rule = AllowRule(id="io-rule", from_=[Selector(cidr="192.0.2.0/24")], to=[Selector(labels={"app": "db"})])
    put = await together(lambda: m.put_rule(rule, request_id="io-put"))
    # the diff of the one real put (a second run would have found the rule there: nothing opens)
    assert put.reach is not None and put.reach.opens > 0
    dele = await together(lambda: m.delete_rule("io-rule", request_id="io-rdel"))
    assert dele.deleted and dele.reach is not None and dele.reach.closes > 0
    await events.settle()
    assert events.count("vnet.evt.policy.rules.io-rule") == 2  # one put, one delete


async def test_endpoint_mutations_overlapping_repeats(m: VNetManager, events: Events) -> None:
    net = await m.create_network("ie", "10.207.5.0/24")
    ep = await m.create_endpoint("e1", net.id, node=NODE)
    upd = await together(lambda: m.update_endpoint(ep.id, set_labels={"role": "web"}, request_id="io-eu"))
    assert upd.changes == ["labels"] and upd.endpoint.revision == ep.revision + 1
    assert (await m.get_endpoint(ep.id)).revision == ep.revision + 1  # updated once
    dele = await together(lambda: m.delete_endpoint(ep.id, request_id="io-ed"))
    assert dele.endpoint.id == ep.id
    await events.settle()
    assert events.count(f"vnet.evt.endpoint.updated.{ep.id}") == 1
    assert events.count(f"vnet.evt.endpoint.deleted.{ep.id}") == 1


async def test_a_dead_first_attempt_blocks_its_request_id_only_until_its_claim_expires(m: VNetManager) -> None:
    """Crash safety: a claim whose request died (its process was killed: nobody extends the
    marker) expires, and a retry then runs the change."""
    net = await m.create_network("ic2", "10.207.6.0/24")
    r = aioredis.Redis.from_url(m.config.redis_url)
    try:
        name = idempotency.PREFIXES["network"] + "update:io-dead"
        await r.set(name, idempotency.PENDING + b"dead-process", px=2000)
        got = await m.update_network(net.id, set_labels={"after": "crash"}, request_id="io-dead")
        assert got.labels == {"after": "crash"}
        stored = await r.get(name)
        assert stored is not None and msgspec.json.decode(stored, type=NetworkReply) == got

        # A first attempt that still runs past the repeat's deadline: 503 naming the way out.
        await r.set(idempotency.PREFIXES["network"] + "update:io-slow", idempotency.PENDING + b"running", px=60000)
        nc = await nats_adapter.connect(m.config, "test-idem-raw")
        try:
            with pytest.raises(E.VNetError) as ei:
                await nats_adapter.request(nc, subjects.NETWORK_UPDATE,
                                           NetworkUpdate(network=net.id, set_labels={"x": "y"}, request_id="io-slow"),
                                           NetworkReply, timeout=2.0)
        finally:
            await nc.drain()
        assert ei.value.code == E.UNAVAILABLE.code and ei.value.details.get("pending"), ei.value
        assert "retry with the same request_id" in ei.value.message
        assert "x" not in (await m.get_network(net.id)).labels  # the repeat changed nothing
    finally:
        await r.aclose()


async def test_a_long_first_attempt_keeps_its_claim(m: VNetManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """The running request extends its claim: a change that takes longer than the claim's TTL
    (a delete waiting for a node that never confirms) is still not run a second time by a
    repeat that overlaps it. Without the extension the marker would expire after 1 s here and
    the second copy would delete again (404)."""
    monkeypatch.setattr(idem_runtime, "PENDING_TTL_S", 1.0)
    monkeypatch.setattr(idem_runtime, "KEEP_EVERY_S", 0.25)
    net = await m.create_network("il", "10.207.7.0/24")
    ep = await m.create_endpoint("l1", net.id, node=NODE)
    # The stand-in node never reports the teardown: each copy would wait 3 s for it.
    dele = await together(lambda: m.delete_endpoint(ep.id, wait=True, wait_timeout=3.0, request_id="io-long"))
    assert dele.endpoint.id == ep.id and not dele.node_confirmed
    assert any("did not confirm" in w for w in dele.warnings)


async def test_the_client_resends_a_repeat_that_found_the_first_still_running(m: VNetManager) -> None:
    """A 503 ``pending`` is resent by VNetManager (as a timeout is): here the first attempt's
    claim belongs to a dead process; the repeat waits out its 2 s calls, gets 503 pending,
    resends, and runs the change once the claim expired."""
    net = await m.create_network("ir2", "10.207.8.0/24")
    r = aioredis.Redis.from_url(m.config.redis_url)
    try:
        await r.set(idempotency.PREFIXES["network"] + "update:io-resend", idempotency.PENDING + b"dead", px=5000)
        before = m.retries
        got = await m.call(subjects.NETWORK_UPDATE,
                           NetworkUpdate(network=net.id, set_labels={"resent": "yes"}, request_id="io-resend"),
                           NetworkReply, timeout=2.0)
        assert got.labels == {"resent": "yes"}
        assert m.retries > before  # at least one 503 pending was resent
    finally:
        await r.aclose()
