"""Strict request decoding: every failure is a 400 with a stable code and a message that names it."""

from __future__ import annotations

import json
from typing import Annotated

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vnet.contracts import codec
from vnet.contracts.messages import Empty
from vnet.core import errors as E


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    port: int


class Req(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=8, pattern=r"^[a-z]+$")]
    count: int = 0
    inner: Inner | None = None
    tags: dict[str, str] = {}


def err(data: bytes, tp: type = Req, **kw: int) -> E.VNetError:
    with pytest.raises(E.VNetError) as ei:
        codec.decode(data, tp, **kw)
    e = ei.value
    assert e.status == 400 and isinstance(e, E.InvalidRequest)
    assert "Traceback" not in e.message and "Error(" not in e.message
    return e


def test_valid_request_decodes() -> None:
    assert codec.decode(b'{"name":"web","count":2,"inner":{"port":80}}', Req) == \
        Req(name="web", count=2, inner=Inner(port=80))


def test_empty_body_is_an_empty_object() -> None:
    assert codec.decode(b"", Empty) == Empty()
    assert codec.decode(b"  \n", Empty) == Empty()
    assert err(b"").code == "invalid_request"  # Req has a required field
    assert "missing required field `name`" in err(b"").message


@pytest.mark.parametrize("data", [b"{not json", b"nope", b'{"name":"a"', b"\xff\xfe", b'{"name":"a"} x'])
def test_not_json(data: bytes) -> None:
    e = err(data)
    assert e.code == "invalid_json"
    assert e.message.startswith("request body is not valid JSON: ")
    assert e.details["reason"]


@pytest.mark.parametrize(("data", "path", "expected"), [
    (b'{"name":1}', "$.name", "Expected `str`, got `int`"),
    (b'{"name":"a","count":"2"}', "$.count", "Expected `int`, got `str`"),
    (b'{"name":"a","inner":{"port":"80"}}', "$.inner.port", "Expected `int`, got `str`"),
    (b'{"name":"a","tags":{"k":1}}', "$.tags[...]", "Expected `str`, got `int`"),
    (b'{"name":"toolongname"}', "$.name", "length <= 8"),
    (b'{"name":"UPPER"}', "$.name", "matching regex"),
])
def test_wrong_type_or_value_names_the_field(data: bytes, path: str, expected: str) -> None:
    e = err(data)
    assert e.code == "invalid_request"
    assert e.message.startswith("invalid Req: ")
    assert expected in e.message and path in e.message
    assert e.details["path"] == path


@pytest.mark.parametrize("data", [b"[]", b'"x"', b"null", b"3"])
def test_not_an_object(data: bytes) -> None:
    e = err(data)
    assert e.code == "invalid_request" and "Expected `object`" in e.message
    e = err(data, Empty)
    assert e.code == "invalid_request" and "invalid Empty" in e.message


def test_missing_required_field() -> None:
    e = err(b'{"count":1}')
    assert e.code == "invalid_request" and "missing required field `name`" in e.message


@pytest.mark.parametrize(("data", "field", "path"), [
    (b'{"name":"a","colour":"red"}', "colour", "$"),
    (b'{"name":"a","inner":{"port":1,"proto":"tcp"}}', "proto", "$.inner"),
    (b'{"x`y":1}', "x`y", "$"),
    (b'{"zz":1}', "zz", "$"),
])
def test_unknown_field(data: bytes, field: str, path: str) -> None:
    e = err(data)
    assert e.code == "unknown_field"
    assert e.details == {"field": field, "path": path}
    assert f"unknown field {json.dumps(field)} at {path}" in e.message
    assert "Req" in e.message


def test_unknown_field_name_is_quoted_not_repr_and_cut() -> None:
    e = err(b'{"a\\nb":1}')
    assert 'unknown field "a\\nb"' in e.message and "'a" not in e.message
    long = "q" * 500
    e = err(json.dumps({long: 1}).encode())
    assert len(e.message) < 300 and "..." in e.message


def test_unknown_field_in_empty_request() -> None:
    e = err(b'{"x":1}', Empty)
    assert e.code == "unknown_field" and e.details["field"] == "x"


def test_payload_too_large_is_checked_before_parsing() -> None:
    e = err(b"x" * 101, max_bytes=100)  # not JSON either: size wins
    assert e.code == "payload_too_large"
    assert e.details == {"size": 101, "limit": 100}
    assert "101 bytes" in e.message and "at most 100" in e.message
    assert codec.decode(b'{"name":"a"}' + b" " * 88, Req, max_bytes=100).name == "a"


def test_default_limit_is_64_kib() -> None:
    assert codec.MAX_REQUEST_BYTES == 64 * 1024
    body = b'{"name":"a","tags":{"k":"' + b"v" * (64 * 1024) + b'"}}'
    assert err(body).code == "payload_too_large"


def test_request_decoder_is_cached() -> None:
    assert codec.request_decoder(Req) is codec.request_decoder(Req)
    assert codec.request_decoder(Req, 10) is not codec.request_decoder(Req)


def test_error_body_round_trip() -> None:
    e = E.make(E.SUBNET_OVERLAP, "overlaps web", network="web")
    e.trace_id = "ab" * 16
    body = codec.error_body(e)
    assert json.loads(body) == {"code": "subnet_overlap", "message": "overlaps web",
                                "details": {"network": "web"}, "trace_id": "ab" * 16}
    back = codec.decode_error(body, "409", "overlaps web")
    assert isinstance(back, E.Conflict) and back.code == "subnet_overlap" and back.trace_id == "ab" * 16


def test_decode_error_without_a_body_uses_the_status() -> None:
    back = codec.decode_error(b"", "404", "no such thing")
    assert isinstance(back, E.NotFound) and back.message == "no such thing"
    assert codec.decode_error(b"garbage", "500", "").code == "internal"


@given(st.binary(max_size=300))
def test_any_bytes_give_a_value_or_a_400(data: bytes) -> None:
    try:
        codec.decode(data, Req, max_bytes=200)
    except E.VNetError as e:
        assert e.status == 400
        assert e.code in ("invalid_json", "invalid_request", "unknown_field", "payload_too_large")
