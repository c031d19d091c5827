"""The kernel side of a network driver: what a driver knows about rtnetlink.

Each :class:`KernelDriver` sits beside its pure half (:mod:`vnet.core.drivers`, same
module name) and covers the link kinds that driver brings:

==============  ==================================================================
``kinds``       the link kinds it brings (each kind belongs to one kernel driver)
``probe``       try to create each of them in the probe's scratch namespace
``info_data``   apply: the ``IFLA_INFO_DATA`` of a link of one of its kinds
``parse_attr``  observe: decode one ``IFLA_INFO_DATA`` attribute of such a link
``features``    the kernel option each kind needs (worded in ``driver_unavailable``)
==============  ==================================================================

Executing ops stays in :mod:`vnet.adapters.netlink.apply`: ops are shared by drivers
(the bridge, its veths and addresses serve bridge and overlay alike), so the applier
executes ops and asks the kernel driver only for what is particular to a kind.
Deleting a link is one generic request for every kind, so there is no kernel
teardown per driver (what to delete is the pure driver's ``teardown``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Protocol

from vnet.core.planning.ops import PlanOp

if TYPE_CHECKING:
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    from vnet.adapters.netlink.observe import RawLink


class Prober(Protocol):
    """What the probe offers a kernel driver (:mod:`vnet.adapters.netlink.probe`)."""

    prefix: str  # names of probe links (inside the scratch namespace only)

    def attempt(self, kind: str, name: str, build: Callable[[], ifinfmsg]) -> bool:
        """Create a link; record whether the kernel did (True) or refused (False)."""

    def skip(self, kind: str, reason: str) -> None:
        """Record ``kind`` as not testable here."""

    def parent(self) -> int | None:
        """Index of a probe veth usable as a parent (None when veth is unavailable)."""


class KernelDriver(abc.ABC):
    name: ClassVar[str]  # the pure driver's name
    kinds: ClassVar[tuple[str, ...]]
    features: ClassVar[dict[str, str]] = {}  # kind -> the kernel option it needs

    @abc.abstractmethod
    def probe(self, p: Prober) -> None:
        """Try each of :attr:`kinds` in the scratch namespace."""

    @abc.abstractmethod
    def info_data(self, op: PlanOp, index: Callable[[str], int]) -> bytes:
        """``IFLA_INFO_DATA`` payload for the link ``op`` creates (``index`` resolves a
        host interface name); raise ``ValueError`` for an op this driver does not make."""

    @abc.abstractmethod
    def parse_attr(self, r: RawLink, t: int, buf: bytes, a: int, b: int) -> None:
        """Decode attribute ``t`` (payload ``buf[a:b]``) of a link of one of :attr:`kinds`."""


class NoKernelData(KernelDriver):
    """For drivers whose links carry no ``IFLA_INFO_DATA`` of their own."""

    def info_data(self, op: PlanOp, index: Callable[[str], int]) -> bytes:
        raise ValueError(f"the {self.name} driver makes no link with kind-specific data ({op.op_name()})")

    def parse_attr(self, r: RawLink, t: int, buf: bytes, a: int, b: int) -> None:
        return None
