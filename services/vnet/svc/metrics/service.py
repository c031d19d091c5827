"""Metrics: serves Prometheus ``/metrics``.

* ``vnet_networks_total`` / ``vnet_endpoints_total``: gauges read from the state in
  Redis (the indexes the network and endpoint services keep), refreshed after network
  and endpoint events (at most every ``EVENT_REFRESH_S``: a burst of creates costs a
  read per period, not one per event) and every ``REFRESH_S``;
* ``vnet_operations_total{service,op}``, ``vnet_operation_errors_total{service,op,code}``,
  ``vnet_operation_duration_seconds{service,op}``: summed over the cumulative reports
  every service instance publishes on ``vnet.metrics.report.<service>.<instance>``;
* ``vnet_events_total{domain,event}``: events published since this instance started,
  heard on the bus with a plain subscription (no consumer to ack: counting cost a
  delivery, an ack and a Redis read per event, 22 % of a core during the scale bench's
  creates); the copies addressed to one node (``vnet.node.<node>.evt...``, core NATS)
  are not on ``vnet.evt.>``;
* per IPAM pool (``network_id``, ``family``), from ``vnet.ipam.pool.list`` every
  ``POOLS_REFRESH_S``: ``vnet_ipam_pool_capacity``, ``vnet_ipam_pool_used``,
  ``vnet_ipam_pool_fullness_ratio``, ``vnet_ipam_pool_alloc_per_hour``,
  ``vnet_ipam_pool_release_per_hour`` and ``vnet_ipam_pool_exhaustion_seconds`` (the time
  to exhaustion at the current rate; absent for a pool that is not filling).
* counters a report names itself (``MetricsReport.counters``), exposed only when listed
  in ``LABELED_COUNTERS`` with exactly its labels: ``vnet_dns_queries_total{service,node,rcode}``,
  ``vnet_node_reconciles_total{service,node,scope}``, ``vnet_node_kernel_writes_total{service,node,scope}``
  and ``vnet_node_drift_repairs_total{service,node,kind}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar

from vnet.contracts import subjects
from vnet.contracts.ipam import PoolInfo, PoolList, PoolsReply
from vnet.contracts.messages import Empty, MetricsReport, MetricsSummary
from vnet.core import errors as E
from vnet.runtime.ports import ENDPOINTS_INDEX, NETWORKS_INDEX
from vnet.runtime.service import Ctx, Runtime, ServiceDef

log = logging.getLogger(__name__)

SERVICE = ServiceDef("metrics", "Metrics: Prometheus /metrics for networks, endpoints and operations")

REFRESH_S = 2.0
EVENT_REFRESH_S = 0.2
POOLS_REFRESH_S = 10.0
POOL_GAUGES: tuple[tuple[str, str], ...] = (
    ("vnet_ipam_pool_capacity", "Assignable addresses of an IPAM pool"),
    ("vnet_ipam_pool_used", "Addresses allocated in an IPAM pool"),
    ("vnet_ipam_pool_fullness_ratio", "Used / capacity of an IPAM pool (0..1)"),
    ("vnet_ipam_pool_alloc_per_hour", "Allocations per hour in an IPAM pool (last 15 minutes)"),
    ("vnet_ipam_pool_release_per_hour", "Releases per hour in an IPAM pool (last 15 minutes)"),
    ("vnet_ipam_pool_exhaustion_seconds", "Time until an IPAM pool is full at the current net allocation rate"),
)


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reports: dict[tuple[str, str], MetricsReport] = {}
        self.networks = 0
        self.endpoints = 0
        self.events: dict[tuple[str, str], int] = {}
        self.http_port = 0
        self.pools: list[PoolInfo] = []


class VNetCollector(Collector):
    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterable[Any]:
        st = self.state
        with st.lock:
            reports = list(st.reports.values())
            networks, endpoints = st.networks, st.endpoints
            events = dict(st.events)
            pools = list(st.pools)
        yield GaugeMetricFamily("vnet_networks_total", "Virtual networks that exist", value=networks)
        yield GaugeMetricFamily("vnet_endpoints_total", "Endpoints that exist", value=endpoints)
        ops = CounterMetricFamily("vnet_operations", "Operations handled, by service and op",
                                  labels=["service", "op"])
        errs = CounterMetricFamily("vnet_operation_errors", "Operations that failed, by service, op and code",
                                   labels=["service", "op", "code"])
        dur = HistogramMetricFamily("vnet_operation_duration_seconds", "Time to handle an operation",
                                    labels=["service", "op"])
        # Sum the instances of one service: replicas are one logical service.
        count: dict[tuple[str, str], int] = {}
        ecount: dict[tuple[str, str, str], int] = {}
        hist: dict[tuple[str, str], tuple[list[float], list[int], float]] = {}
        # per (service, op) and bucket: the latest sampled request of any instance
        exemplars: dict[tuple[str, str], dict[int, tuple[str, float, float]]] = {}
        for r in reports:
            for o in r.ops:
                k = (r.service, o.op)
                count[k] = count.get(k, 0) + o.count
                for code, n in o.errors.items():
                    ek = (r.service, o.op, code)
                    ecount[ek] = ecount.get(ek, 0) + n
                bounds, buckets, total = hist.get(k, (r.buckets, [0] * len(o.bucket_counts), 0.0))
                hist[k] = (bounds, [a + b for a, b in zip(buckets, o.bucket_counts, strict=False)],
                           total + o.sum_s)
                ex = exemplars.setdefault(k, {})
                for i, tid, v, ts in o.exemplars:
                    if i not in ex or ex[i][2] < ts:
                        ex[i] = (tid, v, ts)
        for k, n in sorted(count.items()):
            ops.add_metric(list(k), n)
        for ek, n in sorted(ecount.items()):
            errs.add_metric(list(ek), n)
        for k, (bounds, buckets, total) in sorted(hist.items()):
            les = [*(str(b) for b in bounds), "+Inf"]
            ex = exemplars.get(k, {})
            rows: list[Any] = []
            for i, (le, n) in enumerate(zip(les, buckets, strict=False)):
                got = ex.get(i)
                # exemplars appear in the OpenMetrics exposition (what Prometheus asks for)
                rows.append((le, n, Exemplar({"trace_id": got[0]}, got[1], got[2])) if got else (le, n))
            dur.add_metric(list(k), rows, total)
        yield ops
        yield errs
        yield dur
        ev = CounterMetricFamily("vnet_events", "Domain events seen on VNET_EVENTS", labels=["domain", "event"])
        for (d, e), n in sorted(events.items()):
            ev.add_metric([d, e], n)
        yield ev
        yield from _pool_gauges(pools)
        yield from _labeled_counters(reports)


# A report may name its own counters; only these names, with these labels, are exposed, so a
# confused or hostile reporter cannot mint series (labels are a cardinality budget).
LABELED_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vnet_dns_queries": ("DNS queries answered by a node's resolver, by rcode", ("node", "rcode")),
    # node workers (svc/node/drift.py NodeMetrics): kernel writes per reconcile is the ratio
    "vnet_node_reconciles": ("Reconciles of a node worker, full (resync) or scoped (events)", ("node", "scope")),
    "vnet_node_kernel_writes": ("Kernel writes (netlink requests, sysctls) made by a node worker's reconciles",
                                ("node", "scope")),
    "vnet_node_drift_repairs": ("Drift a node worker repaired, by kind (resync: found by its periodic resync)",
                                ("node", "kind")),
    "vnet_endpoint_lookups": ("Network and node lookups of the endpoint service's attaches and detaches, answered "
                              "from its caches (hit) or read (miss): svc/endpoint/lookups.py", ("what", "result")),
    "vnet_node_event_gaps": ("Times a node worker may have missed events addressed to it (it reconnected to NATS, "
                             "a handler failed) and resynced at once", ("node",)),
}


def _labeled_counters(reports: Iterable[MetricsReport]) -> Iterable[CounterMetricFamily]:
    sums: dict[str, dict[tuple[str, ...], int]] = {}
    for r in reports:
        for c in r.counters:
            spec = LABELED_COUNTERS.get(c.name)
            if spec is None or set(c.labels) != set(spec[1]):
                continue
            key = (r.service, *(c.labels[k] for k in spec[1]))
            per = sums.setdefault(c.name, {})
            per[key] = per.get(key, 0) + c.value
    for name, (doc, labels) in LABELED_COUNTERS.items():
        fam = CounterMetricFamily(name, doc, labels=["service", *labels])
        for key, v in sorted(sums.get(name, {}).items()):
            fam.add_metric(list(key), v)
        yield fam


def _pool_gauges(pools: list[PoolInfo]) -> Iterable[GaugeMetricFamily]:
    fams = {name: GaugeMetricFamily(name, doc, labels=["network_id", "family"]) for name, doc in POOL_GAUGES}
    for p in pools:
        lbl = [p.network_id, str(p.family)]
        fams["vnet_ipam_pool_capacity"].add_metric(lbl, p.capacity)
        fams["vnet_ipam_pool_used"].add_metric(lbl, p.used)
        f = p.forecast
        fams["vnet_ipam_pool_fullness_ratio"].add_metric(lbl, f.fullness if f else
                                                         (p.used / p.capacity if p.capacity else 1.0))
        if f is None:
            continue
        fams["vnet_ipam_pool_alloc_per_hour"].add_metric(lbl, f.alloc_per_h)
        fams["vnet_ipam_pool_release_per_hour"].add_metric(lbl, f.release_per_h)
        if f.exhaustion_s is not None:
            fams["vnet_ipam_pool_exhaustion_seconds"].add_metric(lbl, f.exhaustion_s)
    yield from fams.values()


async def _refresh_pools(rt: Runtime, st: State) -> None:
    """Every pool with its forecast, from the IPAM service (a page at a time)."""
    pools: list[PoolInfo] = []
    cursor: str | None = None
    try:
        while True:
            page = await rt.request(subjects.IPAM_POOL_LIST, PoolList(limit=1000, cursor=cursor), PoolsReply)
            pools += page.pools
            cursor = page.next_cursor
            if cursor is None:
                break
    except Exception as exc:  # IPAM down or slow: keep the last picture
        log.debug("cannot list IPAM pools: %s", exc)
        return
    with st.lock:
        st.pools = pools


async def _refresh(rt: Runtime, st: State) -> None:
    try:
        pipe = rt.redis.pipeline(transaction=False)
        pipe.scard(NETWORKS_INDEX)
        pipe.scard(ENDPOINTS_INDEX)
        n, e = await pipe.execute()
        with st.lock:
            st.networks, st.endpoints = int(n), int(e)
    except Exception as exc:
        log.warning("cannot read state from Redis: %s", exc)


@SERVICE.starting
async def _start(rt: Runtime) -> None:
    from prometheus_client.exposition import start_http_server

    st = State()
    rt.state["metrics"] = st
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VNetCollector(st))
    host, port = rt.config.metrics_http_host, rt.config.metrics_http_port
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise E.make(E.UNAVAILABLE, f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; free the "
                     "port or choose another with VNET_METRICS_HTTP_PORT (0 picks a free one)",
                     host=host, port=port) from None
    st.http_port = int(server.server_address[1])
    rt.state["http"] = (server, thread)

    async def on_report(msg: Msg) -> None:
        try:
            rep = msgspec.json.decode(msg.data, type=MetricsReport)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("ignoring malformed metrics report on %s", msg.subject)
            return
        with st.lock:
            st.reports[(rep.service, rep.instance)] = rep

    changed = asyncio.Event()  # a network or endpoint event came: the gauges are read again

    async def on_event(msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) < 4 or parts[2] == "to":  # an older endpoint service's copy addressed to a node
            return
        with st.lock:
            k = (parts[2], parts[3])
            st.events[k] = st.events.get(k, 0) + 1
        if parts[2] in ("network", "endpoint"):
            changed.set()

    try:
        # Every metrics replica hears every report (no queue group), so each serves the whole picture.
        rt.state["report_sub"] = await rt.nc.subscribe(subjects.METRICS_REPORT.wildcard(), cb=on_report)
        # ... and every event (JetStream publishes reach plain subscribers too)
        rt.state["event_sub"] = await rt.nc.subscribe(subjects.EVENTS_WILDCARD, cb=on_event)
    except BaseException:  # the runtime runs no stop hook after a failed start
        await _stop(rt)
        raise

    async def refresher() -> None:
        while True:
            changed.clear()  # an event during the read below brings the next one at once
            await _refresh(rt, st)
            await asyncio.sleep(EVENT_REFRESH_S)  # one read per period however many events come
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), REFRESH_S - EVENT_REFRESH_S)

    async def pool_refresher() -> None:
        while True:
            await _refresh_pools(rt, st)
            await asyncio.sleep(POOLS_REFRESH_S)

    rt.spawn(refresher(), "refresh")
    rt.spawn(pool_refresher(), "pools")
    log.info("serving /metrics on http://%s:%d/metrics", host, st.http_port)


@SERVICE.stopping
async def _stop(rt: Runtime) -> None:
    for key in ("report_sub", "event_sub"):
        sub: Subscription | None = rt.state.pop(key, None)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe %s: %s", sub.subject, exc)
    http = rt.state.pop("http", None)
    if http:
        server, _thread = http
        # shutdown() blocks until serve_forever notices (up to its 0.5 s poll): not on the loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()


async def _http_check(rt: Runtime) -> tuple[str, str]:
    st: State | None = rt.state.get("metrics")
    return "http", "ok" if st and st.http_port else "not serving"


SERVICE.health_checks.append(_http_check)


@SERVICE.op("summary", subjects.METRICS_SUMMARY, Empty)
async def summary(ctx: Ctx, req: Empty) -> MetricsSummary:
    st: State = ctx.rt.state["metrics"]
    await _refresh(ctx.rt, st)
    with st.lock:
        instances: dict[str, list[str]] = {}
        ops: dict[str, int] = {}
        errors: dict[str, int] = {}
        for (svc, inst), r in st.reports.items():
            instances.setdefault(svc, []).append(inst)
            for o in r.ops:
                ops[f"{svc}.{o.op}"] = ops.get(f"{svc}.{o.op}", 0) + o.count
                n = sum(o.errors.values())
                if n:
                    errors[f"{svc}.{o.op}"] = errors.get(f"{svc}.{o.op}", 0) + n
        return MetricsSummary(networks=st.networks, endpoints=st.endpoints, instances=instances,
                              operations=ops, errors=errors)


