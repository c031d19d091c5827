"""The plan: desired vs actual data-plane state -> ordered kernel operations (pure).

``plan(desired, actual, scope=None)`` looks at what the control plane wants on this
host (:class:`~vnet.core.dataplane_model.NodeDesired`) and what the kernel has
(:class:`~vnet.core.dataplane_model.NodeActual`, read by the netlink observer) and
returns a :class:`Plan`: the operations that close the gap, in the order they must
run, plus a planning error for each object that cannot be realised (the others
proceed). No I/O happens here, so every decision is unit-testable.

Properties the node worker relies on:

* **converged host -> empty plan**: a resync of an unchanged host performs no kernel
  write;
* **drift -> exactly the repair**: a missing veth is recreated with its addresses and
  routes, a missing address is added back, a link set down is set up again, a wrong
  default route is replaced — nothing else is touched;
* **teardown removes exactly what we made**: only interfaces whose names have our
  shapes (``vnb-…``, ``vne…``, see :mod:`vnet.core.naming`) are ever deleted; removing
  a host veth removes its container peer, that peer's addresses and routes with it;
* **limits are errors, not crashes**: a Linux bridge holds at most 1023 ports; the
  1024th endpoint of one bridge gets a ``limit_reached`` error and the rest proceed.

Order of a plan: teardown (stale veths, then stale bridges), host sysctls, networks
(bridge, its addresses), then endpoints one by one (veth created with its peer
directly in the container namespace, interface sysctls, addresses, link up), and
last the default routes to add (after every deletion, so a default route moving
from one interface to another never meets the old one). Each op names its *owner* (``net:<id>``, ``ep:<id>``, ``host``,
``link:<name>``) and, for an endpoint, the network it needs (``after``): the applier
skips the rest of an owner's ops once one fails, and an endpoint's ops when its
network failed.

Where things live: the op types in :mod:`vnet.core.planning.ops`, the checks in
:mod:`vnet.core.planning.checks`, the generic planner in
:mod:`vnet.core.planning.planner`, each driver's part in :mod:`vnet.core.drivers`
(reached through the registry). This module is the public face: :func:`plan`,
:func:`observation_targets` and the names callers import.
"""

from __future__ import annotations

from collections.abc import Iterable

from vnet.core import drivers
from vnet.core.dataplane_model import NodeActual, NodeDesired, Scope
from vnet.core.drivers.overlay import MAX_VNI, VXLAN_PORT
from vnet.core.planning.checks import Family
from vnet.core.planning.ops import (
    BRIDGE_MAX_PORTS,
    FORWARD4,
    FORWARD6,
    MAIN_TABLE,
    MAX_MTU,
    MIN_MTU,
    ROUTE_PROTO,
    WG_OWNER,
    AddAddr,
    AddFdb,
    AddNeigh,
    AddRoute,
    CreateSubIf,
    CreateVeth,
    DelAddr,
    DeleteLink,
    DelFdb,
    DelNeigh,
    DelRoute,
    Departed,
    EnsureBridge,
    EnsureVxlan,
    Op,
    Plan,
    PlanError,
    PlanOp,
    SetLink,
    SetSysctl,
    accept_dad_path,
    arp_notify_path,
    ep_owner,
    is_link_local,
    net_owner,
    normalize_cidr,
    op_writes,
    proxy_arp_path,
    proxy_delay_path,
)
from vnet.core.planning.planner import Planner, observation_targets, table_targets

# Kept for callers written before the registry (the reconciler's sub-interface ledger);
# both are read from the registry, so a new driver is counted without an edit here.
BRIDGED = frozenset(d.name for d in drivers.all_drivers() if d.bridged)
SUBIF = frozenset(d.name for d in drivers.all_drivers() if d.subif_kind is not None)

__all__ = [
    "BRIDGED",
    "BRIDGE_MAX_PORTS",
    "FORWARD4",
    "FORWARD6",
    "MAIN_TABLE",
    "MAX_MTU",
    "MAX_VNI",
    "MIN_MTU",
    "ROUTE_PROTO",
    "SUBIF",
    "VXLAN_PORT",
    "WG_OWNER",
    "AddAddr",
    "AddFdb",
    "AddNeigh",
    "AddRoute",
    "CreateSubIf",
    "CreateVeth",
    "DelAddr",
    "DelFdb",
    "DelNeigh",
    "DelRoute",
    "DeleteLink",
    "Departed",
    "EnsureBridge",
    "EnsureVxlan",
    "Family",
    "Op",
    "Plan",
    "PlanError",
    "PlanOp",
    "SetLink",
    "SetSysctl",
    "accept_dad_path",
    "arp_notify_path",
    "ep_owner",
    "is_link_local",
    "net_owner",
    "normalize_cidr",
    "observation_targets",
    "op_writes",
    "plan",
    "proxy_arp_path",
    "proxy_delay_path",
    "table_targets",
]


def plan(desired: NodeDesired, actual: NodeActual, scope: Scope | None = None,
         departed: Iterable[Departed] = ()) -> Plan:
    """Ordered operations that turn ``actual`` into ``desired`` (see the module doc).

    ``departed``: sub-interface endpoints (macvlan/ipvlan) the caller saw desired
    before and that are gone now; their interfaces are removed from their containers.
    """
    return Planner(desired, actual, scope, departed).run()
