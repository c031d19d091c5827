"""Counters a report names itself (``MetricsReport.counters``): summed over instances,
exposed only under a listed name with exactly its labels."""

from __future__ import annotations

import msgspec
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from vnet.contracts.messages import MetricsReport
from vnet.svc.metrics import service as metrics_service
from vnet.telemetry.metrics import OpMetrics


def _exposed(*reports: MetricsReport) -> list[str]:
    st = metrics_service.State()
    for r in reports:
        st.reports[(r.service, r.instance)] = r
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics_service.VNetCollector(st))
    return [x for x in generate_latest(reg).decode().splitlines() if x.startswith("vnet_dns_queries")]


def test_dns_answers_by_rcode_are_summed_per_node_and_unknown_series_are_dropped() -> None:
    a, b = OpMetrics("node", "i1"), OpMetrics("node", "i2")
    for _ in range(3):
        a.count("vnet_dns_queries", node="n1", rcode="NOERROR")
    a.count("vnet_dns_queries", node="n1", rcode="NXDOMAIN")
    b.count("vnet_dns_queries", 2, node="n1", rcode="NOERROR")  # a second instance of the same node
    b.count("vnet_dns_queries", node="n2", rcode="REFUSED")
    b.count("vnet_dns_queries", node="n2", rcode="NOERROR", extra="x")  # a label not listed: dropped
    b.count("vnet_made_up", node="n2")  # a name not listed: dropped
    back = msgspec.json.decode(msgspec.json.encode(b.snapshot()), type=MetricsReport)
    assert {c.name for c in back.counters} == {"vnet_dns_queries", "vnet_made_up"}
    assert sorted(_exposed(a.snapshot(), back)) == [
        'vnet_dns_queries_total{node="n1",rcode="NOERROR",service="node"} 5.0',
        'vnet_dns_queries_total{node="n1",rcode="NXDOMAIN",service="node"} 1.0',
        'vnet_dns_queries_total{node="n2",rcode="REFUSED",service="node"} 1.0',
    ]


def test_a_report_without_counters_still_decodes() -> None:
    old = msgspec.json.encode({"service": "node", "instance": "i", "started": 0.0, "buckets": [], "ops": []})
    assert msgspec.json.decode(old, type=MetricsReport).counters == []
