"""IPAM state in Redis: one Lua script per decision, keys of one pool in one hash slot.

Keys of the pool of network ``N``, family ``F`` (all tagged ``{pool:N:F}``)::

    vnet:{pool:N:F}:meta      hash   cidr, gateway, reserved, excluded, sig, gen, window,
                                     capacity, used, cursor, created_at, network_id, family
    vnet:{pool:N:F}:bits      string bitmap, bit i = offset i taken (blocked offsets are set
                                     at creation, so they are never found free)
    vnet:{pool:N:F}:sum       string summary, bit b = every offset of block b (1024) taken
    vnet:{pool:N:F}:own       hash   owner -> "offset|allocated_at"
    vnet:{pool:N:F}:off       hash   offset -> owner (who holds an address: the 409 names them)
    vnet:{pool:N:F}:rid:<id>  string "gen|owner|offset|ts", 24 h: request_id idempotency

and one cluster-wide index, ``vnet:{global:idx}:pools`` (sorted set, member ``N/F``,
score the time it was added), next to the sets the network and endpoint services
keep (``...:networks``, ``...:endpoints``) which GC reads.

Addresses never enter Lua: the service turns them into offsets with the pool's layout
(:mod:`vnet.core.ipam`), cached per process and validated by the pool's ``gen``
(a token made at creation) on every call, so a pool deleted and re-created with other
arguments is noticed and the layout reloaded.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from vnet.adapters.ipam_lua import ALLOC, CREATE, DELETE, EXCLUDE, RELEASE, Batcher
from vnet.adapters.ipam_lua import SCRIPTS as SCRIPTS  # the service loads them at start
from vnet.adapters.redis import global_key, key
from vnet.core import errors as E
from vnet.core import ipam as core

POOLS_INDEX = global_key("pools")
NETWORKS_INDEX = global_key("networks")


def registry_marker(set_key: str) -> str:
    """The key a service sets to say it maintains ``set_key`` (which may be empty)."""
    return f"{set_key}:registry"


ENDPOINTS_INDEX = global_key("endpoints")
GC_LOCK = global_key("ipam-gc-lock")
REQUEST_ID_TTL_S = 24 * 3600

PARTS = ("meta", "bits", "sum", "own", "off")


def pool_key(network_id: str, family: int, part: str) -> str:
    return key("pool", f"{network_id}:{family}", part)


def pool_keys(network_id: str, family: int) -> list[str]:
    return [pool_key(network_id, family, p) for p in PARTS]


def index_member(network_id: str, family: int) -> str:
    return f"{network_id}/{family}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class PoolMeta:
    """A pool as stored (``meta`` hash), with its layout."""

    layout: core.PoolLayout
    gen: str
    used: int
    cursor: int
    created_at: float

    @property
    def network_id(self) -> str:
        return self.layout.network_id

    @property
    def family(self) -> int:
        return self.layout.family

    @property
    def free(self) -> int:
        return self.layout.capacity - self.used

    @property
    def cursor_address(self) -> str | None:
        return str(self.layout.address_at(self.cursor)) if 0 <= self.cursor < self.layout.window else None


def meta_from_hash(h: dict[Any, Any]) -> PoolMeta:
    d = {_s(k): _s(v) for k, v in h.items()}
    layout = core.build_layout(d["network_id"], d["cidr"], d.get("gateway") or None,
                               json.loads(d.get("reserved") or "[]"), json.loads(d.get("excluded") or "[]"),
                               block=int(d.get("block") or core.BLOCK))
    return PoolMeta(layout=layout, gen=d["gen"], used=int(d.get("used", 0)), cursor=int(d.get("cursor", -1)),
                    created_at=float(d.get("created_at", 0.0)))


@dataclass(frozen=True)
class Allocated:
    layout: core.PoolLayout
    offset: int
    allocated_at: float
    existing: bool  # the owner already held it (an idempotent retry)
    first_use: bool = False  # no one held this address since the pool was made (no peer can cache it)

    @property
    def address(self) -> str:
        return str(self.layout.address_at(self.offset))


@dataclass(frozen=True)
class Released:
    network_id: str
    family: int
    address: str
    owner: str
    allocated_at: float


@dataclass(frozen=True)
class Snapshot:
    """A pool read in one transaction (for the check)."""

    meta: PoolMeta
    bits: bytes
    summary: bytes
    owners: dict[str, tuple[int, float]]  # owner -> (offset, allocated_at)
    holders: dict[int, str]
    bad_records: list[str]


class IpamStore:
    """Pools and allocations in Redis. Every decision is one script call (one round trip)."""

    def __init__(self, r: aioredis.Redis, *, request_id_ttl_s: int = REQUEST_ID_TTL_S, wait_replicas: int = 0,
                 wait_timeout_ms: int = 500) -> None:
        """``wait_replicas``: allocations and releases are answered once that many replicas
        hold them (``WAIT``, see :class:`~vnet.adapters.ipam_lua.Batcher`)."""
        self.r = r
        self.request_id_ttl_s = request_id_ttl_s
        # Added to Redis's clock by ``now()``, the one clock GC and check measure ages with:
        # a test advances it past a grace period instead of sleeping and racing the wall clock.
        self.clock_offset_s = 0.0
        self._layouts: dict[tuple[str, int], tuple[str, core.PoolLayout]] = {}
        self._keys: dict[tuple[str, int], list[str]] = {}
        self._batch = Batcher(r, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)

    def _pool_keys(self, network_id: str, family: int) -> list[str]:
        k = self._keys.get((network_id, family))
        if k is None:
            if len(self._keys) > 100_000:
                self._keys.clear()
            k = self._keys[(network_id, family)] = pool_keys(network_id, family)
        return k

    # -- pools ---------------------------------------------------------------------------
    async def create_pool(self, layout: core.PoolLayout) -> tuple[bool, PoolMeta]:
        """Create the pool, or find the identical one (409 ``pool_exists`` if it differs)."""
        nid, fam = layout.network_id, layout.family
        # Index first: a crash after this leaves an entry GC removes; the reverse would leave a pool
        # nobody lists.
        await self.r.zadd(POOLS_INDEX, {index_member(nid, fam): time.time()}, nx=True)
        gen = secrets.token_hex(8)
        ranges: list[int] = []
        for s, e in layout.ranges:
            ranges += [s, e]
        args: list[Any] = [
            layout.signature(), gen, nid, fam, layout.cidr, str(layout.gateway) if layout.gateway else "",
            json.dumps([str(a) for a in layout.reserved]), json.dumps([str(n) for n in layout.excluded]),
            layout.window, layout.capacity, layout.block, *ranges,
        ]
        res = await CREATE(self.r, pool_keys(nid, fam), args)
        status = _s(res[0])
        if status == "conflict":
            existing = await self.pool(nid, fam)
            have = existing.layout.signature() if existing else _s(res[1])
            raise E.make(E.POOL_EXISTS,
                         f"network {nid} already has an {core.family_name(fam)} pool with other settings "
                         f"({_describe_sig(have)}) than asked ({_describe_sig(layout.signature())}); delete it "
                         "first (`vnetctl ipam pool-delete`) or ask with the same settings",
                         network_id=nid, family=fam, existing=json.loads(have),
                         requested=json.loads(layout.signature()))
        created = status == "created"
        gen = _s(res[1])
        self._layouts[(nid, fam)] = (gen, layout)
        used = 0
        cursor = -1
        if not created:
            meta = await self.pool(nid, fam)
            if meta is not None:
                return False, meta
        return created, PoolMeta(layout=layout, gen=gen, used=used, cursor=cursor, created_at=float(_s(res[2])))

    async def delete_pool(self, network_id: str, family: int, *, force: bool = False,
                          expect_gen: str | None = None) -> tuple[PoolMeta, int] | None:
        """Delete one pool; ``None`` if there is none. 409 ``pool_in_use`` unless ``force``."""
        res = await DELETE(self.r, pool_keys(network_id, family), ["1" if force else "0", expect_gen or ""])
        status = _s(res[0])
        self._layouts.pop((network_id, family), None)
        if status in ("absent", "changed"):
            if status == "absent":
                await self.r.zrem(POOLS_INDEX, index_member(network_id, family))
            return None
        if status == "in_use":
            n = int(res[1])
            some = ", ".join(_s(o) for o in res[2])
            raise E.make(E.POOL_IN_USE,
                         f"the {core.family_name(family)} pool of network {network_id} still has {n} allocated "
                         f"address{'es' if n != 1 else ''} (owners include {some}); release them or delete the "
                         "endpoints first, or delete with force",
                         network_id=network_id, family=family, used=n, owners=[_s(o) for o in res[2]])
        flat = res[2]
        meta = meta_from_hash({flat[i]: flat[i + 1] for i in range(0, len(flat), 2)})
        await self.r.zrem(POOLS_INDEX, index_member(network_id, family))
        return meta, int(res[1])

    async def change_excluded(self, network_id: str, family: int, add: Sequence[str] = (),
                              remove: Sequence[str] = ()) -> PoolMeta:
        """Exclude child subnets from the pool (``add``) or give them back (``remove``); idempotent.

        Refused (409 ``address_in_use``, holders named) while an address to exclude is allocated.
        """
        adds = [core.parse_network(c, "excluded subnet") for c in add]
        removes = {str(core.parse_network(c, "excluded subnet")) for c in remove}
        for _attempt in range(5):
            meta = await self.pool(network_id, family)
            if meta is None:
                raise pool_not_found(network_id, family)
            old = meta.layout
            current = [str(x) for x in old.excluded]
            wanted = [c for c in dict.fromkeys([*current, *(str(a) for a in adds)]) if c not in removes]
            if wanted == current:
                return meta
            new = core.build_layout(network_id, old.cidr, str(old.gateway) if old.gateway else None,
                                    [str(a) for a in old.reserved], wanted, block=old.block)
            to_set = core.subtract_ranges(new.ranges, old.ranges)
            to_clear = core.subtract_ranges(old.ranges, new.ranges)
            args: list[Any] = [meta.gen, secrets.token_hex(8), new.signature(), json.dumps(wanted), new.capacity,
                               len(to_set)]
            for s, e in (*to_set, *to_clear):
                args += [s, e]
            res = await EXCLUDE(self.r, pool_keys(network_id, family)[:3], args)
            status = _s(res[0])
            if status == "stale":
                continue
            if status == "nopool":
                raise pool_not_found(network_id, family)
            if status == "in_use":
                s, e = int(res[1]), int(res[2])
                held = await self._holders_in(network_id, family, s, e)
                child = next((str(c) for c in new.excluded if c not in old.excluded
                              and 0 <= s - old.offset_of(c.network_address) < c.num_addresses),
                             f"{old.address_at(s)}-{old.address_at(e)}")
                listed = ", ".join(f"{old.address_at(o)} to {h}" for o, h in held[:5])
                more = f" and {len(held) - 5} more" if len(held) > 5 else ""
                raise E.make(E.ADDRESS_IN_USE,
                             f"cannot exclude {child} from {old.describe()}: {len(held)} of its addresses are "
                             f"allocated ({listed}{more}); release them first",
                             network_id=network_id, family=family, excluded=child,
                             holders={str(old.address_at(o)): h for o, h in held[:100]})
            fresh = await self.pool(network_id, family)
            if fresh is None:
                raise pool_not_found(network_id, family)
            return fresh
        raise E.make(E.UNAVAILABLE, f"the pool of network {network_id} kept changing; retry",
                     network_id=network_id, family=family)

    async def _holders_in(self, network_id: str, family: int, s: int, e: int) -> list[tuple[int, str]]:
        out = []
        async for chunk in self.owners(network_id, family):
            out += [(off, owner) for owner, off, _ in chunk if s <= off <= e]
        return sorted(out)

    async def pool(self, network_id: str, family: int) -> PoolMeta | None:
        h = await self.r.hgetall(pool_key(network_id, family, "meta"))
        if not h:
            return None
        meta = meta_from_hash(h)
        self._layouts[(network_id, family)] = (meta.gen, meta.layout)
        return meta

    async def index(self) -> list[tuple[str, int, float]]:
        """Every (network_id, family, added_at) in the pool index."""
        out = []
        rows: Any = await self.r.zrange(POOLS_INDEX, 0, -1, withscores=True)
        for member, score in rows:
            nid, _, fam = _s(member).rpartition("/")
            if nid and fam in ("4", "6"):
                out.append((nid, int(fam), float(score)))
        return out

    async def pools(self, network_id: str | None = None, family: int | None = None) -> list[PoolMeta]:
        if network_id is not None:
            refs = [(network_id, f) for f in ((family,) if family else (4, 6))]
        else:
            refs = [(n, f) for n, f, _ in await self.index() if family in (None, f)]
        if not refs:
            return []
        pipe = self.r.pipeline(transaction=False)
        for n, f in refs:
            pipe.hgetall(pool_key(n, f, "meta"))
        out = []
        for h in await pipe.execute():
            if h:
                meta = meta_from_hash(h)
                self._layouts[(meta.network_id, meta.family)] = (meta.gen, meta.layout)
                out.append(meta)
        out.sort(key=lambda m: (m.network_id, m.family))
        return out

    async def layout(self, network_id: str, family: int, *, refresh: bool = False) -> tuple[str, core.PoolLayout]:
        """The pool's (gen, layout), cached; 404 ``pool_not_found`` if there is no such pool."""
        cached = None if refresh else self._layouts.get((network_id, family))
        if cached is not None:
            return cached
        meta = await self.pool(network_id, family)
        if meta is None:
            raise pool_not_found(network_id, family)
        return meta.gen, meta.layout

    # -- allocations ---------------------------------------------------------------------
    async def allocate(self, network_id: str, family: int, owner: str, address: str | None = None,
                       request_id: str | None = None) -> Allocated:
        """Give ``owner`` an address (``address``: that one) — one script call in the common case."""
        keys = self._pool_keys(network_id, family)
        if request_id:
            keys = [*keys, pool_key(network_id, family, f"rid:{request_id}")]
        for attempt in range(3):
            gen, layout = await self.layout(network_id, family, refresh=attempt > 0)
            want = layout.static_offset(address) if address is not None else -1
            res = await self._batch(ALLOC, keys, [gen, owner, want, self.request_id_ttl_s])
            status = _s(res[0])
            if status == "ok":
                return Allocated(layout, int(res[1]), float(_s(res[2])), existing=False,
                                 first_use=len(res) > 3 and int(res[3]) == 1)
            if status == "exists":
                return Allocated(layout, int(res[1]), float(_s(res[2])), existing=True)
            if status == "stale":
                continue
            if status == "nopool":
                self._layouts.pop((network_id, family), None)
                raise pool_not_found(network_id, family)
            if status == "exhausted":
                raise core.exhausted_error(layout, int(res[1]))
            if status == "in_use":
                ts = _s(res[2])
                raise core.in_use_error(layout, want, _s(res[1]), float(ts) if ts else None)
            if status == "owner_has":
                raise core.owner_has_other_error(layout, owner, int(res[1]), want)
            if status == "blocked":  # a blocked offset the layout did not know: should not happen
                raise E.make(E.ADDRESS_NOT_ASSIGNABLE, f"{address} is not assignable in {layout.describe()}",
                             address=address, network_id=network_id)
            if status == "outside":
                raise E.make(E.ADDRESS_NOT_ASSIGNABLE, f"{address} is outside {layout.describe()}",
                             address=address, network_id=network_id)
            if status == "rid_conflict":
                raise E.make(E.CONFLICT, f"request_id {request_id} was already used to allocate "
                             f"{layout.address_at(int(res[2]))} to {_s(res[1])} in {layout.describe()}, not to "
                             f"{owner}; use a new request_id for a new request", request_id=request_id,
                             owner=_s(res[1]))
            if status == "rid_spent":
                raise E.make(E.CONFLICT, f"request_id {request_id} already allocated "
                             f"{layout.address_at(int(res[1]))} to {owner} in {layout.describe()}, and it has been "
                             "released since; use a new request_id to allocate again", request_id=request_id,
                             owner=owner)
            raise E.make(E.INTERNAL, f"unexpected answer {status!r} from the allocation script")
        raise E.make(E.UNAVAILABLE, f"the pool of network {network_id} changed three times while allocating; retry",
                     network_id=network_id, family=family)

    async def release(self, network_id: str, family: int, owner: str, *, expect_offset: int | None = None,
                      allocated_before: float | None = None) -> Released | None:
        """Release what ``owner`` holds in one pool (``None``: nothing held, or no such pool).

        With ``expect_offset``/``allocated_before`` (GC), release only that very allocation.
        """
        args: list[Any] = [owner, "" if expect_offset is None else expect_offset,
                           "" if allocated_before is None else repr(allocated_before)]
        res = await self._batch(RELEASE, self._pool_keys(network_id, family), args)
        if _s(res[0]) != "released":
            return None
        cidr = _s(res[1])
        addr = core.parse_network(cidr).network_address + int(res[2])
        return Released(network_id, family, str(addr), owner, float(_s(res[3])))

    async def owners(self, network_id: str, family: int, *, count: int = 1000
                     ) -> AsyncIterator[list[tuple[str, int, float]]]:
        """The pool's allocations, in chunks (HSCAN: Redis is never blocked for long)."""
        cursor: int = 0
        k = pool_key(network_id, family, "own")
        while True:
            res: Any = await self.r.hscan(k, cursor, count=count)
            cursor, chunk = int(res[0]), res[1]
            rows = []
            for o, rec in chunk.items():
                parsed = _parse_record(_s(rec))
                if parsed is not None:
                    rows.append((_s(o), parsed[0], parsed[1]))
            if rows:
                yield rows
            if cursor == 0:
                break

    async def snapshot(self, network_id: str, family: int) -> Snapshot | None:
        pipe = self.r.pipeline(transaction=True)
        for part in ("meta", "bits", "sum", "own", "off"):
            k = pool_key(network_id, family, part)
            if part in ("bits", "sum"):
                pipe.get(k)
            else:
                pipe.hgetall(k)
        meta_h, bits, summary, own, off = await pipe.execute()
        if not meta_h:
            return None
        meta = meta_from_hash(meta_h)
        owners: dict[str, tuple[int, float]] = {}
        bad: list[str] = []
        for o, rec in own.items():
            parsed = _parse_record(_s(rec))
            if parsed is None:
                bad.append(f"owner record of {_s(o)} is unreadable: {_s(rec)!r}")
            else:
                owners[_s(o)] = parsed
        holders: dict[int, str] = {}
        for k, v in off.items():
            try:
                holders[int(_s(k))] = _s(v)
            except ValueError:
                bad.append(f"address record {_s(k)!r} is not an offset")
        return Snapshot(meta, bits or b"", summary or b"", owners, holders, bad)

    # -- indexes and time ----------------------------------------------------------------
    async def members(self, set_key: str, items: Sequence[str]) -> list[bool]:
        if not items:
            return []
        res = await self.r.smismember(set_key, list(items))
        return [bool(x) for x in res]

    async def set_exists(self, set_key: str) -> bool:
        """Whether the index is maintained: Redis drops an empty set, so the owning
        service also keeps a ``<set>:registry`` marker once it has run."""
        return bool(await self.r.exists(set_key, registry_marker(set_key)))

    async def now(self) -> float:
        """Redis's clock (shared by every replica, and the one allocation times are stamped
        with), plus ``clock_offset_s``."""
        t: Any = await self.r.time()
        return float(t[0]) + float(t[1]) / 1e6 + self.clock_offset_s

    async def try_lock(self, name: str, holder: str, ttl_s: float) -> bool:
        return bool(await self.r.set(name, holder, nx=True, px=max(1, int(ttl_s * 1000))))

    async def remove_index_entry(self, network_id: str, family: int) -> None:
        await self.r.zrem(POOLS_INDEX, index_member(network_id, family))


def pool_not_found(network_id: str, family: int) -> E.VNetError:
    return E.make(E.POOL_NOT_FOUND, f"network {network_id} has no {core.family_name(family)} pool; the network "
                  "service creates it with the network (`vnetctl ipam pools` lists the pools)",
                  network_id=network_id, family=family)


def _parse_record(rec: str) -> tuple[int, float] | None:
    off, sep, ts = rec.partition("|")
    try:
        return int(off), float(ts) if sep else 0.0
    except ValueError:
        return None


def _describe_sig(sig: str) -> str:
    d = json.loads(sig)
    parts = [str(d["cidr"])]
    if d.get("gateway"):
        parts.append(f"gateway {d['gateway']}")
    if d.get("reserved"):
        parts.append(f"reserved {', '.join(d['reserved'])}")
    if d.get("excluded"):
        parts.append(f"excluded {', '.join(d['excluded'])}")
    return "; ".join(parts)
