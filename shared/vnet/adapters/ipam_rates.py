"""Per-pool allocation and release counts in one-minute buckets (for address forecasts),
and the fullness flags that make each 80 % / 95 % crossing announced once.

One hash per pool, ``vnet:{pool:<network>:<family>}:rates`` (the pool's hash tag), fields
``a:<bucket start>`` / ``r:<bucket start>``; its TTL (:data:`vnet.core.forecast.KEEP_S`)
is renewed on every write, so a deleted pool's counts go away by themselves, and a reader
drops the buckets older than that. A level's flag ``...:full:<percent>`` is set (NX) when
the pool reaches the level and deleted when a release takes it below again.

Counting is best effort next to the allocation script (one extra pipelined round trip,
not in the script): a lost count skews a rate, never an allocation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from vnet.adapters.ipam_store import pool_key
from vnet.core import forecast

FLAG_TTL_S = 7 * 24 * 3600


def rates_key(network_id: str, family: int) -> str:
    return pool_key(network_id, family, "rates")


def flag_key(network_id: str, family: int, level: float) -> str:
    return pool_key(network_id, family, f"full:{round(level * 100)}")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class IpamRates:
    def __init__(self, redis: Any) -> None:
        self.r = redis

    async def note(self, network_id: str, family: int, *, now: float, allocs: int = 0,
                   releases: int = 0) -> int:
        """Count allocations/releases in the current bucket; the pool's ``used`` after it."""
        k = rates_key(network_id, family)
        b = forecast.bucket(now)
        pipe = self.r.pipeline(transaction=False)
        if allocs:
            pipe.hincrby(k, f"a:{b}", allocs)
        if releases:
            pipe.hincrby(k, f"r:{b}", releases)
        pipe.expire(k, forecast.KEEP_S)
        pipe.hget(pool_key(network_id, family, "meta"), "used")
        res = await pipe.execute()
        return int(_s(res[-1])) if res[-1] is not None else 0

    async def crossings(self, network_id: str, family: int, used: int, capacity: int,
                        levels: Sequence[float] = forecast.LEVELS, *, clear: bool = False) -> list[float]:
        """The levels the pool is at or above and had not announced yet (each flag set once);
        ``clear`` (after a release): the flags of the levels it is below again are cleared.
        An allocation below every level costs no round trip here."""
        if capacity <= 0:
            return []
        above = [lv for lv in levels if used >= math.ceil(lv * capacity)]
        below = [lv for lv in levels if lv not in above] if clear else []
        if not above and not below:
            return []
        pipe = self.r.pipeline(transaction=False)
        for lv in above:
            pipe.set(flag_key(network_id, family, lv), str(used), nx=True, ex=FLAG_TTL_S)
        if below:
            pipe.delete(*(flag_key(network_id, family, lv) for lv in below))
        res = await pipe.execute()
        return [lv for lv, ok in zip(above, res[:len(above)], strict=True) if ok]

    async def buckets(self, pools: Sequence[tuple[str, int]], now: float) -> list[dict[int, tuple[int, int]]]:
        """Bucket start -> (allocations, releases) of each pool; old buckets are dropped."""
        if not pools:
            return []
        pipe = self.r.pipeline(transaction=False)
        for nid, fam in pools:
            pipe.hgetall(rates_key(nid, fam))
        raws = await pipe.execute()
        out: list[dict[int, tuple[int, int]]] = []
        drop = self.r.pipeline(transaction=False)
        dropping = False
        for (nid, fam), raw in zip(pools, raws, strict=True):
            got: dict[int, tuple[int, int]] = {}
            for f, v in (raw or {}).items():
                kind, _, start = _s(f).partition(":")
                try:
                    b, n = int(start), int(_s(v))
                except ValueError:
                    continue
                a, r = got.get(b, (0, 0))
                got[b] = (a + n, r) if kind == "a" else (a, r + n)
            old = forecast.expired(list(got), now)
            if old:
                drop.hdel(rates_key(nid, fam), *(f"{k}:{b}" for b in old for k in ("a", "r")))
                dropping = True
                for b in old:
                    got.pop(b)
            out.append(got)
        if dropping:
            await drop.execute()
        return out
