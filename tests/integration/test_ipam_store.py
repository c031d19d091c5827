"""The IPAM allocator through the real Lua script of the store (real valkey), checked against
the pure model by a hypothesis stateful test per pool shape, and the edges it reaches only by
luck, pinned down."""

# ruff: noqa: F811 (a test's argument rds is ipam_env's fixture, imported for pytest)

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.integration.ipam_env import rds  # noqa: F401  (the fixture)
from vnet.adapters import ipam_store
from vnet.adapters.ipam_store import IpamStore
from vnet.core import errors as E
from vnet.core import ipam as core

T = TypeVar("T")

# --- 1. the allocator through the real Lua script, checked against the pure model -----------

# (cidr, gateway, reserved, excluded, block): blocks of 8 offsets make small pools span several
# summary bits, so the summary search and its upkeep are exercised too.
PoolSpec = tuple[str, str | None, tuple[str, ...], tuple[str, ...], int]
POOL_SPECS: list[PoolSpec] = [
    # nothing blocked at the end: the bitmap string starts shorter than the pool
    ("fd00::/123", "fd00::1", (), (), 1024),
    ("10.0.0.0/26", "10.0.0.1", ("10.0.0.40",), ("10.0.0.16/28",), 8),
    ("fd00::/122", None, (), (), 16),
    ("10.0.0.0/27", "10.0.0.1", ("10.0.0.30",), ("10.0.0.8/29",), 8),  # block 1 is full from the start
    ("10.0.0.0/28", "10.0.0.1", ("10.0.0.5", "10.0.0.6"), (), 8),
    ("fd00::/124", "fd00::1", ("fd00::f",), (), 8),
    ("10.0.0.0/29", "10.0.0.6", ("10.0.0.2",), (), 1024),
    ("10.0.0.0/30", None, (), (), 1024),
]
OWNERS = [f"e{i}" for i in range(12)]
_pool_ids = itertools.count()


class AllocatorMachine(RuleBasedStateMachine):
    """Two stores (two replicas, separate layout caches) on one Redis vs. one model."""

    loop: asyncio.AbstractEventLoop
    redis_url: str
    prefix: str

    def __init__(self) -> None:
        super().__init__()
        self.r = aioredis.Redis.from_url(self.redis_url)
        self.stores = [IpamStore(self.r), IpamStore(self.r)]
        self.model: core.PoolModel | None = None
        self.nid = f"{self.prefix}-hyp{next(_pool_ids)}"
        self.fresh = itertools.count()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @property
    def m(self) -> core.PoolModel:
        assert self.model is not None
        return self.model

    def both(self, model_call: Callable[[], int | None], store_call: Callable[[], Coroutine[Any, Any, Any]]
             ) -> tuple[int | None, Any]:
        """Run the same request on the model and the store; their outcomes must agree."""
        expect: int | None = None
        expect_err: E.VNetError | None = None
        try:
            expect = model_call()
        except E.VNetError as err:
            expect_err = err
        try:
            got = self.run(store_call())
        except E.VNetError as err:
            assert expect_err is not None, f"store refused ({err}) what the model allowed ({expect})"
            assert err.code == expect_err.code, (err, expect_err)
            assert err.message == expect_err.message or err.code == "address_in_use", (err, expect_err)
            return None, err
        assert expect_err is None, f"store allowed ({got}) what the model refused ({expect_err})"
        return expect, got

    spec: PoolSpec

    @initialize()
    def make_pool(self) -> None:
        cidr, gw, reserved, excluded, block = self.spec
        layout = core.build_layout(self.nid, cidr, gw, reserved, excluded, block=block)
        created, meta = self.run(self.stores[0].create_pool(layout))
        assert created and meta.used == 0
        self.model = core.PoolModel(layout)

    @rule(owner=st.sampled_from(OWNERS), replica=st.integers(0, 1))
    def allocate(self, owner: str, replica: int) -> None:
        lay = self.m.layout
        held = owner in self.m.owners
        expect, got = self.both(lambda: self.m.allocate(owner),
                                lambda: self.stores[replica].allocate(self.nid, lay.family, owner))
        if got is not None and not isinstance(got, E.VNetError):
            assert got.offset == expect, f"serial rule: expected {lay.address_at(expect or 0)}, got {got.address}"
            self.check_first_use(got, held)

    def check_first_use(self, got: Any, held: bool) -> None:
        """``first_use`` says no one held the address since the pool was made: never for a
        repeat, and for a new allocation exactly when the model has never handed it out."""
        assert got.existing == held
        assert got.first_use == (not held and self.m.first_use), (got, self.m.high)

    @rule(owner=st.sampled_from(OWNERS), offset=st.integers(0, 63), replica=st.integers(0, 1))
    def allocate_static(self, owner: str, offset: int, replica: int) -> None:
        lay = self.m.layout
        addr = str(lay.address_at(offset % lay.window))
        held = owner in self.m.owners
        expect, got = self.both(lambda: self.m.allocate_static(owner, addr),
                                lambda: self.stores[replica].allocate(self.nid, lay.family, owner, addr))
        if isinstance(got, E.VNetError):
            if got.code == "address_in_use":
                assert got.details["holder"] == self.m.holders[offset % lay.window]
                assert got.details["holder"] in got.message
        elif got is not None:
            assert got.offset == expect and got.address == addr
            self.check_first_use(got, held)

    @rule(n=st.integers(2, 8), replica=st.integers(0, 1))
    def allocate_many(self, n: int, replica: int) -> None:
        for _ in range(n):
            self.allocate(f"m{next(self.fresh)}", replica)

    @rule(owner=st.sampled_from(OWNERS), ahead=st.integers(1, 8), replica=st.integers(0, 1))
    def allocate_static_ahead(self, owner: str, ahead: int, replica: int) -> None:
        """A static address just ahead of the cursor: the next dynamic search must skip it."""
        self.allocate_static(owner, (self.m.cursor + ahead) % self.m.layout.window, replica)

    @rule(owner=st.sampled_from(OWNERS), replica=st.integers(0, 1))
    def release(self, owner: str, replica: int) -> None:
        expect = self.m.release(owner)
        got = self.run(self.stores[replica].release(self.nid, self.m.layout.family, owner))
        if expect is None:
            assert got is None
        else:
            assert got is not None and got.address == str(self.m.layout.address_at(expect))

    @precondition(lambda self: self.model is not None and bool(self.model.owners))
    @rule(data=st.data(), replica=st.integers(0, 1))
    def release_held(self, data: st.DataObject, replica: int) -> None:
        owner = data.draw(st.sampled_from(sorted(self.m.owners)))
        self.release(owner, replica)

    @rule()
    def exhaust(self) -> None:
        lay = self.m.layout
        while True:
            owner = f"x{next(self.fresh)}"
            _, got = self.both(lambda o=owner: self.m.allocate(o),
                               lambda o=owner: self.stores[0].allocate(self.nid, lay.family, o))
            if isinstance(got, E.VNetError):
                assert got.code == "pool_exhausted" and got.status == 503
                assert self.nid in got.message and lay.cidr in got.message
                assert got.details["capacity"] == lay.capacity
                break
        assert self.m.free == 0

    @rule()
    def recreate_is_idempotent(self) -> None:
        created, meta = self.run(self.stores[1].create_pool(self.m.layout))
        assert not created and meta.used == self.m.used

    @invariant()
    def store_matches_model(self) -> None:
        if self.model is None:
            return
        lay = self.m.layout
        snap = self.run(self.stores[0].snapshot(self.nid, lay.family))
        assert snap is not None
        owners = {o: v[0] for o, v in snap.owners.items()}
        assert owners == self.m.owners
        assert snap.holders == self.m.holders
        assert len(set(owners.values())) == len(owners), "two owners for one address"
        assert not any(lay.is_blocked(o) for o in owners.values()), "a blocked address was handed out"
        # free + used = capacity, counted on the bitmap itself
        clear = sum(1 for o in range(lay.window) if not core.get_bit(snap.bits, o))
        assert clear == lay.capacity - snap.meta.used
        assert snap.meta.used + snap.meta.free == lay.capacity
        assert snap.meta.cursor == self.m.cursor
        assert core.check_pool(lay, snap.bits, snap.summary, owners, snap.holders, snap.meta.used) == []

    def teardown(self) -> None:
        if self.model is not None:
            self.run(self.stores[0].delete_pool(self.nid, self.m.layout.family, force=True))
        self.run(self.r.aclose())


@pytest.mark.parametrize("spec", POOL_SPECS, ids=[f"{s[0]}-b{s[4]}" for s in POOL_SPECS])
def test_allocator_state_machine(redis_server: Any, run_prefix: str, spec: PoolSpec) -> None:
    """One machine per pool shape (hypothesis spreads examples unevenly over a sampled shape)."""
    loop = asyncio.new_event_loop()
    machine = type("Machine", (AllocatorMachine,), {
        "loop": loop, "redis_url": redis_server.url, "prefix": run_prefix, "spec": spec})
    try:
        run_state_machine_as_test(machine, settings=settings(
            max_examples=40, stateful_step_count=40, deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow]))
    finally:
        loop.close()


async def _problems(store: IpamStore, nid: str, family: int) -> list[str]:
    snap = await store.snapshot(nid, family)
    assert snap is not None
    found = core.check_pool(snap.meta.layout, snap.bits, snap.summary, {o: v[0] for o, v in snap.owners.items()},
                            snap.holders, snap.meta.used)
    return [p.kind for p in found]


async def test_store_edges(rds: aioredis.Redis, run_prefix: str) -> None:
    """Edges the state machine reaches only by luck, pinned down."""
    store = IpamStore(rds)
    # The bitmap string ends before the pool does (nothing blocked at the end of an IPv6 pool):
    # a search that runs past the string's end must find the (implicitly clear) bits there.
    nid = f"{run_prefix}-edge6"
    await store.create_pool(core.build_layout(nid, "fd00::/123", "fd00::1"))
    assert (await store.allocate(nid, 6, "s", "fd00::7")).offset == 7
    assert [(await store.allocate(nid, 6, f"d{i}")).offset for i in range(6)] == [2, 3, 4, 5, 6, 8]
    # A summary bit wrongly clear on a full block is repaired by the next search that meets it.
    nid = f"{run_prefix}-edgesum"
    await store.create_pool(core.build_layout(nid, "10.0.0.0/20", excluded=["10.0.0.0/22", "10.0.4.0/22"]))
    assert await _problems(store, nid, 4) == []
    await rds.setbit(ipam_store.pool_key(nid, 4, "sum"), 1, 0)
    assert await _problems(store, nid, 4) == ["summary_wrong"]
    assert (await store.allocate(nid, 4, "a")).address == "10.0.8.0"
    assert await _problems(store, nid, 4) == []
    # A full block gets its summary bit, a release clears it.
    nid = f"{run_prefix}-edgefull"
    await store.create_pool(core.build_layout(nid, "10.0.0.0/21", "10.0.0.1"))
    for i in range(1022):
        await store.allocate(nid, 4, f"o{i}")
    assert await rds.getbit(ipam_store.pool_key(nid, 4, "sum"), 0) == 1
    assert (await store.allocate(nid, 4, "next")).address == "10.0.4.0"
    await store.release(nid, 4, "o5")
    assert await rds.getbit(ipam_store.pool_key(nid, 4, "sum"), 0) == 0
    assert (await store.allocate(nid, 4, "after")).address == "10.0.4.1"  # serial: not the freed .7
    assert await _problems(store, nid, 4) == []
    # Redis forgot the scripts (restart, SCRIPT FLUSH): a batch of concurrent calls still succeeds.
    await rds.script_flush()
    got = await asyncio.gather(*(store.allocate(nid, 4, f"flush{i}") for i in range(20)))
    assert len({a.address for a in got}) == 20
    await rds.script_flush()
    assert (await store.release(nid, 4, "flush0")) is not None
    for n in ("edge6", "edgesum", "edgefull"):
        for fam in (4, 6):
            await store.delete_pool(f"{run_prefix}-{n}", fam, force=True)
