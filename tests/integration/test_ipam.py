"""IPAM against real valkey and NATS: the Lua store driven by a stateful model test,
replicas under concurrent load, GC and check, and the service's errors."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import msgspec
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

from vnet.adapters import ipam_store
from vnet.adapters.ipam_store import IpamStore
from vnet.client import VNetManager
from vnet.contracts import subjects
from vnet.contracts.ipam import GcReply, PoolEvent
from vnet.core import errors as E
from vnet.core import ipam as core
from vnet.runtime.config import VNetConfig

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
        expect, got = self.both(lambda: self.m.allocate(owner),
                                lambda: self.stores[replica].allocate(self.nid, lay.family, owner))
        if got is not None and not isinstance(got, E.VNetError):
            assert got.offset == expect, f"serial rule: expected {lay.address_at(expect or 0)}, got {got.address}"

    @rule(owner=st.sampled_from(OWNERS), offset=st.integers(0, 63), replica=st.integers(0, 1))
    def allocate_static(self, owner: str, offset: int, replica: int) -> None:
        lay = self.m.layout
        addr = str(lay.address_at(offset % lay.window))
        expect, got = self.both(lambda: self.m.allocate_static(owner, addr),
                                lambda: self.stores[replica].allocate(self.nid, lay.family, owner, addr))
        if isinstance(got, E.VNetError):
            if got.code == "address_in_use":
                assert got.details["holder"] == self.m.holders[offset % lay.window]
                assert got.details["holder"] in got.message
        else:
            assert got.offset == expect and got.address == addr

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


@pytest.fixture
async def rds(config: VNetConfig) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(config.redis_url)
    yield r
    await r.aclose()


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


# --- helpers for the service tests ---------------------------------------------------------


async def _register_network(r: aioredis.Redis, *nids: str) -> None:
    await r.sadd(ipam_store.NETWORKS_INDEX, *nids)


# --- 2. replicas under concurrent load ---------------------------------------------------------

async def test_two_replicas_four_clients_no_duplicates(config: VNetConfig, start_service: Any, run_prefix: str,
                                                       rds: aioredis.Redis) -> None:
    # 10,000 requests 64 at a time on two replicas and one valkey: on a busy machine a command
    # or a request can wait in line past the defaults (2 s, 5 s); that is slowness, not an error
    config = msgspec.structs.replace(config, redis_timeout_s=60.0, request_timeout_s=120.0)
    await start_service("ipam", cfg=config)
    await start_service("ipam", cfg=config)
    clients = [VNetManager(config) for _ in range(4)]
    for c in clients:
        await c.__aenter__()
    try:
        big, small = f"{run_prefix}-big", f"{run_prefix}-small"
        await _register_network(rds, big, small)
        info = await clients[0].create_pool(big, "10.64.0.0/18", "10.64.0.1")
        assert info.capacity == 16384 - 3

        total, inflight = 10_000, 64
        sem = asyncio.Semaphore(inflight)

        async def one(i: int) -> str:
            async with sem:
                rep = await clients[i % 4].request_address(big, f"o{i}")
                return rep.address

        addrs = await asyncio.gather(*(one(i) for i in range(total)))
        assert len(set(addrs)) == total, "duplicate addresses handed out"
        net = ipaddress.ip_network("10.64.0.0/18")
        assert all(ipaddress.ip_address(a) in net for a in addrs)
        assert not {"10.64.0.0", "10.64.0.1", "10.64.63.255"} & set(addrs)
        (pool,) = await clients[1].pool(big)
        assert pool.used == total and pool.free == pool.capacity - total

        # both replicas did part of the work
        stats = [s for s in await clients[0].services() if s.name == "ipam"]
        assert len(stats) >= 2 and sum(1 for s in stats if s.requests > 100) >= 2, stats

        # over-asking a /26: exactly its capacity succeeds, the rest get a clear 503
        small_info = await clients[0].create_pool(small, "10.65.0.0/26", "10.65.0.1")
        assert small_info.capacity == 61

        async def try_one(i: int) -> str | E.VNetError:
            async with sem:
                try:
                    return (await clients[i % 4].request_address(small, f"s{i}")).address
                except E.VNetError as err:
                    return err

        results = await asyncio.gather(*(try_one(i) for i in range(100)))
        ok = [r for r in results if isinstance(r, str)]
        errs = [r for r in results if isinstance(r, E.VNetError)]
        assert len(ok) == 61 and len(set(ok)) == 61 and len(errs) == 39
        for err in errs:
            assert isinstance(err, E.Unavailable) and err.code == "pool_exhausted" and err.status == 503
            assert small in err.message and "10.65.0.0/26" in err.message and "61" in err.message
            assert err.details["capacity"] == 61

        # releasing everything returns both pools to empty, and check finds nothing wrong
        async def rel(nid: str, owner: str, i: int) -> list[str]:
            async with sem:
                return await clients[i % 4].release_address(nid, owner)

        released = await asyncio.gather(*(rel(big, f"o{i}", i) for i in range(total)),
                                        *(rel(small, f"s{i}", i) for i in range(100)))
        assert sum(len(r) for r in released) == total + 61
        for nid in (big, small):
            (p,) = await clients[0].pool(nid)
            assert p.used == 0 and p.free == p.capacity
            rep = await clients[0].ipam_check(network_id=nid)
            assert rep.clean and rep.pools_checked == 1 and rep.allocations == 0, rep
        # a released address is not handed out again while others are free: the cursor went on
        nxt = await clients[0].request_address(small, "after")
        assert nxt.address == "10.65.0.2"  # the cursor was at .62; .63 is the broadcast: wrapped to .2
        await clients[0].delete_pool(small, force=True)
        await clients[0].delete_pool(big)
    finally:
        for c in clients:
            await c.close()


# --- 3. GC and check -----------------------------------------------------------------------------

def _advance(rts: list[Any], seconds: float) -> None:
    """Move the GC clock of these ipam replicas forward: ages are measured against
    ``IpamStore.now()``, so the grace period passes without a sleep that a slow machine
    could overrun (or a fast one undercut)."""
    for rt in rts:
        store: IpamStore = rt.state["ipam_store"]
        store.clock_offset_s += seconds


# A grace far longer than any step of these tests can take, however loaded the machine:
# nothing reaches it unless the test advances the clock.
GRACE = 600.0


async def test_gc_releases_orphans_after_grace_only(config: VNetConfig, start_service: Any, run_prefix: str,
                                                    rds: aioredis.Redis) -> None:
    rt = await start_service("ipam")
    nid = f"{run_prefix}-gc"
    live, ghost = f"{run_prefix}-live", f"{run_prefix}-ghost"
    await _register_network(rds, nid)
    await rds.sadd(ipam_store.ENDPOINTS_INDEX, live)
    grace = GRACE
    async with VNetManager(config) as m:
        await m.create_pool(nid, "10.70.0.0/24", "10.70.0.1")
        a_live = await m.request_address(nid, live)
        a_ghost = await m.request_address(nid, ghost)

        rep = await m.ipam_check(network_id=nid, grace_s=grace)
        assert not rep.clean and rep.inconsistencies == [] and rep.orphan_pools == []
        assert [(lk.owner, lk.address, lk.collectable) for lk in rep.leaks] == [(ghost, a_ghost.address, False)]

        early = await m.ipam_gc(grace_s=grace, network_id=nid)
        assert early.released == [] and early.pools_scanned == 1
        (p,) = await m.pool(nid)
        assert p.used == 2, "released before the grace period"

        # Just short of the grace period: still not collectable.
        _advance([rt], grace - 60)
        assert (await m.ipam_gc(grace_s=grace, network_id=nid)).released == []
        rep = await m.ipam_check(network_id=nid, grace_s=grace)
        assert [(lk.owner, lk.collectable) for lk in rep.leaks] == [(ghost, False)]
        assert all(grace - 60 <= lk.age_s < grace for lk in rep.leaks), rep.leaks

        _advance([rt], 61)
        rep = await m.ipam_check(network_id=nid, grace_s=grace)
        assert [(lk.owner, lk.collectable) for lk in rep.leaks] == [(ghost, True)]
        late = await m.ipam_gc(grace_s=grace, network_id=nid)
        assert [(a.owner, a.address) for a in late.released] == [(ghost, a_ghost.address)]
        (p,) = await m.pool(nid)
        assert p.used == 1
        assert (await m.request_address(nid, live)).address == a_live.address  # the live one is untouched
        rep = await m.ipam_check(network_id=nid, grace_s=grace)
        assert rep.clean, rep
        await m.release_address(nid, live)
        await m.delete_pool(nid)


async def test_gc_deletes_pools_whose_network_is_gone(config: VNetConfig, start_service: Any, run_prefix: str,
                                                      rds: aioredis.Redis) -> None:
    rt = await start_service("ipam")
    kept, orphan = f"{run_prefix}-kept", f"{run_prefix}-orphan"
    await _register_network(rds, kept)
    async with VNetManager(config) as m:
        await m.create_pool(kept, "10.71.0.0/24", "10.71.0.1")
        await m.create_pool(orphan, "10.72.0.0/24", "10.72.0.1")
        await m.request_address(orphan, "someone")
        grace = GRACE
        rep = await m.ipam_check(network_id=orphan, grace_s=grace)
        assert [(o.network_id, o.collectable) for o in rep.orphan_pools] == [(orphan, False)]
        assert (await m.ipam_gc(grace_s=grace, network_id=orphan)).pools_deleted == []
        _advance([rt], grace + 1)
        rep = await m.ipam_check(network_id=orphan, grace_s=grace)
        assert [(o.network_id, o.collectable) for o in rep.orphan_pools] == [(orphan, True)]
        assert (await m.ipam_gc(grace_s=grace, network_id=kept)).pools_deleted == []
        gc = await m.ipam_gc(grace_s=grace, network_id=orphan)
        assert [(p.network_id, p.released) for p in gc.pools_deleted] == [(orphan, 1)]
        assert [p.network_id for p in await m.pools(orphan)] == []
        assert orphan not in [p.network_id for p in await m.pools()]
        assert [p.network_id for p in await m.pools(kept)] == [kept]
        await m.delete_pool(kept)


async def test_periodic_gc_respects_grace(config: VNetConfig, start_service: Any, run_prefix: str,
                                          rds: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The periodic collection runs, in one replica per period, and only takes what is older
    than the grace period: passes before the (controlled) clock reaches it release nothing."""
    from vnet.svc.ipam import service as ipam_service

    grace = GRACE
    gc_config = msgspec.structs.replace(config, ipam_gc_interval_s=0.15, ipam_gc_grace_s=grace)
    passes: list[GcReply] = []
    real_collect = ipam_service.collect

    async def counted(store: IpamStore, grace_s: float, network_id: str | None = None) -> GcReply:
        rep = await real_collect(store, grace_s, network_id)
        passes.append(rep)
        return rep

    monkeypatch.setattr(ipam_service, "collect", counted)
    nid = f"{run_prefix}-pgc"
    live, ghost = f"{run_prefix}-live", f"{run_prefix}-ghost2"
    await _register_network(rds, nid)
    await rds.sadd(ipam_store.ENDPOINTS_INDEX, live)
    # two replicas: the lock lets one collect per period
    rts = [await start_service("ipam", cfg=gc_config), await start_service("ipam", cfg=gc_config)]
    own_key = ipam_store.pool_key(nid, 4, "own")

    async def passes_after(n: int, what: str) -> None:
        for _ in range(1200):  # 60 s: many periods even on a machine that barely schedules us
            if len(passes) >= n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the periodic GC ran {len(passes)} times, never {what}")

    async with VNetManager(config) as m:
        await m.create_pool(nid, "10.73.0.0/24", "10.73.0.1")
        a_live = await m.request_address(nid, live)
        got = await m.request_address(nid, ghost)
        seen = len(passes)
        await passes_after(seen + 3, "three times after the allocation")
        assert await rds.hexists(own_key, ghost), "released before the grace period"
        # (the database is shared with other tests: look at this network only)
        assert [a for rep in passes for a in rep.released if a.network_id == nid] == [], passes
        _advance(rts, grace + 1)
        seen = len(passes)
        for _ in range(1200):
            if not await rds.hexists(own_key, ghost):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"periodic GC never released the orphan ({len(passes) - seen} passes)")
        # (which pass released it is not asserted: a pass that fails after the release, say on a
        # Redis timeout of a busy machine, is not counted; nothing but the periodic GC runs here)
        released = [(a.owner, a.address) for rep in passes[seen:] for a in rep.released if a.network_id == nid]
        assert released in ([], [(ghost, got.address)]), released
        assert await rds.hexists(own_key, live)
        assert (await m.request_address(nid, live)).address == a_live.address
        await m.release_address(nid, live)
        await m.delete_pool(nid)


# --- the service's contract: idempotency, conflicts, errors, events --------------------------

async def test_pool_lifecycle_and_errors(config: VNetConfig, start_service: Any, run_prefix: str) -> None:
    await start_service("ipam")
    nid = f"{run_prefix}-life"
    async with VNetManager(config) as m:
        js = (await m._client()).jetstream()
        sub = await js.subscribe(f"vnet.evt.ipam.*.{nid}_4")
        p = await m.create_pool(nid, "10.80.0.0/24", "10.80.0.1", reserved=["10.80.0.10"],
                                excluded=["10.80.0.128/26"])
        assert (p.capacity, p.used, p.free, p.cursor, p.window) == (256 - 4 - 64, 0, 188, None, 256)
        # identical re-create: same pool; different settings: 409 naming both
        assert (await m.create_pool(nid, "10.80.0.0/24", "10.80.0.1", reserved=["10.80.0.10"],
                                    excluded=["10.80.0.128/26"])).created_at == p.created_at
        with pytest.raises(E.Conflict) as ei:
            await m.create_pool(nid, "10.80.0.0/25", "10.80.0.1")
        assert ei.value.code == "pool_exists"
        assert "10.80.0.0/24" in ei.value.message and "10.80.0.0/25" in ei.value.message
        with pytest.raises(E.InvalidRequest) as ei:
            await m.create_pool(nid, "10.80.0.1/24")
        assert ei.value.code == "invalid_cidr" and "did you mean 10.80.0.0/24" in ei.value.message

        # serial allocation, idempotent per owner and per request_id
        a = await m.request_address(nid, "ep-a", request_id="req-1")
        assert (a.address, a.prefix_len, a.gateway, a.family) == ("10.80.0.2", 24, "10.80.0.1", 4)
        assert (await m.request_address(nid, "ep-a", request_id="req-1")).address == "10.80.0.2"
        assert (await m.request_address(nid, "ep-a")).address == "10.80.0.2"
        with pytest.raises(E.Conflict) as ei:
            await m.request_address(nid, "ep-other", request_id="req-1")
        assert "req-1" in ei.value.message and "ep-a" in ei.value.message
        b = await m.request_address(nid, "ep-b")
        assert b.address == "10.80.0.3"
        assert await m.release_address(nid, "ep-a") == ["10.80.0.2"]
        assert await m.release_address(nid, "ep-a") == []  # idempotent
        with pytest.raises(E.Conflict) as ei:
            await m.request_address(nid, "ep-a", request_id="req-1")  # replay after release
        assert "released since" in ei.value.message
        assert (await m.request_address(nid, "ep-c")).address == "10.80.0.4"  # .2 is not reused yet
        (info,) = await m.pool(nid)
        assert info.cursor == "10.80.0.4" and info.used == 2

        # static requests
        assert (await m.request_address(nid, "ep-s", address="10.80.0.50")).address == "10.80.0.50"
        with pytest.raises(E.Conflict) as ei:
            await m.request_address(nid, "ep-t", address="10.80.0.50")
        assert ei.value.code == "address_in_use" and ei.value.status == 409
        assert "ep-s" in ei.value.message and ei.value.details["holder"] == "ep-s"
        for bad, words in [("10.80.0.1", "the gateway"), ("10.80.0.0", "network address"),
                           ("10.80.0.255", "broadcast"), ("10.80.0.10", "reserved"),
                           ("10.80.0.130", "excluded subnet 10.80.0.128/26"), ("10.81.0.5", "outside")]:
            with pytest.raises(E.InvalidRequest) as ei:
                await m.request_address(nid, "ep-t", address=bad)
            assert ei.value.code == "address_not_assignable" and words in ei.value.message, ei.value

        # unknown pool, unknown family, bad input
        with pytest.raises(E.NotFound) as ei:
            await m.request_address(f"{nid}-nope", "ep-a")
        assert ei.value.code == "pool_not_found"
        with pytest.raises(E.NotFound):
            await m.request_address(nid, "ep-a", family=6)
        with pytest.raises(E.InvalidRequest) as ei:
            await m.call(subjects.IPAM_ADDR_REQUEST, b'{"network_id":"x","owner":"y","colour":1}', PoolEvent)
        assert ei.value.code == "unknown_field"

        # delete: refused while in use (names the count), forced works and says how many were dropped
        with pytest.raises(E.Conflict) as ei:
            await m.delete_pool(nid)
        assert ei.value.code == "pool_in_use" and "3 allocated addresses" in ei.value.message
        rep = await m.delete_pool(nid, force=True)
        assert [x.cidr for x in rep.pools] == ["10.80.0.0/24"] and rep.released == 3
        assert (await m.delete_pool(nid)).pools == []  # idempotent
        with pytest.raises(E.NotFound):
            await m.pool(nid)

        kinds = []
        for _ in range(2):
            msg = await sub.next_msg(timeout=5)
            kinds.append(msg.subject.split(".")[3])
            await msg.ack()
        assert kinds == ["pool_created", "pool_deleted"]
        await sub.unsubscribe()


async def test_ipv6_pool(config: VNetConfig, start_service: Any, run_prefix: str) -> None:
    await start_service("ipam")
    nid = f"{run_prefix}-v6"
    async with VNetManager(config) as m:
        await m.create_pool(nid, "10.90.0.0/24", "10.90.0.1")
        p6 = await m.create_pool(nid, "fd00:90::/64", "fd00:90::1")
        assert p6.family == 6 and p6.window == 2 ** 24 and p6.capacity == 2 ** 24 - 2
        a4 = await m.request_address(nid, "ep")
        a6 = await m.request_address(nid, "ep", family=6)
        assert (a4.address, a6.address, a6.prefix_len) == ("10.90.0.2", "fd00:90::2", 64)
        s6 = await m.request_address(nid, "ep2", address="fd00:90::ff:ffff")  # family follows the address
        assert s6.family == 6
        with pytest.raises(E.InvalidRequest) as ei:
            await m.request_address(nid, "ep3", address="fd00:90::1:0:0:1")
        assert "managed window" in ei.value.message
        assert sorted(await m.release_address(nid, "ep")) == ["10.90.0.2", "fd00:90::2"]
        pools = await m.pool(nid)
        assert [(p.family, p.used) for p in pools] == [(4, 0), (6, 1)]
        rep = await m.delete_pool(nid, force=True)
        assert sorted(p.family for p in rep.pools) == [4, 6]


# --- vnetctl ipam ----------------------------------------------------------------------------

async def _vnetctl(config: VNetConfig, *args: str) -> tuple[int, str]:
    """Run ``vnetctl ipam ARGS``: (exit code, stdout + stderr; stdout alone with --json)."""
    import os
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "vnetctl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNET_") or k == "VNET_RUN_PREFIX"}
    env["COLUMNS"] = "200"
    proc = await asyncio.create_subprocess_exec(exe, "--nats", config.nats_url, "ipam", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode() if "--json" in args else out.decode() + err.decode()


async def test_vnetctl_ipam(config: VNetConfig, start_service: Any, run_prefix: str, rds: aioredis.Redis) -> None:
    import json

    await start_service("ipam")
    nid = f"{run_prefix}-cli"
    await _register_network(rds, nid)
    await rds.sadd(ipam_store.ENDPOINTS_INDEX, f"{run_prefix}-cli-ep")
    rc, out = await _vnetctl(config, "pool-create", nid, "10.99.0.0/24", "--gateway", "10.99.0.1",
                             "--reserved", "10.99.0.2")
    assert rc == 0, out
    rc, out = await _vnetctl(config, "request", nid, f"{run_prefix}-cli-ep", "--json")
    assert rc == 0 and json.loads(out)["address"] == "10.99.0.3", out
    rc, out = await _vnetctl(config, "request", nid, "stray", "--address", "10.99.0.3")
    assert rc == 1 and "already allocated to" in out and "address_in_use" in out, out
    rc, out = await _vnetctl(config, "request", nid, "stray", "--address", "10.99.0.9")
    assert rc == 0 and "10.99.0.9/24" in out, out
    rc, out = await _vnetctl(config, "pools", nid)
    assert rc == 0 and "10.99.0.0/24" in out and "252" in out and "250" in out, out  # capacity, free
    rc, out = await _vnetctl(config, "pools", "--json")
    assert rc == 0 and nid in [p["network_id"] for p in json.loads(out)["items"]], out
    rc, out = await _vnetctl(config, "check", nid, "--grace", "3600")
    assert rc == 1 and "leaks" in out and "stray" in out and "waits (grace)" in out, out
    rc, out = await _vnetctl(config, "check", nid, "--json", "--grace", "0")
    rep = json.loads(out)
    assert rc == 1 and [lk["owner"] for lk in rep["leaks"]] == ["stray"] and rep["leaks"][0]["collectable"]
    rc, out = await _vnetctl(config, "gc", "--grace", "0", "--network", nid)
    assert rc == 0 and "released 1 allocations" in out and "stray" in out, out
    rc, out = await _vnetctl(config, "check", nid)
    assert rc == 0 and "clean" in out, out
    rc, out = await _vnetctl(config, "pool-delete", nid)
    assert rc == 1 and "pool_in_use" in out and "1 allocated address" in out, out
    rc, out = await _vnetctl(config, "release", nid, f"{run_prefix}-cli-ep")
    assert rc == 0 and "released 10.99.0.3" in out, out
    rc, out = await _vnetctl(config, "pool-delete", nid, "--json")
    assert rc == 0 and json.loads(out)["pools"][0]["cidr"] == "10.99.0.0/24", out


async def test_pool_exclude_child_subnets(config: VNetConfig, start_service: Any, run_prefix: str) -> None:
    """A parent's pool gives up a child's subnet (and gets it back when the child goes)."""
    await start_service("ipam")
    nid = f"{run_prefix}-parent"
    async with VNetManager(config) as m:
        p = await m.create_pool(nid, "10.100.0.0/22", "10.100.0.1")
        assert p.capacity == 1024 - 3
        holder = await m.request_address(nid, "ep-in-child", address="10.100.1.7")
        with pytest.raises(E.Conflict) as ei:
            await m.exclude_from_pool(nid, add=["10.100.1.0/24"])
        assert ei.value.code == "address_in_use"
        assert "10.100.1.0/24" in ei.value.message and "10.100.1.7 to ep-in-child" in ei.value.message
        await m.release_address(nid, holder.owner)
        p = await m.exclude_from_pool(nid, add=["10.100.1.0/24"])
        assert p.capacity == 1024 - 3 - 256 and p.excluded == ["10.100.1.0/24"]
        assert (await m.exclude_from_pool(nid, add=["10.100.1.0/24"])).capacity == p.capacity  # idempotent
        with pytest.raises(E.InvalidRequest) as ei:
            await m.request_address(nid, "x", address="10.100.1.9")
        assert "excluded subnet 10.100.1.0/24" in ei.value.message
        # dynamic allocation skips the child: fill the first block, the next one lands after it
        for i in range(254):
            await m.request_address(nid, f"f{i}")
        assert (await m.request_address(nid, "jump")).address == "10.100.2.0"
        rep = await m.ipam_check(network_id=nid)
        assert rep.inconsistencies == [], rep.inconsistencies
        p = await m.exclude_from_pool(nid, remove=["10.100.1.0/24"])
        assert p.excluded == [] and p.capacity == 1024 - 3
        assert (await m.request_address(nid, "back", address="10.100.1.9")).address == "10.100.1.9"
        assert (await m.ipam_check(network_id=nid)).inconsistencies == []
        with pytest.raises(E.InvalidRequest):
            await m.exclude_from_pool(nid, add=["10.101.0.0/24"])  # not inside the pool
        await m.delete_pool(nid, force=True)


async def test_gc_still_collects_when_every_endpoint_is_gone(config: VNetConfig, start_service: Any,
                                                             run_prefix: str, rds: aioredis.Redis) -> None:
    """Redis drops an empty set; the endpoint service's registry marker keeps GC working."""
    await start_service("ipam")
    nid = f"{run_prefix}-gc-empty"
    await _register_network(rds, nid)
    saved = await rds.smembers(ipam_store.ENDPOINTS_INDEX)
    marker = ipam_store.registry_marker(ipam_store.ENDPOINTS_INDEX)
    had_marker = await rds.exists(marker)
    await rds.delete(ipam_store.ENDPOINTS_INDEX)
    try:
        async with VNetManager(config) as m:
            await m.create_pool(nid, "10.74.0.0/24", "10.74.0.1")
            await m.request_address(nid, f"{run_prefix}-gone")
            await rds.delete(marker)
            skipped = await m.ipam_gc(grace_s=0, network_id=nid)
            assert skipped.released == [], "without index or marker GC must not treat everything as orphaned"
            await rds.set(marker, b"1")
            rep = await m.ipam_gc(grace_s=0, network_id=nid)
            assert [a.owner for a in rep.released] == [f"{run_prefix}-gone"]
            await m.delete_pool(nid)
    finally:
        if saved:
            await rds.sadd(ipam_store.ENDPOINTS_INDEX, *saved)
        if not had_marker:
            await rds.delete(marker)
