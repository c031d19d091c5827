"""Network drivers' option schemas and their validation, pure.

Each driver accepts a fixed set of string options (the wire carries ``options`` as a
string map, like Docker's ``--opt``). :func:`validate_options` rejects an unknown
option naming the allowed ones, checks every value, requires what the driver needs
(``parent`` for macvlan and ipvlan) and fills defaults, so the stored record says
exactly what the node worker will build::

    >>> validate_options(DriverType.MACVLAN, {"parent": "eth0"})
    {'mode': 'bridge', 'parent': 'eth0'}

============  ============================================================================
driver        options
============  ============================================================================
bridge        ``mtu``, ``bridge_name``
overlay       ``mtu``, ``vni``, ``encrypted``, ``vxlan_port``
macvlan       ``parent`` (required), ``mode`` (bridge|private|vepa|passthru), ``mtu``
ipvlan        ``parent`` (required), ``mode`` (l2|l3), ``mtu``
host          none: the container shares the host's namespace
============  ============================================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vnet.core import errors as E
from vnet.core.model import DriverType

# A Linux interface name: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or whitespace.
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class OptionSpec:
    """One option: its meaning, how a value is checked and normalised, its default."""

    name: str
    description: str
    check: Callable[[str], str]  # returns the normalised value or raises ValueError(reason)
    required: bool = False
    default: str | None = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class DriverSchema:
    driver: DriverType
    description: str
    options: tuple[OptionSpec, ...]

    def names(self) -> list[str]:
        return sorted(o.name for o in self.options)

    def option(self, name: str) -> OptionSpec | None:
        for o in self.options:
            if o.name == name:
                return o
        return None


def _int_range(lo: int, hi: int) -> Callable[[str], str]:
    def check(v: str) -> str:
        try:
            n = int(v.strip(), 10)
        except ValueError:
            raise ValueError(f"must be a whole number from {lo} to {hi}") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be from {lo} to {hi}")
        return str(n)

    return check


def _choice(*choices: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        s = v.strip().lower()
        if s not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return s

    return check


def _bool(v: str) -> str:
    s = v.strip().lower()
    if s in _TRUE:
        return "true"
    if s in _FALSE:
        return "false"
    raise ValueError("must be true or false")


def _ifname(v: str) -> str:
    s = v.strip()
    if not _IFNAME.match(s):
        raise ValueError("must be a Linux interface name: 1 to 15 letters, digits, '_', '.' or '-'")
    return s


_MTU = OptionSpec("mtu", "MTU of the network's interfaces (68-65535; default: the host's)", _int_range(68, 65535))

MACVLAN_MODES = ("bridge", "private", "vepa", "passthru")
IPVLAN_MODES = ("l2", "l3")

SCHEMAS: dict[DriverType, DriverSchema] = {
    DriverType.BRIDGE: DriverSchema(DriverType.BRIDGE, "a Linux bridge per network per host, veth per endpoint", (
        _MTU,
        OptionSpec("bridge_name", "name of the bridge device (default: derived from the network id)", _ifname),
    )),
    DriverType.OVERLAY: DriverSchema(DriverType.OVERLAY, "a bridge plus a VXLAN device per host; spans hosts", (
        _MTU,
        OptionSpec("vni", "VXLAN network identifier (1-16777215; default: allocated per network)",
                   _int_range(1, 16_777_215)),
        OptionSpec("encrypted", "carry the VXLAN underlay over WireGuard between hosts", _bool, default="false"),
        OptionSpec("vxlan_port", "UDP port of the VXLAN underlay (default 4789)", _int_range(1, 65535)),
    )),
    DriverType.MACVLAN: DriverSchema(DriverType.MACVLAN, "a macvlan sub-interface of a host interface", (
        OptionSpec("parent", "host interface the sub-interfaces hang off (e.g. eth0)", _ifname, required=True),
        OptionSpec("mode", "macvlan mode", _choice(*MACVLAN_MODES), default="bridge", choices=MACVLAN_MODES),
        _MTU,
    )),
    DriverType.IPVLAN: DriverSchema(DriverType.IPVLAN, "an ipvlan sub-interface sharing the host's MAC", (
        OptionSpec("parent", "host interface the sub-interfaces hang off (e.g. eth0)", _ifname, required=True),
        OptionSpec("mode", "ipvlan mode", _choice(*IPVLAN_MODES), default="l2", choices=IPVLAN_MODES),
        _MTU,
    )),
    DriverType.HOST: DriverSchema(DriverType.HOST, "the container shares the host's network namespace", ()),
}


def parse_driver(name: str) -> DriverType:
    """``"Bridge"`` / ``"bridge"`` -> :attr:`DriverType.BRIDGE`; raises ``unknown_driver``."""
    s = name.strip().lower()
    for d in DriverType:
        if d.value == s:
            return d
    allowed = ", ".join(d.value for d in DriverType)
    raise E.make(E.UNKNOWN_DRIVER, f"unknown driver {name!r}; choose one of: {allowed}", driver=name,
                 allowed=[d.value for d in DriverType])


def validate_options(driver: DriverType, options: Mapping[str, str]) -> dict[str, str]:
    """Check ``options`` against ``driver``'s schema; return them normalised with defaults filled.

    Raises ``invalid_option`` naming the option and what is allowed.
    """
    schema = SCHEMAS[driver]
    allowed = schema.names()
    out: dict[str, str] = {}
    for key, value in options.items():
        spec = schema.option(key)
        if spec is None:
            hint = f"allowed: {', '.join(allowed)}" if allowed else "it takes no options"
            raise E.make(E.INVALID_OPTION, f"unknown option {key!r} for driver {driver.value}; {hint}",
                         option=key, driver=driver.value, allowed=allowed)
        try:
            out[key] = spec.check(value)
        except ValueError as exc:
            raise E.make(E.INVALID_OPTION, f"option {key}={value!r} for driver {driver.value} {exc}",
                         option=key, driver=driver.value, value=value) from None
    for spec in schema.options:
        if spec.name in out:
            continue
        if spec.required:
            raise E.make(E.INVALID_OPTION, f"driver {driver.value} needs option {spec.name!r}: {spec.description}",
                         option=spec.name, driver=driver.value)
        if spec.default is not None:
            out[spec.name] = spec.default
    return dict(sorted(out.items()))
