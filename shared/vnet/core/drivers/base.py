"""The interface every network driver implements, and its option schema (pure).

A driver is one module under :mod:`vnet.core.drivers` holding one :class:`Driver`
subclass (its kernel side lives in :mod:`vnet.adapters.netlink.drivers`). Everything
else — the network service validating options, the planner, the observer's targets,
teardown, the probe — consults the driver through the registry
(:func:`vnet.core.drivers.get`), never by comparing ``DriverType`` members.

The interface, in the order a network meets it:

==================  ===============================================================
``options``         the option schema (:class:`OptionSpec`); ``validate_options``
                    checks a request's options against it (network service)
``validate``        a desired network on a node: fill the driver's fields of the
                    :class:`~vnet.core.planning.checks.NetView` or raise ``Invalid``
``plan_host``       once per reconcile, before any network (optional; overlay: the
                    WireGuard interface)
``plan_network``    the network's host-side objects (bridge, VXLAN, shim, ...)
``plan_endpoint``   one endpoint's interface in its container namespace
``observe``         the host interfaces a scoped observation must read for a network
``teardown``        every host interface the driver may have made for a network id
``wanted_links``    the host interfaces a desired network keeps (the full sweep
                    deletes the other interfaces of ours)
``kernel_kinds``    the link kinds the kernel must support (the probe tries them)
==================  ===============================================================

and class attributes the generic code reads instead of naming drivers (``bridged``,
``container_iface``, ``subif_kind``, ...; see :class:`Driver`).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vnet.core import errors as E

if TYPE_CHECKING:
    from vnet.core.dataplane_model import NetDesired, NodeDesired, NsState, PeerHost, RemoteEndpoint
    from vnet.core.planning.checks import EpView, NetView
    from vnet.core.planning.ops import PlanOp
    from vnet.core.planning.planner import Planner

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
    driver: str
    description: str
    options: tuple[OptionSpec, ...]

    def names(self) -> list[str]:
        return sorted(o.name for o in self.options)

    def option(self, name: str) -> OptionSpec | None:
        for o in self.options:
            if o.name == name:
                return o
        return None


def int_range(lo: int, hi: int) -> Callable[[str], str]:
    def check(v: str) -> str:
        try:
            n = int(v.strip(), 10)
        except ValueError:
            raise ValueError(f"must be a whole number from {lo} to {hi}") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be from {lo} to {hi}")
        return str(n)

    return check


def choice(*choices: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        s = v.strip().lower()
        if s not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return s

    return check


def boolean(v: str) -> str:
    s = v.strip().lower()
    if s in _TRUE:
        return "true"
    if s in _FALSE:
        return "false"
    raise ValueError("must be true or false")


def ifname(v: str) -> str:
    s = v.strip()
    if not _IFNAME.match(s):
        raise ValueError("must be a Linux interface name: 1 to 15 letters, digits, '_', '.' or '-'")
    return s


MTU = OptionSpec("mtu", "MTU of the network's interfaces (68-65535; default: the host's)", int_range(68, 65535))
PARENT = OptionSpec("parent", "host interface the sub-interfaces hang off (e.g. eth0)", ifname, required=True)


class Driver(abc.ABC):
    """One network driver's pure side. Subclasses set the class attributes and
    implement every abstract method (``tests/unit/test_driver_registry.py`` checks
    each registered driver does)."""

    name: ClassVar[str]  # the wire value (``DriverType``'s member value for a built-in driver)
    description: ClassVar[str]
    options: ClassVar[tuple[OptionSpec, ...]]
    kernel_kinds: ClassVar[tuple[str, ...]]  # link kinds the kernel must be able to create
    # Facts the generic planner and the node worker read instead of naming drivers:
    realised: ClassVar[bool] = True  # False: nothing of the network is made on a node (no MTU or gateway
    # checks, endpoints are ready as recorded)
    bridged: ClassVar[bool] = False  # a Linux bridge per network (forwarding on, proxy ARP for children)
    container_iface: ClassVar[bool] = False  # endpoints get an interface of their own in their container
    subif_kind: ClassVar[str | None] = None  # endpoints are sub-interfaces of this kind, no host side: the
    # reconciler remembers them to remove them (``Departed``)
    departed_by_mac: ClassVar[bool] = False  # only an interface with the endpoint's MAC is ours to delete
    spans_hosts: ClassVar[bool] = False  # one network across hosts: a VNI per network, remote endpoints,
    # an underlay and peers (and, when encrypted, the WireGuard mesh)
    enforced_in_container: ClassVar[bool] = False  # frames between its endpoints never cross the host's
    # hooks (they switch inside the parent device): isolation is enforced by tables in each container
    # (vnet.core.mvpolicy, docs/dataplane.md "macvlan enforcement")

    def schema(self) -> DriverSchema:
        return DriverSchema(self.name, self.description, self.options)

    def validate_options(self, options: Mapping[str, str]) -> dict[str, str]:
        """Check ``options`` against the schema; return them normalised with defaults filled.

        Raises ``invalid_option`` naming the option and what is allowed.
        """
        schema = self.schema()
        allowed = schema.names()
        out: dict[str, str] = {}
        for key, value in options.items():
            spec = schema.option(key)
            if spec is None:
                hint = f"allowed: {', '.join(allowed)}" if allowed else "it takes no options"
                raise E.make(E.INVALID_OPTION, f"unknown option {key!r} for driver {self.name}; {hint}",
                             option=key, driver=self.name, allowed=allowed)
            try:
                out[key] = spec.check(value)
            except ValueError as exc:
                raise E.make(E.INVALID_OPTION, f"option {key}={value!r} for driver {self.name} {exc}",
                             option=key, driver=self.name, value=value) from None
        for spec in schema.options:
            if spec.name in out:
                continue
            if spec.required:
                raise E.make(E.INVALID_OPTION, f"driver {self.name} needs option {spec.name!r}: {spec.description}",
                             option=spec.name, driver=self.name)
            if spec.default is not None:
                out[spec.name] = spec.default
        return dict(sorted(out.items()))

    @abc.abstractmethod
    def validate(self, net: NetView, desired: NodeDesired) -> None:
        """Check the driver's fields of a desired network on this node and fill the
        ``NetView``'s driver fields; raise :class:`~vnet.core.planning.checks.Invalid`."""

    def plan_host(self, p: Planner, nets: list[NetView]) -> None:  # noqa: B027 - optional hook, no-op by default
        """Once per reconcile, before any network: node-wide objects of this driver's networks."""

    @abc.abstractmethod
    def plan_network(self, p: Planner, net: NetView) -> None:
        """Append the ops that make the network's host-side objects match."""

    @abc.abstractmethod
    def plan_endpoint(self, p: Planner, ep: EpView, cns: NsState, ours: set[str]) -> None:
        """Append the ops that make one endpoint match (only called when ``container_iface``).

        ``cns`` is the container namespace as observed, ``ours`` the interface names the
        desired endpoints hold in it."""

    @abc.abstractmethod
    def observe(self, nd: NetDesired, desired: NodeDesired) -> set[str]:
        """Host interfaces (besides the network's bridge name) a scoped observation reads."""

    @abc.abstractmethod
    def teardown(self, network_id: str) -> tuple[str, ...]:
        """Every host interface this driver may have made for the network (removed with it)."""

    @abc.abstractmethod
    def wanted_links(self, nd: NetDesired) -> set[str]:
        """Host interfaces of ours a desired network keeps (the full sweep spares them)."""

    def remote_delta(self, nd: NetDesired, peers: Sequence[PeerHost], rem: RemoteEndpoint,
                     created: bool) -> list[PlanOp] | None:
        """The kernel ops for one endpoint of another host arriving in (``created``) or leaving
        network ``nd`` (its desired state before the event), decided without observing the
        kernel; None: the caller reconciles the network instead. Only a driver whose networks
        span hosts has remote endpoints."""
        return None
