"""The kernel side of the node worker's data plane (rtnetlink through pyroute2 messages).

* :mod:`.nsctx` — namespace-bound netlink sockets opened without forking (setns in one
  dedicated thread), cached per namespace; sysctls written inside a namespace;
* :mod:`.observe` — read links, addresses, routes and sysctls into
  :class:`~vnet.core.dataplane_model.NodeActual`;
* :mod:`.apply` — execute :mod:`vnet.core.plan` operations idempotently, one span and
  a counted kernel write each;
* :mod:`.probe` — which link kinds and drivers this kernel really supports.

The reconciler that ties them together is ``vnet.svc.node.reconcile.Reconciler``;
``docs/dataplane.md`` explains the whole path.
"""

from vnet.adapters.netlink.apply import Applier
from vnet.adapters.netlink.nsctx import NamespaceGone, NetlinkError, NsContext, NsWorker
from vnet.adapters.netlink.observe import Observer
from vnet.adapters.netlink.probe import probe

__all__ = ["Applier", "NamespaceGone", "NetlinkError", "NsContext", "NsWorker", "Observer", "probe"]
