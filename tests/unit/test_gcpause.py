"""The collector's pauses are timed in every process; a large heap is frozen and collected less often."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import pytest

from vnet.runtime import gcpause


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gcpause.unwatch()
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_a_collection_is_counted_and_a_long_one_logged(restore_gc: None, caplog: pytest.LogCaptureFixture) -> None:
    before = list(gcpause.STATS.collections)
    gcpause.watch(warn_s=0.0)  # every pause is "long"
    gcpause.watch(warn_s=0.0)  # idempotent: one callback
    assert gc.callbacks.count(gcpause._callback) == 1
    with caplog.at_level(logging.WARNING, logger="vnet.runtime.gcpause"):
        gc.collect(2)
    assert gcpause.STATS.collections[2] == before[2] + 1
    assert gcpause.STATS.pause_s[2] > 0 and gcpause.STATS.longest_s > 0
    assert any("generation 2 paused this process" in r.getMessage() for r in caplog.records)
    gcpause.unwatch()
    gc.collect(2)
    assert gcpause.STATS.collections[2] == before[2] + 1  # no longer watched


def test_a_large_heap_is_frozen_and_its_young_generations_collected_less_often(restore_gc: None) -> None:
    state = [{"n": i} for i in range(20_000)]  # long-lived state a process just built
    gcpause.tune_for_large_heap(gen0=50_000, gen1=20, gen2=100)
    assert gc.get_threshold() == (50_000, 20, 100)
    assert gc.get_freeze_count() >= len(state)  # out of the collector's sight
    collected_ids = {id(o) for o in gc.get_objects(2)}
    assert not any(id(d) in collected_ids for d in state[:100])
