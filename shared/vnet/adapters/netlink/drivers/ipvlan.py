"""Kernel side of the ipvlan driver: link kind ``ipvlan`` and its modes' numbers."""

from __future__ import annotations

from vnet.adapters.netlink.drivers.subif import SubIfKernel


class IpvlanKernel(SubIfKernel):
    name = "ipvlan"
    kind = "ipvlan"
    kinds = ("ipvlan",)
    features = {"ipvlan": "CONFIG_IPVLAN (link kind ipvlan)"}
    # linux/if_link.h IPVLAN_MODE_*; "l3s" is only ever read (VNet does not make it)
    modes = {"l2": 0, "l3": 1, "l3s": 2}
    mode_format = "=H"
    probe_mode = "l2"


DRIVER = IpvlanKernel()
