"""Spans that would not be recorded are not made (``vnet.telemetry.tracing._Tracer``): under a
provider whose sampler is ParentBased with the default not-sampled delegates, a child of a
parent that is not sampled is the parent itself; roots, sampled traces and any other sampler
go through the SDK as before."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from vnet.telemetry import tracing

UNSAMPLED = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
SAMPLED = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


@pytest.fixture
def recorded() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    try:
        yield exporter, provider
    finally:
        tracing.use_tracer_provider(None)


def _ids(span: trace.Span) -> tuple[int, int]:
    sc = span.get_span_context()
    return sc.trace_id, sc.span_id


def test_a_child_of_an_unsampled_parent_is_the_parent(recorded: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    exporter, _ = recorded
    parent = tracing.start_process_span("process a", UNSAMPLED)
    assert _ids(parent) == (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331)
    token = tracing.activate(parent)
    try:
        with tracing.tracer().start_as_current_span("inner", attributes={"k": "v"}) as inner:
            assert inner is parent and not inner.is_recording()
            inner.set_attribute("more", 1)  # a no-op, as on any span not recorded
            with tracing.publish_span("a.b", "a.b") as headers:
                assert headers["traceparent"] == UNSAMPLED["traceparent"]  # the trace goes on
        # an explicit context is current inside, and only inside
        other = tracing.extract_context({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-00"})
        with tracing.tracer().start_as_current_span("elsewhere", context=other) as sp:
            assert trace.get_current_span() is sp and _ids(sp) == (int("1" * 32, 16), int("2" * 16, 16))
        assert trace.get_current_span() is parent
    finally:
        tracing.deactivate(token)
    parent.end()
    assert exporter.get_finished_spans() == ()


def test_roots_get_a_trace_of_their_own(recorded: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    root = tracing.start_process_span("process a", None)
    assert root.get_span_context().is_valid and not root.is_recording()
    with tracing.tracer().start_as_current_span("root") as sp:
        assert sp.get_span_context().is_valid and sp.get_span_context().trace_id != root.get_span_context().trace_id


def test_sampled_traces_are_recorded_span_by_span(recorded: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    exporter, _ = recorded
    parent = tracing.start_process_span("process a", SAMPLED)
    token = tracing.activate(parent)
    try:
        with tracing.tracer().start_as_current_span("inner") as inner:
            assert inner is not parent and inner.is_recording()
    finally:
        tracing.deactivate(token)
    parent.end()
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["inner", "process a"]


@pytest.mark.parametrize("sampler", [ALWAYS_ON, ParentBased(ALWAYS_OFF, remote_parent_not_sampled=ALWAYS_ON)])
def test_another_sampler_decides_every_span(sampler: object) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)  # type: ignore[arg-type]
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    try:
        span = tracing.start_process_span("process a", UNSAMPLED)
        assert span.is_recording()  # this sampler records it although its parent is not sampled
        span.end()
    finally:
        tracing.use_tracer_provider(None)
    assert [s.name for s in exporter.get_finished_spans()] == ["process a"]
