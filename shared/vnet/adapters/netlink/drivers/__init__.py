"""The kernel side of the network drivers, one module each, and their registry.

Beside each pure driver (:mod:`vnet.core.drivers`, same module name) sits its kernel
half (:class:`~vnet.adapters.netlink.drivers.base.KernelDriver`): the link kinds it
brings, how the probe tries them, their ``IFLA_INFO_DATA`` for the applier and the
observer. Adding a driver: its module here and one ``register`` line below
(``docs/drivers.md``).
"""

from __future__ import annotations

from vnet.adapters.netlink.drivers import bridge, host, ipvlan, macvlan, overlay
from vnet.adapters.netlink.drivers.base import KernelDriver, Prober

_REGISTRY: dict[str, KernelDriver] = {}
_BY_KIND: dict[str, KernelDriver] = {}


def register(driver: KernelDriver) -> KernelDriver:
    """Add ``driver`` under its name; each link kind belongs to one kernel driver."""
    if driver.name in _REGISTRY:
        raise ValueError(f"kernel driver {driver.name!r} is registered already")
    for kind in driver.kinds:
        if kind in _BY_KIND:
            raise ValueError(f"link kind {kind!r} belongs to kernel driver {_BY_KIND[kind].name!r} already")
    _REGISTRY[driver.name] = driver
    for kind in driver.kinds:
        _BY_KIND[kind] = driver
    return driver


def unregister(name: str) -> None:
    d = _REGISTRY.pop(name, None)
    if d is not None:
        for kind in d.kinds:
            _BY_KIND.pop(kind, None)


# The registry: one line per driver, in probe order.
register(bridge.DRIVER)
register(overlay.DRIVER)
register(macvlan.DRIVER)
register(ipvlan.DRIVER)
register(host.DRIVER)


def get(name: str) -> KernelDriver | None:
    return _REGISTRY.get(name)


def for_kind(kind: str) -> KernelDriver | None:
    """The kernel driver that brings link kind ``kind`` (None: a kind no driver decodes)."""
    return _BY_KIND.get(kind)


def all_kernel_drivers() -> list[KernelDriver]:
    return list(_REGISTRY.values())


def kernel_feature(kind: str) -> str | None:
    """The kernel option link kind ``kind`` needs, for ``driver_unavailable`` messages."""
    d = _BY_KIND.get(kind)
    return None if d is None else d.features.get(kind)


__all__ = ["KernelDriver", "Prober", "all_kernel_drivers", "for_kind", "get", "kernel_feature", "register",
           "unregister"]
