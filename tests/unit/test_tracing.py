"""The fast W3C paths in ``vnet.telemetry.tracing`` agree with OpenTelemetry's propagator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from vnet.telemetry import tracing

W3C = TraceContextTextMapPropagator()


def _ctx_fields(ctx: otel_context.Context) -> tuple[int, int, int, bool, str]:
    sc = trace.get_current_span(ctx).get_span_context()
    return sc.trace_id, sc.span_id, int(sc.trace_flags), sc.is_remote, sc.trace_state.to_header()


ids = st.tuples(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.sampled_from([0, 1]))


@given(ids)
def test_inject_matches_the_propagator(t: tuple[int, int, int]) -> None:
    trace_id, span_id, flags = t
    span = NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(flags)))
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        ours = tracing.inject_headers({})
        theirs: dict[str, str] = {}
        propagate.inject(theirs)
    finally:
        otel_context.detach(token)
    assert ours == theirs and "traceparent" in ours


@given(ids)
def test_extract_matches_the_propagator(t: tuple[int, int, int]) -> None:
    trace_id, span_id, flags = t
    headers = {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}", "Nats-Msg-Id": "x"}
    assert _ctx_fields(tracing.extract_context(headers)) == _ctx_fields(propagate.extract(headers))


@pytest.mark.parametrize("headers", [
    {"traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"},  # invalid trace id
    {"traceparent": "00-" + "1" * 32 + "-" + "0" * 16 + "-01"},  # invalid span id
    {"traceparent": "zz-nonsense"},
    {"traceparent": "01-" + "a" * 32 + "-" + "b" * 16 + "-01-future"},  # a later version: the propagator's rules
    {"traceparent": " 00-" + "a" * 32 + "-" + "b" * 16 + "-01 "},
    {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "vendor=v1"},
    {"traceparent": "00-" + "A" * 32 + "-" + "b" * 16 + "-01"},
    {"other": "header"},
])
def test_extract_edge_cases_match_the_propagator(headers: dict[str, str]) -> None:
    assert _ctx_fields(tracing.extract_context(headers)) == _ctx_fields(propagate.extract(headers))


def test_no_headers_is_an_empty_context() -> None:
    assert not trace.get_current_span(tracing.extract_context(None)).get_span_context().is_valid
    assert not trace.get_current_span(tracing.extract_context({})).get_span_context().is_valid


def test_tracestate_and_baggage_go_through_the_propagator() -> None:
    sc = SpanContext(5, 6, is_remote=False, trace_flags=TraceFlags(1), trace_state=TraceState([("k", "v")]))
    ctx = baggage.set_baggage("tenant", "blue", trace.set_span_in_context(NonRecordingSpan(sc)))
    token = otel_context.attach(ctx)
    try:
        ours = tracing.inject_headers({})
        theirs: dict[str, str] = {}
        propagate.inject(theirs)
    finally:
        otel_context.detach(token)
    assert ours == theirs and ours["tracestate"] == "k=v" and "tenant=blue" in ours["baggage"]
    back = tracing.extract_context(ours)
    assert baggage.get_baggage("tenant", back) == "blue"
    assert _ctx_fields(back)[4] == "k=v"


@pytest.fixture
def other_propagator() -> Iterator[None]:
    before = propagate.get_global_textmap()

    class Marker(TraceContextTextMapPropagator):
        def inject(self, carrier, context=None, setter=None) -> None:  # type: ignore[no-untyped-def]
            carrier["x-marker"] = "1"

    propagate.set_global_textmap(CompositePropagator([Marker()]))
    yield
    propagate.set_global_textmap(before)


def test_another_propagator_is_honoured(other_propagator: None) -> None:
    sc = SpanContext(5, 6, is_remote=False, trace_flags=TraceFlags(1))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(sc)))
    try:
        assert tracing.inject_headers({}) == {"x-marker": "1"}
    finally:
        otel_context.detach(token)


def test_publish_span_is_current_inside_and_records_errors() -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    try:
        with tracing.publish_span("vnet.node.{node}.health", "vnet.node.n1.health") as hdrs:
            current = trace.get_current_span().get_span_context()
            assert hdrs["traceparent"].split("-")[2] == format(current.span_id, "016x")
        with pytest.raises(ValueError), tracing.publish_span("vnet.x.y", "vnet.x.y"):
            raise ValueError("boom")
    finally:
        tracing.use_tracer_provider(None)
    ok, failed = exporter.get_finished_spans()
    assert ok.name == "publish vnet.node.{node}.health" and ok.kind == trace.SpanKind.PRODUCER
    assert ok.attributes is not None and ok.attributes["messaging.destination.name"] == "vnet.node.n1.health"
    assert failed.name == "publish vnet.x.y" and not failed.status.is_ok
    assert not failed.attributes  # the template is the subject: nothing to add
    assert any(e.name == "exception" for e in failed.events)
    assert not trace.get_current_span().get_span_context().is_valid  # nothing left current


def test_provider_without_exporter_makes_ids_but_records_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    provider = tracing.make_tracer_provider("test")
    assert isinstance(provider, TracerProvider)
    tracer = provider.get_tracer("t")
    root = tracer.start_span("root")
    assert root.get_span_context().is_valid and not root.is_recording()
    # a caller's sampled trace is still honoured (and its flag passed on)
    sampled = SpanContext(7, 8, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    child = tracer.start_span("child", context=trace.set_span_in_context(NonRecordingSpan(sampled)))
    assert child.is_recording() and child.get_span_context().trace_id == 7
    assert provider.resource.attributes["service.name"] == "vnet-test"


def test_provider_sampler_from_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    root = tracing.make_tracer_provider("test").get_tracer("t").start_span("root")
    assert root.is_recording()
