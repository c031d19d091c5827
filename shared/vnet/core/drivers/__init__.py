"""Network drivers: one module each, and the registry everything else consults (pure).

Each driver is a :class:`~vnet.core.drivers.base.Driver` in its own module (its kernel
side in :mod:`vnet.adapters.netlink.drivers`). The registry below is the one list of
drivers: the network service validates options through it, the planner, the
observation targets and teardown dispatch through it, the probe lists it. Adding a
driver is its two modules, one ``register`` line here and one in the kernel
registry, and its docs — ``docs/drivers.md`` walks through it.

Each driver accepts a fixed set of string options (the wire carries ``options`` as a
string map, like Docker's ``--opt``). :func:`validate_options` rejects an unknown
option naming the allowed ones, checks every value, requires what the driver needs
(``parent`` for macvlan and ipvlan) and fills defaults, so the stored record says
exactly what the node worker will build::

    >>> validate_options("macvlan", {"parent": "eth0"})
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

from collections.abc import Mapping

from vnet.core import errors as E
from vnet.core.drivers import bridge, host, ipvlan, macvlan, overlay
from vnet.core.drivers.base import Driver, DriverSchema, OptionSpec
from vnet.core.model import DriverType

_REGISTRY: dict[str, Driver] = {}


def register(driver: Driver) -> Driver:
    """Add ``driver`` under its name (a name registered twice is a mistake)."""
    if driver.name in _REGISTRY:
        raise ValueError(f"driver {driver.name!r} is registered already")
    _REGISTRY[driver.name] = driver
    return driver


def unregister(name: str) -> None:
    """Remove a driver (tests plug a driver in and take it out again)."""
    _REGISTRY.pop(name, None)


# The registry: one line per driver, in the order they are listed.
register(bridge.DRIVER)
register(overlay.DRIVER)
register(macvlan.DRIVER)
register(ipvlan.DRIVER)
register(host.DRIVER)


def get(name: str) -> Driver:
    """The driver registered as ``name`` (a ``DriverType`` member works: it is its value)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise E.make(E.UNKNOWN_DRIVER, f"unknown driver {name!r}; choose one of: {', '.join(_REGISTRY)}",
                     driver=name, allowed=list(_REGISTRY)) from None


def all_drivers() -> list[Driver]:
    """Every registered driver, in registry order."""
    return list(_REGISTRY.values())


def names() -> list[str]:
    return list(_REGISTRY)


def schemas() -> dict[str, DriverSchema]:
    return {name: d.schema() for name, d in _REGISTRY.items()}


MACVLAN_MODES = macvlan.MODES
IPVLAN_MODES = ipvlan.MODES


def parse_driver(name: str) -> DriverType:
    """``"Bridge"`` / ``"bridge"`` -> the ``DriverType`` member ``bridge``; raises ``unknown_driver``.

    Parses the wire enum (the public contract), not the registry: a driver reaches the
    wire only once ``DriverType`` has its member (see docs/drivers.md)."""
    s = name.strip().lower()
    for d in DriverType:
        if d.value == s:
            return d
    allowed = ", ".join(d.value for d in DriverType)
    raise E.make(E.UNKNOWN_DRIVER, f"unknown driver {name!r}; choose one of: {allowed}", driver=name,
                 allowed=[d.value for d in DriverType])


def validate_options(driver: str, options: Mapping[str, str]) -> dict[str, str]:
    """Check ``options`` against ``driver``'s schema; return them normalised with defaults filled.

    Raises ``invalid_option`` naming the option and what is allowed.
    """
    return get(driver).validate_options(options)


__all__ = ["IPVLAN_MODES", "MACVLAN_MODES", "Driver", "DriverSchema", "OptionSpec", "all_drivers", "get", "names",
           "parse_driver", "register", "schemas", "unregister", "validate_options"]
