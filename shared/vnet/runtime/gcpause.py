"""The cyclic garbage collector's pauses: watched in every process, tuned where the heap is large.

CPython's collector stops the whole interpreter, event loop included, while it walks the
objects of a generation. A full (generation 2) collection walks every tracked object, so its
pause grows with the heap: a simulated fleet of 250 node workers in one process (125 MB,
each node's desired state and consumers) paused 250-635 ms every ~15 s during the
1,000-node scale bench (3 Dec, ``tests/bench/bench_scale.py``), and every create addressed
to one of its nodes in that moment waited for it: most of the p99 of that row
(docs/scale.md). A control-plane service keeps no such state (its records live in Redis)
and is not tuned.

:func:`watch` (the launcher calls it in every process) times each collection, keeps the
totals in :data:`STATS` and logs one warning per pause of at least ``warn_s``, so a pause
shows up next to the request it held up. :func:`tune_for_large_heap`, for a process that
has just built a large long-lived state: that state is moved out of the collector's sight
(:func:`gc.freeze`; it is still freed by reference counting) and the young generations are
collected less often, so a full collection comes rarely and walks only what came since.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

WARN_S = 0.1


@dataclass
class GcStats:
    """Collections and their pause seconds per generation since :func:`watch`."""

    collections: list[int] = field(default_factory=lambda: [0, 0, 0])
    pause_s: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    longest_s: float = 0.0


STATS = GcStats()
_state: dict[str, Any] = {"start": 0.0, "warn_s": WARN_S, "cb": None}


def _callback(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _state["start"] = time.perf_counter()
        return
    took = time.perf_counter() - _state["start"]
    gen = info.get("generation", 2)
    STATS.collections[gen] += 1
    STATS.pause_s[gen] += took
    STATS.longest_s = max(STATS.longest_s, took)
    if took >= _state["warn_s"]:
        log.warning("garbage collection of generation %d paused this process %.0f ms (%d collected, %d objects "
                    "frozen)", gen, took * 1e3, info.get("collected", 0), gc.get_freeze_count())


def watch(warn_s: float = WARN_S) -> None:
    """Time every collection of this process (idempotent)."""
    _state["warn_s"] = warn_s
    if _state["cb"] is None:
        _state["cb"] = _callback
        gc.callbacks.append(_callback)


def unwatch() -> None:
    cb = _state["cb"]
    if cb is not None:
        gc.callbacks.remove(cb)
        _state["cb"] = None


def tune_for_large_heap(gen0: int = 50_000, gen1: int = 20, gen2: int = 100) -> None:
    """Freeze what the process holds now and collect the young generations less often (the
    defaults are 700, 10, 10: a gen-2 pass every ~70,000 net allocations)."""
    gc.collect()  # garbage left from start-up is not frozen with the state
    gc.freeze()
    gc.set_threshold(gen0, gen1, gen2)
    log.info("garbage collector tuned for a large heap: %d objects frozen, thresholds %d/%d/%d",
             gc.get_freeze_count(), gen0, gen1, gen2)
