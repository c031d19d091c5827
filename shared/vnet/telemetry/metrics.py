"""Operation counters of one process: counts, errors by code, duration histogram.

Each service keeps these in memory and reports a cumulative snapshot to the
metrics service, which exposes them as ``vnet_operations_total{service,op}``,
``vnet_operation_errors_total{service,op,code}`` and
``vnet_operation_duration_seconds{service,op}``.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from vnet.contracts.messages import LabeledCount, MetricsReport, OpCounter

# Buckets sized for a control plane whose floor is ~0.1 ms and whose attaches reach 100 ms.
BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


@dataclass
class _Op:
    count: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    sum_s: float = 0.0
    exemplars: dict[int, tuple[str, float, float]] = field(default_factory=dict)


class OpMetrics:
    def __init__(self, service: str, instance: str) -> None:
        self.service = service
        self.instance = instance
        self.started = time.time()
        self._ops: dict[str, _Op] = {}
        self._counts: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}

    def observe(self, op: str, duration_s: float, error_code: str | None = None,
                trace_id: str | None = None) -> None:
        """``trace_id``: the request's trace when it is recorded (sampled): kept as its
        bucket's exemplar (the latest one per bucket)."""
        o = self._ops.get(op)
        if o is None:
            o = self._ops[op] = _Op()
        o.count += 1
        o.sum_s += duration_s
        i = bisect.bisect_left(BUCKETS, duration_s)
        o.buckets[i] += 1
        if trace_id is not None:
            o.exemplars[i] = (trace_id, duration_s, time.time())
        if error_code is not None:
            o.errors[error_code] = o.errors.get(error_code, 0) + 1

    def count(self, name: str, n: int = 1, **labels: str) -> None:
        """Add ``n`` to the counter ``name`` (``vnet_..._total`` without the suffix) with these labels."""
        k = (name, tuple(sorted(labels.items())))
        self._counts[k] = self._counts.get(k, 0) + n

    def totals(self) -> tuple[int, int]:
        return (sum(o.count for o in self._ops.values()),
                sum(sum(o.errors.values()) for o in self._ops.values()))

    def snapshot(self) -> MetricsReport:
        ops = []
        for name, o in sorted(self._ops.items()):
            cum, acc = [], 0
            for b in o.buckets:
                acc += b
                cum.append(acc)
            ops.append(OpCounter(op=name, count=o.count, errors=dict(o.errors), bucket_counts=cum, sum_s=o.sum_s,
                                 exemplars=[(i, t, v, ts) for i, (t, v, ts) in sorted(o.exemplars.items())]))
        counters = [LabeledCount(name=name, labels=dict(lbl), value=v)
                    for (name, lbl), v in sorted(self._counts.items())]
        return MetricsReport(service=self.service, instance=self.instance, started=self.started,
                             buckets=list(BUCKETS), ops=ops, counters=counters)
