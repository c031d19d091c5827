"""The ipvlan driver: each endpoint an ipvlan of a host interface, sharing its MAC (pure).

Modes l2 (default) and l3 — the one list of them (the kernel's numbers are in
:mod:`vnet.adapters.netlink.drivers.ipvlan`). Where the kernel lacks ipvlan the node
reports ``driver_unavailable`` with the kernel's refusal.
"""

from __future__ import annotations

from vnet.core.drivers.base import MTU, PARENT, OptionSpec, choice
from vnet.core.drivers.subif import SubIfDriver

MODES = ("l2", "l3")


class IpvlanDriver(SubIfDriver):
    name = "ipvlan"
    description = "an ipvlan sub-interface sharing the host's MAC"
    options = (
        PARENT,
        OptionSpec("mode", "ipvlan mode", choice(*MODES), default=MODES[0], choices=MODES),
        MTU,
    )
    kernel_kinds = ("ipvlan",)
    kind = "ipvlan"
    modes = MODES
    subif_kind = "ipvlan"


DRIVER = IpvlanDriver()
