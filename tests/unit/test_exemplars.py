"""Exemplars: a sampled request's trace id rides on its latency bucket from the service's
counters through the metrics report to the OpenMetrics exposition of /metrics."""

from __future__ import annotations

import msgspec
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from vnet.contracts.messages import MetricsReport
from vnet.svc.metrics import service as metrics_service
from vnet.telemetry.metrics import BUCKETS, OpMetrics


def test_latest_sampled_request_per_bucket_is_the_exemplar() -> None:
    m = OpMetrics("network", "i1")
    m.observe("create", 0.003, trace_id="a" * 32)
    m.observe("create", 0.004, trace_id="b" * 32)  # same bucket (<= 0.005): the latest wins
    m.observe("create", 0.2)  # not sampled: counted, no exemplar
    m.observe("create", 0.3, "conflict", trace_id="c" * 32)
    (op,) = m.snapshot().ops
    assert [(i, t, v) for i, t, v, _ in op.exemplars] == [
        (BUCKETS.index(0.005), "b" * 32, 0.004), (BUCKETS.index(0.5), "c" * 32, 0.3)]
    # the report survives the wire (array-like counters, the new field last)
    back = msgspec.json.decode(msgspec.json.encode(m.snapshot()), type=MetricsReport)
    assert back.ops[0].exemplars == op.exemplars


def test_openmetrics_exposition_carries_trace_ids() -> None:
    a, b = OpMetrics("network", "i1"), OpMetrics("network", "i2")
    a.observe("create", 0.003, trace_id="a" * 32)
    b.observe("create", 0.004, trace_id="b" * 32)  # newer, same bucket, another replica
    st = metrics_service.State()
    st.reports[("network", "i1")] = a.snapshot()
    st.reports[("network", "i2")] = b.snapshot()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics_service.VNetCollector(st))
    text = generate_latest(reg).decode()
    line = next(x for x in text.splitlines()
                if x.startswith('vnet_operation_duration_seconds_bucket{le="0.005",op="create",service="network"}'))
    assert line.split(" ")[1] == "2.0" and f'# {{trace_id="{"b" * 32}"}} 0.004' in line
    assert "trace_id" not in next(x for x in text.splitlines() if 'le="0.001"' in x)
