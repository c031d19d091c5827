"""Session fixtures: a real nats-server and valkey-server on free loopback ports,
an in-memory span exporter, a per-run prefix for everything a test creates."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from vnet.runtime import servers
from vnet.runtime.config import VNetConfig

# Every namespace, process name and temp dir a test makes carries this prefix.
RUN_PREFIX = os.environ.get("VNET_RUN_PREFIX") or f"vt{uuid.uuid4().hex[:5]}"
os.environ["VNET_RUN_PREFIX"] = RUN_PREFIX

_EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
trace.set_tracer_provider(_provider)


@pytest.fixture(scope="session")
def run_prefix() -> str:
    return RUN_PREFIX


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def nats_server(tmp_root: Path) -> Iterator[servers.ServerProc]:
    s = servers.start_nats(tmp_root / "nats")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_root: Path) -> Iterator[servers.ServerProc]:
    s = servers.start_valkey(tmp_root / "valkey")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def config(nats_server: servers.ServerProc, redis_server: servers.ServerProc) -> VNetConfig:
    return VNetConfig.load(env={}, nats_url=nats_server.url, redis_url=redis_server.url,
                           metrics_http_port=0, metrics_report_interval_s=0.2)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
async def start_service(config: VNetConfig) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Start services in this process (``await start_service("ipam")``); stopped after the test."""
    from vnet.runtime import launcher, service

    started: list[service.Runtime] = []

    async def _start(name_or_def: Any, *, params: dict[str, str] | None = None,
                     cfg: VNetConfig | None = None) -> service.Runtime:
        defn = launcher.load_service(name_or_def) if isinstance(name_or_def, str) else name_or_def
        rt = await service.start(defn, cfg or config, params=params)
        started.append(rt)
        return rt

    yield _start
    for rt in reversed(started):
        await rt.stop(drain_timeout=2.0)


def _is_root() -> bool:
    return os.geteuid() == 0


requires_root = pytest.mark.skipif(not _is_root(), reason="needs root to create network namespaces")


@pytest.fixture
def netns(run_prefix: str) -> Iterator[Callable[[str], str]]:
    """Create named network namespaces (``netns("h1")`` -> ``<prefix>-h1``); all are
    deleted at teardown, pass or fail, with every process still inside them."""
    import subprocess

    if not _is_root():
        pytest.skip("needs root to create network namespaces")
    made: list[str] = []

    def _make(name: str) -> str:
        full = f"{run_prefix}-{name}"
        subprocess.run(["ip", "netns", "add", full], check=True, capture_output=True)
        made.append(full)
        subprocess.run(["ip", "-n", full, "link", "set", "lo", "up"], check=True, capture_output=True)
        return full

    yield _make
    for ns in reversed(made):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    # wireguard-go killed with the namespace leaves its control socket behind (named after
    # its interface, which carries the run prefix).
    for sock in Path("/var/run/wireguard").glob(f"{run_prefix}*.sock"):
        sock.unlink(missing_ok=True)
