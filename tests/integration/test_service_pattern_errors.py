"""The one service pattern (``vnet.runtime.service``) against a real nats-server: errors.

Every endpoint of every service is found through ``$SRV.INFO`` (so ops added later are
covered without touching this file) and fed bad input: each answers 400 with a code and a
message naming the problem, and counts the decode error. An unexpected exception is a 500
``internal`` with the trace id and nothing else (no repr, no traceback); a service error
reaches the caller as its class.
"""

# ruff: noqa: F811 (a test's argument nc is service_pattern_env's fixture, imported for pytest)

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.errors import MaxPayloadError
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.integration.service_pattern_env import (
    Echo,
    EchoReply,
    StartService,
    _echo_service,
    _info,
    _no_leak,
    _stats,
    _unique,
    nc,  # noqa: F401  (the fixture)
)
from vnet.adapters import nats as nats_adapter
from vnet.contracts import headers as H
from vnet.contracts import subjects
from vnet.core import errors as E
from vnet.runtime.config import VNetConfig


async def _error_reply(nc: Client, subject: str, data: bytes, *, status: str, code: str) -> dict[str, Any]:
    msg = await nc.request(subject, data, timeout=5.0)
    _no_leak(msg)
    hdrs = msg.headers or {}
    assert hdrs.get(H.ERROR_CODE) == status, (subject, data[:80], hdrs, msg.data[:300])
    assert hdrs.get(H.ERROR), hdrs
    body = json.loads(msg.data)
    assert body["code"] == code, (subject, data[:80], body)
    assert body["message"] and hdrs[H.ERROR].startswith(body["message"][:40].replace("\n", " ").strip()), body
    return dict(body)


def _wrong_field_value(tp: Any) -> tuple[str, Any] | None:
    """A field of ``tp`` and a value of the wrong JSON type for it, if the type has fields."""
    fields = getattr(tp, "__struct_fields__", ())
    for f in fields:
        name = f
        for cand in (12345, "not-a-value", True, [], {}, 1.5):
            try:
                msgspec.json.decode(json.dumps({name: cand}).encode(), type=tp)
            except msgspec.ValidationError as exc:
                if str(exc).endswith(f"- at `$.{name}`"):
                    return name, cand
            except msgspec.DecodeError:
                continue
    return None


def _concrete(subject: str) -> str:
    return ".".join("x" if t in ("*", ">") else t for t in subject.split("."))


# -- 1. every endpoint rejects bad input with a 400 that names the problem -----------------------

async def test_every_endpoint_rejects_bad_input(config: VNetConfig, start_service: StartService,
                                                nc: Client) -> None:
    rts = [await start_service(name) for name in subjects.SERVICES]
    rts.append(await start_service(subjects.NODE_SERVICE, params={"node": _unique("n")}))
    checked: list[str] = []
    for rt in rts:
        info = await _info(nc, rt)
        eps = info["endpoints"]
        assert any(e["name"] == "health" for e in eps), eps
        assert len(eps) == len(rt.defn.ops) + 1, (rt.defn.name, [e["name"] for e in eps])
        ops = {o.name: o for o in rt.defn.ops}
        for ep in eps:
            subject = _concrete(ep["subject"])
            meta = ep.get("metadata") or {}
            op_name = meta["vnet.op"]
            limit = int(meta["vnet.max_bytes"])
            where = f"{rt.defn.name}/{op_name} on {subject}"

            body = await _error_reply(nc, subject, b"{not json", status="400", code="invalid_json")
            assert "not valid JSON" in body["message"], where

            body = await _error_reply(nc, subject, b"[]", status="400", code="invalid_request")
            assert "Expected `object`, got `array`" in body["message"], (where, body)

            op = ops.get(op_name)
            wrong = _wrong_field_value(op.req_type) if op is not None else None
            if wrong is not None:
                field, value = wrong
                data = json.dumps({field: value}).encode()
                body = await _error_reply(nc, subject, data, status="400", code="invalid_request")
                assert f"$.{field}" in body["message"], (where, body)

            body = await _error_reply(nc, subject, b'{"zz_not_a_field": 1}', status="400", code="unknown_field")
            assert '"zz_not_a_field"' in body["message"] and body["details"]["field"] == "zz_not_a_field", body

            big = b'{"pad": "' + b"x" * (limit + 1 - 11) + b'"}'
            assert len(big) == limit + 1
            if len(big) <= nc.max_payload:
                body = await _error_reply(nc, subject, big, status="400", code="payload_too_large")
                assert str(limit) in body["message"] and str(len(big)) in body["message"], (where, body)
            else:  # NATS itself refuses it before any service sees it
                with pytest.raises(MaxPayloadError):
                    await nc.request(subject, big, timeout=2.0)
            checked.append(where)
        # ... and it keeps serving
        health = subjects.NODE_HEALTH.format(node=rt.params["node"]) if rt.defn.name == "node" \
            else subjects.health(rt.defn.name).template
        msg = await nc.request(health, b"", timeout=5.0)
        assert H.ERROR_CODE not in (msg.headers or {}), msg.data
        assert json.loads(msg.data)["service"] == rt.defn.name
    assert len(checked) >= len(rts), checked


async def test_decode_errors_counted_per_endpoint(start_service: StartService, nc: Client) -> None:
    rt = await start_service("policy")
    before = (await _stats(nc, rt))["health"]
    for data in (b"nope", b"[]", b'{"x":1}'):
        await nc.request(subjects.health("policy").template, data, timeout=5.0)
    after = (await _stats(nc, rt))["health"]
    assert after["num_requests"] - before["num_requests"] == 3
    assert after["num_errors"] - before["num_errors"] == 3
    assert "unknown_field" in after["last_error"]


# -- 2. an unexpected exception is a 500 "internal" with the trace id, nothing else --------------

async def test_unexpected_exception_is_internal_with_trace_id(start_service: StartService, nc: Client,
                                                             spans: InMemorySpanExporter) -> None:
    defn, subj, _ = _echo_service(_unique("pboom"))
    rt = await start_service(defn)
    msg = await nc.request(subj["boom"].template, b'{"text":"x"}', timeout=5.0)
    _no_leak(msg)
    hdrs = msg.headers or {}
    assert hdrs[H.ERROR_CODE] == "500"
    body = json.loads(msg.data)
    assert body["code"] == "internal"
    trace_id = hdrs[H.TRACE_ID]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    assert trace_id in body["message"] and body["trace_id"] == trace_id
    assert "secret" not in msg.data.decode() and "Boom" not in msg.data.decode()
    assert hdrs[H.INSTANCE] == rt.instance
    # counted: by the metrics the service reports, and by $SRV.STATS
    report = rt.metrics.snapshot()
    (boom_op,) = [o for o in report.ops if o.op == "boom"]
    assert boom_op.count == 1 and boom_op.errors == {"internal": 1}
    stats = await _stats(nc, rt)
    assert stats["boom"]["num_errors"] == 1 and stats["boom"]["num_requests"] == 1
    # the span says what happened (the traceback stays on our side: logs and span events)
    (span,) = [s for s in spans.get_finished_spans() if s.name == f"process {subj['boom'].template}"]
    assert not span.status.is_ok and span.attributes is not None and span.attributes["error.type"] == "internal"
    assert any(ev.name == "exception" for ev in span.events)
    # ... and the service keeps serving
    reply, _ = await nats_adapter.request(nc, subj["echo"], Echo(text="still here"), EchoReply)
    assert reply.text == "still here"


async def test_service_error_reaches_caller_as_its_class(start_service: StartService, nc: Client) -> None:
    defn, subj, _ = _echo_service(_unique("pfail"))
    await start_service(defn)
    with pytest.raises(E.Conflict) as ei:
        await nats_adapter.request(nc, subj["fail"], Echo(text="this"), EchoReply)
    err = ei.value
    assert err.code == "conflict" and err.status == 409
    assert err.message == "refused this" and err.details == {"what": "this"}
    assert err.trace_id and re.fullmatch(r"[0-9a-f]{32}", err.trace_id)
