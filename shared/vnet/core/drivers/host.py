"""The host driver: the container shares the host's network namespace (pure).

Nothing is created, observed or torn down; an endpoint is recorded and reported
ready. Every method of the interface is here anyway, so the registry can treat all
drivers alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vnet.core.dataplane_model import NetDesired, NodeDesired, NsState
from vnet.core.drivers.base import Driver

if TYPE_CHECKING:
    from vnet.core.planning.checks import EpView, NetView
    from vnet.core.planning.planner import Planner


class HostDriver(Driver):
    name = "host"
    description = "the container shares the host's network namespace"
    options = ()
    kernel_kinds = ()
    realised = False

    def validate(self, net: NetView, desired: NodeDesired) -> None:
        return None  # no MTU, no gateway: nothing of the network is made on the node

    def plan_network(self, p: Planner, net: NetView) -> None:
        return None

    def plan_endpoint(self, p: Planner, ep: EpView, cns: NsState, ours: set[str]) -> None:
        return None  # never called: container_iface is False

    def observe(self, nd: NetDesired, desired: NodeDesired) -> set[str]:
        return set()

    def teardown(self, network_id: str) -> tuple[str, ...]:
        return ()

    def wanted_links(self, nd: NetDesired) -> set[str]:
        return set()


DRIVER = HostDriver()
