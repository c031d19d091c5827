"""W3C trace context over NATS headers, and tracer setup.

Span names follow the messaging conventions: ``publish <subject template>`` on the
sending side, ``process <subject template>`` on the receiving side, so one trace
shows a request crossing services.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

_TRACER_NAME = "vnet"
_configured = False


def setup_tracing(service_name: str, otlp_endpoint: str | None = None) -> None:
    """Install an SDK tracer provider once per process (OTLP export only when asked)."""
    global _configured
    if _configured:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(resource=Resource.create({"service.name": f"vnet-{service_name}"}))
    endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            url = endpoint.rstrip("/")
            if not url.endswith("/v1/traces"):
                url += "/v1/traces"
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        except ImportError:  # the exporter is an optional extra (vnet[otlp])
            pass
    trace.set_tracer_provider(provider)
    _configured = True


def tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER_NAME)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Put the current context's ``traceparent``/``tracestate`` into ``headers``."""
    headers = {} if headers is None else headers
    inject(headers)
    return headers


def extract_context(headers: dict[str, str] | None) -> otel_context.Context:
    return extract(headers or {})


def trace_id_hex(span: Span | None = None) -> str | None:
    span = span or trace.get_current_span()
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x")


@contextmanager
def publish_span(subject_template: str, subject: str, **attrs: Any) -> Iterator[dict[str, str]]:
    """A PRODUCER/CLIENT span around a send; yields headers carrying its context."""
    with tracer().start_as_current_span(
        f"publish {subject_template}",
        kind=SpanKind.PRODUCER,
        attributes={"messaging.system": "nats", "messaging.destination.name": subject, **attrs},
    ) as span:
        yield inject_headers({})
        del span


@contextmanager
def process_span(
    subject_template: str, subject: str, headers: dict[str, str] | None, **attrs: Any
) -> Iterator[Span]:
    """A CONSUMER/SERVER span whose parent is the context in the message's headers."""
    parent = extract_context(headers)
    with tracer().start_as_current_span(
        f"process {subject_template}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "nats", "messaging.destination.name": subject, **attrs},
    ) as span:
        yield span


def mark_error(span: Span, code: str, message: str) -> None:
    span.set_status(Status(StatusCode.ERROR, message))
    span.set_attribute("error.type", code)
