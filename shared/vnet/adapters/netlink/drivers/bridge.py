"""Kernel side of the bridge driver: link kinds ``bridge`` and ``veth``.

Neither carries kind data VNet sets or reads, so only the probe is particular here;
the bridge and veth requests themselves are built by the applier (``ensure_bridge``,
``create_veth``), since the overlay driver uses them too.
"""

from __future__ import annotations

from vnet.adapters.netlink.drivers.base import NoKernelData, Prober
from vnet.adapters.netlink.drivers.wire import link_msg


class BridgeKernel(NoKernelData):
    name = "bridge"
    kinds = ("bridge", "veth")

    def probe(self, p: Prober) -> None:
        p.attempt("bridge", f"{p.prefix}-br", lambda: link_msg("bridge", f"{p.prefix}-br"))
        p.attempt("veth", f"{p.prefix}-va", lambda: link_msg("veth", f"{p.prefix}-va", peer=f"{p.prefix}-vb"))


DRIVER = BridgeKernel()
