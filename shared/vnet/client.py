"""``VNetManager``: the Python API of the module description, over NATS.

::

    from vnet import VNetManager, VNetConfig

    async with VNetManager(VNetConfig.load()) as vnet:
        print(await vnet.services())

Methods are coroutines; the manager connects on first use. Errors raise the
:class:`vnet.VNetError` subclasses (see the ``vnet`` module docstring).
"""

from __future__ import annotations

from vnet.api.base import ClientBase, ServiceStatus
from vnet.api.endpoint import EndpointAPI
from vnet.api.ipam import IpamAPI
from vnet.api.network import NetworkAPI
from vnet.api.policy import PolicyAPI

__all__ = ["ClientBase", "ServiceStatus", "VNetManager"]


class VNetManager(NetworkAPI, IpamAPI, EndpointAPI, PolicyAPI, ClientBase):
    """Client of the VNet services (module description's ``VNetManager``).

    One mixin per service (``vnet.api.*``); all share :class:`ClientBase`.
    """
