"""Session fixtures: a real nats-server and valkey-server on free loopback ports,
an in-memory span exporter, a per-run prefix for everything a test creates."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
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


@pytest.fixture(scope="session", autouse=True)
def node_state_dirs() -> Iterator[None]:
    """Node workers started without node_state_dir (nor VNET_STATE_DIR) keep their state in
    /tmp/<prefix>-nodes/<node> under the test suite (vnet.svc.node.lifecycle): removed here."""
    yield
    shutil.rmtree(Path(tempfile.gettempdir()) / f"{RUN_PREFIX}-nodes", ignore_errors=True)


# The session's servers require credentials, as every deployment does (docs/security.md):
# one identity per server here (the per-role matrix has its own tests, test_security_matrix.py), in
# the URLs every test and process of the run is given, so nothing connects anonymously.
_SECRET = secrets.token_urlsafe(18)


@pytest.fixture(scope="session")
def nats_server(tmp_root: Path) -> Iterator[servers.ServerProc]:
    conf = tmp_root / "nats-auth.conf"
    conf.write_text(f'authorization {{\n  user: "vnet-test"\n  password: "{_SECRET}"\n}}\n')
    conf.chmod(0o600)
    s = servers.start_nats(tmp_root / "nats", config_file=conf)
    s = dataclasses.replace(s, url=s.url.replace("nats://", f"nats://vnet-test:{_SECRET}@", 1))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_root: Path) -> Iterator[servers.ServerProc]:
    s = servers.start_valkey(tmp_root / "valkey", password=_SECRET)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def config(nats_server: servers.ServerProc, redis_server: servers.ServerProc) -> VNetConfig:
    # redis_timeout_s: valkey shares the machine with everything else a test run does; a command
    # that waits its turn for seconds is slowness, not a dead store (the tests of dependency
    # faults set their own short timeout).
    return VNetConfig.load(env={}, nats_url=nats_server.url, redis_url=redis_server.url,
                           metrics_http_port=0, metrics_report_interval_s=0.2, redis_timeout_s=15.0)


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
    wg_ifs: set[str] = set()
    for ns in reversed(made):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:  # a wireguard-go's interface names its control socket (a node's default: vnw-<hash>)
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if len(argv) >= 3 and argv[-3].endswith(b"wireguard-go"):
                    wg_ifs.add(argv[-2].decode(errors="replace"))
            except OSError:
                pass
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    # wireguard-go killed with the namespace leaves its control socket behind (named after
    # its interface: the run prefix, or one seen above).
    for sock in [*Path("/var/run/wireguard").glob(f"{run_prefix}*.sock"),
                 *(Path("/var/run/wireguard") / f"{i}.sock" for i in wg_ifs if "/" not in i)]:
        sock.unlink(missing_ok=True)


# --- the control plane plus one node worker, for endpoint-level tests -------------------------

_fresh_dbs = itertools.cycle(range(1, 16))


def fresh_db_config(config: VNetConfig) -> VNetConfig:
    """``config`` pointed at the next Redis logical database, so a test starts from empty state."""
    base = config.redis_url.rsplit("/", 1)[0]
    return msgspec.structs.replace(config, redis_url=f"{base}/{next(_fresh_dbs)}")


@asynccontextmanager
async def fake_node(m: Any, node: str) -> AsyncIterator[None]:
    """``node`` registered (bridge driver) by a stand-in that answers namespace checks and
    nothing else: the control plane places endpoints on it, with no kernel behind it."""
    from vnet.adapters import nats as nats_adapter
    from vnet.contracts import subjects
    from vnet.contracts.endpoint import NetnsCheckReply, NodeRegister, NodeRegistered
    from vnet.core.dataplane_model import Support

    await m.call(subjects.NODE_REGISTER, NodeRegister(node=node, instance="i", heartbeat_s=60,
                                                      drivers={"bridge": Support(available=True)}), NodeRegistered,
                 params={"node": node})
    nc = await nats_adapter.connect(m.config, f"test-fake-node-{node}")

    async def answer(msg: Any) -> None:
        await msg.respond(msgspec.json.encode(NetnsCheckReply(netns="x", path="/run/netns/x", exists=True)))

    await nc.subscribe(subjects.NODE_NETNS_CHECK.format(node=node), cb=answer)
    try:
        yield
    finally:
        await nc.drain()


@asynccontextmanager
async def services(config: VNetConfig, start_service: Callable[..., Awaitable[Any]], *,
                   node: str | None = None) -> AsyncIterator[Any]:
    """The four control-plane services on a fresh Redis database and a client (a
    VNetManager) on them; ``node``: a :func:`fake_node` of that name too."""
    from vnet.client import VNetManager

    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for name in ("ipam", "network", "endpoint", "policy"):
        await start_service(name, cfg=cfg)
    m = VNetManager(cfg)
    await m.__aenter__()
    try:
        if node is None:
            yield m
        else:
            async with fake_node(m, node):
                yield m
    finally:
        await m.close()
        await r.flushdb()
        await r.aclose()


@dataclass
class ControlPlane:
    cfg: VNetConfig
    m: Any  # VNetManager (typed loosely: conftest imports stay light)
    r: aioredis.Redis
    node: str
    host: str
    node_rt: Any  # the node worker's Runtime


@asynccontextmanager
async def control_plane(config: VNetConfig, start_service: Callable[..., Awaitable[Any]],
                        netns: Callable[[str], str], *, host: str, node: str, resync_s: float,
                        services: tuple[str, ...] = ("ipam", "network", "endpoint", "policy"),
                        node_params: dict[str, str] | None = None,
                        ) -> AsyncIterator[ControlPlane]:
    """Services (policy included: the worker applies rulesets) on a fresh Redis database and
    one node worker on a fixture host namespace, registered before this yields. Take the
    ``netns`` fixture before ``start_service`` so the services stop before the namespaces go."""
    from vnet.client import VNetManager

    cfg = fresh_db_config(config)
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.flushdb()
    for name in services:
        await start_service(name, cfg=cfg)
    host_ns = netns(host)
    node_rt = await start_service("node", params={"node": node, "resync_s": str(resync_s), **(node_params or {})},
                                  cfg=msgspec.structs.replace(cfg, host_netns=host_ns))
    m = VNetManager(cfg)
    await m.__aenter__()
    try:
        for _ in range(1200):  # 60 s: a busy machine is slow to start a worker, never wrong to wait
            if any(n.node == node for n in await m.nodes()):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the node worker {node} did not register")
        yield ControlPlane(cfg, m, r, node, host_ns, node_rt)
    finally:
        await m.close()
        await r.flushdb()
        await r.aclose()
