"""The resolver's wire handling (adapters/dns_server.py) on bytes alone: whatever arrives,
it answers a well-formed reply or nothing, and never raises."""

from __future__ import annotations

import asyncio

from dnslib import QTYPE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from vnet.adapters.dns_server import DnsServer
from vnet.core.dns import Answer


def _server() -> DnsServer:
    def answer(src: str, qname: str, qtype: str) -> Answer:
        if qname.rstrip(".") == "web.vnet":
            return Answer("NOERROR", addresses=("10.1.0.2",))
        return Answer("NXDOMAIN")

    return DnsServer(answer, ttl=7)


def _ask(srv: DnsServer, data: bytes) -> bytes | None:
    return asyncio.run(srv.handle(data, "10.1.0.3"))


def test_answers_and_caches_per_querier() -> None:
    srv = _server()
    q = DNSRecord.question("web.vnet")
    r = DNSRecord.parse(_ask(srv, bytes(q.pack())) or b"")
    assert r.header.id == q.header.id and r.header.rcode == 0 and str(r.rr[0].rdata) == "10.1.0.2"
    assert r.rr[0].ttl == 7 and r.rr[0].rtype == QTYPE.A
    q2 = DNSRecord.question("web.vnet")  # another id: the cached reply carries the new one
    r2 = DNSRecord.parse(_ask(srv, bytes(q2.pack())) or b"")
    assert r2.header.id == q2.header.id and str(r2.rr[0].rdata) == "10.1.0.2" and srv.counters.cache_hits == 1
    assert DNSRecord.parse(_ask(srv, bytes(DNSRecord.question("x.vnet").pack())) or b"").header.rcode == 3


def test_a_compression_pointer_loop_is_formerr() -> None:
    loop = bytes.fromhex("abcd01000001000000000000c00c00010001")
    r = DNSRecord.parse(_ask(_server(), loop) or b"")
    assert r.header.id == 0xABCD and r.header.rcode == 1  # FORMERR


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    srv = _server()
    out = _ask(srv, data)
    if out is not None:
        DNSRecord.parse(out)  # whatever it sends parses
    if len(data) < 12:
        assert out is None  # no header, no reply


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63),
                min_size=1, max_size=8),
       st.sampled_from(["A", "AAAA", "PTR", "MX", "SRV", "TXT", "ANY"]))
def test_any_question_gets_one_reply_with_its_id(labels: list[str], qtype: str) -> None:
    q = DNSRecord.question(".".join(labels), qtype)
    r = DNSRecord.parse(_ask(_server(), bytes(q.pack())) or b"")
    assert r.header.id == q.header.id and r.header.qr == 1 and r.header.rcode in (0, 3)


def test_srv_answers_carry_their_targets_addresses_in_the_additional_section() -> None:
    def answer(src: str, qname: str, qtype: str) -> Answer:
        assert qtype == "SRV"
        return Answer("NOERROR", srv=((5432, "db.back.vnet", ("10.2.0.3", "fd00::3")),))

    srv = DnsServer(answer, ttl=3)
    r = DNSRecord.parse(_ask(srv, bytes(DNSRecord.question("_postgresql._tcp.db", "SRV").pack())) or b"")
    assert [(x.rtype, x.rdata.port, str(x.rdata.target)) for x in r.rr] == [(QTYPE.SRV, 5432, "db.back.vnet.")]
    assert sorted((QTYPE[x.rtype], str(x.rname), str(x.rdata)) for x in r.ar) == [
        ("A", "db.back.vnet.", "10.2.0.3"), ("AAAA", "db.back.vnet.", "fd00::3")]


def test_every_query_is_observed_by_rcode_and_a_sampled_one_gets_a_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from vnet.telemetry import tracing

    seen: list[tuple[str, str | None]] = []
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    try:
        def answer(src: str, qname: str, qtype: str) -> Answer:
            return Answer("NOERROR", addresses=("10.1.0.2",)) if qname == "web.vnet." else Answer("NXDOMAIN")

        never = DnsServer(answer, observe=lambda rc, s, tid: seen.append((rc, tid)), trace_ratio=0.0)
        _ask(never, bytes(DNSRecord.question("web.vnet").pack()))
        _ask(never, bytes(DNSRecord.question("web.vnet").pack()))  # a cache hit counts too
        _ask(never, bytes(DNSRecord.question("gone.vnet").pack()))
        _ask(never, b"\x00\x01" + b"\xff" * 14)
        assert [rc for rc, _ in seen] == ["NOERROR", "NOERROR", "NXDOMAIN", "FORMERR"]
        assert all(tid is None for _, tid in seen) and exporter.get_finished_spans() == ()
        seen.clear()
        always = DnsServer(answer, observe=lambda rc, s, tid: seen.append((rc, tid)), trace_ratio=1.0)
        _ask(always, bytes(DNSRecord.question("gone.vnet").pack()))
        (span,) = exporter.get_finished_spans()
        assert span.name == "dns.query" and span.attributes is not None
        assert span.attributes["dns.question.name"] == "gone.vnet."
        assert span.attributes["dns.response.rcode"] == "NXDOMAIN"
        assert seen == [("NXDOMAIN", format(span.context.trace_id, "032x"))]
    finally:
        tracing.use_tracer_provider(None)
