"""The one service pattern (``vnet.runtime.service``) against a real nats-server: requests,
with small services defined in ``service_pattern_env``: one trace across two services (and
a trace id for an untraced caller), subject parameters in ``ctx.params``, requests run
concurrently within the bound, ``$SRV.STATS`` per endpoint, dotted op names.
"""

# ruff: noqa: F811 (a test's argument nc is service_pattern_env's fixture, imported for pytest)

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.integration.service_pattern_env import (
    Echo,
    EchoReply,
    StartService,
    _echo_service,
    _info,
    _stats,
    _unique,
    _until,
    nc,  # noqa: F401  (the fixture)
)
from vnet.adapters import nats as nats_adapter
from vnet.contracts import headers as H
from vnet.contracts import subjects
from vnet.contracts.messages import Empty
from vnet.contracts.subjects import Subject
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Ctx, ServiceDef

# -- 3. one trace across two services ----------------------------------------------------------

class Hop(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    n: int


class HopReply(msgspec.Struct, kw_only=True):
    n: int
    seq: int = 0


async def test_one_trace_across_two_services(start_service: StartService, nc: Client,
                                             spans: InMemorySpanExporter) -> None:
    a_name, b_name = _unique("pa"), _unique("pb")
    a_subj, b_subj = Subject(f"vnet.{a_name}.call"), Subject(f"vnet.{b_name}.answer")
    svc_a = ServiceDef(a_name, "calls B", uses_redis=False)
    svc_b = ServiceDef(b_name, "answers", uses_redis=False)

    @svc_b.op("answer", b_subj, Hop)
    async def answer(ctx: Ctx, req: Hop) -> HopReply:
        return HopReply(n=req.n + 1)

    @svc_a.op("call", a_subj, Hop)
    async def call(ctx: Ctx, req: Hop) -> HopReply:
        got = await ctx.request(b_subj, Hop(n=req.n), HopReply)
        seq = await ctx.publish_event(a_name, "called", str(req.n), got)
        return HopReply(n=got.n, seq=seq)

    await start_service(svc_b)
    await start_service(svc_a)
    spans.clear()
    reply, trace_id = await nats_adapter.request(nc, a_subj, Hop(n=41), HopReply)
    assert reply.n == 42 and trace_id

    by_name = {s.name: s for s in spans.get_finished_spans()}
    client = by_name[f"publish {a_subj.template}"]
    proc_a = by_name[f"process {a_subj.template}"]
    pub_b = by_name[f"publish {b_subj.template}"]
    proc_b = by_name[f"process {b_subj.template}"]
    pub_evt = by_name[f"publish {subjects.EVT.template}"]
    assert client.parent is None, "the client's publish span is the root"
    assert client.kind == SpanKind.PRODUCER and proc_a.kind == SpanKind.CONSUMER
    for s in (client, proc_a, pub_b, proc_b, pub_evt):
        assert s.context is not None and format(s.context.trace_id, "032x") == trace_id, s.name
    assert proc_a.parent is not None and client.context is not None
    assert proc_a.parent.span_id == client.context.span_id
    assert pub_b.parent is not None and proc_a.context is not None and pub_b.parent.span_id == proc_a.context.span_id
    assert proc_b.parent is not None and pub_b.context is not None and proc_b.parent.span_id == pub_b.context.span_id
    assert pub_evt.parent is not None and pub_evt.parent.span_id == proc_a.context.span_id

    # the event in the stream carries the trace context of the request that published it
    js = nc.jetstream()
    stored = await js.get_msg(subjects.EVENTS_STREAM, reply.seq)
    assert stored.headers is not None
    _version, tp_trace, tp_span, _flags = stored.headers[H.TRACEPARENT].split("-")
    assert tp_trace == trace_id
    assert pub_evt.context is not None and tp_span == format(pub_evt.context.span_id, "016x")
    assert stored.headers[H.MSG_ID]


async def test_untraced_caller_gets_a_trace_id(start_service: StartService, nc: Client,
                                               spans: InMemorySpanExporter) -> None:
    defn, subj, _ = _echo_service(_unique("puntr"))
    await start_service(defn)
    msg = await nc.request(subj["echo"].template, b'{"text":"hi"}', timeout=5.0)
    trace_id = (msg.headers or {})[H.TRACE_ID]
    assert json.loads(msg.data) == {"text": "hi", "trace_id": trace_id}
    (span,) = [s for s in spans.get_finished_spans() if s.name == f"process {subj['echo'].template}"]
    assert span.parent is None and span.context is not None and format(span.context.trace_id, "032x") == trace_id


async def test_parameterised_subject_fills_ctx_params(start_service: StartService, nc: Client,
                                                      spans: InMemorySpanExporter) -> None:
    name = _unique("pparam")
    defn = ServiceDef(name, "params", uses_redis=False)
    tmpl = Subject(f"vnet.{name}.{{node}}.{{thing}}.get")

    @defn.op("get", tmpl, Empty)
    async def get(ctx: Ctx, req: Empty) -> dict[str, Any]:
        return {"params": ctx.params, "template": ctx.template, "subject": ctx.subject}

    await start_service(defn, params={"node": "n7"})  # {thing} is not given: a wildcard, read per request
    msg = await nc.request(tmpl.format(node="n7", thing="abc"), b"", timeout=5.0)
    assert json.loads(msg.data) == {"params": {"node": "n7", "thing": "abc"}, "template": tmpl.template,
                                    "subject": f"vnet.{name}.n7.abc.get"}
    (span,) = [s for s in spans.get_finished_spans() if s.name == f"process {tmpl.template}"]
    assert span.attributes is not None and span.attributes["messaging.destination.name"] == f"vnet.{name}.n7.abc.get"


# -- 4. requests run concurrently, within the bound ----------------------------------------------

async def test_requests_run_concurrently(start_service: StartService, nc: Client) -> None:
    defn, subj, state = _echo_service(_unique("pconc"))
    await start_service(defn)
    data = Echo(text="z", hold=True)
    calls = [asyncio.create_task(nats_adapter.request(nc, subj["slow"], data, EchoReply, timeout=60.0))
             for _ in range(64)]
    # All 64 are inside the handler at once (the default bound is 256): one at a time, the
    # first would wait for the gate and the second would never start. No clock involved.
    assert await _until(lambda: state["now"] == 64, timeout=60.0), state
    assert state["done"] == 0
    state.gate.set()
    replies = await asyncio.gather(*calls)
    assert len(replies) == 64 and all(r.text == "z" for r, _ in replies)
    assert state["peak"] == 64 and state["done"] == 64 and state["now"] == 0


async def test_concurrency_bound_holds(config: VNetConfig, start_service: StartService, nc: Client) -> None:
    defn, subj, state = _echo_service(_unique("pbound"))
    cfg = msgspec.structs.replace(config, max_inflight=4)
    rt = await start_service(defn, cfg=cfg)
    data = Echo(text="b", hold=True)
    calls = [asyncio.create_task(nats_adapter.request(nc, subj["slow"], data, EchoReply, timeout=60.0))
             for _ in range(24)]
    # Four are in, the gate is shut: the other twenty wait their turn outside the handler.
    assert await _until(lambda: state["now"] == 4, timeout=60.0), state
    await asyncio.sleep(0.3)  # time for a fifth to get in if the bound leaked (a slow machine only hides it)
    assert state["now"] == 4 and state["peak"] == 4 and state["done"] == 0, state
    state.gate.set()
    replies = await asyncio.gather(*calls)
    assert all(r.text == "b" for r, _ in replies)
    assert state["peak"] == 4, state  # the bound is reached and never passed
    assert state["done"] == 24
    assert rt.inflight == 0


# -- 6. $SRV.STATS counts requests and errors per endpoint ----------------------------------------

async def test_srv_stats_per_endpoint(start_service: StartService, nc: Client) -> None:
    defn, subj, _ = _echo_service(_unique("pstat"))
    rt = await start_service(defn)
    for i in range(5):
        await nats_adapter.request(nc, subj["echo"], Echo(text=str(i)), EchoReply)
    for _ in range(3):
        with pytest.raises(E.Conflict):
            await nats_adapter.request(nc, subj["fail"], Echo(text="no"), EchoReply)
    await nc.request(subj["echo"].template, b"not json", timeout=5.0)
    stats = await _stats(nc, rt)
    assert stats["echo"]["num_requests"] == 6 and stats["echo"]["num_errors"] == 1
    assert "invalid_json" in stats["echo"]["last_error"]
    assert stats["fail"]["num_requests"] == 3 and stats["fail"]["num_errors"] == 3
    assert "409" in stats["fail"]["last_error"] and "conflict" in stats["fail"]["last_error"]
    assert stats["boom"]["num_requests"] == 0 and stats["boom"]["num_errors"] == 0
    assert stats["echo"]["processing_time"] > 0
    assert stats["echo"]["average_processing_time"] == stats["echo"]["processing_time"] // 6
    # INFO names the endpoints after their ops, with the op's own name and limits in metadata
    info = await _info(nc, rt)
    meta = {e["name"]: e["metadata"] for e in info["endpoints"]}
    assert meta["echo"]["vnet.op"] == "echo" and meta["echo"]["vnet.subject"] == subj["echo"].template
    assert meta["echo"]["vnet.request"] == "Echo"


async def test_dotted_op_names_register(start_service: StartService, nc: Client) -> None:
    name = _unique("pdot")
    defn = ServiceDef(name, "dotted op names", uses_redis=False)
    subj = Subject(f"vnet.{name}.addr.request")

    @defn.op("addr.request", subj, Empty)
    async def op(ctx: Ctx, req: Empty) -> dict[str, str]:
        return {"ok": "yes"}

    rt = await start_service(defn)
    reply, _ = await nats_adapter.request(nc, subj, Empty(), dict)
    assert reply == {"ok": "yes"}
    stats = await _stats(nc, rt)
    assert stats["addr_request"]["num_requests"] == 1
    assert [o.op for o in rt.metrics.snapshot().ops if o.op != "health"] == ["addr.request"]
    with pytest.raises(ValueError, match="clashes"):
        defn.op("addr_request", Subject(f"vnet.{name}.other"), Empty)(op)
