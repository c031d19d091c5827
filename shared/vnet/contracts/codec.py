"""JSON on the wire with msgspec: strict decoding, errors a person can act on."""

from __future__ import annotations

import re
from typing import Any, TypeVar

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


_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`(?: - at `([^`]*)`)?")


def decode(data: bytes, tp: type[T], *, max_bytes: int = MAX_REQUEST_BYTES) -> T:
    """Decode ``data`` as ``tp`` or raise a 400 that names the problem."""
    if len(data) > max_bytes:
        raise E.make(
            E.PAYLOAD_TOO_LARGE,
            f"request body is {len(data)} bytes; this operation accepts at most {max_bytes}",
            size=len(data),
            limit=max_bytes,
        )
    if not data.strip():
        data = b"{}"
    try:
        return _decoder(tp).decode(data)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = _UNKNOWN.match(msg)
        if m:
            where = m.group(2) or "$"
            raise E.make(
                E.UNKNOWN_FIELD,
                f"unknown field {m.group(1)!r} at {where}; remove it (see the contract for the fields "
                f"{tp.__name__} accepts)",
                field=m.group(1),
                path=where,
            ) from None
        raise E.make(E.INVALID_REQUEST, f"invalid {tp.__name__}: {msg}", reason=msg) from None
    except msgspec.DecodeError as exc:
        raise E.make(E.INVALID_JSON, f"request body is not valid JSON: {exc}", reason=str(exc)) from None


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
