"""Address forecast arithmetic (vnet.core.forecast), with the expected numbers written out."""

from __future__ import annotations

import pytest

from vnet.core import forecast as fc

NOW = 1_000_000.0  # a bucket boundary plus 40 s: 999_960 is the current bucket's start


def test_bucket() -> None:
    assert fc.bucket(NOW) == 999_960 and fc.bucket(999_960) == 999_960 and fc.bucket(999_959.9) == 999_900


def test_rates_over_the_window_and_time_to_exhaustion() -> None:
    # 30 allocations and 10 releases in the last 15 minutes of an old pool: 120/h in, 40/h out
    b = {fc.bucket(NOW) - 60 * k: (2, 0) for k in range(15)}
    b[fc.bucket(NOW)] = (2, 10)
    f = fc.forecast(b, now=NOW, used=200, capacity=280, created_at=NOW - 86400)
    assert (f.alloc_per_h, f.release_per_h, f.net_per_h) == (120.0, 40.0, 80.0)
    assert f.exhaustion_s == 3600.0  # 80 free at 80/h: one hour
    assert f.fullness == pytest.approx(200 / 280, abs=1e-4) and f.window_s == fc.WINDOW_S


def test_buckets_outside_the_window_or_in_the_future_do_not_count() -> None:
    b = {fc.bucket(NOW - 16 * 60): (100, 0), fc.bucket(NOW + 120): (100, 0), fc.bucket(NOW): (15, 0)}
    f = fc.forecast(b, now=NOW, used=10, capacity=100)
    assert f.alloc_per_h == 60.0  # only the current bucket: 15 in 15 minutes


def test_young_pool_rate_over_its_age_but_at_least_one_bucket() -> None:
    f = fc.forecast({fc.bucket(NOW): (10, 0)}, now=NOW, used=10, capacity=254, created_at=NOW - 120)
    assert f.window_s == 120.0 and f.alloc_per_h == 300.0
    assert f.exhaustion_s == pytest.approx(244 / 300 * 3600, abs=0.1)
    g = fc.forecast({fc.bucket(NOW): (1, 0)}, now=NOW, used=1, capacity=254, created_at=NOW - 1)
    assert g.window_s == 60.0 and g.alloc_per_h == 60.0  # one allocation is not an infinite rate


def test_not_filling_and_full() -> None:
    assert fc.forecast({fc.bucket(NOW): (5, 5)}, now=NOW, used=5, capacity=10).exhaustion_s is None
    assert fc.forecast({fc.bucket(NOW): (1, 9)}, now=NOW, used=5, capacity=10).net_per_h < 0
    assert fc.forecast({}, now=NOW, used=10, capacity=10).exhaustion_s == 0.0
    assert fc.forecast({}, now=NOW, used=0, capacity=10).exhaustion_s is None


@pytest.mark.parametrize(("before", "after", "cap", "want"), [
    (7, 8, 10, [0.8]),  # ceil(0.8 * 10) = 8
    (8, 9, 10, []),  # already above 80 %, below 95 % (ceil(9.5) = 10)
    (9, 10, 10, [0.95]),
    (0, 10, 10, [0.8, 0.95]),  # one jump across both
    (202, 203, 254, []),  # a /24: 80 % of 254 is 203.2, reached at 204
    (203, 204, 254, [0.8]),
    (8, 7, 10, []),  # falling never announces
    (0, 1, 0, []),
])
def test_crossed(before: int, after: int, cap: int, want: list[float]) -> None:
    assert fc.crossed(before, after, cap) == want


def test_expired_and_human() -> None:
    assert fc.expired([int(NOW) - fc.KEEP_S - 60, int(NOW) - fc.KEEP_S, fc.bucket(NOW)], NOW) == [
        int(NOW) - fc.KEEP_S - 60]
    assert [fc.human_duration(x) for x in (None, 45, 720, 12600, 363000)] == ["never", "45s", "12m", "3.5h", "4.2d"]
