"""Every error code VNet can return, in one place, and the exception tree.

A code is a stable, machine-readable string (``subnet_overlap``); its status is the
HTTP meaning carried in the ``Nats-Service-Error-Code`` header. Messages are for
people: they say what was wrong and what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ErrorCode:
    code: str
    status: int
    summary: str


_REGISTRY: dict[str, ErrorCode] = {}


def _code(code: str, status: int, summary: str) -> ErrorCode:
    if code in _REGISTRY:
        raise ValueError(f"duplicate error code {code!r}")
    ec = ErrorCode(code, status, summary)
    _REGISTRY[code] = ec
    return ec


# 400: the request is malformed or a value is invalid
INVALID_JSON = _code("invalid_json", 400, "the request body is not valid JSON")
INVALID_REQUEST = _code("invalid_request", 400, "a field is missing, has the wrong type or an invalid value")
UNKNOWN_FIELD = _code("unknown_field", 400, "the request has a field this operation does not know")
PAYLOAD_TOO_LARGE = _code("payload_too_large", 400, "the request body is larger than the operation accepts")
INVALID_CIDR = _code("invalid_cidr", 400, "a CIDR is not valid")
INVALID_GATEWAY = _code("invalid_gateway", 400, "the gateway is not a usable address of the subnet")
INVALID_OPTION = _code("invalid_option", 400, "a driver option is unknown or has an invalid value")
INVALID_CONFIG = _code("invalid_config", 400, "a configuration value is invalid")
# 404
NOT_FOUND = _code("not_found", 404, "the thing named does not exist")
NETWORK_NOT_FOUND = _code("network_not_found", 404, "no network has that id or name")
ENDPOINT_NOT_FOUND = _code("endpoint_not_found", 404, "no endpoint has that id")
NODE_NOT_FOUND = _code("node_not_found", 404, "no node worker with that id is registered")
# 409
CONFLICT = _code("conflict", 409, "the request clashes with existing state")
NAME_TAKEN = _code("name_taken", 409, "another object already has that name")
SUBNET_OVERLAP = _code("subnet_overlap", 409, "the subnet overlaps an existing network")
ADDRESS_IN_USE = _code("address_in_use", 409, "the address is already allocated")
NETWORK_IN_USE = _code("network_in_use", 409, "the network still has endpoints")
# 422 / 423
UNPROCESSABLE = _code("unprocessable", 422, "the request is well-formed but cannot be carried out as asked")
LOCKED = _code("locked", 423, "another operation holds the lock on this object; retry")
# 503
POOL_EXHAUSTED = _code("pool_exhausted", 503, "no free address is left in the pool")
LIMIT_REACHED = _code("limit_reached", 503, "a configured limit is reached")
DRIVER_UNAVAILABLE = _code("driver_unavailable", 503, "no node can run this driver")
UNAVAILABLE = _code("unavailable", 503, "a dependency (NATS, Redis, a node) is unavailable; retry later")
OVERLOADED = _code("overloaded", 503, "the service is at its concurrency bound; retry later")
TIMEOUT = _code("timeout", 504, "no reply came in time")
# 500
INTERNAL = _code("internal", 500, "an unexpected error on our side; the trace id finds it")


def all_codes() -> dict[str, ErrorCode]:
    """Every registered code, by name (used for docs and the contract document)."""
    return dict(_REGISTRY)


def lookup(code: str) -> ErrorCode:
    return _REGISTRY.get(code, INTERNAL)


class VNetError(Exception):
    """Base of every error VNet reports: ``.code``, ``.status``, ``.message``, ``.details``."""

    default: ClassVar[ErrorCode] = INTERNAL

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | str | None = None,
        details: dict[str, Any] | None = None,
        trace_id: str | None = None,
    ) -> None:
        super().__init__(message)
        if code is None:
            ec = self.default
        elif isinstance(code, str):
            ec = lookup(code)
            if ec.code != code:  # unknown code from a newer peer: keep its name
                ec = ErrorCode(code, ec.status, ec.summary)
        else:
            ec = code
        self.error_code = ec
        self.message = message
        self.details: dict[str, Any] = details or {}
        self.trace_id = trace_id

    @property
    def code(self) -> str:
        return self.error_code.code

    @property
    def status(self) -> int:
        return self.error_code.status

    def __str__(self) -> str:
        s = f"{self.message} [{self.code}]"
        if self.trace_id:
            s += f" (trace {self.trace_id})"
        return s


class InvalidRequest(VNetError):
    default = INVALID_REQUEST


class NotFound(VNetError):
    default = NOT_FOUND


class Conflict(VNetError):
    default = CONFLICT


class Unavailable(VNetError):
    default = UNAVAILABLE


class InternalError(VNetError):
    default = INTERNAL


_BY_STATUS: dict[int, type[VNetError]] = {
    400: InvalidRequest,
    404: NotFound,
    409: Conflict,
    422: InvalidRequest,
    423: Conflict,
    503: Unavailable,
    504: Unavailable,
    500: InternalError,
}


def error_from(code: str, message: str, details: dict[str, Any] | None = None,
               trace_id: str | None = None) -> VNetError:
    """Rebuild the right exception class from a wire error."""
    ec = lookup(code)
    cls = _BY_STATUS.get(ec.status, VNetError)
    return cls(message, code=code, details=details, trace_id=trace_id)


def make(ec: ErrorCode, message: str, **details: Any) -> VNetError:
    """Build the exception for a registered code (``raise make(SUBNET_OVERLAP, ...)``)."""
    cls = _BY_STATUS.get(ec.status, VNetError)
    return cls(message, code=ec, details=details or None)
