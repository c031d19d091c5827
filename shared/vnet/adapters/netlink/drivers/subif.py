"""What the kernel sides of macvlan and ipvlan share: a mode attribute, one mode map.

Each of :mod:`.macvlan` and :mod:`.ipvlan` gives its kind, its mode attribute's
width and its map of mode names to the kernel's numbers — the one copy of it: the
applier encodes with it, the observer decodes with its inverse.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from vnet.adapters.netlink.drivers.base import KernelDriver, Prober
from vnet.adapters.netlink.drivers.wire import link_msg
from vnet.adapters.netlink.nsctx import nla
from vnet.core.planning.ops import CreateSubIf, PlanOp

if TYPE_CHECKING:
    from vnet.adapters.netlink.observe import RawLink

IFLA_SUBIF_MODE = 1  # IFLA_MACVLAN_MODE and IFLA_IPVLAN_MODE are both attribute 1


class SubIfKernel(KernelDriver):
    kind: ClassVar[str]
    modes: ClassVar[dict[str, int]]  # mode name -> the kernel's number
    mode_format: ClassVar[str]  # struct format of the mode attribute ("=I" macvlan, "=H" ipvlan)
    probe_mode: ClassVar[str]

    def probe(self, p: Prober) -> None:
        parent = p.parent()
        if parent is None:
            p.skip(self.kind, "no veth to use as parent: cannot test")
            return
        name = f"{p.prefix}-{self.kind[:3]}"
        attr = f"IFLA_{self.kind.upper()}_MODE"
        mode = self.modes[self.probe_mode]
        p.attempt(self.kind, name, lambda: link_msg(self.kind, name, link=parent, data=[(attr, mode)]))

    def info_data(self, op: PlanOp, index: Callable[[str], int]) -> bytes:
        if not isinstance(op, CreateSubIf) or op.kind != self.kind:
            raise ValueError(f"the {self.name} driver makes {self.kind} links only, not {op.op_name()}")
        return nla(IFLA_SUBIF_MODE, struct.pack(self.mode_format, self.modes[op.mode]))

    def parse_attr(self, r: RawLink, t: int, buf: bytes, a: int, b: int) -> None:
        if t == IFLA_SUBIF_MODE:
            (mode,) = struct.unpack_from(self.mode_format, buf, a)
            r.sub_mode = self.mode_names().get(mode, str(mode))

    @classmethod
    def mode_names(cls) -> dict[int, str]:
        return {v: k for k, v in cls.modes.items()}
