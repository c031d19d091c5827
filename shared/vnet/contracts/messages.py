"""Request and reply types shared by every service (per-domain types live beside them)."""

from __future__ import annotations

from typing import Annotated

import msgspec

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


class Empty(msgspec.Struct, forbid_unknown_fields=True):
    """A request with no fields (an empty body decodes to this)."""


class HealthReply(msgspec.Struct, kw_only=True):
    service: str
    instance: str
    version: str
    status: str  # "ok" | "degraded"
    uptime_s: float
    checks: dict[str, str] = {}
    inflight: int = 0


class OpCounter(msgspec.Struct, kw_only=True, array_like=True):
    op: str
    count: int
    errors: dict[str, int]
    # Histogram buckets (cumulative counts for the bucket bounds in MetricsReport.buckets).
    bucket_counts: list[int]
    sum_s: float
    # The latest sampled request per bucket: [bucket index, trace id, seconds, unix time]
    # (exemplars: a latency spike on a dashboard links to the trace behind it).
    exemplars: list[tuple[int, str, float, float]] = []


class LabeledCount(msgspec.Struct, kw_only=True, array_like=True):
    """A cumulative counter with labels of its own, exposed as ``<name>_total{service,...labels}``
    (for counts that are not operations, e.g. DNS answers by rcode)."""

    name: str
    labels: dict[str, str]
    value: int


class MetricsReport(msgspec.Struct, kw_only=True):
    """Cumulative counters of one service instance; a newer one replaces the older."""

    service: str
    instance: str
    started: float
    buckets: list[float]
    ops: list[OpCounter]
    counters: list[LabeledCount] = []


class MetricsSummary(msgspec.Struct, kw_only=True):
    networks: int
    endpoints: int
    instances: dict[str, list[str]]
    operations: dict[str, int]
    errors: dict[str, int]
