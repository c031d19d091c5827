"""Address forecasts (pure): allocation and release rates of an IPAM pool and the time to
exhaustion at the current rate, and the fullness levels an allocation crosses.

The IPAM service counts allocations and releases per pool in one-minute buckets
(:func:`bucket`); :func:`forecast` turns the buckets of the last ``window_s`` into rates:

* ``alloc_per_h`` / ``release_per_h``: the counts in the window divided by the time the
  window covers — the window, or the pool's age when it is younger (a pool created two
  minutes ago with 10 allocations allocates 300 an hour, not 40), never less than one
  bucket (so one allocation in a new pool is not an infinite rate);
* ``exhaustion_s``: ``free / (alloc - release)`` when addresses are being consumed
  (net rate > 0), ``0`` when nothing is free, ``None`` when the pool is not filling.

:func:`crossed` says which fullness levels (80 % and 95 % by default) an allocation moved
the pool across, upward only, so each crossing is announced once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import msgspec

BUCKET_S = 60
WINDOW_S = 900.0  # rates over the last 15 minutes
KEEP_S = 2 * 3600  # buckets older than this are dropped
LEVELS: tuple[float, ...] = (0.8, 0.95)


class PoolForecast(msgspec.Struct, frozen=True, kw_only=True):
    """Rates over the last ``window_s`` seconds and what they mean for the free addresses."""

    alloc_per_h: float
    release_per_h: float
    net_per_h: float  # alloc - release: > 0 the pool fills
    exhaustion_s: float | None  # at the current net rate; None: not filling
    fullness: float  # used / capacity (0..1)
    window_s: float  # the time the rates cover


def bucket(t: float) -> int:
    """The bucket (start time, whole seconds) time ``t`` falls in."""
    return int(t // BUCKET_S) * BUCKET_S


def forecast(buckets: Mapping[int, tuple[int, int]], *, now: float, used: int, capacity: int,
             created_at: float = 0.0, window_s: float = WINDOW_S) -> PoolForecast:
    """``buckets``: bucket start -> (allocations, releases). Buckets that end before the
    window are ignored, as are those from the future (clock skew between replicas)."""
    start = now - window_s
    allocs = releases = 0
    for b, (a, r) in buckets.items():
        if b + BUCKET_S <= start or b > now:
            continue
        allocs += a
        releases += r
    covered = window_s
    if created_at > 0:
        covered = min(covered, max(now - created_at, 0.0))
    covered = max(covered, float(BUCKET_S))
    a_h = allocs * 3600.0 / covered
    r_h = releases * 3600.0 / covered
    net = a_h - r_h
    free = max(capacity - used, 0)
    eta: float | None
    if free == 0 and capacity > 0:
        eta = 0.0
    elif net > 0:
        eta = free / net * 3600.0
    else:
        eta = None
    full = used / capacity if capacity > 0 else 1.0
    return PoolForecast(alloc_per_h=round(a_h, 3), release_per_h=round(r_h, 3), net_per_h=round(net, 3),
                        exhaustion_s=None if eta is None else round(eta, 1), fullness=round(full, 4),
                        window_s=covered)


def crossed(before_used: int, after_used: int, capacity: int, levels: Sequence[float] = LEVELS) -> list[float]:
    """The levels the pool's fullness rose across (``before < level * capacity <= after``)."""
    if capacity <= 0 or after_used <= before_used:
        return []
    return [lv for lv in levels if before_used < math.ceil(lv * capacity) <= after_used]


def expired(buckets: Sequence[int], now: float, keep_s: float = KEEP_S) -> list[int]:
    """The bucket starts old enough to drop."""
    return [b for b in buckets if b + BUCKET_S <= now - keep_s]


def human_duration(s: float | None) -> str:
    """``None`` -> ``never`` (not filling); seconds -> ``45s``, ``12m``, ``3.5h``, ``4.2d``."""
    if s is None:
        return "never"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    if s < 86400:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"
