"""Kernel side of the macvlan driver: link kind ``macvlan`` and its modes' numbers."""

from __future__ import annotations

from vnet.adapters.netlink.drivers.subif import SubIfKernel


class MacvlanKernel(SubIfKernel):
    name = "macvlan"
    kind = "macvlan"
    kinds = ("macvlan",)
    features = {"macvlan": "CONFIG_MACVLAN (link kind macvlan)"}
    # linux/if_link.h MACVLAN_MODE_*; "source" is only ever read (VNet does not make it)
    modes = {"private": 1, "vepa": 2, "bridge": 4, "passthru": 8, "source": 16}
    mode_format = "=I"
    probe_mode = "bridge"


DRIVER = MacvlanKernel()
