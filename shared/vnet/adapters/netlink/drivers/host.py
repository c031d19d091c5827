"""Kernel side of the host driver: nothing (the container shares the host's namespace)."""

from __future__ import annotations

from vnet.adapters.netlink.drivers.base import NoKernelData, Prober


class HostKernel(NoKernelData):
    name = "host"
    kinds = ()

    def probe(self, p: Prober) -> None:
        return None  # needs nothing from the kernel


DRIVER = HostKernel()
