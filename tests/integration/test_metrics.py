"""The metrics service: Prometheus ``/metrics`` fed by every service's reports and by Redis."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client

from vnet.adapters import nats as nats_adapter
from vnet.adapters.redis import global_key
from vnet.client import VNetManager
from vnet.contracts.subjects import Subject
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Ctx, Runtime, ServiceDef

StartService = Callable[..., Awaitable[Runtime]]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Prometheus text format -> {(name, labels): value}."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparsable line: {line!r}"
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            body: bytes = resp.read()
            return body.decode()

    return parse(await asyncio.to_thread(get))


async def scrape_until(port: int, pred: Callable[[Samples], bool], timeout: float = 30.0) -> Samples:
    s = await scrape(port)
    for _ in range(int(timeout / 0.1)):
        if pred(s):
            return s
        await asyncio.sleep(0.1)
        s = await scrape(port)
    return s


class Ask(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ok: bool = True


@pytest.fixture
async def nc(config: VNetConfig) -> AsyncIterator[Client]:
    client = await nats.connect(config.nats_url, name="test-metrics")
    yield client
    await client.close()


@pytest.fixture
async def redis(config: VNetConfig) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(config.redis_url)
    yield r
    await r.aclose()


async def test_operations_errors_and_durations_move(start_service: StartService, nc: Client) -> None:
    name = f"m{uuid.uuid4().hex[:8]}"
    defn = ServiceDef(name, "metrics test", uses_redis=False)
    subj = Subject(f"vnet.{name}.ask")

    @defn.op("ask", subj, Ask)
    async def ask(ctx: Ctx, req: Ask) -> Ask:
        if not req.ok:
            raise E.make(E.CONFLICT, "asked to fail")
        return req

    rt_metrics = await start_service("metrics")
    port = rt_metrics.state["metrics"].http_port
    assert port
    await start_service(defn)
    labels = {"service": name, "op": "ask"}
    await nats_adapter.request(nc, subj, Ask(ok=True), Ask)
    before = await scrape_until(port, lambda s: value(s, "vnet_operations_total", **labels) == 1)
    assert value(before, "vnet_operations_total", **labels) == 1
    assert value(before, "vnet_operation_errors_total", code="conflict", **labels) == 0

    for _ in range(4):
        await nats_adapter.request(nc, subj, Ask(ok=True), Ask)
    for _ in range(3):
        with pytest.raises(E.Conflict):
            await nats_adapter.request(nc, subj, Ask(ok=False), Ask)
    await nc.request(subj.template, b"{broken", timeout=5.0)

    after = await scrape_until(port, lambda s: value(s, "vnet_operations_total", **labels) >= 9)
    assert value(after, "vnet_operations_total", **labels) == 9
    assert value(after, "vnet_operation_errors_total", code="conflict", **labels) == 3
    assert value(after, "vnet_operation_errors_total", code="invalid_json", **labels) == 1
    inf_before = value(before, "vnet_operation_duration_seconds_bucket", le="+Inf", **labels)
    inf_after = value(after, "vnet_operation_duration_seconds_bucket", le="+Inf", **labels)
    assert inf_after - inf_before == 8
    assert value(after, "vnet_operation_duration_seconds_count", **labels) == 9
    assert value(after, "vnet_operation_duration_seconds_sum", **labels) > \
        value(before, "vnet_operation_duration_seconds_sum", **labels) > 0
    # buckets are cumulative: each is at most the next
    buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in after.items()
                      if k[0] == "vnet_operation_duration_seconds_bucket" and dict(k[1]).get("service") == name))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1][1] == 9
    # the metrics service reports its own operations like any other service
    await nc.request("vnet.metrics.health", b"", timeout=5.0)
    own = await scrape_until(port, lambda s: value(s, "vnet_operations_total", service="metrics", op="health") >= 1)
    assert value(own, "vnet_operations_total", service="metrics", op="health") >= 1

    # the summary op agrees
    async with VNetManager(rt_metrics.config, nc=nc) as m:
        summary = await m.metrics_summary()
    assert summary.operations[f"{name}.ask"] == 9 and summary.errors[f"{name}.ask"] == 4


async def test_network_and_endpoint_gauges_follow_redis(start_service: StartService,
                                                        redis: aioredis.Redis) -> None:
    rt = await start_service("metrics")
    port = rt.state["metrics"].http_port
    nets, eps = global_key("networks"), global_key("endpoints")
    tag = uuid.uuid4().hex[:8]
    new_nets = [f"test-net-{tag}-{i}" for i in range(3)]
    new_eps = [f"test-ep-{tag}-{i}" for i in range(5)]
    try:
        await redis.sadd(nets, *new_nets)
        await redis.sadd(eps, *new_eps)
        n_nets, n_eps = await redis.scard(nets), await redis.scard(eps)
        s = await scrape_until(port, lambda s: value(s, "vnet_networks_total") == n_nets
                               and value(s, "vnet_endpoints_total") == n_eps)
        assert value(s, "vnet_networks_total") == n_nets >= 3
        assert value(s, "vnet_endpoints_total") == n_eps >= 5
        await redis.srem(nets, new_nets[0])
        n_nets = await redis.scard(nets)
        s = await scrape_until(port, lambda s: value(s, "vnet_networks_total") == n_nets)
        assert value(s, "vnet_networks_total") == n_nets
    finally:
        await redis.srem(nets, *new_nets)
        await redis.srem(eps, *new_eps)


async def test_port_in_use_is_a_clear_error_and_leaves_nothing(config: VNetConfig, start_service: StartService,
                                                               nc: Client) -> None:
    first = await start_service("metrics")
    port = first.state["metrics"].http_port
    cfg = msgspec.structs.replace(config, metrics_http_port=port)
    with pytest.raises(E.Unavailable) as ei:
        await start_service("metrics", cfg=cfg)
    assert f":{port}" in ei.value.message and "VNET_METRICS_HTTP_PORT" in ei.value.message
    # the first one still serves, and only it answers
    s = await scrape(port)
    assert ("vnet_networks_total", frozenset()) in s
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.PING.vnet-metrics", b"", reply=inbox)
    ids = []
    try:
        while True:
            ids.append(json.loads((await sub.next_msg(timeout=0.5)).data)["id"])
    except nats.errors.TimeoutError:
        pass
    await sub.unsubscribe()
    assert ids == [first.instance]
