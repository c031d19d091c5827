"""The macvlan driver: each endpoint a macvlan of a host interface, with its own MAC (pure).

Modes bridge (default), private, vepa, passthru — the one list of them (the kernel's
numbers for them are in :mod:`vnet.adapters.netlink.drivers.macvlan`). A network may
ask for a host shim (``NetDesired.host_shim``): frames between a macvlan and its
parent never meet, so the host reaches its macvlan containers through the shim.
"""

from __future__ import annotations

from vnet.core.drivers.base import MTU, PARENT, OptionSpec, choice
from vnet.core.drivers.subif import SubIfDriver

MODES = ("bridge", "private", "vepa", "passthru")


class MacvlanDriver(SubIfDriver):
    name = "macvlan"
    description = "a macvlan sub-interface of a host interface"
    options = (
        PARENT,
        OptionSpec("mode", "macvlan mode", choice(*MODES), default=MODES[0], choices=MODES),
        MTU,
    )
    kernel_kinds = ("macvlan",)
    kind = "macvlan"
    modes = MODES
    host_shim = True
    subif_kind = "macvlan"
    departed_by_mac = True  # its MAC is the endpoint's: only that interface is ours to delete
    enforced_in_container = True


DRIVER = MacvlanDriver()
