"""A trivial driver that lives only in the tests: proof that a driver plugs in from one
module without an edit anywhere else (docs/drivers.md walks through the same steps).

``dummy``: each network gets a Linux bridge on the host carrying its gateway address,
and nothing else (no endpoint interfaces: containers of a dummy network are recorded
only). It takes one option, ``mtu``, and refuses an MTU above 9000 on the node.
Its kernel half brings the ``dummy`` link kind (the probe tries one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vnet.adapters.netlink.drivers import KernelDriver, Prober
from vnet.adapters.netlink.drivers.wire import link_msg
from vnet.core import errors as E
from vnet.core import naming
from vnet.core.dataplane_model import NetDesired, NodeDesired, NsState
from vnet.core.drivers import Driver
from vnet.core.drivers.base import MTU
from vnet.core.planning.checks import EpView, Invalid, NetView
from vnet.core.planning.ops import AddAddr, EnsureBridge, PlanOp, net_owner

if TYPE_CHECKING:
    from vnet.adapters.netlink.observe import RawLink
    from vnet.core.planning.planner import Planner

NAME = "dummy"
MAX_MTU = 9000


class DummyDriver(Driver):
    name = NAME
    description = "a bridge per network with its gateway, no endpoint interfaces (tests only)"
    options = (MTU,)
    kernel_kinds = ("bridge", "dummy")

    def validate(self, net: NetView, desired: NodeDesired) -> None:
        if net.d.mtu > MAX_MTU:
            raise Invalid(E.INVALID_OPTION, f"dummy network {net.d.id}: mtu {net.d.mtu} is above {MAX_MTU}")

    def plan_network(self, p: Planner, net: NetView) -> None:
        owner = net_owner(net.d.id)
        link = p.host.links.get(net.bridge)
        want = [a for a in (net.gw4, net.gw6) if a is not None]
        if link is None:
            p.ops.append(EnsureBridge(owner=owner, name=net.bridge, mac=naming.bridge_mac(net.d.id), mtu=net.d.mtu))
            p.ops.extend(AddAddr(owner=owner, ifname=net.bridge, cidr=a, nodad=":" in a) for a in want)
            return
        p.addrs(owner, None, net.bridge, link, want)

    def plan_endpoint(self, p: Planner, ep: EpView, cns: NsState, ours: set[str]) -> None:
        return None  # container_iface is False: never called

    def observe(self, nd: NetDesired, desired: NodeDesired) -> set[str]:
        return set()

    def teardown(self, network_id: str) -> tuple[str, ...]:
        return (naming.bridge_name(network_id),)

    def wanted_links(self, nd: NetDesired) -> set[str]:
        return {naming.bridge_name(nd.id)}


class DummyKernel(KernelDriver):
    name = NAME
    kinds = ("dummy",)
    features = {"dummy": "CONFIG_DUMMY (link kind dummy)"}

    def probe(self, p: Prober) -> None:
        p.attempt("dummy", f"{p.prefix}-dm", lambda: link_msg("dummy", f"{p.prefix}-dm"))

    def info_data(self, op: PlanOp, index: Callable[[str], int]) -> bytes:
        return b""  # a dummy link has no kind data

    def parse_attr(self, r: RawLink, t: int, buf: bytes, a: int, b: int) -> None:
        return None


DRIVER = DummyDriver()
KERNEL = DummyKernel()
