"""Reachability diffs (dry runs) and the exposure audit against the real services (valkey,
NATS, IPAM, network, endpoint, policy): a dry run changes nothing; its diff equals the
difference of the ``explain`` matrices before and after the real change; the real call's
reply and event carry the same diff; ``exposure`` lists what explain lets in from outside."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest

from tests.conftest import services
from vnet import VNetManager
from vnet.adapters import nats as nats_adapter
from vnet.contracts.endpoint import PortMapping
from vnet.core.policy import AllowRule, PortSpec, Selector
from vnet.core.reach import ReachDiff
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

NODE = "rn1"
EXTERNAL = "192.0.2.1"  # the diff's own "outside" address when no network or rule CIDR holds it
PROBES: list[tuple[str, int | None]] = [("tcp", 5432), ("tcp", 80), ("udp", 53), ("icmp", None)]


@pytest.fixture
async def m(config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]]) -> AsyncIterator[VNetManager]:
    async with services(config, start_service, node=NODE) as mgr:
        yield mgr


class Events:
    """Every event published while the test runs (core NATS sees JetStream publishes too)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []

    async def cb(self, msg: Any) -> None:
        self.got.append((msg.subject, msgspec.json.decode(msg.data)))

    async def wait(self, prefix: str, deadline_s: float = 30.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while loop.time() < end:
            for i, (subj, body) in enumerate(self.got):
                if subj.startswith(prefix):
                    del self.got[i]
                    return body
            await asyncio.sleep(0.05)
        raise AssertionError(f"no event {prefix}* within {deadline_s}s; got {[s for s, _ in self.got]}")


Matrix = dict[tuple[str, str, str, int | None], bool]


async def matrix(m: VNetManager, parties: list[str]) -> Matrix:
    """``explain`` over every party pair and probe (external -> external is not governed)."""
    keys = [(s, d, p, port) for s, d in itertools.permutations(parties, 2) if EXTERNAL not in (s, d) or s != d
            for p, port in PROBES if not (s == EXTERNAL and d == EXTERNAL)]
    sem = asyncio.Semaphore(16)

    async def one(k: tuple[str, str, str, int | None]) -> bool:
        async with sem:
            return (await m.explain(k[0], k[1], protocol=k[2], port=k[3])).allowed  # type: ignore[arg-type]

    got = await asyncio.gather(*(one(k) for k in keys))
    return dict(zip(keys, got, strict=True))


def expected_groups(before: Matrix, after: Matrix, net_of: dict[str, str]) -> Counter[tuple[bool, str, str, str]]:
    """The groups the diff must show, from the matrices: per pair, every probe changed the
    same way -> ``any``; only tcp/5432 -> ``tcp/5432`` (the only port a rule here names)."""
    per_pair: dict[tuple[str, str], dict[tuple[str, int | None], bool]] = {}
    for k, v in after.items():
        if before[k] != v:
            per_pair.setdefault((k[0], k[1]), {})[(k[2], k[3])] = v
    out: Counter[tuple[bool, str, str, str]] = Counter()
    for (s, d), changed in per_pair.items():
        dirs = set(changed.values())
        assert len(dirs) == 1, (s, d, changed)
        if len(changed) == len(PROBES):
            label = "any"
        else:
            assert set(changed) == {("tcp", 5432)}, (s, d, changed)
            label = "tcp/5432"
        out[(dirs.pop(), net_of.get(s, "external"), net_of.get(d, "external"), label)] += 1
    return out


def groups(d: ReachDiff) -> Counter[tuple[bool, str, str, str]]:
    out: Counter[tuple[bool, str, str, str]] = Counter()
    for opened, gs in ((True, d.opened), (False, d.closed)):
        for g in gs:
            out[(opened, g.src, g.dst, g.ports)] += g.paths
    return out


async def test_dry_runs_equal_explain_matrix_differences(m: VNetManager) -> None:
    nc = await nats_adapter.connect(m.config, "test-reach-events")
    ev = Events()
    await nc.subscribe("vnet.evt.>", cb=ev.cb)
    try:
        await _scenario(m, ev)
    finally:
        await nc.drain()


async def _scenario(m: VNetManager, ev: Events) -> None:
    a = await m.create_network("ra", "10.203.1.0/24", isolation="peer_only")
    b = await m.create_network("rb", "10.203.2.0/24", isolation="peer_only")
    c = await m.create_network("rc", "10.203.3.0/24", isolation="mesh_only")
    d = await m.create_network("rd", "10.203.4.0/24", isolation="mesh_only")
    eps = [await m.create_endpoint("w1", a.id, labels={"role": "web"}, node=NODE),
           await m.create_endpoint("w2", a.id, labels={"role": "web"}, node=NODE),
           await m.create_endpoint("d1", b.id, labels={"role": "db"}, node=NODE),
           await m.create_endpoint("d2", b.id, labels={"role": "db"}, node=NODE),
           await m.create_endpoint("c1", c.id, node=NODE),
           await m.create_endpoint("x1", d.id, node=NODE)]
    net_of = {e.id: e.network_id for e in eps}
    parties = [e.id for e in eps] + [EXTERNAL]
    web_db = AllowRule(id="web-db", from_=[Selector(labels={"role": "web"})], to=[Selector(labels={"role": "db"})],
                       ports=[PortSpec(protocol="tcp", port=5432)])

    async def step(dry: Callable[[], Awaitable[Any]], real: Callable[[], Awaitable[Any]], event: str,
                   want_opens: int, want_closes: int) -> None:
        before = await matrix(m, parties)
        rep = await dry()
        assert rep.dry_run is True and rep.reach is not None
        assert await matrix(m, parties) == before  # a dry run changes nothing
        got = await real()
        after = await matrix(m, parties)
        assert got.dry_run is False
        assert groups(rep.reach) == expected_groups(before, after, net_of)
        assert (rep.reach.opens, rep.reach.closes) == (want_opens, want_closes)
        assert got.reach == rep.reach  # the real call computed the same diff
        body = await ev.wait(event)
        assert body["reach"] == msgspec.to_builtins(rep.reach)  # and its event carries it

    # connect two peer_only networks: a path, but the modes keep them apart; the rule opens 4
    await step(lambda: m.connect_networks("ra", "rb", dry_run=True), lambda: m.connect_networks("ra", "rb"),
               f"vnet.evt.network.connected.{a.id}", 0, 0)
    await step(lambda: m.put_rule(web_db, dry_run=True), lambda: m.put_rule(web_db),
               "vnet.evt.policy.rules.web-db", 4, 0)
    assert await m.get_rule("web-db") is not None
    # rb to none: its endpoints and the outside, both ways, every protocol
    await step(lambda: m.update_network("rb", isolation="none", dry_run=True),
               lambda: m.update_network("rb", isolation="none"), f"vnet.evt.network.updated.{b.id}", 4, 0)
    await step(lambda: m.create_mesh("g", ["rc", "rd"], dry_run=True), lambda: m.create_mesh("g", ["rc", "rd"]),
               "vnet.evt.network.mesh_created.g", 2, 0)
    await step(lambda: m.remove_from_mesh("g", "rd", dry_run=True), lambda: m.remove_from_mesh("g", "rd"),
               "vnet.evt.network.mesh_member_removed.g", 0, 2)
    await step(lambda: m.add_to_mesh("g", "rd", dry_run=True), lambda: m.add_to_mesh("g", "rd"),
               "vnet.evt.network.mesh_member_added.g", 2, 0)
    await step(lambda: m.delete_mesh("g", dry_run=True), lambda: m.delete_mesh("g"),
               "vnet.evt.network.mesh_deleted.g", 0, 2)
    await step(lambda: m.delete_rule("web-db", dry_run=True), lambda: m.delete_rule("web-db"),
               "vnet.evt.policy.rules.web-db", 0, 4)
    await step(lambda: m.update_network("rb", isolation="full", dry_run=True),
               lambda: m.update_network("rb", isolation="full"), f"vnet.evt.network.updated.{b.id}", 0, 6)
    await step(lambda: m.disconnect_networks("ra", "rb", dry_run=True), lambda: m.disconnect_networks("ra", "rb"),
               f"vnet.evt.network.disconnected.{a.id}", 0, 0)

    # a dry run of something that changes nothing, and of a missing rule
    same = await m.update_network("rb", isolation="full", dry_run=True)
    assert same.reach == ReachDiff() and same.isolation_mode == "full"
    gone = await m.delete_rule("web-db", dry_run=True)
    assert (gone.deleted, gone.dry_run, gone.reach) == (False, True, ReachDiff())
    assert (await m.connect_networks("ra", "rb", dry_run=True)).network_a.connected == [b.id]
    assert (await m.get_network("ra")).connected == []


async def test_exposure_matches_explain_from_outside(m: VNetManager) -> None:
    pub = await m.create_network("xp", "10.204.1.0/24", isolation="peer_only")
    none = await m.create_network("xn", "10.204.2.0/24", isolation="none")
    full = await m.create_network("xf", "10.204.3.0/24", isolation="full")
    web = await m.create_endpoint("xw", pub.id, node=NODE,
                                  ports=[PortMapping(protocol="tcp", host_port=18080, container_port=80)])
    quiet = await m.create_endpoint("xq", pub.id, node=NODE)
    open1 = await m.create_endpoint("xo1", none.id, node=NODE)
    open2 = await m.create_endpoint("xo2", none.id, node=NODE)
    ops = await m.create_endpoint("xs", full.id, node=NODE)
    await m.put_rule(AllowRule(id="ssh-in", from_=[Selector(cidr="198.51.100.0/24")], to=[Selector(network=full.id)],
                               ports=[PortSpec(protocol="tcp", port=22)]))
    rep = await m.exposure()
    got = [(x.kind, x.ident, x.endpoints) for x in rep.exposures]
    assert got == [("network", none.id, sorted([open1.id, open2.id])), ("published", web.id, [web.id]),
                   ("rule", "ssh-in", [ops.id])]
    assert rep.endpoints == 4
    # explain from outside agrees, endpoint by endpoint
    assert (await m.explain("203.0.113.7", web.id, protocol="tcp", port=80)).allowed
    assert not (await m.explain("203.0.113.7", web.id, protocol="tcp", port=81)).allowed
    assert not (await m.explain("203.0.113.7", quiet.id, protocol="tcp", port=80)).allowed
    for e in (open1, open2):
        assert (await m.explain("203.0.113.7", e.id, protocol="udp", port=9)).allowed
    assert (await m.explain("198.51.100.9", ops.id, protocol="tcp", port=22)).allowed
    assert not (await m.explain("203.0.113.7", ops.id, protocol="tcp", port=22)).allowed
