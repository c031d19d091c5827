"""Deterministic, IFNAMSIZ-safe names for what the node worker creates (pure).

Linux interface names are at most 15 bytes (IFNAMSIZ 16 with the NUL). Our names
are derived from object ids with SHA-256, so every node computes the same name for
the same object without asking anyone, a restarted worker recognises what it made,
and teardown can tell our interfaces from everybody else's by shape alone:

===============  =========================  ======  =============================
what             name                       length  collision space
===============  =========================  ======  =============================
network bridge   ``vnb-`` + 10 hex          14      40 bits (per host)
endpoint veth    ``vne`` + 12 hex           15      48 bits (per host)
network VXLAN    ``vnx-`` + 10 hex          14      40 bits (per host)
macvlan shim     ``vnm-`` + 10 hex          14      40 bits (per host)
WireGuard        ``vnw-`` + 10 hex          14      40 bits (per machine)
===============  =========================  ======  =============================

(Calico's ``cali`` + 11 hex is the model.) With 48 bits, 10,000 endpoints on one
host collide with probability about 2e-7; the planner still checks for a clash and
reports it instead of wiring two endpoints to one interface.
"""

from __future__ import annotations

import functools
import hashlib
import re

IFNAMSIZ = 16
MAX_IFNAME = IFNAMSIZ - 1

BRIDGE_PREFIX = "vnb-"
VETH_PREFIX = "vne"
VXLAN_PREFIX = "vnx-"
SHIM_PREFIX = "vnm-"
WG_PREFIX = "vnw-"
_BRIDGE_HEX = 10
_VETH_HEX = 12

_BRIDGE_RE = re.compile(rf"^{re.escape(BRIDGE_PREFIX)}[0-9a-f]{{{_BRIDGE_HEX}}}$")
_VETH_RE = re.compile(rf"^{re.escape(VETH_PREFIX)}[0-9a-f]{{{_VETH_HEX}}}$")
_VXLAN_RE = re.compile(rf"^{re.escape(VXLAN_PREFIX)}[0-9a-f]{{{_BRIDGE_HEX}}}$")
_SHIM_RE = re.compile(rf"^{re.escape(SHIM_PREFIX)}[0-9a-f]{{{_BRIDGE_HEX}}}$")
_WG_RE = re.compile(rf"^{re.escape(WG_PREFIX)}[0-9a-f]{{{_BRIDGE_HEX}}}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class InvalidName(ValueError):
    """A name or MAC that the kernel would refuse (or that is not ours to take)."""


def _digest(kind: str, ident: str) -> str:
    if not ident:
        raise InvalidName(f"empty {kind} id")
    return hashlib.sha256(f"vnet:{kind}:{ident}".encode()).hexdigest()


@functools.lru_cache(maxsize=1 << 16)
def bridge_name(network_id: str) -> str:
    """The Linux bridge of network ``network_id`` on every host (14 chars)."""
    return BRIDGE_PREFIX + _digest("network", network_id)[:_BRIDGE_HEX]


@functools.lru_cache(maxsize=1 << 16)
def veth_name(endpoint_id: str) -> str:
    """The host-side veth of endpoint ``endpoint_id`` (15 chars)."""
    return VETH_PREFIX + _digest("endpoint", endpoint_id)[:_VETH_HEX]


@functools.lru_cache(maxsize=1 << 16)
def vxlan_name(network_id: str) -> str:
    """The VXLAN device of overlay network ``network_id`` on every host (14 chars)."""
    return VXLAN_PREFIX + _digest("network", network_id)[:_BRIDGE_HEX]


@functools.lru_cache(maxsize=1 << 16)
def shim_name(network_id: str) -> str:
    """The host-side macvlan shim of network ``network_id`` (14 chars)."""
    return SHIM_PREFIX + _digest("network", network_id)[:_BRIDGE_HEX]


@functools.lru_cache(maxsize=1024)
def wg_name(node: str) -> str:
    """The default WireGuard interface of node ``node`` (14 chars). One per node, not one
    per host namespace: wireguard-go's control socket ``/var/run/wireguard/<name>.sock``
    is a path every namespace of the machine shares, so several node workers on one
    machine (simulated hosts, tests, demos) each need their own name."""
    return WG_PREFIX + _digest("wireguard", node)[:_BRIDGE_HEX]


def bridge_mac(network_id: str) -> str:
    """A fixed, locally administered unicast MAC for a network's bridge.

    Without an explicit address a Linux bridge takes the lowest MAC of its ports,
    so the gateway's MAC would change as containers come and go (and every
    container's ARP entry for the gateway would go stale). Deriving it from the
    network id keeps it stable and identical on every host (distributed gateway).
    """
    h = bytes.fromhex(_digest("bridge-mac", network_id)[:12])
    return local_mac(h)


def local_mac(six_bytes: bytes) -> str:
    """A locally administered unicast MAC built from 6 bytes (random or hashed)."""
    if len(six_bytes) < 6:
        raise InvalidName("need 6 bytes for a MAC")
    b = bytearray(six_bytes[:6])
    b[0] = (b[0] & 0xFC) | 0x02  # unicast, locally administered
    return ":".join(f"{x:02x}" for x in b)


def is_our_bridge(name: str) -> bool:
    return _BRIDGE_RE.fullmatch(name) is not None


def is_our_veth(name: str) -> bool:
    return _VETH_RE.fullmatch(name) is not None


def is_our_vxlan(name: str) -> bool:
    return _VXLAN_RE.fullmatch(name) is not None


def is_our_shim(name: str) -> bool:
    return _SHIM_RE.fullmatch(name) is not None


def is_our_wg(name: str) -> bool:
    """A default WireGuard interface name. Not part of :func:`is_ours`: the planner deletes
    every interface of :func:`is_ours` that no network wants, and the WireGuard interface
    belongs to the node's WireGuard manager (vnet.adapters.wireguard), not to a network."""
    return _WG_RE.fullmatch(name) is not None


def is_ours(name: str) -> bool:
    """True only for the names of networks' and endpoints' interfaces this module generates:
    teardown never touches others."""
    return is_our_bridge(name) or is_our_veth(name) or is_our_vxlan(name) or is_our_shim(name)


def check_ifname(name: str) -> str:
    """Return ``name`` if the kernel accepts it as an interface name (``dev_valid_name``)."""
    if not name:
        raise InvalidName("interface name is empty")
    if len(name.encode()) > MAX_IFNAME:
        raise InvalidName(f"interface name {name!r} is longer than {MAX_IFNAME} bytes")
    if name in (".", ".."):
        raise InvalidName(f"interface name {name!r} is not allowed")
    for ch in name:
        if ch in "/:" or ch.isspace() or not ch.isprintable():
            raise InvalidName(f"interface name {name!r} contains {ch!r}")
    return name


def normalize_mac(mac: str) -> str:
    """Lower-case colon form; raises unless it is a valid unicast, non-zero MAC."""
    m = mac.strip().lower().replace("-", ":")
    if not _MAC_RE.fullmatch(m):
        raise InvalidName(f"{mac!r} is not a MAC address (expected six hex bytes, e.g. 02:42:ac:11:00:02)")
    first = int(m[:2], 16)
    if first & 0x01:
        raise InvalidName(f"{mac!r} is a multicast MAC; an interface needs a unicast one")
    if m == "00:00:00:00:00:00":
        raise InvalidName("00:00:00:00:00:00 is not a usable MAC")
    return m
