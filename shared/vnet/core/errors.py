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
DEADLINE_EXCEEDED = _code("deadline_exceeded", 504, "the caller's deadline passed before the work started; nothing "
                          "was done")
REPLY_TOO_LARGE = _code("reply_too_large", 413, "the reply would exceed the bus's maximum message size; ask for "
                        "less (page with a cursor or a narrower request)")
# 500
INTERNAL = _code("internal", 500, "an unexpected error on our side; the trace id finds it")

# IPAM (appended by the IPAM service)
ADDRESS_NOT_ASSIGNABLE = _code("address_not_assignable", 400,
                               "the address is outside the pool or is its network, broadcast, gateway, "
                               "a reserved or an excluded address")
POOL_NOT_FOUND = _code("pool_not_found", 404, "the network has no IPAM pool of that family")
POOL_EXISTS = _code("pool_exists", 409, "a pool with other settings already exists for that network and family")
POOL_IN_USE = _code("pool_in_use", 409, "the pool still has allocated addresses")


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
    413: InvalidRequest,
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


# Networks and topology (appended by the network service)
CIDR_HOST_BITS = _code("cidr_host_bits", 400, "a CIDR has host bits set; its network address is suggested")
UNKNOWN_DRIVER = _code("unknown_driver", 400, "no network driver has that name")
UNKNOWN_ISOLATION = _code("unknown_isolation", 400, "no isolation mode has that name")
CIDR_OUTSIDE_PARENT = _code("cidr_outside_parent", 400,
                            "a child network's subnet is not inside its parent's, or covers the parent's gateway")
SELF_CONNECTION = _code("self_connection", 400, "a network cannot be connected to itself")
NO_IPV6_POOL = _code("no_ipv6_pool", 422, "IPv6 was asked for but no IPv6 subnet was given or configured")
PARENT_NOT_FOUND = _code("parent_not_found", 404, "the parent network named does not exist")
MESH_NOT_FOUND = _code("mesh_not_found", 404, "no mesh group has that name")
SUBNET_POOL_EXHAUSTED = _code("subnet_pool_exhausted", 503,
                              "no free subnet of the asked size is left in the pool networks are carved from")

# Endpoints and nodes (appended by the endpoint service)
INVALID_MAC = _code("invalid_mac", 400, "a MAC address is malformed, multicast or all zeros")
INVALID_IFNAME = _code("invalid_ifname", 400, "an interface name is empty, longer than 15 bytes or has a "
                       "character the kernel refuses")
INVALID_NETNS = _code("invalid_netns", 400, "a network namespace is neither a name under /run/netns nor an "
                      "absolute path")
NETNS_NOT_FOUND = _code("netns_not_found", 404, "the container's network namespace does not exist on its node")
MAC_IN_USE = _code("mac_in_use", 409, "another endpoint of the network has that MAC address")
IFNAME_IN_USE = _code("ifname_in_use", 409, "the container already has an interface with that name")
PORT_IN_USE = _code("port_in_use", 409, "another endpoint of the node publishes that host port")
STALE_REVISION = _code("stale_revision", 409, "the object changed since the revision the request names; read it "
                       "again and retry")
ENDPOINT_GONE = _code("endpoint_gone", 409, "the request id created an endpoint that has since been deleted")
ENCRYPTION_UNAVAILABLE = _code("encryption_unavailable", 503,
                               "the node cannot run encrypted overlays (no WireGuard): install wireguard-go and "
                               "wireguard-tools or load the wireguard kernel module, give the node a writable "
                               "node_state_dir, and restart its worker; the endpoint's reason says which is missing")

# Policy (appended by the policy service)
RULE_NOT_FOUND = _code("rule_not_found", 404, "no allow rule has that id")

# The command line (vnetctl): reported under --json like any other error
USAGE = _code("usage", 400, "the command line is wrong (an unknown verb or option, a missing argument, a bad "
              "value); `vnetctl VERB --help` shows the usage")
