"""What every endpoint operation shares: settings, store, clocks, validation (no I/O), MTUs.

The helpers keep their leading underscore: they are private to the endpoint service's package.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re

from vnet.core import drivers, naming
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork
from vnet.runtime.ports import EndpointStorePort as EndpointStore
from vnet.runtime.service import Ctx, Runtime

HEARTBEAT_MISSES = 3  # a node is gone after this many missed heartbeats
NODE_WATCH_S = 0.25  # how often the registrations due to expire by now are looked at
NODE_WATCH_FULL_S = 5.0  # how often every node's registration expiry is read
NODE_CALL_TIMEOUT_S = 2.0
WAIT_POLL_S = 1.0  # a waiting request also re-reads the record this often
# v2: the status subject gained the node id (vnet.evt.endpoint.status.<node>.<id>); a durable
# made for the old filter would keep it, so the new one has a new name.
STATUS_DURABLE = "vnet-endpoint-status-v2"
NETDEL_DURABLE = "vnet-endpoint-netdel"
PORT_REPAIR_S = 300.0  # how often the host-port claims are checked against the records (GC)
UPDATE_RETRIES = 20  # optimistic retries of an update without expected_revision under contention
HOST_NETNS_DEFAULT = "/proc/1/ns/net"

_IFNAME_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _store(ctx: Ctx | Runtime) -> EndpointStore:
    rt = ctx.rt if isinstance(ctx, Ctx) else ctx
    st: EndpointStore = rt.state["store"]
    return st


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- validation (no I/O) ------------------------------------------------------------------------


def _check_mac(mac: str) -> str:
    try:
        return naming.normalize_mac(mac)
    except naming.InvalidName as exc:
        raise E.make(E.INVALID_MAC, f"mac {exc}", mac=mac[:64]) from None


def _check_ifname(name: str) -> str:
    try:
        naming.check_ifname(name)
    except naming.InvalidName as exc:
        raise E.make(E.INVALID_IFNAME, f"{exc} (the kernel's limit is {naming.MAX_IFNAME} bytes)",
                     ifname=name[:64]) from None
    if not _IFNAME_CHARS.match(name):
        raise E.make(E.INVALID_IFNAME, f"interface name {name!r} may only contain letters, digits, '_', '.' and "
                     "'-', and must start with a letter or digit", ifname=name)
    return name


def check_netns(ref: str) -> str:
    """A name under /run/netns, or an absolute path without ``..``."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in ref):  # a NUL would reach open() and fail there (500)
        raise E.make(E.INVALID_NETNS, f"namespace {ref!r} contains a control character (NUL, newline, ...); "
                     "give a name under /run/netns or an absolute path", netns=ref)
    if ref.startswith("/"):
        parts = ref.split("/")
        if ".." in parts or "." in parts or "" in parts[1:]:
            raise E.make(E.INVALID_NETNS, f"namespace path {ref!r} must be a plain absolute path (no '.', '..' or "
                         "'//'), e.g. /proc/1234/ns/net or /run/netns/web-1", netns=ref)
        return ref
    if ref in (".", "..") or "/" in ref or any(c.isspace() for c in ref) or len(ref) > 255:
        raise E.make(E.INVALID_NETNS, f"namespace {ref!r} is neither a name under /run/netns nor an absolute path",
                     netns=ref)
    return ref


def _parse_ip(value: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        if "%" in value:  # an IPv6 zone id: Python accepts it, an endpoint's address has none
            raise ValueError(value)
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise E.make(E.INVALID_REQUEST, f"{what} {value!r} is not an IP address (give one without a prefix, "
                     "e.g. 172.20.1.10)", field=what, value=value) from None


# Without an mtu option: a bridge's interfaces get 1500; an overlay's leave room for the VXLAN
# header (50 bytes) on a 1500-byte underlay, and for WireGuard's too (80) when encrypted.
DEFAULT_MTU = 1500
OVERLAY_MTU = 1450
ENCRYPTED_OVERLAY_MTU = 1370


def _mtu(net: VirtualNetwork) -> int:
    default = DEFAULT_MTU
    if drivers.get(net.driver_type).spans_hosts:
        default = ENCRYPTED_OVERLAY_MTU if net.options.get("encrypted") == "true" else OVERLAY_MTU
    try:
        return int(net.options.get("mtu", default))
    except ValueError:
        return default


# --- read ----------------------------------------------------------------------------------------


def _not_found(ident: str) -> E.VNetError:
    return E.make(E.ENDPOINT_NOT_FOUND, f"no endpoint has id {ident!r}; `vnetctl endpoint ls` lists them",
                  endpoint=ident)
