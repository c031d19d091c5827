"""Dry runs of parent/child changes against the real services (issue 16): creating a child
network carved from its parent and deleting a network (a child, or a parent whose children
become top-level) answer the reachability diff and change nothing; the diff equals the
difference of the ``explain`` matrices before and after the real change; the real call's
reply and event carry the same diff."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from tests.integration.test_reach import EXTERNAL, NODE, PROBES, Events, Matrix, m  # noqa: F401  (the fixture)
from vnet import VNetManager
from vnet.adapters import nats as nats_adapter
from vnet.core import errors as E
from vnet.core.reach import ReachDiff


async def matrix(mgr: VNetManager, parties: list[str], gone: set[str]) -> Matrix:
    """``explain`` over every party pair and probe; a deleted endpoint reaches nothing."""
    keys = [(s, d, p, port) for s, d in itertools.permutations(parties, 2) for p, port in PROBES]
    sem = asyncio.Semaphore(16)

    async def one(k: tuple[str, str, str, int | None]) -> bool:
        if k[0] in gone or k[1] in gone:
            return False
        async with sem:
            return (await mgr.explain(k[0], k[1], protocol=k[2], port=k[3])).allowed  # type: ignore[arg-type]

    return dict(zip(keys, await asyncio.gather(*(one(k) for k in keys)), strict=True))


def changed_pairs(before: Matrix, after: Matrix) -> dict[tuple[str, str], bool]:
    """Pairs whose every probe changed the same way (the only kind these changes make)."""
    per: dict[tuple[str, str], set[tuple[Any, bool]]] = {}
    for k, v in after.items():
        if before[k] != v:
            per.setdefault((k[0], k[1]), set()).add(((k[2], k[3]), v))
    out: dict[tuple[str, str], bool] = {}
    for pair, ch in per.items():
        assert len(ch) == len(PROBES) and len({v for _, v in ch}) == 1, (pair, ch)
        out[pair] = next(iter(ch))[1]
    return out


def diff_pairs(d: ReachDiff) -> int:
    return sum(g.paths for g in d.opened) + sum(g.paths for g in d.closed)


async def test_parent_child_dry_runs_equal_explain_differences(m: VNetManager) -> None:  # noqa: F811
    nc = await nats_adapter.connect(m.config, "test-reach-family-events")
    ev = Events()
    await nc.subscribe("vnet.evt.>", cb=ev.cb)
    try:
        await _scenario(m, ev)
    finally:
        await nc.drain()


async def _scenario(mgr: VNetManager, ev: Events) -> None:
    parent = await mgr.create_network("fp", "10.204.0.0/16", isolation="mesh_only")
    other = await mgr.create_network("fo", "10.205.0.0/24", isolation="none")
    p1 = await mgr.create_endpoint("fp1", parent.id, node=NODE)
    o1 = await mgr.create_endpoint("fo1", other.id, node=NODE)

    # create a child carved from the parent: a dry run names the subnet and changes nothing
    dry = await mgr.create_child_network("fp", "fc", isolation="mesh_only", prefix_len=24, dry_run=True)
    assert dry.dry_run is True and dry.reach is not None and dry.parent == parent.id
    assert dry.cidr.startswith("10.204.") and dry.cidr.endswith("/24")
    assert [n.name for n in await mgr.all_networks()] == ["fo", "fp"]  # nothing created
    assert (await mgr.get_network("fp")).children == []
    child = await mgr.create_child_network("fp", "fc", isolation="mesh_only", prefix_len=24)
    assert child.cidr == dry.cidr  # the subnet the dry run said
    assert (dry.reach.opens, dry.reach.closes) == (0, 0)  # no endpoint in it yet: nothing opens
    body = await ev.wait(f"vnet.evt.network.created.{child.id}")
    assert body["reach"] == msgspec.to_builtins(dry.reach)  # the real create's event carries the same diff

    c1 = await mgr.create_endpoint("fc1", child.id, node=NODE)
    parties = [p1.id, o1.id, c1.id, EXTERNAL]

    async def step(dry: Callable[[], Awaitable[Any]], real: Callable[[], Awaitable[Any]], event: str,
                   gone: set[str], closes: int) -> None:
        before = await matrix(mgr, parties, set())
        rep = await dry()
        assert rep.dry_run is True and rep.reach is not None
        assert await matrix(mgr, parties, set()) == before  # a dry run changes nothing
        got = await real()
        after = await matrix(mgr, parties, gone)
        expect = changed_pairs(before, after)
        assert rep.reach.opens == 0 and all(v is False for v in expect.values())
        # one closed path per changed pair (every protocol changed the same way: "any")
        assert diff_pairs(rep.reach) == rep.reach.closes == len(expect) == closes, (rep.reach, expect)
        assert {s for g in rep.reach.closed for s in g.sample} <= {f"{s} -> {d}" for s, d in expect}
        assert got.dry_run is False and got.reach == rep.reach  # the real call computed the same diff
        body = await ev.wait(event)
        assert body["reach"] == msgspec.to_builtins(rep.reach)  # and its event carries it

    # deleting the child (with its endpoint): fc1 loses the parent (mesh_only: both ways) and
    # nothing else (fo is none-mode but unrelated; fc is mesh_only: no external)
    refused = None
    try:
        await mgr.delete_network("fc", dry_run=True)
    except E.VNetError as err:
        refused = err.code
    assert refused == E.NETWORK_IN_USE.code  # a dry run refuses what the real call refuses
    await step(lambda: mgr.delete_network("fc", force=True, dry_run=True), lambda: mgr.delete_network("fc", force=True),
               f"vnet.evt.network.deleted.{child.id}", {c1.id}, 2)

    # a parent whose child has an endpoint: deleting the parent detaches the child, closing
    # fp1 <-> fc2 (fp1 goes with its network)
    child2 = await mgr.create_child_network("fp", "fc2", isolation="mesh_only", prefix_len=24)
    c2 = await mgr.create_endpoint("fc2", child2.id, node=NODE)
    parties[2] = c2.id
    d = await mgr.delete_network("fp", force=True, dry_run=True)
    assert d.children_detached == [child2.id] and d.endpoints_deleted == [p1.id]
    assert (await mgr.get_network("fc2")).parent == parent.id  # still a child: nothing changed
    await step(lambda: mgr.delete_network("fp", force=True, dry_run=True), lambda: mgr.delete_network("fp", force=True),
               f"vnet.evt.network.deleted.{parent.id}", {p1.id}, 2)
    assert (await mgr.get_network("fc2")).parent is None
