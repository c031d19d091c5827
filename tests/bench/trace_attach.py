"""Where a ``create_endpoint(wait=True)`` goes with each service and the node worker in a
process of its own (as ``vnetctl up`` runs them), read from the spans every process records.

Run as root from the repository root::

    .venv/bin/python -m tests.bench.trace_attach --n 40

``profile_attach`` wraps clients and coroutines in one process (every round trip counted, but
one event loop for everything); this one changes no code: the client samples every trace
(``make_tracer_provider(sample_all=True)``), so each service records the spans of the
requests it handles into its local trace file (``$VNET_TRACE_DIR``, a temporary directory
here), and the table is every span name's median start and end, in ms from the client's
request, over the attaches (a Full network with an allow rule selecting the endpoint).
Recording spans costs each process some time: the walls are longer than ``bench_attach_cni``'s
(a fifth to a quarter here), the order and the gaps are what to read. Spans only cover what is
instrumented: a gap between two rows is work without a span of its own (Redis calls in a
handler, the wait for a status, a thread hop).

Everything runs in namespaces this script makes (``<prefix>-...``), removed at the end;
nothing touches the root namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
from opentelemetry import trace

from tests.bench import bench_attach_cni as B
from vnet.telemetry import local_traces, tracing


async def run(n: int) -> list[float]:
    trace.set_tracer_provider(tracing.make_tracer_provider("client", sample_all=True))
    walls: list[float] = []
    async with B.web_stack(n) as st:
        for c in st.containers:
            t = time.perf_counter()
            await st.m.create_endpoint(c, st.network_id, labels={"app": "web"}, wait=True)
            walls.append(time.perf_counter() - t)
            await asyncio.sleep(0.02)  # let each attach's tail (reports, announcements) settle
        await asyncio.sleep(1.0)  # the services' batch processors write every 0.2 s
        flush = getattr(trace.get_tracer_provider(), "force_flush", None)
        if flush is not None:
            flush()
    return walls


def table(traces: Path) -> list[tuple[float, float, str, str, float]]:
    """(median start, median end, service, span name, spans per attach), in start order."""
    by_trace: dict[str, list[local_traces.SpanRecord]] = collections.defaultdict(list)
    for f in traces.glob(f"*{local_traces.SUFFIX}"):
        for line in f.read_bytes().splitlines():
            r = msgspec.json.decode(line, type=local_traces.SpanRecord)
            by_trace[r.trace_id].append(r)
    rows: dict[tuple[str, str], list[tuple[float, float]]] = collections.defaultdict(list)
    attaches = 0
    for spans in by_trace.values():
        roots = [s for s in spans if s.service == "client" and s.name.endswith("vnet.endpoint.create")]
        if not roots:
            continue
        attaches += 1
        t0 = min(s.start_ns for s in roots)
        for s in spans:
            rows[(s.service, s.name)].append(((s.start_ns - t0) / 1e6, (s.end_ns - t0) / 1e6))
    out = [(statistics.median(a for a, _ in v), statistics.median(b for _, b in v), svc, name,
            len(v) / max(1, attaches)) for (svc, name), v in rows.items()]
    return sorted(out)


def main(n: int) -> None:
    traces = Path(tempfile.mkdtemp(prefix=f"{B.PREFIX}-traces-"))
    os.environ["VNET_TRACE_DIR"] = str(traces)  # the services inherit it
    try:
        walls = asyncio.run(run(n))
        rows = table(traces)
    finally:
        shutil.rmtree(traces, ignore_errors=True)
    print(f"\ncreate_endpoint(wait=True), Full network + allow rule, {len(walls)} attaches, each service and the "
          f"node worker in a process of its own, spans recorded: median wall {statistics.median(walls) * 1e3:.1f} ms\n")
    print(f"{'process':<9} {'span':<58} {'/attach':>7} {'start':>7} {'end':>7} {'dur':>6}")
    for st, en, svc, name, per in rows:
        if per < 0.5:  # not on every attach (a resync, a first endpoint's bridge)
            continue
        print(f"{svc:<9} {name:<58} {per:>7.1f} {st:>7.2f} {en:>7.2f} {en - st:>6.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40, help="attaches (default 40)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it makes network namespaces")
    main(args.n)
