"""Benchmark: the service pattern against a bare nats-py responder.

Run it as a script (pytest does not collect it: the name does not start with ``test_``)::

    python -m tests.bench.bench_service_pattern            # 20,000 requests per row
    python tests/bench/bench_service_pattern.py -n 5000 --inflight 64
    python -m tests.bench.bench_service_pattern --split    # responders in a child process

It starts its own nats-server (``vnet.runtime.servers``) in a temporary directory and
removes both when it ends. One client connection drives every row with the same code
(``nc.request`` from ``--inflight`` concurrent workers), so the rows differ only in what
answers:

* ``bare nats-py responder``: ``nc.subscribe(subject, cb=...)`` whose callback answers
  ``msg.respond(b'{"ok":true}')`` — the floor;
* ``pattern, SDK tracer, every span recorded``: a trivial op through
  :mod:`vnet.runtime.service` with an SDK ``TracerProvider()`` and no exporter: every
  request's span is created, recorded, timed and ended, its trace id returned in
  ``Vnet-Trace-Id``; operation metrics on. **The target row** (>= 60% of bare);
* ``pattern, SDK tracer as setup_tracing makes it``: the provider a VNet process installs
  (``vnet.telemetry.tracing.make_tracer_provider``); without an OTLP endpoint it makes
  and propagates trace ids but records no span nobody could export;
* ``pattern, no-op tracer``: the OpenTelemetry no-op provider (no trace ids at all);
* ``pattern, SDK tracer, traced client``: as the target row, but the client sends a
  ``traceparent`` from a ``publish`` span of its own (``vnet.adapters.nats.request``,
  what ``VNetManager`` and ``Ctx.request`` do), so both ends pay for tracing.

By default responders and client share one process and one event loop (the service and
the bare responder each have their own connection). With ``--split`` each responder
runs in a child process and the table adds its CPU time per request, which is what
bounds a real service's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracerProvider

if __package__ in (None, ""):  # run as a file: make the repo importable as ``tests``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vnet.adapters import nats as nats_adapter
from vnet.contracts.messages import Empty
from vnet.contracts.subjects import Subject
from vnet.runtime import servers, service
from vnet.runtime.config import VNetConfig
from vnet.telemetry import tracing

ROOT = Path(__file__).resolve().parents[2]
BARE_SUBJECT = "bench.bare"
PATTERN_SUBJECT = Subject("vnet.bench.ping")


class Pong(msgspec.Struct):
    ok: bool = True


BENCH = service.ServiceDef("bench", "benchmark: a trivial op", uses_redis=False)


@BENCH.op("ping", PATTERN_SUBJECT, Empty)
async def _ping(ctx: service.Ctx, req: Empty) -> Pong:
    return Pong()


# name -> (responder kind, tracer provider, traced client)
ROWS: dict[str, tuple[str, str, bool]] = {
    "bare nats-py responder": ("bare", "", False),
    "pattern, SDK tracer, every span recorded": ("pattern", "sdk", False),
    "pattern, SDK tracer as setup_tracing makes it": ("pattern", "production", False),
    "pattern, no-op tracer": ("pattern", "noop", False),
    "pattern, SDK tracer, traced client": ("pattern", "sdk", True),
}
TARGET_ROW = "pattern, SDK tracer, every span recorded"


def make_provider(kind: str) -> TracerProvider | NoOpTracerProvider | None:
    if kind == "sdk":
        return TracerProvider()
    if kind == "production":
        provider = tracing.make_tracer_provider("bench")
        assert isinstance(provider, TracerProvider | NoOpTracerProvider)
        return provider
    if kind == "noop":
        return NoOpTracerProvider()
    return None


@dataclass
class Row:
    name: str
    n: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float | None = None

    @property
    def rps(self) -> float:
        return self.n / self.seconds


Send = Callable[[], Awaitable[None]]


async def drive(send: Send, n: int, inflight: int) -> tuple[float, list[float]]:
    """``n`` calls of ``send`` from ``inflight`` concurrent workers; wall time and latencies."""
    lat: list[float] = []
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            await send()
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return time.perf_counter() - t0, lat


def _row(name: str, n: int, secs: float, lat: list[float], cpu: float | None = None) -> Row:
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return Row(name, n, secs, q[49] * 1e3, q[98] * 1e3, cpu)


def _senders(client: Client) -> dict[tuple[str, bool], Send]:
    body = b"{}"
    subject = PATTERN_SUBJECT.template

    async def send_bare() -> None:
        await client.request(BARE_SUBJECT, body, timeout=10.0)

    async def send_pattern() -> None:
        msg = await client.request(subject, body, timeout=10.0)
        if msg.headers and "Nats-Service-Error-Code" in msg.headers:
            raise RuntimeError(f"error reply: {msg.data!r}")

    async def send_traced() -> None:
        await nats_adapter.request(client, PATTERN_SUBJECT, body, Pong, timeout=10.0)

    return {("bare", False): send_bare, ("pattern", False): send_pattern, ("pattern", True): send_traced}


async def start_responder(kind: str, url: str, inflight: int) -> Callable[[], Awaitable[None]]:
    """Start one responder on its own connection; returns its stop function."""
    if kind == "bare":
        nc: Client = await nats.connect(url, name="bench-bare")

        async def on_bare(msg: Msg) -> None:
            await msg.respond(b'{"ok":true}')

        await nc.subscribe(BARE_SUBJECT, queue="bare", cb=on_bare)
        await nats_adapter.flush(nc)
        return nc.close
    cfg = VNetConfig.load(env={}, nats_url=url, max_inflight=inflight * 4, metrics_report_interval_s=2.0)
    rt = await service.start(BENCH, cfg)

    async def stop() -> None:
        await rt.stop(drain_timeout=5.0)

    return stop


async def run_inprocess(url: str, n: int, inflight: int, warmup: int, rounds: int) -> list[Row]:
    client: Client = await nats.connect(url, name="bench-client")
    stops = [await start_responder("bare", url, inflight), await start_responder("pattern", url, inflight)]
    senders = _senders(client)
    best: dict[str, Row] = {}
    try:
        for _ in range(rounds):  # interleaved rounds, best of each: fair on a busy machine
            for name, (kind, provider, traced) in ROWS.items():
                tracing.use_tracer_provider(make_provider(provider))
                send = senders[(kind, traced)]
                await drive(send, warmup, inflight)
                secs, lat = await drive(send, n, inflight)
                row = _row(name, n, secs, lat)
                if name not in best or row.rps > best[name].rps:
                    best[name] = row
    finally:
        tracing.use_tracer_provider(None)
        for stop in stops:
            await stop()
        await client.close()
    return [best[name] for name in ROWS]


async def run_split(url: str, n: int, inflight: int, warmup: int, rounds: int) -> list[Row]:
    client: Client = await nats.connect(url, name="bench-client")
    senders = _senders(client)
    best: dict[str, Row] = {}
    try:
        for _ in range(rounds):
            for name, (kind, provider, traced) in ROWS.items():
                child = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tests.bench.bench_service_pattern", "--serve", kind,
                    "--provider", provider or "none", "--url", url, "--inflight", str(inflight),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT)
                assert child.stdin is not None and child.stdout is not None
                try:
                    assert (await child.stdout.readline()).strip() == b"ready"
                    send = senders[(kind, traced)]
                    await drive(send, warmup, inflight)
                    child.stdin.write(b"start\n")
                    assert (await child.stdout.readline()).strip() == b"started"
                    secs, lat = await drive(send, n, inflight)
                    child.stdin.write(b"stop\n")
                    cpu = float(await child.stdout.readline()) / n * 1e6
                finally:
                    if child.returncode is None:
                        child.kill()
                    await child.wait()
                row = _row(name, n, secs, lat, cpu)
                if name not in best or row.rps > best[name].rps:
                    best[name] = row
    finally:
        await client.close()
    return [best[name] for name in ROWS]


async def serve(kind: str, provider: str, url: str, inflight: int) -> None:
    """Child process of ``--split``: answer until told to stop, report CPU seconds in between."""
    if provider != "none":
        tracing.use_tracer_provider(make_provider(provider))
    stop = await start_responder(kind, url, inflight)
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    c0 = time.process_time()
    print("started", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    print(time.process_time() - c0, flush=True)
    await stop()


def table(rows: list[Row], inflight: int, split: bool) -> str:
    base = rows[0].rps
    head = f"{'responder':<46} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'vs bare':>8}"
    if split:
        head += f" {'server CPU/req':>15}"
    out = [head, "-" * len(head)]
    for r in rows:
        line = f"{r.name:<46} {r.rps:>11,.0f} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} {r.rps / base:>7.0%}"
        if split and r.server_cpu_us is not None:
            line += f" {r.server_cpu_us:>12.1f} us"
        out.append(line)
    where = "responders in child processes" if split else "client and responders in one process"
    out.append(f"({rows[0].n:,} requests per row, {inflight} in flight, best of the rounds, {where})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("-n", type=int, default=20_000, help="requests per row (default 20,000; at most 1,000,000)")
    p.add_argument("--inflight", type=int, default=64, help="requests in flight (default 64)")
    p.add_argument("--warmup", type=int, default=2_000, help="requests before each measured row")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each row is kept")
    p.add_argument("--split", action="store_true", help="run each responder in a child process")
    p.add_argument("--min-ratio", type=float, default=0.6,
                   help=f"exit 1 when '{TARGET_ROW}' keeps less than this share of the bare throughput")
    p.add_argument("--serve", choices=["bare", "pattern"], help=argparse.SUPPRESS)
    p.add_argument("--provider", default="none", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve, args.provider, args.url, args.inflight))
        return 0
    n = max(100, min(args.n, 1_000_000))
    rounds = max(1, args.rounds)
    tmp = Path(tempfile.mkdtemp(prefix="vnet-bench-"))
    srv = servers.start_nats(tmp / "nats")
    try:
        runner = run_split if args.split else run_inprocess
        rows = asyncio.run(runner(srv.url, n, args.inflight, args.warmup, rounds))
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows, args.inflight, args.split))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    target = next(r for r in rows if r.name == TARGET_ROW)
    ratio = target.rps / rows[0].rps
    if ratio < args.min_ratio:
        print(f"'{TARGET_ROW}' keeps {ratio:.0%} of the bare responder's throughput "
              f"(target {args.min_ratio:.0%})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
