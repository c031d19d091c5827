"""JSON on the wire with msgspec: strict decoding, errors a person can act on."""

from __future__ import annotations

import json
import re
from typing import Any, Generic, TypeVar

import msgspec

from vnet.core import errors as E

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}

# Default cap on a request body; a type may lower it with its own constraints.
MAX_REQUEST_BYTES = 64 * 1024


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def _decoder(tp: type[T]) -> msgspec.json.Decoder[T]:
    dec = _decoders.get(tp)
    if dec is None:
        dec = msgspec.json.Decoder(tp, strict=True)
        _decoders[tp] = dec
    return dec


_UNKNOWN_AT = re.compile(r"Object contains unknown field `(.*)` - at `([^`]*)`$", re.DOTALL)
_UNKNOWN = re.compile(r"Object contains unknown field `(.*)`$", re.DOTALL)
_AT = re.compile(r" - at `([^`]*)`$")


def _quote(name: str, limit: int = 100) -> str:
    """A field name for a message: JSON-quoted (never a Python repr), cut to ``limit`` characters."""
    cut = name if len(name) <= limit else name[:limit] + "..."
    return json.dumps(cut)


class RequestDecoder(Generic[T]):
    """Strict decoding of one request type; every failure is a 400 that names the problem.

    Codes: ``payload_too_large`` (over ``max_bytes``, checked before parsing),
    ``invalid_json`` (not JSON), ``unknown_field`` (a field the type does not have),
    ``invalid_request`` (wrong type, missing field, value out of its constraints).
    An empty body decodes as ``{}``.
    """

    __slots__ = ("_dec", "max_bytes", "tp")

    def __init__(self, tp: type[T], max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.tp = tp
        self.max_bytes = max_bytes
        self._dec: msgspec.json.Decoder[T] = _decoder(tp)

    def __call__(self, data: bytes) -> T:
        if len(data) > self.max_bytes:
            raise E.make(
                E.PAYLOAD_TOO_LARGE,
                f"request body is {len(data)} bytes; this operation accepts at most {self.max_bytes}",
                size=len(data),
                limit=self.max_bytes,
            )
        if not data or data.isspace():
            data = b"{}"
        try:
            return self._dec.decode(data)
        except msgspec.ValidationError as exc:
            raise _validation_error(str(exc), _type_name(self.tp)) from None
        except msgspec.DecodeError as exc:
            raise E.make(E.INVALID_JSON, f"request body is not valid JSON: {exc}", reason=str(exc)) from None


def _type_name(tp: Any) -> str:
    return str(getattr(tp, "__name__", tp))


def _validation_error(msg: str, type_name: str) -> E.VNetError:
    m = _UNKNOWN_AT.match(msg) or _UNKNOWN.match(msg)
    if m:
        where = m.group(2) if m.re is _UNKNOWN_AT else "$"
        return E.make(
            E.UNKNOWN_FIELD,
            f"unknown field {_quote(m.group(1))} at {where}; remove it (see the contract for the fields "
            f"{type_name} accepts)",
            field=m.group(1)[:100],
            path=where,
        )
    at = _AT.search(msg)
    if at:
        return E.make(E.INVALID_REQUEST, f"invalid {type_name}: {msg}", reason=msg, path=at.group(1))
    return E.make(E.INVALID_REQUEST, f"invalid {type_name}: {msg}", reason=msg)


_request_decoders: dict[tuple[Any, int], RequestDecoder[Any]] = {}


def request_decoder(tp: type[T], max_bytes: int = MAX_REQUEST_BYTES) -> RequestDecoder[T]:
    """The cached :class:`RequestDecoder` for ``tp`` and ``max_bytes``."""
    key = (tp, max_bytes)
    dec = _request_decoders.get(key)
    if dec is None:
        dec = _request_decoders[key] = RequestDecoder(tp, max_bytes)
    return dec


def decode(data: bytes, tp: type[T], *, max_bytes: int = MAX_REQUEST_BYTES) -> T:
    """Decode ``data`` as ``tp`` or raise a 400 that names the problem."""
    return request_decoder(tp, max_bytes)(data)


class ErrorBody(msgspec.Struct, kw_only=True):
    """The JSON body of every error reply."""

    code: str
    message: str
    details: dict[str, Any] = {}
    trace_id: str | None = None


def error_body(err: E.VNetError) -> bytes:
    return encode(ErrorBody(code=err.code, message=err.message, details=err.details, trace_id=err.trace_id))


def decode_error(data: bytes, status: str, description: str) -> E.VNetError:
    try:
        body = msgspec.json.decode(data, type=ErrorBody)
        return E.error_from(body.code, body.message, body.details, body.trace_id)
    except (msgspec.DecodeError, msgspec.ValidationError):
        code = {"400": "invalid_request", "404": "not_found", "409": "conflict", "503": "unavailable"}.get(
            status, "internal"
        )
        return E.error_from(code, description or f"error {status}")
