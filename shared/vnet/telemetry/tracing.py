"""W3C trace context over NATS headers, and tracer setup.

Span names follow the messaging conventions: ``publish <subject template>`` on the
sending side, ``process <subject template>`` on the receiving side, so one trace
shows a request crossing services.

Every request of every service goes through here, so it is written for speed: the
tracer is looked up once per provider (the SDK builds a new ``Tracer`` per
``get_tracer`` call), a message without headers skips the propagator, spans get
attributes only where the span name does not already say it (each costs 1-2 us in the
SDK), and while the global propagator is OpenTelemetry's default (W3C trace context
and baggage) a plain ``traceparent`` is read and written here directly rather than
through the propagator chain (5 us -> 1 us). Anything else — ``tracestate``,
baggage, another version, another propagator — takes the propagator's own path.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagate import extract, inject
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_TRACER_NAME = "vnet"
_configured = False
_EMPTY_CONTEXT = otel_context.Context()

_override: trace.Tracer | None = None
_cached_provider: trace.TracerProvider | None = None
_cached_tracer: trace.Tracer | None = None


def make_tracer_provider(service_name: str, otlp_endpoint: str | None = None, *,
                         sample_all: bool = False) -> trace.TracerProvider:
    """The SDK tracer provider a VNet process runs with.

    With an OTLP endpoint (argument or ``OTEL_EXPORTER_OTLP_ENDPOINT``) every span is
    recorded and exported in batches. Without one, spans are not recorded unless the
    caller's trace is sampled (``ParentBased(ALWAYS_OFF)``): trace ids are still made,
    propagated, returned in ``Vnet-Trace-Id`` and written into log lines, at a third of
    the cost per request; the spans of sampled traces go to this process's local trace
    file (:mod:`vnet.telemetry.local_traces`), which ``vnetctl trace`` reads.
    ``sample_all`` (``vnetctl``): record every trace this process starts, so the
    services record the rest of it. ``OTEL_TRACES_SAMPLER`` set in the environment wins.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    resource = Resource.create({"service.name": f"vnet-{service_name}"})
    endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporter = None
    if endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = endpoint.rstrip("/")
            if not url.endswith("/v1/traces"):
                url += "/v1/traces"
            exporter = OTLPSpanExporter(endpoint=url)
        except ImportError:  # the exporter is an optional extra (vnet[otlp])
            log.warning("OTLP endpoint %s given but opentelemetry-exporter-otlp is not installed "
                        "(pip install 'vnet[otlp]'); spans are not exported", endpoint)
    if exporter is None and not sample_all and not os.environ.get("OTEL_TRACES_SAMPLER"):
        provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF))
    else:
        provider = TracerProvider(resource=resource)
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    else:
        from vnet.telemetry import local_traces

        local = local_traces.make_exporter(service_name, client=sample_all)
        if local is not None:  # written by the processor's thread, a fifth of a second later at most
            provider.add_span_processor(BatchSpanProcessor(local, schedule_delay_millis=200))
    return provider


def setup_tracing(service_name: str, otlp_endpoint: str | None = None) -> None:
    """Install :func:`make_tracer_provider`'s provider as the global one, once per process."""
    global _configured
    if _configured:
        return
    trace.set_tracer_provider(make_tracer_provider(service_name, otlp_endpoint))
    _configured = True


def _drops_unsampled_children(provider: trace.TracerProvider) -> bool:
    """Whether ``provider`` never records a span whose parent is valid and not sampled: its
    sampler is ``ParentBased`` (ours, and the SDK's default) with both not-sampled delegates
    ``ALWAYS_OFF`` (their defaults). Any other sampler (``OTEL_TRACES_SAMPLER``) decides
    span by span, through the SDK."""
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler

    sampler = getattr(provider, "sampler", None)
    if type(sampler) is not ParentBased:
        return False
    for delegate in (getattr(sampler, "_remote_parent_not_sampled", None),
                     getattr(sampler, "_local_parent_not_sampled", None)):
        if type(delegate) is not StaticSampler or getattr(delegate, "_decision", None) is not Decision.DROP:
            return False
    return True


class _CurrentSpan:
    """``start_as_current_span`` for a span that would not be recorded: the parent stays the
    span (its trace id in logs and in the headers sent on), ``context`` current meanwhile."""

    __slots__ = ("_context", "_span", "_token")

    def __init__(self, span: Span, context: otel_context.Context | None) -> None:
        self._span = span
        self._context = context
        self._token: object = None

    def __enter__(self) -> Span:
        if self._context is not None:
            self._token = otel_context.attach(self._context)
        return self._span

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]


class _Tracer(trace.Tracer):
    """The SDK's tracer, short of the spans it would not record.

    Without an OTLP endpoint a trace is recorded only when its client asks (``vnetctl``), so
    nearly every request's spans are children of a parent that is not sampled. The SDK still
    builds each one (sampler, span id, span object, context): ~23 per attach across the
    processes (a process, an inner and a publish span: 27 µs made, 12 µs not). Under a
    provider that drops them anyway
    (:func:`_drops_unsampled_children`) such a span is not made: the parent stands in for it
    (not recording either, so setting attributes or ending it does nothing). Roots and
    sampled traces go through the SDK unchanged."""

    def __init__(self, inner: trace.Tracer, fast: bool) -> None:
        self._inner = inner
        self._fast = fast

    def _stand_in(self, context: otel_context.Context | None) -> Span | None:
        if not self._fast:
            return None
        parent = trace.get_current_span(context)
        sc = parent.get_span_context()
        if sc.is_valid and not sc.trace_flags.sampled and not parent.is_recording():
            return parent
        return None

    def start_span(self, name: str, context: otel_context.Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: Any = None, links: Any = None, start_time: int | None = None,
                   record_exception: bool = True, set_status_on_exception: bool = True) -> Span:
        parent = self._stand_in(context)
        if parent is not None:
            return parent
        return self._inner.start_span(name, context, kind, attributes, links, start_time, record_exception,
                                      set_status_on_exception)

    def start_as_current_span(self, name: str, context: otel_context.Context | None = None,
                              kind: SpanKind = SpanKind.INTERNAL, attributes: Any = None, links: Any = None,
                              start_time: int | None = None, record_exception: bool = True,
                              set_status_on_exception: bool = True, end_on_exit: bool = True) -> Any:
        parent = self._stand_in(context)
        if parent is not None:
            return _CurrentSpan(parent, context)
        return self._inner.start_as_current_span(name, context, kind, attributes, links, start_time,
                                                 record_exception, set_status_on_exception, end_on_exit)


def _wrap(provider: trace.TracerProvider) -> trace.Tracer:
    return _Tracer(provider.get_tracer(_TRACER_NAME), _drops_unsampled_children(provider))


def tracer() -> trace.Tracer:
    """The ``vnet`` tracer of the global provider (or of :func:`use_tracer_provider`'s)."""
    global _cached_provider, _cached_tracer
    if _override is not None:
        return _override
    provider = trace.get_tracer_provider()
    if provider is not _cached_provider or _cached_tracer is None:
        _cached_tracer = _wrap(provider)
        _cached_provider = provider
    return _cached_tracer


def use_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Use ``provider``'s tracer instead of the global one (benchmarks, tests); ``None`` restores the global."""
    global _override
    _override = None if provider is None else _wrap(provider)


_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_w3c_checked: object = None
_w3c: bool = False


def _w3c_only() -> bool:
    """Is the global propagator OpenTelemetry's default (W3C trace context, optionally baggage)?"""
    global _w3c_checked, _w3c
    textmap = propagate.get_global_textmap()
    if textmap is not _w3c_checked:
        if type(textmap) is TraceContextTextMapPropagator:
            ok = True
        elif isinstance(textmap, CompositePropagator):
            parts = [type(p) for p in getattr(textmap, "_propagators", ())]
            ok = TraceContextTextMapPropagator in parts and all(
                p in (TraceContextTextMapPropagator, W3CBaggagePropagator) for p in parts)
        else:
            ok = False
        _w3c_checked, _w3c = textmap, ok
    return _w3c


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Put the current context's ``traceparent``/``tracestate`` (and baggage) into ``headers``."""
    headers = {} if headers is None else headers
    if _w3c_only() and not baggage.get_all():
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            headers["traceparent"] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
            if ctx.trace_state:
                headers["tracestate"] = ctx.trace_state.to_header()
        return headers
    inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a message carries (an empty context when it has none)."""
    if not headers:
        return _EMPTY_CONTEXT
    if _w3c_only() and "tracestate" not in headers and "baggage" not in headers:
        tp = headers.get("traceparent")
        if tp is None:
            return _EMPTY_CONTEXT
        m = _TRACEPARENT.fullmatch(tp)
        if m is not None:
            trace_id, span_id = int(m.group(1), 16), int(m.group(2), 16)
            if not trace_id or not span_id:
                return _EMPTY_CONTEXT
            parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(m.group(3), 16)))
            return trace.set_span_in_context(NonRecordingSpan(parent), _EMPTY_CONTEXT)
    return extract(headers)


def trace_id_hex(span: Span | None = None) -> str | None:
    span = span or trace.get_current_span()
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x")


def start_process_span(name: str, headers: Mapping[str, str] | None,
                       attributes: Mapping[str, Any] | None = None) -> Span:
    """Start (not activate) a CONSUMER span whose parent is the context in ``headers``.

    ``name`` is the full span name (``process <template>``); end it with ``span.end()``.
    """
    return tracer().start_span(name, context=extract_context(headers), kind=SpanKind.CONSUMER,
                               attributes=attributes)


def activate(span: Span) -> object:
    """Make ``span`` current; returns the token for :func:`deactivate`."""
    return otel_context.attach(trace.set_span_in_context(span))


def deactivate(token: object) -> None:
    # the token is the one activate() got from attach(); callers hold it as ``object`` so they need no
    # OpenTelemetry types, and detach() is annotated to take its own Token type
    otel_context.detach(token)  # type: ignore[arg-type]


@contextmanager
def publish_span(subject_template: str, subject: str, **attrs: Any) -> Iterator[dict[str, str]]:
    """A PRODUCER span around a send, current while it lasts; yields headers carrying its context.

    An exception inside is recorded on the span (and re-raised), as ``start_as_current_span`` does.
    """
    if subject != subject_template:
        attrs["messaging.destination.name"] = subject
    span = tracer().start_span(f"publish {subject_template}", kind=SpanKind.PRODUCER, attributes=attrs or None)
    token = activate(span)
    try:
        yield inject_headers({})
    except Exception as exc:
        if span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        deactivate(token)
        span.end()


@contextmanager
def process_span(
    subject_template: str, subject: str, headers: Mapping[str, str] | None, **attrs: Any
) -> Iterator[Span]:
    """A CONSUMER/SERVER span whose parent is the context in the message's headers."""
    if subject != subject_template:
        attrs["messaging.destination.name"] = subject
    with tracer().start_as_current_span(
        f"process {subject_template}",
        context=extract_context(headers),
        kind=SpanKind.CONSUMER,
        attributes=attrs or None,
    ) as span:
        yield span


def mark_error(span: Span, code: str, message: str) -> None:
    span.set_status(Status(StatusCode.ERROR, message))
    span.set_attribute("error.type", code)
