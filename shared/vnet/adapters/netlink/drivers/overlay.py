"""Kernel side of the overlay driver: link kind ``vxlan`` (its ``IFLA_INFO_DATA``).

The bridge and veths of an overlay network are the bridge driver's; the FDB and
neighbour entries are generic ops of the applier.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from vnet.adapters.netlink.drivers.base import KernelDriver, Prober
from vnet.adapters.netlink.drivers.wire import link_msg
from vnet.adapters.netlink.nsctx import nla, nla_u32
from vnet.core.planning.ops import EnsureVxlan, PlanOp

if TYPE_CHECKING:
    from vnet.adapters.netlink.observe import RawLink

IFLA_VXLAN_ID = 1
IFLA_VXLAN_LINK = 3
IFLA_VXLAN_LOCAL = 4
IFLA_VXLAN_LEARNING = 7
IFLA_VXLAN_PROXY = 11
IFLA_VXLAN_PORT = 15
IFLA_VXLAN_LOCAL6 = 17
_U32 = struct.Struct("=I")


class OverlayKernel(KernelDriver):
    name = "overlay"
    kinds = ("vxlan",)
    features = {"vxlan": "CONFIG_VXLAN (link kind vxlan)"}

    def probe(self, p: Prober) -> None:
        p.attempt("vxlan", f"{p.prefix}-vx", lambda: link_msg("vxlan", f"{p.prefix}-vx",
                                                              data=[("IFLA_VXLAN_ID", 4242),
                                                                    ("IFLA_VXLAN_PORT", 4789)]))

    def info_data(self, op: PlanOp, index: Callable[[str], int]) -> bytes:
        """VNI, source ``local`` bound to ``dev``, UDP port, ``nolearning`` and ``proxy``."""
        if not isinstance(op, EnsureVxlan):
            raise ValueError(f"the overlay driver makes VXLAN devices only, not {op.op_name()}")
        local = ipaddress.ip_address(op.local)
        return (nla_u32(IFLA_VXLAN_ID, op.vni) + nla_u32(IFLA_VXLAN_LINK, index(op.dev))
                + nla(IFLA_VXLAN_LOCAL if local.version == 4 else IFLA_VXLAN_LOCAL6, local.packed)
                + nla(IFLA_VXLAN_LEARNING, b"\0") + nla(IFLA_VXLAN_PROXY, b"\1")
                + nla(IFLA_VXLAN_PORT, struct.pack("!H", op.port)))

    def parse_attr(self, r: RawLink, t: int, buf: bytes, a: int, b: int) -> None:
        if t == IFLA_VXLAN_ID:
            (r.vni,) = _U32.unpack_from(buf, a)
        elif t == IFLA_VXLAN_LINK:
            (r.vxlan_link,) = _U32.unpack_from(buf, a)
        elif t in (IFLA_VXLAN_LOCAL, IFLA_VXLAN_LOCAL6) and b - a in (4, 16):
            r.vxlan_local = str(ipaddress.ip_address(buf[a:b]))
        elif t == IFLA_VXLAN_LEARNING:
            r.vxlan_learning = bool(buf[a])
        elif t == IFLA_VXLAN_PROXY:
            r.vxlan_proxy = bool(buf[a])
        elif t == IFLA_VXLAN_PORT:
            (r.vxlan_port,) = struct.unpack_from("!H", buf, a)


DRIVER = OverlayKernel()
